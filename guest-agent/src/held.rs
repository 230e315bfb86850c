//! What fills (`fill.rs`) and pins (`pin.rs`) share: their handles, the memory they must
//! leave free on a node, and the errors they have in common.

use std::fmt;
use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use thiserror::Error;

/// Memory left free on the node after a fill or a pin. Running a node out of memory
/// under MPOL_BIND would call the OOM killer, which cannot kill init and panics instead.
pub const RESERVE_KIB: u64 = 16 << 10;

/// What the agent holds for the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Fill,
    Pin,
}

impl Kind {
    fn verb(self) -> &'static str {
        match self {
            Kind::Fill => "filling",
            Kind::Pin => "pinning",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Fill => "fill",
            Kind::Pin => "pin",
        })
    }
}

/// The failures of fills and pins alike.
#[derive(Debug, Error)]
pub enum HeldError {
    #[error("a {kind} of {bytes} bytes is refused: it must be between 1 byte and {max} bytes")]
    BadSize { kind: Kind, bytes: u64, max: u64 },
    #[error("node {0} does not exist")]
    NoSuchNode(u32),
    #[error(
        "node {node} has {free_kib} KiB free{where_}; \
         {verb} {bytes} bytes would leave less than {RESERVE_KIB} KiB",
        verb = .kind.verb()
    )]
    NotEnoughMemory {
        kind: Kind,
        node: u32,
        bytes: u64,
        free_kib: u64,
        /// "" or " in its kernel zones".
        where_: &'static str,
    },
    #[error("cannot read the free memory of node {node}: {reason}")]
    MemFree { node: u32, reason: String },
    #[error("no such {kind} handle: {handle}")]
    UnknownHandle { kind: Kind, handle: u64 },
}

impl HeldError {
    pub fn errno(&self) -> i32 {
        match self {
            Self::BadSize { .. } | Self::UnknownHandle { .. } => libc::EINVAL,
            Self::NoSuchNode(_) => libc::ENOENT,
            Self::NotEnoughMemory { .. } => libc::ENOMEM,
            Self::MemFree { .. } => libc::EIO,
        }
    }
}

/// Hands out handles: 1, 2, 3... never reusing one. Fills and pins share one `Handles`,
/// so that a handle names exactly one of them and `release` needs no type.
#[derive(Debug, Default)]
pub struct Handles(AtomicU64);

impl Handles {
    pub fn next(&self) -> u64 {
        self.0.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// Free memory of `node`, from its meminfo (or /proc/meminfo for node 0 without NUMA).
/// Fails with `NoSuchNode` if the node has no sysfs directory (or is above 63, which
/// the one-word node masks of `mbind` and `set_mempolicy` cannot name).
pub fn node_free_kib(root: &Path, node: u32) -> Result<u64, HeldError> {
    let nodes = root.join("sys/devices/system/node");
    let meminfo = if nodes.is_dir() {
        nodes.join(format!("node{node}/meminfo"))
    } else if node == 0 {
        root.join("proc/meminfo")
    } else {
        return Err(HeldError::NoSuchNode(node));
    };
    if node >= 64 || !meminfo.parent().is_some_and(Path::is_dir) {
        return Err(HeldError::NoSuchNode(node));
    }
    let text = fs::read_to_string(&meminfo).map_err(|e| HeldError::MemFree {
        node,
        reason: e.to_string(),
    })?;
    parse_mem_free_kib(&text).ok_or_else(|| HeldError::MemFree {
        node,
        reason: "no MemFree line".into(),
    })
}

/// `MemFree: <n> kB` of /proc/meminfo or `Node 0 MemFree: <n> kB` of a node's meminfo.
fn parse_mem_free_kib(text: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let mut words = line
            .split_whitespace()
            .skip_while(|w| *w != "MemFree:")
            .skip(1);
        match (words.next(), words.next()) {
            (Some(n), Some("kB")) => n.parse().ok(),
            _ => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_free_parsing() {
        assert_eq!(
            parse_mem_free_kib("MemTotal: 5 kB\nMemFree:  3 kB\n"),
            Some(3)
        );
        assert_eq!(parse_mem_free_kib("Node 1 MemFree:   77 kB\n"), Some(77));
        assert_eq!(parse_mem_free_kib("MemFree: lots kB\n"), None);
        assert_eq!(parse_mem_free_kib(""), None);
    }

    #[test]
    fn messages_name_the_kind() {
        let err = HeldError::NotEnoughMemory {
            kind: Kind::Pin,
            node: 1,
            bytes: 4096,
            free_kib: 1234,
            where_: " in its kernel zones",
        };
        assert_eq!(
            err.to_string(),
            "node 1 has 1234 KiB free in its kernel zones; \
             pinning 4096 bytes would leave less than 16384 KiB"
        );
        let err = HeldError::BadSize {
            kind: Kind::Fill,
            bytes: 0,
            max: 7,
        };
        assert_eq!(
            err.to_string(),
            "a fill of 0 bytes is refused: it must be between 1 byte and 7 bytes"
        );
        let err = HeldError::UnknownHandle {
            kind: Kind::Pin,
            handle: 3,
        };
        assert_eq!(
            (err.to_string().as_str(), err.errno()),
            ("no such pin handle: 3", libc::EINVAL)
        );
    }
}
