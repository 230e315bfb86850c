//! Memory blocks, as /sys/devices/system/memory shows them, and taking them offline and
//! online through their `state` files.
//!
//! Every function takes the filesystem root (`/` in production, a fixture directory in
//! tests) and works below `<root>/sys/devices/system/memory`.

use std::ffi::OsStr;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use agent_protocol::{AgentError, BlockResult, MemoryBlock};
use thiserror::Error;

use crate::sys;

/// Page size of the guest (`x86_64`).
pub const PAGE_SIZE: u64 = 4096;

#[derive(Debug, Error)]
pub enum MemoryError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("malformed block size {0:?} (expected a non-zero multiple of the page size, in hex)")]
    BlockSize(String),
    #[error("no such memory block: {0:?}")]
    NoSuchBlocks(Vec<u32>),
}

impl MemoryError {
    pub fn errno(&self) -> i32 {
        match self {
            Self::Read { source, .. } => sys::errno_of(source),
            Self::BlockSize(_) => libc::EIO,
            Self::NoSuchBlocks(_) => libc::ENOENT,
        }
    }
}

/// The directory holding `block_size_bytes` and the `memoryN` directories.
pub fn memory_dir(root: &Path) -> PathBuf {
    root.join("sys/devices/system/memory")
}

fn block_dir(root: &Path, id: u32) -> PathBuf {
    memory_dir(root).join(format!("memory{id}"))
}

fn read(path: &Path) -> Result<String, MemoryError> {
    fs::read_to_string(path).map_err(|source| MemoryError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Bytes per memory block, from `block_size_bytes` (hex without `0x`, e.g. `8000000`).
pub fn block_size(root: &Path) -> Result<u64, MemoryError> {
    let text = read(&memory_dir(root).join("block_size_bytes"))?;
    let digits = text.trim();
    let digits = digits.strip_prefix("0x").unwrap_or(digits);
    match u64::from_str_radix(digits, 16) {
        Ok(size) if size > 0 && size % PAGE_SIZE == 0 && !digits.starts_with('+') => Ok(size),
        _ => Err(MemoryError::BlockSize(text.trim().to_owned())),
    }
}

/// `memory12` → 12; anything else → None.
fn block_id(name: &OsStr) -> Option<u32> {
    let digits = name.to_str()?.strip_prefix("memory")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The ids of every memory block, sorted.
pub fn block_ids(root: &Path) -> Result<Vec<u32>, MemoryError> {
    let dir = memory_dir(root);
    let read_err = |source| MemoryError::Read {
        path: dir.clone(),
        source,
    };
    let mut ids = Vec::new();
    for entry in fs::read_dir(&dir).map_err(read_err)? {
        if let Some(id) = block_id(&entry.map_err(read_err)?.file_name()) {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

/// The ids of node `node`'s memory blocks, sorted: its `memoryN` links in sysfs, one
/// directory read where [`block_node`] reads one per block.
pub fn node_block_ids(root: &Path, node: u32) -> Result<Vec<u32>, MemoryError> {
    let dir = crate::numa::nodes_dir(root).join(format!("node{node}"));
    let read_err = |source| MemoryError::Read {
        path: dir.clone(),
        source,
    };
    let mut ids = Vec::new();
    for entry in fs::read_dir(&dir).map_err(read_err)? {
        ids.extend(block_id(&entry.map_err(read_err)?.file_name()));
    }
    ids.sort_unstable();
    Ok(ids)
}

/// Fails with ENOENT naming every id in `wanted` that is not a block.
pub fn check_blocks_exist(root: &Path, wanted: &[u32]) -> Result<(), MemoryError> {
    let missing: Vec<u32> = wanted
        .iter()
        .copied()
        .filter(|&id| !block_dir(root, id).is_dir())
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(MemoryError::NoSuchBlocks(missing))
    }
}

/// The block's `state`: "online", "offline" or "going-offline".
pub fn read_state(root: &Path, id: u32) -> Result<String, MemoryError> {
    Ok(read(&block_dir(root, id).join("state"))?.trim().to_owned())
}

/// First word of `valid_zones`: for an online block its zone (or "none" if it spans
/// several), for an offline block the zone it would go to by default.
fn read_zone(dir: &Path) -> Result<String, MemoryError> {
    let text = read(&dir.join("valid_zones"))?;
    Ok(text.split_whitespace().next().unwrap_or("none").to_owned())
}

/// The node of a block: its `nodeK` link, or a `node` file if there is one.
fn read_node(dir: &Path) -> Result<Option<u32>, MemoryError> {
    if let Ok(text) = fs::read_to_string(dir.join("node")) {
        if let Ok(node) = text.trim().parse() {
            return Ok(Some(node));
        }
    }
    let read_err = |source| MemoryError::Read {
        path: dir.to_owned(),
        source,
    };
    for entry in fs::read_dir(dir).map_err(read_err)? {
        let name = entry.map_err(read_err)?.file_name();
        let Some(digits) = name.to_str().and_then(|n| n.strip_prefix("node")) else {
            continue;
        };
        if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
            if let Ok(node) = digits.parse() {
                return Ok(Some(node));
            }
        }
    }
    Ok(None)
}

/// The node of block `id` (None if sysfs names none).
pub fn block_node(root: &Path, id: u32) -> Result<Option<u32>, MemoryError> {
    read_node(&block_dir(root, id))
}

/// One block's description. `removable` defaults to true when the file is missing
/// (newer kernels dropped it).
pub fn read_block(root: &Path, id: u32, block_size: u64) -> Result<MemoryBlock, MemoryError> {
    let dir = block_dir(root, id);
    let removable = match fs::read_to_string(dir.join("removable")) {
        Ok(text) => text.trim() != "0",
        Err(e) if e.kind() == io::ErrorKind::NotFound => true,
        Err(source) => {
            return Err(MemoryError::Read {
                path: dir.join("removable"),
                source,
            })
        }
    };
    Ok(MemoryBlock {
        id,
        start: u64::from(id).saturating_mul(block_size),
        size: block_size,
        node: read_node(&dir)?,
        zone: read_zone(&dir)?,
        online: read_state(root, id)? == "online",
        removable,
    })
}

/// The block size and every block, sorted by id.
pub fn blocks(root: &Path) -> Result<(u64, Vec<MemoryBlock>), MemoryError> {
    let size = block_size(root)?;
    let blocks = block_ids(root)?
        .into_iter()
        .map(|id| read_block(root, id, size))
        .collect::<Result<_, _>>()?;
    Ok((size, blocks))
}

/// What `offline` and `online` ask of a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Offline,
    Online { movable: bool },
}

impl Target {
    /// The word written to `state`.
    fn word(self) -> &'static str {
        match self {
            Self::Offline => "offline",
            Self::Online { movable: true } => "online_movable",
            Self::Online { movable: false } => "online_kernel",
        }
    }
}

/// Moves each block to `target`, in order, and reports each outcome. Fails as a whole,
/// before touching anything, if an id is not a block.
pub fn set_states(
    root: &Path,
    blocks: &[u32],
    target: Target,
) -> Result<Vec<BlockResult>, MemoryError> {
    check_blocks_exist(root, blocks)?;
    Ok(blocks
        .iter()
        .map(|&block| BlockResult {
            block,
            error: set_state(root, block, target).err(),
        })
        .collect())
}

fn os_error(errno: i32) -> AgentError {
    AgentError::new(errno, sys::strerror(errno))
}

fn set_state(root: &Path, id: u32, target: Target) -> Result<(), AgentError> {
    let to_agent = |e: MemoryError| AgentError::new(e.errno(), e.to_string());
    let before = read_state(root, id).map_err(to_agent)?;
    match target {
        // The kernel answers EINVAL for a block that is already offline.
        Target::Offline if before == "offline" => return Ok(()),
        Target::Online { movable } if before == "online" => {
            let zone = read_zone(&block_dir(root, id)).map_err(to_agent)?;
            if (zone == "Movable") == movable {
                return Ok(());
            }
            return Err(AgentError::new(
                libc::EINVAL,
                format!("already online in zone {zone}"),
            ));
        }
        _ => {}
    }
    let path = block_dir(root, id).join("state");
    let written = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&path)
        .and_then(|mut file| file.write_all(target.word().as_bytes()));
    match written {
        Ok(()) => Ok(()),
        Err(e) => {
            let errno = sys::errno_of(&e);
            // Someone else may have finished the job in the meantime.
            let now = read_state(root, id).ok();
            if target == Target::Offline
                && errno == libc::EINVAL
                && now.as_deref() == Some("offline")
            {
                return Ok(());
            }
            Err(os_error(errno))
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::numa::tests::Fixture;

    /// Adds `memory<id>` to a fixture, linked to `node` and from it as sysfs does.
    pub(crate) fn block(fx: &Fixture, id: u32, node: u32, state: &str, zones: &str) {
        let dir = format!("sys/devices/system/memory/memory{id}");
        fx.file(&format!("{dir}/state"), &format!("{state}\n"))
            .file(&format!("{dir}/valid_zones"), &format!("{zones}\n"))
            .file(&format!("{dir}/phys_index"), &format!("{id:08x}\n"));
        let node_dir = fx.0.join(format!("sys/devices/system/node/node{node}"));
        fs::create_dir_all(&node_dir).unwrap();
        std::os::unix::fs::symlink(fx.0.join(&dir), node_dir.join(format!("memory{id}"))).unwrap();
        std::os::unix::fs::symlink(node_dir, fx.0.join(format!("{dir}/node{node}"))).unwrap();
    }

    /// Two nodes, 128 MiB blocks: 0 (Normal, online), 8 and 9 (node 1, online Movable and
    /// offline), 10 (node 1, offline, no `removable` file), 1 not removable.
    pub(crate) fn two_node_fixture(name: &str) -> Fixture {
        let fx = Fixture::new(name);
        fx.node(0, "0\n", 262_144)
            .node(1, "1\n", 262_144)
            .file("sys/devices/system/memory/block_size_bytes", "8000000\n")
            .file("sys/devices/system/memory/auto_online_blocks", "offline\n");
        block(&fx, 0, 0, "online", "DMA32");
        block(&fx, 1, 0, "online", "Normal");
        block(&fx, 8, 1, "online", "Movable");
        block(&fx, 9, 1, "offline", "Movable Normal");
        block(&fx, 10, 1, "offline", "Normal Movable");
        for id in [0, 8, 9] {
            fx.file(
                &format!("sys/devices/system/memory/memory{id}/removable"),
                "1\n",
            );
        }
        fx.file("sys/devices/system/memory/memory1/removable", "0\n");
        fx
    }

    fn state_of(fx: &Fixture, id: u32) -> String {
        fs::read_to_string(fx.0.join(format!("sys/devices/system/memory/memory{id}/state")))
            .unwrap()
    }

    #[test]
    fn block_size_is_hex() {
        let fx = Fixture::new("block-size");
        for (text, want) in [("8000000\n", Some(128 << 20)), ("0x1000", Some(4096))] {
            fx.file("sys/devices/system/memory/block_size_bytes", text);
            assert_eq!(block_size(&fx.0).ok(), want, "{text:?}");
        }
        for bad in [
            "",
            "0\n",
            "zz\n",
            "800\n",
            "+8000000",
            "10000000000000000000",
        ] {
            fx.file("sys/devices/system/memory/block_size_bytes", bad);
            assert!(
                matches!(block_size(&fx.0), Err(MemoryError::BlockSize(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn inventory_of_two_node_fixture() {
        let fx = two_node_fixture("mem-inventory");
        let (size, blocks) = blocks(&fx.0).unwrap();
        assert_eq!(size, 128 << 20);
        let ids: Vec<u32> = blocks.iter().map(|b| b.id).collect();
        assert_eq!(ids, [0, 1, 8, 9, 10]);
        assert_eq!(
            blocks[2],
            MemoryBlock {
                id: 8,
                start: 8 << 27,
                size: 128 << 20,
                node: Some(1),
                zone: "Movable".into(),
                online: true,
                removable: true,
            }
        );
        assert_eq!(
            (blocks[0].zone.as_str(), blocks[0].node),
            ("DMA32", Some(0))
        );
        assert_eq!(
            (blocks[1].zone.as_str(), blocks[1].removable),
            ("Normal", false)
        );
        let offline = &blocks[3];
        assert_eq!((offline.online, offline.zone.as_str()), (false, "Movable"));
        assert_eq!(blocks[4].zone, "Normal");
        assert!(
            blocks[4].removable,
            "a missing removable file means removable"
        );
    }

    #[test]
    fn node_file_wins_and_no_node_is_none() {
        let fx = two_node_fixture("mem-node-file");
        fx.file("sys/devices/system/memory/memory9/node", "3\n");
        assert_eq!(read_block(&fx.0, 9, 1).unwrap().node, Some(3));
        fs::remove_file(fx.0.join("sys/devices/system/memory/memory10/node1")).unwrap();
        assert_eq!(read_block(&fx.0, 10, 1).unwrap().node, None);
    }

    #[test]
    fn offline_and_online_write_the_right_words() {
        let fx = two_node_fixture("mem-states");
        let results = set_states(&fx.0, &[8, 1], Target::Offline).unwrap();
        assert!(results.iter().all(|r| r.error.is_none()), "{results:?}");
        assert_eq!(state_of(&fx, 8), "offline");
        assert_eq!(state_of(&fx, 1), "offline");

        set_states(&fx.0, &[9], Target::Online { movable: true }).unwrap();
        assert_eq!(state_of(&fx, 9), "online_movable");
        set_states(&fx.0, &[10], Target::Online { movable: false }).unwrap();
        assert_eq!(state_of(&fx, 10), "online_kernel");
    }

    #[test]
    fn already_there_is_success_without_writing() {
        let fx = two_node_fixture("mem-already");
        let results = set_states(&fx.0, &[9, 10], Target::Offline).unwrap();
        assert!(results.iter().all(|r| r.error.is_none()), "{results:?}");
        assert_eq!(state_of(&fx, 9), "offline\n", "not rewritten");

        let ok = set_states(&fx.0, &[8], Target::Online { movable: true }).unwrap();
        assert_eq!(ok[0].error, None);
        let wrong_zone = set_states(&fx.0, &[8], Target::Online { movable: false }).unwrap();
        let err = wrong_zone[0].error.as_ref().unwrap();
        assert_eq!(err.errno, libc::EINVAL);
        assert!(err.message.contains("Movable"), "{err}");
    }

    #[test]
    fn failed_writes_report_the_errno() {
        let fx = two_node_fixture("mem-fail");
        // A directory in place of `state`.
        let state = fx.0.join("sys/devices/system/memory/memory8/state");
        fs::remove_file(&state).unwrap();
        fs::create_dir(&state).unwrap();
        let results = set_states(&fx.0, &[8], Target::Offline).unwrap();
        assert_eq!(results[0].error.as_ref().unwrap().errno, libc::EISDIR);

        // A readable file that even root cannot write: a read-only sysctl.
        let state = fx.0.join("sys/devices/system/memory/memory1/state");
        fs::remove_file(&state).unwrap();
        std::os::unix::fs::symlink("/proc/sys/kernel/osrelease", &state).unwrap();
        let results = set_states(&fx.0, &[1], Target::Offline).unwrap();
        let err = results[0].error.as_ref().unwrap();
        assert_eq!(err.errno, libc::EACCES);
        assert_eq!(err.message, "Permission denied");
    }

    #[test]
    fn unknown_blocks_are_refused_before_anything_is_written() {
        let fx = two_node_fixture("mem-unknown");
        let err = set_states(&fx.0, &[8, 7, 99], Target::Offline).unwrap_err();
        assert_eq!(err.errno(), libc::ENOENT);
        assert!(err.to_string().contains("[7, 99]"), "{err}");
        assert_eq!(state_of(&fx, 8), "online\n");
    }
}
