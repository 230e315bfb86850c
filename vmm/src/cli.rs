//! Command-line interface. Usage errors print one line and exit with status 2.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{self, ConfigError, DiskConfig, NodeSpec, VmConfig};
use crate::host_numa::HostTopology;
use crate::logger;
use crate::seccomp::{self, SeccompMode};
use crate::stop::{self, EXIT_USAGE, EXIT_VMM_ERROR};
use crate::vm;

mod autopilot;
mod balloon;
mod evacuation;

#[derive(Debug, Parser)]
#[command(
    name = "mempower",
    version,
    about = "A VMM that gives host DRAM back by evacuating guest memory regions"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Boot a Linux guest and run it until it powers off.
    Run(RunArgs),
    /// Show a running VM: state, vCPUs and NUMA nodes.
    Vm(ClientArgs),
    /// Stop a running VM.
    Shutdown(ClientArgs),
    /// Show each NUMA node's memory: boot memory, hotplug region, plugged, requested, resident.
    Nodes(ClientArgs),
    /// Show a node's regions (whole memory blocks of its hotplug region, 128 MiB unless
    /// its --numa says region=).
    Regions(RegionsArgs),
    /// Ask the guest to plug or unplug memory of a node's hotplug region.
    Resize(ResizeArgs),
    /// Show the guest agent's connection, or send it one request given as JSON
    /// (e.g. '{"type":"inventory"}').
    Agent(AgentArgs),
    /// Evacuate named regions of a node: the guest empties them, the host frees them.
    Evacuate(evacuation::EvacuateArgs),
    /// Give back host memory from a node's least-filled regions.
    Compact(evacuation::CompactArgs),
    /// Show evacuation jobs.
    Jobs(evacuation::JobsArgs),
    /// Ask the guest to plug a released region again.
    Plug(evacuation::PlugArgs),
    /// Show the Prometheus metrics.
    Metrics(ClientArgs),
    /// Show the balloon, or ask the guest to inflate or deflate it (--size).
    Balloon(balloon::BalloonArgs),
    /// Show a node's autopilot, or set it (--mode, --min, --max, --headroom...).
    Autopilot(autopilot::AutopilotArgs),
    /// Show the autopilot's recent decisions, with their inputs and reasons.
    Events(autopilot::EventsArgs),
}

#[derive(Debug, clap::Args)]
struct AgentArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// A request for the agent, as protocol JSON; without it, show the connection.
    request: Option<String>,
}

#[derive(Debug, clap::Args)]
struct RegionsArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The node whose regions to show.
    #[arg(long)]
    node: u32,
    /// Only the regions in this state (plugged, partial, evacuating, released, failed).
    #[arg(long)]
    state: Option<mempower_api::RegionState>,
    /// Skip this many regions (after --state).
    #[arg(long, default_value_t = 0)]
    offset: u32,
    /// Show at most this many regions.
    #[arg(long)]
    limit: Option<u32>,
}

impl RegionsArgs {
    /// `/api/v1/nodes/N/regions` with the query the options make.
    fn path(&self) -> String {
        let query = mempower_api::RegionQuery {
            state: self.state,
            offset: self.offset,
            limit: self.limit,
        }
        .to_query_string();
        let path = format!("/api/v1/nodes/{}/regions", self.node);
        match query.is_empty() {
            true => path,
            false => format!("{path}?{query}"),
        }
    }
}

#[derive(Debug, clap::Args)]
struct ResizeArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The node whose hotplug region to resize.
    #[arg(long)]
    node: u32,
    /// How much of the region the guest should have plugged (e.g. 512M); a multiple of the
    /// block size (2 MiB).
    #[arg(long, value_parser = config::parse_size)]
    size: u64,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Kernel image: an uncompressed vmlinux ELF or a bzImage (e.g. /boot/vmlinuz-*).
    #[arg(long, value_name = "PATH")]
    kernel: PathBuf,
    /// Initramfs or initrd for the kernel (a cpio, compressed or not).
    #[arg(long, value_name = "PATH")]
    initramfs: Option<PathBuf>,
    /// A virtio-blk disk backed by a raw image: path=IMG[,readonly=on][,id=NAME]
    /// (repeat per disk; the guest sees them as vda, vdb, ... in this order).
    #[arg(long = "disk", value_name = "SPEC", value_parser = config::parse_disk)]
    disks: Vec<DiskConfig>,
    /// Appended to the default kernel command line; words after `--` go to init.
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    cmdline: Option<String>,
    /// A NUMA node: node=N,cpus=LIST,memory=SIZE[,hotplug=SIZE[,requested=SIZE][,region=SIZE]]
    /// [,host-node=H][,hugepages=on|off] (repeat per node; region= is 128M, 256M, 512M, 1G or
    /// 2G; host-node= binds its memory and threads to host node H; hugepages=on backs it with
    /// 2 MiB hugetlbfs pages). Default: one node, 1 vCPU, 256M.
    #[arg(long = "numa", value_name = "SPEC")]
    numa: Vec<NodeSpec>,
    /// Serve the REST API on this Unix socket (mode 0600).
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// Expose guest vsock ports on this Unix socket: send `CONNECT <port>\n`, get
    /// `OK <hostport>\n`, then talk to the guest.
    #[arg(long, value_name = "PATH")]
    vsock_socket: Option<PathBuf>,
    /// Write the guest console here instead of stdout.
    #[arg(long, value_name = "FILE")]
    console_log: Option<PathBuf>,
    /// A virtio-balloon device:
    /// size=SIZE,free_page_reporting=on|off,stats=DURATION|off,deflate_on_oom=on|off.
    #[arg(long, value_name = "SPEC")]
    balloon: Option<config::BalloonSpec>,
    /// The autopilot of a node (or of all): node=N|all[,mode=autosize|release|off]
    /// [,min=SIZE][,max=SIZE][,headroom=SIZE][,interval=DURATION][,patience=DURATION]
    /// (repeat per node). It sizes the node's hotplug memory to what its guest uses:
    /// grows at once under memory pressure, gives back with patience.
    #[arg(long = "autopilot", value_name = "SPEC")]
    autopilot: Vec<config::AutopilotSpec>,
    /// The VMM's log level on stderr (default: info, or the bare level of RUST_LOG);
    /// RUST_LOG=path=level,... refines it per module path.
    #[arg(long, value_name = "LEVEL", value_enum)]
    log_level: Option<LogLevel>,
    /// seccomp filters on every VMM thread: `kill` stops the VMM (SIGSYS) at a system
    /// call outside its thread's allow-list, `log` lets it through and has the host kernel
    /// log it (audit, dmesg), `off` installs none.
    #[arg(long, value_name = "MODE", value_enum, default_value_t = SeccompMode::Kill)]
    seccomp: SeccompMode,
}

/// `--log-level`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl From<LogLevel> for log::LevelFilter {
    fn from(level: LogLevel) -> Self {
        match level {
            LogLevel::Error => Self::Error,
            LogLevel::Warn => Self::Warn,
            LogLevel::Info => Self::Info,
            LogLevel::Debug => Self::Debug,
            LogLevel::Trace => Self::Trace,
        }
    }
}

#[derive(Debug, clap::Args)]
pub(crate) struct ClientArgs {
    /// The running VMM's API socket.
    #[arg(long, value_name = "PATH")]
    pub(crate) api_socket: PathBuf,
}

fn vm_config(args: RunArgs) -> Result<VmConfig, ConfigError> {
    config::check_file("kernel", &args.kernel)?;
    if let Some(initramfs) = &args.initramfs {
        config::check_file("initramfs", initramfs)?;
    }
    let nodes = config::validate_nodes(args.numa)?;
    HostTopology::system().check_config(&nodes)?;
    // One virtio-mem per node with a hotplug region, the vsock device and the balloon.
    let others =
        nodes.iter().filter(|n| n.hotplug > 0).count() + 1 + usize::from(args.balloon.is_some());
    config::validate_disks(&args.disks, others)?;
    if let Some(balloon) = &args.balloon {
        config::check_balloon(balloon, &nodes)?;
    }
    crate::autopilot::plan::settings(&nodes, &args.autopilot)?;
    Ok(VmConfig {
        kernel: args.kernel,
        initramfs: args.initramfs,
        cmdline_extra: args.cmdline,
        nodes,
        api_socket: args.api_socket,
        vsock_socket: args.vsock_socket,
        console_log: args.console_log,
        disks: args.disks,
        balloon: args.balloon,
        autopilot: args.autopilot,
    })
}

/// A usage error: one line on stderr and exit status 2 (the command's answer, not logging).
fn usage_error(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("mempower: error: {message}");
    ExitCode::from(EXIT_USAGE)
}

fn run(args: RunArgs) -> ExitCode {
    let log_level = args.log_level.map(log::LevelFilter::from);
    let seccomp_mode = args.seccomp;
    let config = match vm_config(args) {
        Ok(c) => c,
        Err(e) => return usage_error(e),
    };
    let installed =
        logger::rust_log_env().and_then(|spec| logger::init(log_level, spec.as_deref()));
    if let Err(e) = installed {
        return usage_error(e);
    }
    if let Err(e) = seccomp::prepare(seccomp_mode) {
        log::error!("{e}");
        return ExitCode::from(EXIT_VMM_ERROR);
    }
    match vm::run(&config) {
        // Already reported, before the teardown.
        Ok(reason) => ExitCode::from(stop::status(&reason)),
        Err(e) => {
            log::error!("{e}");
            ExitCode::from(EXIT_VMM_ERROR)
        }
    }
}

/// A client subcommand's failure: one line on stderr and exit status 1. Like usage
/// errors this is the command's own answer, not logging (client commands install no
/// logger).
fn command_error(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("mempower: error: {message}");
    ExitCode::from(EXIT_VMM_ERROR)
}

/// Sends one request and prints the answer; non-2xx answers are errors.
fn client(args: &ClientArgs, method: &str, path: &str, body: Option<&str>) -> ExitCode {
    // Agent calls may take the VMM's whole agent timeout; allow for it.
    let timeout = crate::agent::AGENT_CALL_TIMEOUT + std::time::Duration::from_secs(20);
    match mempower_api::client::request_with_timeout(&args.api_socket, method, path, body, timeout)
    {
        Ok(resp) if (200..300).contains(&resp.status) => {
            if !resp.body.is_empty() {
                println!("{}", resp.body);
            }
            ExitCode::SUCCESS
        }
        Ok(resp) => command_error(format!("API answered {}: {}", resp.status, resp.body)),
        Err(e) => command_error(e),
    }
}

/// clap's message spans lines up to a blank one (usage and tips follow): join them.
fn one_line(rendered: &str) -> String {
    let message: Vec<&str> = rendered
        .lines()
        .map(str::trim)
        .take_while(|l| !l.is_empty())
        .collect();
    message.join(" ").trim_start_matches("error: ").to_string()
}

pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            return usage_error(one_line(&e.render().to_string()));
        }
    };
    match cli.command {
        Command::Run(args) => run(args),
        Command::Vm(args) => client(&args, "GET", "/api/v1/vm", None),
        Command::Shutdown(args) => client(&args, "PUT", "/api/v1/vm/shutdown", None),
        Command::Nodes(args) => client(&args, "GET", "/api/v1/nodes", None),
        Command::Regions(args) => client(&args.client, "GET", &args.path(), None),
        Command::Agent(AgentArgs {
            client: c,
            request: None,
        }) => client(&c, "GET", "/api/v1/agent", None),
        Command::Agent(AgentArgs {
            client: c,
            request: Some(json),
        }) => client(&c, "POST", "/api/v1/agent/call", Some(&json)),
        Command::Resize(args) => {
            let body = serde_json::json!({ "requested_size": args.size }).to_string();
            let path = format!("/api/v1/nodes/{}/requested-size", args.node);
            client(&args.client, "PUT", &path, Some(&body))
        }
        Command::Evacuate(args) => evacuation::evacuate(args),
        Command::Compact(args) => evacuation::compact(args),
        Command::Jobs(args) => evacuation::jobs(args),
        Command::Plug(args) => evacuation::plug(args),
        Command::Metrics(args) => evacuation::metrics(args),
        Command::Balloon(args) => balloon::balloon(args),
        Command::Autopilot(args) => autopilot::autopilot(args),
        Command::Events(args) => autopilot::events(args),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("mempower").chain(args.iter().copied()))
    }

    fn run_args(args: &[&str]) -> RunArgs {
        match parse(args).unwrap().command {
            Command::Run(r) => r,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn full_run_command_line() {
        let r = run_args(&[
            "run",
            "--kernel",
            "/k",
            "--initramfs",
            "/i",
            "--cmdline",
            "-- poweroff",
            "--numa",
            "node=0,cpus=0-1,memory=256M",
            "--numa",
            "node=1,cpus=2-3,memory=256M",
            "--api-socket",
            "/tmp/s",
            "--disk",
            "path=/root.img,id=root",
            "--disk",
            "path=/data.img,readonly=on",
        ]);
        assert_eq!(r.disks.len(), 2);
        assert_eq!(r.disks[0].id.as_deref(), Some("root"));
        assert!(r.disks[1].readonly && !r.disks[0].readonly);
        assert_eq!(r.numa.len(), 2);
        assert_eq!(r.numa[1].cpus, vec![2, 3]);
        assert_eq!(r.cmdline.as_deref(), Some("-- poweroff"));
        assert_eq!(r.api_socket, Some(PathBuf::from("/tmp/s")));
    }

    #[test]
    fn seccomp_defaults_to_kill_and_takes_log_and_off() {
        assert_eq!(
            run_args(&["run", "--kernel", "/k"]).seccomp,
            SeccompMode::Kill
        );
        for (word, mode) in [
            ("kill", SeccompMode::Kill),
            ("log", SeccompMode::Log),
            ("off", SeccompMode::Off),
        ] {
            let r = run_args(&["run", "--kernel", "/k", "--seccomp", word]);
            assert_eq!(r.seccomp, mode);
        }
        let err = parse(&["run", "--kernel", "/k", "--seccomp", "strict"]).unwrap_err();
        assert!(err.use_stderr());
        let line = one_line(&err.render().to_string());
        assert!(
            line.contains("'strict'") && line.contains("kill, log, off"),
            "{line}"
        );
    }

    #[test]
    fn log_level_takes_the_five_levels() {
        assert_eq!(run_args(&["run", "--kernel", "/k"]).log_level, None);
        let r = run_args(&["run", "--kernel", "/k", "--log-level", "debug"]);
        assert_eq!(
            r.log_level.map(log::LevelFilter::from),
            Some(log::LevelFilter::Debug)
        );
        let err = parse(&["run", "--kernel", "/k", "--log-level", "loud"]).unwrap_err();
        let line = one_line(&err.render().to_string());
        assert!(line.contains("'loud'") && line.contains("trace"), "{line}");
    }

    #[test]
    fn bad_values_are_usage_errors_naming_the_problem() {
        for (args, needle) in [
            (
                vec!["run", "--kernel", "/k", "--numa", "node=0,cpus=0,memory=1X"],
                "unknown unit 'X'",
            ),
            (
                vec!["run", "--kernel", "/k", "--numa", "node=0,cpus=0,memory=3M"],
                "not a multiple of 2 MiB",
            ),
            (
                vec!["run", "--kernel", "/k", "--numa", "node=0,cpus=0"],
                "missing memory",
            ),
            (vec!["run"], "--kernel"),
            (vec!["run", "--kernel", "/k", "--bogus"], "--bogus"),
            (
                vec!["run", "--kernel", "/k", "--disk", "file=/x"],
                "unknown key 'file'",
            ),
            (
                vec!["run", "--kernel", "/k", "--disk", "path=/x,readonly=1"],
                "readonly '1' is not on or off",
            ),
            (vec!["frobnicate"], "frobnicate"),
        ] {
            let err = parse(&args).unwrap_err();
            assert!(err.use_stderr());
            assert!(err.to_string().contains(needle), "{args:?}: {err}");
        }
    }

    #[test]
    fn resize_takes_a_node_and_a_size_with_units() {
        let cli = parse(&[
            "resize",
            "--api-socket",
            "/s",
            "--node",
            "1",
            "--size",
            "512M",
        ])
        .unwrap();
        match cli.command {
            Command::Resize(r) => assert_eq!((r.node, r.size), (1, 512 << 20)),
            other => panic!("{other:?}"),
        }
        let err = parse(&[
            "resize",
            "--api-socket",
            "/s",
            "--node",
            "1",
            "--size",
            "5Q",
        ])
        .unwrap_err();
        assert!(err.to_string().contains("unknown unit 'Q'"), "{err}");
        let err = parse(&["resize", "--api-socket", "/s", "--size", "1G"]).unwrap_err();
        assert!(err.to_string().contains("--node"), "{err}");
    }

    #[test]
    fn a_host_node_the_host_lacks_is_a_usage_error() {
        let kernel = std::env::temp_dir().join(format!("mempower-k-{}", std::process::id()));
        std::fs::write(&kernel, b"k").unwrap();
        let run = |numa: &str| {
            let args = ["run", "--kernel", kernel.to_str().unwrap(), "--numa", numa];
            match parse(&args).unwrap().command {
                Command::Run(r) => vm_config(r),
                other => panic!("{other:?}"),
            }
        };
        let host = HostTopology::system().memory_nodes().unwrap()[0];
        let ok = run(&format!(
            "node=0,cpus=0,memory=64M,host-node={host},hugepages=on"
        ));
        assert_eq!(ok.unwrap().nodes[0].host_node, Some(host));
        let err = run("node=0,cpus=0,memory=64M,host-node=999").unwrap_err();
        let line = err.to_string();
        assert!(
            line.starts_with("--numa node=0: host-node=999: host node 999 does not exist"),
            "{line}"
        );
        assert!(!line.contains('\n'), "{line}");
        std::fs::remove_file(&kernel).unwrap();
    }

    #[test]
    fn usage_errors_fit_one_line() {
        let err = parse(&["run"]).unwrap_err();
        assert_eq!(
            one_line(&err.render().to_string()),
            "the following required arguments were not provided: --kernel <PATH>"
        );
        let err = parse(&["run", "--kernel", "/k", "--numa", "node=0,memory=1Q"]).unwrap_err();
        let line = one_line(&err.render().to_string());
        assert!(!line.contains('\n'));
        assert!(
            line.ends_with("unknown unit 'Q' in size '1Q': use K, M, G or T"),
            "{line}"
        );
        // A node above 1 TiB, and regions that are not whole blocks: one line each.
        for (numa, end) in [
            (
                "node=0,cpus=0,memory=1G,hotplug=2T",
                "hotplug size 2T is above the limit of 1 TiB per node",
            ),
            (
                "node=0,cpus=0,memory=1G,hotplug=1G,region=96M",
                "region size '96M' must be one of 128M, 256M, 512M, 1G, 2G",
            ),
        ] {
            let err = parse(&["run", "--kernel", "/k", "--numa", numa]).unwrap_err();
            assert!(err.use_stderr());
            let line = one_line(&err.render().to_string());
            assert!(!line.contains('\n') && line.ends_with(end), "{line}");
        }
    }

    #[test]
    fn config_errors_cover_cpus_and_files() {
        let kernel = std::env::current_exe().unwrap();
        let k = kernel.to_str().unwrap();
        let err = vm_config(run_args(&[
            "run",
            "--kernel",
            k,
            "--numa",
            "node=0,cpus=0-1,memory=128M",
            "--numa",
            "node=1,cpus=1,memory=128M",
        ]))
        .unwrap_err();
        assert_eq!(
            err,
            ConfigError::OverlappingCpus {
                cpu: 1,
                first: 0,
                second: 1
            }
        );
        let err = vm_config(run_args(&["run", "--kernel", "/no/such/vmlinux"])).unwrap_err();
        assert!(err.to_string().contains("/no/such/vmlinux"));
        let err = vm_config(run_args(&[
            "run",
            "--kernel",
            k,
            "--initramfs",
            "/no/initrd",
        ]))
        .unwrap_err();
        assert!(err.to_string().starts_with("initramfs '/no/initrd'"));
        let err = vm_config(run_args(&[
            "run",
            "--kernel",
            k,
            "--disk",
            "path=/no/disk.img",
        ]))
        .unwrap_err();
        assert!(err.to_string().starts_with("disk '/no/disk.img'"), "{err}");
        let ok = vm_config(run_args(&["run", "--kernel", k])).unwrap();
        assert_eq!(ok.vcpu_count(), 1);
    }

    #[test]
    fn region_lists_filter_and_page() {
        let regions = |args: &[&str]| match parse(args) {
            Ok(Cli {
                command: Command::Regions(r),
            }) => Ok(r.path()),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(one_line(&e.render().to_string())),
        };
        let base = ["regions", "--api-socket", "/s", "--node", "1"];
        assert_eq!(regions(&base).unwrap(), "/api/v1/nodes/1/regions");
        let all = [
            &base[..],
            &["--state", "plugged", "--offset", "8", "--limit", "4"],
        ]
        .concat();
        assert_eq!(
            regions(&all).unwrap(),
            "/api/v1/nodes/1/regions?state=plugged&offset=8&limit=4"
        );
        let bad = [&base[..], &["--state", "gone"]].concat();
        let line = regions(&bad).unwrap_err();
        assert!(
            line.contains("must be one of plugged, partial, evacuating, released, failed"),
            "{line}"
        );
    }

    #[test]
    fn balloon_options_and_subcommand() {
        let kernel = std::env::current_exe().unwrap();
        let k = kernel.to_str().unwrap();
        let spec = "size=64M,free_page_reporting=on,stats=5s,deflate_on_oom=on";
        let config = vm_config(run_args(&["run", "--kernel", k, "--balloon", spec])).unwrap();
        let b = config.balloon.unwrap();
        assert_eq!(
            (b.size, b.free_page_reporting, b.deflate_on_oom),
            (64 << 20, true, true)
        );
        assert_eq!(b.stats, Some(std::time::Duration::from_secs(5)));
        assert!(vm_config(run_args(&["run", "--kernel", k]))
            .unwrap()
            .balloon
            .is_none());
        // Bigger than the guest: a usage error naming both sizes.
        let err = vm_config(run_args(&["run", "--kernel", k, "--balloon", "size=1G"])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "balloon size 1024 MiB is above the guest's 256 MiB of memory at boot"
        );
        let err = parse(&["run", "--kernel", "/k", "--balloon", "stats=5"]).unwrap_err();
        let line = one_line(&err.render().to_string());
        assert!(
            line.starts_with("invalid value 'stats=5' for '--balloon <SPEC>': stats='5'"),
            "{line}"
        );

        for (args, size) in [
            (vec!["balloon", "--api-socket", "/s"], None),
            (
                vec!["balloon", "--api-socket", "/s", "--size", "128M"],
                Some(128 << 20),
            ),
        ] {
            match parse(&args).unwrap().command {
                Command::Balloon(b) => {
                    assert!(
                        format!("{b:?}").contains(&format!("size: {size:?}")),
                        "{b:?}"
                    )
                }
                other => panic!("{other:?}"),
            }
        }
        let err = parse(&["balloon", "--api-socket", "/s", "--size", "1Q"]).unwrap_err();
        assert!(err.to_string().contains("unknown unit 'Q'"), "{err}");
    }

    #[test]
    fn autopilot_options_and_subcommands() {
        let k = "/proc/self/exe";
        let numa = "node=0,cpus=0,memory=256M,hotplug=1G";
        let run = |extra: &[&str]| {
            let mut args = vec!["run", "--kernel", k, "--numa", numa];
            args.extend_from_slice(extra);
            vm_config(run_args(&args))
        };
        let config = run(&["--autopilot", "node=0,max=512M"]).unwrap();
        assert_eq!(config.autopilot.len(), 1);
        assert_eq!(config.autopilot[0].settings.max_bytes, Some(512 << 20));
        // Checked against the node: one line.
        let err = run(&["--autopilot", "node=0,min=768M,max=512M"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "node 0: autopilot: min 768 MiB is above max 512 MiB"
        );
        let err = parse(&["run", "--kernel", k, "--autopilot", "node=0,mode=on"]).unwrap_err();
        let line = one_line(&err.render().to_string());
        assert!(
            line.contains("mode 'on' is not off, release or autosize"),
            "{line}"
        );

        match parse(&["autopilot", "--api-socket", "/s", "--node", "1"])
            .unwrap()
            .command
        {
            Command::Autopilot(a) => assert_eq!(a.settings(), None, "a GET"),
            other => panic!("{other:?}"),
        }
        let set = [
            "autopilot",
            "--api-socket",
            "/s",
            "--node",
            "1",
            "--mode",
            "release",
        ];
        match parse(&set).unwrap().command {
            Command::Autopilot(a) => assert_eq!(
                a.settings().unwrap().mode,
                Some(mempower_api::AutopilotMode::Release)
            ),
            other => panic!("{other:?}"),
        }
        let err = parse(&[
            "autopilot",
            "--api-socket",
            "/s",
            "--node",
            "1",
            "--mode",
            "x",
        ]);
        assert!(err.is_err());
        assert!(parse(&["events", "--api-socket", "/s", "--since", "3"]).is_ok());
    }

    #[test]
    fn evacuation_subcommands_parse_and_check_their_values() {
        let cli = parse(&[
            "evacuate",
            "--api-socket",
            "/s",
            "--node",
            "1",
            "--regions",
            "0,3",
            "--allow-other-nodes",
            "--wait",
        ])
        .unwrap();
        assert!(
            matches!(&cli.command, Command::Evacuate(e) if format!("{e:?}").contains("allow_other_nodes: true")),
            "{:?}",
            cli.command
        );
        let cli = parse(&[
            "compact",
            "--api-socket",
            "/s",
            "--node",
            "1",
            "--release",
            "256M",
        ])
        .unwrap();
        match cli.command {
            Command::Compact(c) => {
                let shown = format!("{c:?}");
                assert!(shown.contains("release: 268435456"), "{shown}");
                assert!(shown.contains("allow_other_nodes: false"), "{shown}");
            }
            other => panic!("{other:?}"),
        }
        for (args, needle) in [
            (
                vec!["evacuate", "--api-socket", "/s", "--node", "1"],
                "--regions",
            ),
            (
                vec![
                    "evacuate",
                    "--api-socket",
                    "/s",
                    "--node",
                    "1",
                    "--regions",
                    "a",
                ],
                "invalid digit",
            ),
            (
                vec![
                    "compact",
                    "--api-socket",
                    "/s",
                    "--node",
                    "1",
                    "--release",
                    "1X",
                ],
                "unknown unit",
            ),
            (
                vec!["plug", "--api-socket", "/s", "--node", "1"],
                "--region",
            ),
        ] {
            let err = parse(&args).unwrap_err();
            assert!(err.to_string().contains(needle), "{args:?}: {err}");
        }
        assert!(parse(&["jobs", "--api-socket", "/s", "--job", "3"]).is_ok());
        assert!(parse(&["metrics", "--api-socket", "/s"]).is_ok());
    }
}
