//! How much free memory each node's allocations may still take, from /proc/zoneinfo:
//! per zone, free pages above the high watermark and above the reserve kept for
//! allocations that could use higher zones (`protection`). Migration targets of a
//! movable page may be any zone of a node, so a node's room is the sum over its zones.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ZoneinfoError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl ZoneinfoError {
    pub fn errno(&self) -> i32 {
        match self {
            Self::Read { source, .. } => crate::sys::errno_of(source),
        }
    }
}

/// One zone's figures, in pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Zone {
    pub node: u32,
    /// "DMA32", "Normal", "Movable"...
    pub name: String,
    pub free: u64,
    pub high: u64,
    /// The largest `protection` entry: what the zone keeps back from allocations that
    /// may use higher zones, as movable ones do.
    pub reserve: u64,
}

impl Zone {
    /// Free pages an allocation may still take without waking reclaim.
    pub fn room(&self) -> u64 {
        self.free
            .saturating_sub(self.high.saturating_add(self.reserve))
    }
}

/// Reads and parses `<root>/proc/zoneinfo`.
pub fn read(root: &Path) -> Result<Vec<Zone>, ZoneinfoError> {
    let path = root.join("proc/zoneinfo");
    let text = fs::read_to_string(&path).map_err(|source| ZoneinfoError::Read { path, source })?;
    Ok(parse(&text))
}

/// Free pages each node can still give, by node id.
pub fn node_rooms(root: &Path) -> Result<BTreeMap<u32, u64>, ZoneinfoError> {
    Ok(rooms(&read(root)?))
}

fn rooms(zones: &[Zone]) -> BTreeMap<u32, u64> {
    let mut rooms = BTreeMap::new();
    for z in zones {
        let room: &mut u64 = rooms.entry(z.node).or_default();
        *room = room.saturating_add(z.room());
    }
    rooms
}

/// The zones of a zoneinfo text. A zone starts with `Node N, zone NAME`; its `pages
/// free`, `high` and `protection: (...)` lines follow (a pageset's `high:` is not the
/// watermark). Unknown and malformed lines are skipped; missing figures are 0.
pub fn parse(text: &str) -> Vec<Zone> {
    let mut zones: Vec<Zone> = Vec::new();
    // Whether the lines read belong to the last zone (not to one whose header was bad).
    let mut in_zone = false;
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().take(8).collect();
        if let ["Node", node, "zone", name, ..] = words.as_slice() {
            in_zone = match node.trim_end_matches(',').parse() {
                Ok(node) => {
                    zones.push(Zone {
                        node,
                        name: (*name).to_owned(),
                        free: 0,
                        high: 0,
                        reserve: 0,
                    });
                    true
                }
                Err(_) => false,
            };
            continue;
        }
        let Some(z) = zones.last_mut().filter(|_| in_zone) else {
            continue;
        };
        match words.as_slice() {
            ["pages", "free", n] => z.free = n.parse().unwrap_or(0),
            ["high", n] => z.high = n.parse().unwrap_or(0),
            ["protection:", ..] => {
                z.reserve = line
                    .split(['(', ')', ','])
                    .filter_map(|w| w.trim().parse::<u64>().ok())
                    .max()
                    .unwrap_or(0);
            }
            _ => {}
        }
    }
    zones
}

#[cfg(test)]
mod tests {
    use super::*;

    const ZONEINFO: &str = "\
Node 0, zone    DMA32
  per-node stats
      nr_inactive_anon 19
  pages free     10000
        boost    0
        min      100
        low      200
        high     300
        spanned  65536
        protection: (0, 0, 2000, 2000)
      nr_free_pages 10000
  pagesets
    cpu: 0
              count: 5
              high:  42
Node 0, zone   Normal
  pages free     0
        high     0
        protection: (0, 0, 0, 0)
Node 0, zone  Movable
  pages free     5000
        high     100
        protection: (0, 0, 0, 0)
Node 1, zone    DMA32
  pages free     100
        high     300
        protection: (0, 0, 5, 5)
Node 1, zone  Movable
  pages free     30000
        high     60
        protection: (0, 0, 0, 0)
Node 2, zone  Movable
";

    #[test]
    fn rooms_per_node() {
        let zones = parse(ZONEINFO);
        assert_eq!(
            zones
                .iter()
                .map(|z| (z.node, z.name.as_str()))
                .collect::<Vec<_>>(),
            [
                (0, "DMA32"),
                (0, "Normal"),
                (0, "Movable"),
                (1, "DMA32"),
                (1, "Movable"),
                (2, "Movable")
            ]
        );
        assert_eq!(
            (zones[0].free, zones[0].high, zones[0].reserve),
            (10000, 300, 2000)
        );
        let rooms = rooms(&zones);
        // Node 0: (10000 - 300 - 2000) + 0 + (5000 - 100); the pageset's `high:` is not
        // the zone's watermark.
        assert_eq!(rooms[&0], 7700 + 4900);
        // Node 1: DMA32 is below its watermark: it gives nothing, and is not negative.
        assert_eq!(rooms[&1], 29_940);
        assert_eq!(rooms[&2], 0);
        assert!(parse("").is_empty());
        assert!(parse("Node x, zone DMA\n  pages free 5\n").is_empty());
        assert!(parse("  pages free 5\n").is_empty());
    }

    #[test]
    fn reads_this_machine() {
        let rooms = node_rooms(Path::new("/")).unwrap();
        assert!(rooms.contains_key(&0), "{rooms:?}");
        let err = node_rooms(Path::new("/nonexistent")).unwrap_err();
        assert_eq!(err.errno(), libc::ENOENT);
    }
}
