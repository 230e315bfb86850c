//! The VM's validated configuration, and the parsers for its command-line values.
//!
//! Everything a user types is checked here, once, so that the rest of the VMM can rely
//! on a consistent layout: node ids are 0..n, every vCPU belongs to exactly one node,
//! and memory sizes are whole 2 MiB pages.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

pub use virtio_blk::DiskConfig;

/// Granularity of guest memory: one x86_64 huge page, which is also virtio-mem's block size.
pub const MEMORY_ALIGNMENT: u64 = 2 << 20;
/// A Linux memory block on x86_64: the smallest region, and the default (`region=`).
/// Every evacuation region is made of whole guest memory blocks.
pub const MIN_REGION_SIZE: u64 = 128 << 20;
pub const DEFAULT_REGION_SIZE: u64 = MIN_REGION_SIZE;
/// The largest memory block Linux picks on x86_64, and the largest region.
pub const MAX_REGION_SIZE: u64 = 2 << 30;
/// A node's hotplug region may be this large, and no larger.
pub const MAX_HOTPLUG_SIZE: u64 = 1 << 40;
const _: () = assert!(
    MAX_HOTPLUG_SIZE / MIN_REGION_SIZE <= mempower_api::MAX_EVACUATION_REGIONS as u64,
    "the API takes an evacuation of every region of the largest node"
);
/// More vCPUs would need x2APIC MADT entries (APIC ids of 255 and above).
pub const MAX_VCPUS: u32 = 254;
/// The guest kernel image alone needs more than this.
pub const MIN_TOTAL_MEMORY: u64 = 64 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error(
        "invalid size '{0}': expected a number with an optional unit K, M, G or T (e.g. 256M)"
    )]
    BadSize(String),
    #[error("unknown unit '{unit}' in size '{value}': use K, M, G or T")]
    UnknownUnit { value: String, unit: String },
    #[error("size '{0}' is too large")]
    SizeOverflow(String),
    #[error("memory size {0} is not a multiple of 2 MiB")]
    Unaligned(String),
    #[error("hotplug size {0} is not a multiple of 128 MiB (one Linux memory block)")]
    HotplugUnaligned(String),
    #[error("hotplug size {0} is above the limit of 1 TiB per node")]
    HotplugTooLarge(String),
    #[error("region size '{0}' must be one of 128M, 256M, 512M, 1G, 2G")]
    BadRegionSize(String),
    #[error("hotplug size {hotplug} is not a multiple of the region size {region}")]
    HotplugNotWholeRegions { hotplug: String, region: String },
    #[error(
        "the hotplug regions need {needed} KVM memory slots (one per region, plus \
         {other} for boot memory) but this host's KVM has {available}: use coarser regions, \
         e.g. region={suggestion} in --numa"
    )]
    TooManyMemslots {
        needed: u64,
        other: u64,
        available: u64,
        suggestion: String,
    },
    #[error("requested size {requested} is above the hotplug size {hotplug}")]
    RequestedTooLarge { requested: String, hotplug: String },
    #[error("invalid CPU list '{0}': expected e.g. 0-3 or [0-1,4]")]
    BadCpuList(String),
    /// clap prefixes the offending `--numa` value, so only the reason is said here.
    #[error("{0}")]
    BadNuma(String),
    #[error("NUMA node {0} is given twice")]
    DuplicateNode(u32),
    #[error("NUMA node ids must be 0..{count} without gaps, but node {missing} is missing")]
    NodeGap { count: usize, missing: u32 },
    #[error("vCPU {cpu} is given to both node {first} and node {second}")]
    OverlappingCpus { cpu: u32, first: u32, second: u32 },
    #[error("vCPUs must be numbered 0..{count} without gaps, but vCPU {missing} is in no node")]
    CpuGap { count: usize, missing: u32 },
    #[error("at least one vCPU is needed")]
    NoCpus,
    #[error("{0} vCPUs requested, at most {MAX_VCPUS} are supported")]
    TooManyCpus(usize),
    #[error("total memory {0} MiB is below the minimum of 64 MiB")]
    TooLittleMemory(u64),
    /// clap prefixes the offending `--balloon` value, so only the reason is said here.
    #[error("{0}")]
    BadBalloon(String),
    #[error("balloon size {size} is above the guest's {ram_mib} MiB of memory at boot")]
    BalloonTooLarge { size: String, ram_mib: u64 },
    #[error("--numa node={node}: host-node={host}: {reason}")]
    HostNode {
        node: u32,
        host: u32,
        reason: String,
    },
    #[error("{what} '{path}': {reason}")]
    BadFile {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    /// clap prefixes the offending `--disk` value, so only the reason is said here.
    #[error("{0}")]
    BadDisk(String),
    #[error("disk '{0}' is given twice")]
    DuplicateDisk(PathBuf),
    #[error("disk id '{0}' is given twice")]
    DuplicateDiskId(String),
    /// clap prefixes the offending `--autopilot` value, so only the reason is said here.
    #[error("{0}")]
    BadAutopilot(String),
    #[error("--autopilot node={0}: {1}")]
    AutopilotNode(u32, &'static str),
    #[error("{disks} disks and {others} other virtio devices (virtio-mem per hotplug region, vsock, balloon) need {needed} virtio-mmio slots, only {max} exist")]
    TooManyDevices {
        disks: usize,
        others: usize,
        needed: usize,
        max: usize,
    },
}

/// Parses a size such as `256M`, `1G`, `512MiB` or `4096` (bytes). Units are binary.
pub fn parse_size(value: &str) -> Result<u64, ConfigError> {
    let s = value.trim();
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(digits_end);
    if number.is_empty() {
        return Err(ConfigError::BadSize(value.to_string()));
    }
    let number: u64 = number
        .parse()
        .map_err(|_| ConfigError::SizeOverflow(value.to_string()))?;
    let shift = match unit.trim() {
        "" | "B" => 0,
        "K" | "KiB" | "k" => 10,
        "M" | "MiB" => 20,
        "G" | "GiB" => 30,
        "T" | "TiB" => 40,
        other => {
            return Err(ConfigError::UnknownUnit {
                value: value.to_string(),
                unit: other.to_string(),
            })
        }
    };
    number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| ConfigError::SizeOverflow(value.to_string()))
}

/// Parses a memory size that must be a positive multiple of 2 MiB.
pub fn parse_memory_size(value: &str) -> Result<u64, ConfigError> {
    let size = parse_size(value)?;
    if size == 0 || size % MEMORY_ALIGNMENT != 0 {
        return Err(ConfigError::Unaligned(value.to_string()));
    }
    Ok(size)
}

/// Parses `3`, `0-3`, or a bracketed list such as `[0-1,4,6-7]`.
pub fn parse_cpu_list(value: &str) -> Result<Vec<u32>, ConfigError> {
    let bad = || ConfigError::BadCpuList(value.to_string());
    let inner = match value.strip_prefix('[') {
        Some(rest) => rest.strip_suffix(']').ok_or_else(bad)?,
        None => value,
    };
    let mut cpus = BTreeSet::new();
    for part in inner.split(',') {
        let (lo, hi) = match part.split_once('-') {
            Some((lo, hi)) => (lo, hi),
            None => (part, part),
        };
        let lo: u32 = lo.trim().parse().map_err(|_| bad())?;
        let hi: u32 = hi.trim().parse().map_err(|_| bad())?;
        if lo > hi || hi >= MAX_VCPUS {
            return Err(bad());
        }
        cpus.extend(lo..=hi);
    }
    Ok(cpus.into_iter().collect())
}

/// Parses a hotplug region size: whole 128 MiB blocks, possibly none, at most 1 TiB.
pub fn parse_hotplug_size(value: &str) -> Result<u64, ConfigError> {
    let size = parse_size(value)?;
    if size % MIN_REGION_SIZE != 0 {
        return Err(ConfigError::HotplugUnaligned(value.to_string()));
    }
    if size > MAX_HOTPLUG_SIZE {
        return Err(ConfigError::HotplugTooLarge(value.to_string()));
    }
    Ok(size)
}

/// Parses a region size: a power of two from 128 MiB to 2 GiB.
pub fn parse_region_size(value: &str) -> Result<u64, ConfigError> {
    match parse_size(value) {
        Ok(size)
            if size.is_power_of_two() && (MIN_REGION_SIZE..=MAX_REGION_SIZE).contains(&size) =>
        {
            Ok(size)
        }
        _ => Err(ConfigError::BadRegionSize(value.to_string())),
    }
}

/// Checks that one KVM memory slot per region, plus `other` for boot memory, fits
/// the `available` slots (`KVM_CAP_NR_MEMSLOTS`); if not, the error names the
/// smallest region size that would fit.
pub fn check_memslots(nodes: &[NodeConfig], other: u64, available: u64) -> Result<(), ConfigError> {
    let slots = |region_size: Option<u64>| -> u64 {
        nodes
            .iter()
            .map(|n| n.hotplug / region_size.unwrap_or(n.region_size).max(n.region_size))
            .sum::<u64>()
            + other
    };
    let needed = slots(None);
    if needed <= available {
        return Ok(());
    }
    let mut suggestion = MIN_REGION_SIZE;
    while suggestion < MAX_REGION_SIZE && slots(Some(suggestion)) > available {
        suggestion *= 2;
    }
    Err(ConfigError::TooManyMemslots {
        needed,
        other,
        available,
        suggestion: match suggestion {
            s if s >= 1 << 30 => format!("{}G", s >> 30),
            s => format!("{}M", s >> 20),
        },
    })
}

/// One `--numa` value:
/// `node=N,cpus=LIST,memory=SIZE[,hotplug=SIZE[,requested=SIZE][,region=SIZE]]`
/// `[,host-node=H][,hugepages=on|off]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    pub id: u32,
    pub cpus: Vec<u32>,
    pub memory: u64,
    /// Size of the node's virtio-mem region (0: none).
    pub hotplug: u64,
    /// How much of it the guest is asked to plug at boot.
    pub requested: u64,
    /// The regions evacuation cuts the hotplug region into.
    pub region_size: u64,
    /// The host node whose memory and CPUs this node uses (`host-node=`).
    pub host_node: Option<u32>,
    /// 2 MiB hugetlbfs pages for all of the node's memory (`hugepages=on`).
    pub hugepages: bool,
}

impl Default for NodeSpec {
    fn default() -> Self {
        NodeSpec {
            id: 0,
            cpus: Vec::new(),
            memory: 0,
            hotplug: 0,
            requested: 0,
            region_size: DEFAULT_REGION_SIZE,
            host_node: None,
            hugepages: false,
        }
    }
}

/// Parses `on` or `off`; the error names the key and the value.
fn parse_switch(key: &str, value: &str) -> Result<bool, String> {
    match value {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("{key}='{value}': expected on or off")),
    }
}

/// Splits on commas that are not inside brackets, so that `cpus=[0,2]` stays whole.
fn split_top_level(spec: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0i32, 0usize);
    for (i, c) in spec.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&spec[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&spec[start..]);
    parts
}

impl std::str::FromStr for NodeSpec {
    type Err = ConfigError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let bad = ConfigError::BadNuma;
        let (mut id, mut cpus, mut memory) = (None, None, None);
        // (bytes, as typed) so that errors quote the user's own words.
        let mut hotplug: Option<(u64, &str)> = None;
        let mut requested: Option<(u64, &str)> = None;
        let mut region: Option<(u64, &str)> = None;
        let (mut host_node, mut hugepages) = (None, None);
        for part in split_top_level(spec) {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| bad(format!("'{part}' is not key=value")))?;
            let duplicate = match key {
                "node" => id
                    .replace(
                        value
                            .parse::<u32>()
                            .map_err(|_| bad(format!("node id '{value}' is not a number")))?,
                    )
                    .is_some(),
                "cpus" => cpus
                    .replace(parse_cpu_list(value).map_err(|e| bad(e.to_string()))?)
                    .is_some(),
                "memory" => memory
                    .replace(parse_memory_size(value).map_err(|e| bad(e.to_string()))?)
                    .is_some(),
                "hotplug" => hotplug
                    .replace((
                        parse_hotplug_size(value).map_err(|e| bad(e.to_string()))?,
                        value,
                    ))
                    .is_some(),
                "requested" => {
                    let size = parse_size(value).map_err(|e| bad(e.to_string()))?;
                    if size % MEMORY_ALIGNMENT != 0 {
                        return Err(bad(ConfigError::Unaligned(value.to_string()).to_string()));
                    }
                    requested.replace((size, value)).is_some()
                }
                "region" => region
                    .replace((
                        parse_region_size(value).map_err(|e| bad(e.to_string()))?,
                        value,
                    ))
                    .is_some(),
                "host-node" => host_node
                    .replace(
                        value
                            .parse::<u32>()
                            .map_err(|_| bad(format!("host node '{value}' is not a number")))?,
                    )
                    .is_some(),
                "hugepages" => hugepages
                    .replace(parse_switch(key, value).map_err(ConfigError::BadNuma)?)
                    .is_some(),
                other => {
                    return Err(bad(format!(
                        "unknown key '{other}' (expected node, cpus, memory, hotplug, \
                         requested, region, host-node, hugepages)"
                    )))
                }
            };
            if duplicate {
                return Err(bad(format!("'{key}' is given twice")));
            }
        }
        let (hotplug, hotplug_text) = hotplug.unwrap_or((0, "0"));
        let requested = match requested {
            Some((size, text)) if size > hotplug => {
                return Err(bad(ConfigError::RequestedTooLarge {
                    requested: text.to_string(),
                    hotplug: hotplug_text.to_string(),
                }
                .to_string()))
            }
            Some((size, _)) => size,
            None => 0,
        };
        let (region_size, region_text) = region.unwrap_or((DEFAULT_REGION_SIZE, "128M"));
        if hotplug % region_size != 0 {
            return Err(bad(ConfigError::HotplugNotWholeRegions {
                hotplug: hotplug_text.to_string(),
                region: region_text.to_string(),
            }
            .to_string()));
        }
        Ok(NodeSpec {
            id: id.ok_or_else(|| bad("missing node=N".into()))?,
            cpus: cpus.unwrap_or_default(),
            memory: memory.ok_or_else(|| bad("missing memory=SIZE".into()))?,
            hotplug,
            requested,
            region_size,
            host_node,
            hugepages: hugepages.unwrap_or(false),
        })
    }
}

/// Parses one `--disk` value: `path=IMG[,readonly=on|off][,id=NAME]`. The image path
/// cannot contain a comma.
pub fn parse_disk(spec: &str) -> Result<DiskConfig, ConfigError> {
    let bad = ConfigError::BadDisk;
    let (mut path, mut readonly, mut id) = (None, None, None);
    for part in spec.split(',') {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| bad(format!("'{part}' is not key=value")))?;
        let duplicate = match key {
            "path" if value.is_empty() => return Err(bad("path is empty".into())),
            "path" => path.replace(PathBuf::from(value)).is_some(),
            "readonly" => {
                let on = match value {
                    "on" | "true" | "yes" => true,
                    "off" | "false" | "no" => false,
                    _ => return Err(bad(format!("readonly '{value}' is not on or off"))),
                };
                readonly.replace(on).is_some()
            }
            "id" => {
                virtio_blk::DiskId::new(value).map_err(|e| bad(e.to_string()))?;
                id.replace(value.to_string()).is_some()
            }
            other => {
                return Err(bad(format!(
                    "unknown key '{other}' (expected path, readonly, id)"
                )))
            }
        };
        if duplicate {
            return Err(bad(format!("'{key}' is given twice")));
        }
    }
    Ok(DiskConfig {
        readonly: readonly.unwrap_or(false),
        id,
        ..DiskConfig::new(path.ok_or_else(|| bad("missing path=IMG".into()))?)
    })
}

/// Checks the disks against each other and the virtio-mmio slots left by the `others`
/// virtio devices (virtio-mem, vsock, balloon), and that each image opens as asked.
pub fn validate_disks(disks: &[DiskConfig], others: usize) -> Result<(), ConfigError> {
    let needed = disks.len() + others;
    if needed > crate::layout::VIRTIO_MAX_DEVICES {
        return Err(ConfigError::TooManyDevices {
            disks: disks.len(),
            others,
            needed,
            max: crate::layout::VIRTIO_MAX_DEVICES,
        });
    }
    let mut paths = BTreeSet::new();
    let mut ids = BTreeSet::new();
    for disk in disks {
        let fail = |reason: String| ConfigError::BadFile {
            what: "disk",
            path: disk.path.clone(),
            reason,
        };
        let meta = std::fs::metadata(&disk.path).map_err(|e| fail(e.to_string()))?;
        use std::os::unix::fs::FileTypeExt;
        if !meta.is_file() && !meta.file_type().is_block_device() {
            return Err(fail("not a regular file or block device".into()));
        }
        std::fs::OpenOptions::new()
            .read(true)
            .write(!disk.readonly)
            .open(&disk.path)
            .map_err(|e| fail(e.to_string()))?;
        let canonical = disk.path.canonicalize().map_err(|e| fail(e.to_string()))?;
        if !paths.insert(canonical) {
            return Err(ConfigError::DuplicateDisk(disk.path.clone()));
        }
        if let Some(id) = &disk.id {
            if !ids.insert(id.clone()) {
                return Err(ConfigError::DuplicateDiskId(id.clone()));
            }
        }
    }
    Ok(())
}

/// A virtual NUMA node: its vCPUs, its boot memory and its hotplug region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    pub id: u32,
    pub cpus: Vec<u32>,
    pub memory: u64,
    pub hotplug: u64,
    pub requested: u64,
    /// Bytes per evacuation region of the hotplug region: the one place that says it
    /// (the layout aligns the hotplug base to it, evacuation cuts regions by it).
    pub region_size: u64,
    /// The host node the node's memory is bound to and its threads run on.
    pub host_node: Option<u32>,
    /// Whether the node's memory is 2 MiB hugetlbfs pages.
    pub hugepages: bool,
}

impl From<NodeSpec> for NodeConfig {
    fn from(s: NodeSpec) -> Self {
        NodeConfig {
            id: s.id,
            cpus: s.cpus,
            memory: s.memory,
            hotplug: s.hotplug,
            requested: s.requested,
            region_size: s.region_size,
            host_node: s.host_node,
            hugepages: s.hugepages,
        }
    }
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeSpec::default().into()
    }
}

/// The whole, validated VM configuration.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initramfs: Option<PathBuf>,
    pub cmdline_extra: Option<String>,
    /// Sorted by node id; ids are 0..nodes.len().
    pub nodes: Vec<NodeConfig>,
    pub api_socket: Option<PathBuf>,
    /// Host programs reach guest vsock ports through this Unix socket (`CONNECT <port>`).
    pub vsock_socket: Option<PathBuf>,
    pub console_log: Option<PathBuf>,
    /// virtio-blk disks, in `--disk` order (the guest's vda, vdb, ...).
    pub disks: Vec<DiskConfig>,
    /// A virtio-balloon device, if asked for.
    pub balloon: Option<BalloonSpec>,
    /// `--autopilot`, in order (checked against the nodes: `autopilot::plan`).
    pub autopilot: Vec<AutopilotSpec>,
}

impl VmConfig {
    pub fn vcpu_count(&self) -> u32 {
        self.nodes.iter().map(|n| n.cpus.len() as u32).sum()
    }

    /// The node that owns `cpu`. Validation guarantees there is exactly one.
    pub fn node_of_cpu(&self, cpu: u32) -> Option<u32> {
        self.nodes
            .iter()
            .find(|n| n.cpus.contains(&cpu))
            .map(|n| n.id)
    }
}

/// Checks that the node specs form one consistent machine, and sorts them by id.
pub fn validate_nodes(mut specs: Vec<NodeSpec>) -> Result<Vec<NodeConfig>, ConfigError> {
    if specs.is_empty() {
        specs.push(NodeSpec {
            id: 0,
            cpus: vec![0],
            memory: 256 << 20,
            ..Default::default()
        });
    }
    specs.sort_by_key(|s| s.id);
    for pair in specs.windows(2) {
        if pair[0].id == pair[1].id {
            return Err(ConfigError::DuplicateNode(pair[0].id));
        }
    }
    for (expected, spec) in specs.iter().enumerate() {
        if spec.id != expected as u32 {
            return Err(ConfigError::NodeGap {
                count: specs.len(),
                missing: expected as u32,
            });
        }
    }
    let mut owner = std::collections::BTreeMap::new();
    for spec in &specs {
        for &cpu in &spec.cpus {
            if let Some(first) = owner.insert(cpu, spec.id) {
                return Err(ConfigError::OverlappingCpus {
                    cpu,
                    first,
                    second: spec.id,
                });
            }
        }
    }
    if owner.is_empty() {
        return Err(ConfigError::NoCpus);
    }
    if owner.len() > MAX_VCPUS as usize {
        return Err(ConfigError::TooManyCpus(owner.len()));
    }
    for (expected, &cpu) in owner.keys().enumerate() {
        if cpu != expected as u32 {
            return Err(ConfigError::CpuGap {
                count: owner.len(),
                missing: expected as u32,
            });
        }
    }
    let total: u64 = specs.iter().map(|s| s.memory).sum();
    if total < MIN_TOTAL_MEMORY {
        return Err(ConfigError::TooLittleMemory(total >> 20));
    }
    Ok(specs.into_iter().map(NodeConfig::from).collect())
}

/// The balloon's page size: targets are whole 4 KiB pages.
pub const BALLOON_PAGE: u64 = 4096;
/// The longest stats polling interval, a day: anything longer is a typo.
pub const MAX_STATS_INTERVAL: Duration = Duration::from_secs(24 * 3600);

/// One `--balloon` value:
/// `size=SIZE,free_page_reporting=on|off,stats=DURATION|off,deflate_on_oom=on|off`, every
/// key optional (a balloon of size 0 with every feature off).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BalloonSpec {
    /// The initial target: memory the guest is asked to give up from boot on.
    pub size: u64,
    pub free_page_reporting: bool,
    /// How often the host asks for the guest's memory statistics (`None`: no stats queue).
    pub stats: Option<Duration>,
    pub deflate_on_oom: bool,
}

/// Parses a duration such as `500ms`, `5s` or `2m`, more than 0 and at most `max`
/// (`max_words` in the error); the error says why not (the caller names the key).
pub fn parse_duration(value: &str, max: Duration, max_words: &str) -> Result<Duration, String> {
    let digits_end = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (number, unit) = value.split_at(digits_end);
    let number: u64 = number.parse().map_err(|_| "not a duration")?;
    let d = match unit {
        "ms" => Duration::from_millis(number),
        "s" => Duration::from_secs(number),
        "m" => Duration::from_secs(number.saturating_mul(60)),
        "" => return Err("the unit is missing".into()),
        _ => return Err("unknown unit".into()),
    };
    match d {
        d if d.is_zero() => Err("must be more than 0".into()),
        d if d > max => Err(format!("longer than {max_words}")),
        d => Ok(d),
    }
}

/// Parses a polling interval such as `5s`, `500ms` or `2m`; `off` is none.
pub fn parse_interval(value: &str) -> Result<Option<Duration>, ConfigError> {
    if value == "off" {
        return Ok(None);
    }
    let interval = parse_duration(value, MAX_STATS_INTERVAL, "a day").map_err(|why| {
        ConfigError::BadBalloon(format!(
            "stats='{value}': {why} (e.g. 5s, 500ms, 2m or off)"
        ))
    })?;
    Ok(Some(interval))
}

impl std::str::FromStr for BalloonSpec {
    type Err = ConfigError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let bad = ConfigError::BadBalloon;
        let mut out = BalloonSpec::default();
        let mut seen: Vec<&str> = Vec::new();
        for part in spec.split(',').filter(|p| !p.is_empty()) {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| bad(format!("'{part}' is not key=value")))?;
            if seen.contains(&key) {
                return Err(bad(format!("'{key}' is given twice")));
            }
            match key {
                "size" => {
                    let size = parse_size(value).map_err(|e| bad(e.to_string()))?;
                    if size % BALLOON_PAGE != 0 {
                        return Err(bad(format!("size '{value}' is not a multiple of 4 KiB")));
                    }
                    out.size = size;
                }
                "free_page_reporting" => {
                    out.free_page_reporting = parse_switch(key, value).map_err(bad)?
                }
                "deflate_on_oom" => out.deflate_on_oom = parse_switch(key, value).map_err(bad)?,
                "stats" => out.stats = parse_interval(value)?,
                other => {
                    return Err(bad(format!(
                        "unknown key '{other}' (expected size, free_page_reporting, stats, \
                         deflate_on_oom)"
                    )))
                }
            }
            seen.push(key);
        }
        Ok(out)
    }
}

/// Refuses a balloon that would start larger than the guest's memory at boot (boot
/// memory and the plugged part of the hotplug regions).
pub fn check_balloon(spec: &BalloonSpec, nodes: &[NodeConfig]) -> Result<(), ConfigError> {
    let ram: u64 = nodes.iter().map(|n| n.memory + n.requested).sum();
    if spec.size > ram {
        return Err(ConfigError::BalloonTooLarge {
            size: format!("{} MiB", spec.size >> 20),
            ram_mib: ram >> 20,
        });
    }
    Ok(())
}

/// Fails unless `path` is a readable regular file.
pub fn check_file(what: &'static str, path: &std::path::Path) -> Result<(), ConfigError> {
    let fail = |reason: String| ConfigError::BadFile {
        what,
        path: path.to_path_buf(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| fail(e.to_string()))?;
    if !meta.is_file() {
        return Err(fail("not a regular file".into()));
    }
    std::fs::File::open(path).map_err(|e| fail(e.to_string()))?;
    Ok(())
}

pub mod autopilot;

pub use autopilot::AutopilotSpec;

#[cfg(test)]
mod tests;
