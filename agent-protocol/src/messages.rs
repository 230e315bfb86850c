//! The messages. JSON shapes are part of the protocol: field names are stable.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::signals::GuestSignals;

/// One request from the VMM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestFrame {
    pub version: u32,
    /// Echoed in the response, so that the VMM can match them.
    pub id: u64,
    pub request: Request,
}

/// A request. Its names (`Request::VARIANTS`, `<&'static str>::from(&request)`) are
/// its JSON `type`s, so that what an agent says it serves is derived, never listed.
#[derive(
    Debug, Clone, PartialEq, Eq, Serialize, Deserialize, strum::VariantNames, strum::IntoStaticStr,
)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
#[strum(serialize_all = "snake_case")]
pub enum Request {
    /// Versions and capabilities.
    Hello,
    /// NUMA nodes and every memory block.
    Inventory,
    /// Offline these memory blocks: the guest kernel migrates their pages elsewhere.
    Offline { blocks: Vec<u32> },
    /// Online these memory blocks, to ZONE_MOVABLE (`movable`) or to a kernel zone.
    Online { blocks: Vec<u32>, movable: bool },
    /// Pages in use and free in these blocks (all online blocks if empty).
    BlockUsage { blocks: Vec<u32> },
    /// Allocate `bytes` on `node`, fill them with a pattern derived from `seed`, keep them.
    Fill { node: u32, bytes: u64, seed: u64 },
    /// Which memory blocks a fill's pages are in now (they move when blocks go offline).
    Locate { handle: u64 },
    /// Check every byte of a fill against its pattern.
    Verify { handle: u64 },
    /// Hold `bytes` of unmovable kernel memory (pipe buffers) allocated on `node`, until
    /// released. A memory block holding some of it cannot go offline (EBUSY).
    Pin { node: u32, bytes: u64 },
    /// Free a fill or a pin, or forget a track (their handles never collide).
    Release { handle: u64 },
    /// Two fills of `bytes` in all on `node`, written run by run in turn (runs of
    /// `run_pages` pages, 1 if not given), so that they are interleaved in physical
    /// memory: of every `keep_one_in` runs (2 to 512), the first goes to the `kept` fill,
    /// the others to the `other` fill. Releasing `other` then leaves free holes of the
    /// run's size between live data (for one-page runs, no free 2 MiB chunk).
    FillInterleaved {
        node: u32,
        bytes: u64,
        seed: u64,
        keep_one_in: u32,
        #[serde(default = "one_page")]
        run_pages: u32,
    },
    /// The guest's /proc/vmstat counters.
    Vmstat,
    /// Power the guest off, after answering.
    Shutdown,
    /// Read `len` bytes at guest-physical `addr` through /dev/mem, write `byte` over them,
    /// and read them back: what a hostile guest does to memory the host took back. At
    /// most [`MAX_POKE`](crate::MAX_POKE) bytes, never in RAM the guest kernel owns, and
    /// `byte` is not 0xff (which a dropped write reads back as).
    Poke { addr: u64, len: u32, byte: u8 },
    /// Before offlining `blocks`: remember which process pages are in them (every
    /// process's pagemap), and say what moving them needs: their in-use pages and the
    /// room on each node. Answers a token for `settle` (a handle: `release` forgets it).
    Track { blocks: Vec<u32> },
    /// After offlining the blocks of a `track`, whether that succeeded or not: where
    /// their tracked pages are now. With `move_back`, pages that left their block's node
    /// are moved back to it (move_pages). Forgets the token.
    Settle { token: u64, move_back: bool },
    /// Compact `node`'s memory (`/sys/devices/system/node/nodeN/compact`): in each of
    /// its zones, movable pages move from the bottom of the zone to free pages at its top.
    CompactNode { node: u32 },
    /// The autopilot's sample: per node free, page cache, anonymous and online memory;
    /// the guest's memory pressure (PSI) and reclaim counters. One bounded answer
    /// ([`GuestSignals`]), cheap enough to ask every second.
    Signals,
}

fn one_page() -> u32 {
    1
}

/// The answer to one request. Not `Eq`: pressure figures are `f32`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResponseFrame {
    pub version: u32,
    pub id: u64,
    pub result: Outcome,
}

/// `{"ok": {...}}` or `{"error": {"errno": N, "message": "..."}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok(Response),
    Error(AgentError),
}

/// A failed request: the errno the guest kernel gave (0 if none applies) and a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message} (errno {errno})")]
pub struct AgentError {
    pub errno: i32,
    pub message: String,
}

impl AgentError {
    pub fn new(errno: i32, message: impl Into<String>) -> Self {
        AgentError {
            errno,
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    Hello {
        protocol_version: u32,
        agent_version: String,
        kernel: String,
        capabilities: Vec<String>,
    },
    Inventory {
        /// Bytes per memory block (128 MiB on x86_64).
        block_size: u64,
        nodes: Vec<NodeInventory>,
        blocks: Vec<MemoryBlock>,
    },
    /// Per block, for `offline` and `online`.
    BlockResults {
        results: Vec<BlockResult>,
    },
    BlockUsage {
        usage: Vec<BlockUsage>,
    },
    Filled {
        handle: u64,
        node: u32,
        bytes: u64,
        /// Pages of the fill per memory block, from /proc/self/pagemap.
        blocks: Vec<BlockPages>,
    },
    Located {
        handle: u64,
        blocks: Vec<BlockPages>,
    },
    Verified {
        handle: u64,
        checked_bytes: u64,
        mismatched_bytes: u64,
    },
    /// Pipe buffers of `bytes` in all, on `node`'s kernel zones.
    Pinned {
        handle: u64,
        node: u32,
        bytes: u64,
    },
    Released {
        handle: u64,
    },
    /// The two fills of a `fill_interleaved` (seeds `seed` and `seed + 1`), whole pages.
    FilledInterleaved {
        kept: u64,
        kept_bytes: u64,
        other: u64,
        other_bytes: u64,
    },
    Vmstat {
        counters: BTreeMap<String, u64>,
    },
    ShuttingDown,
    /// What a poke read: bytes that were 0xff before the write and after it, and bytes
    /// that read back as written.
    Poked {
        addr: u64,
        len: u32,
        ones_before: u32,
        ones_after: u32,
        written_after: u32,
    },
    Tracked {
        token: u64,
        /// Whether this kernel's offlining keeps pages on their node when it has room
        /// (`memory_hotplug.offline_node_local`, a mempower guest kernel patch). If not,
        /// offlining moves them to other nodes, and `settle` can move them back.
        node_local_offline: bool,
        blocks: Vec<TrackedBlock>,
        /// Every node with memory, and its free memory outside the tracked blocks.
        rooms: Vec<NodeRoom>,
    },
    Settled {
        token: u64,
        blocks: Vec<SettledBlock>,
    },
    NodeCompacted {
        node: u32,
    },
    /// The fields of [`GuestSignals`], beside `type`.
    Signals(GuestSignals),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInventory {
    pub id: u32,
    pub cpus: Vec<u32>,
    pub mem_total_kib: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryBlock {
    /// N of /sys/devices/system/memory/memoryN.
    pub id: u32,
    /// Guest-physical start and size.
    pub start: u64,
    pub size: u64,
    pub node: Option<u32>,
    /// The zone of an online block ("Movable", "Normal", "DMA32"...), or where an offline
    /// block would go by default (the first of `valid_zones`).
    pub zone: String,
    pub online: bool,
    pub removable: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockResult {
    pub block: u32,
    /// None on success, else the kernel's error.
    pub error: Option<AgentError>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockUsage {
    pub block: u32,
    pub pages: u64,
    /// Pages the buddy allocator holds (reference count 0).
    pub free_pages: u64,
    /// The block's NUMA node.
    #[serde(default)]
    pub node: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockPages {
    pub block: u32,
    pub pages: u64,
    /// The block's NUMA node: where these pages are.
    #[serde(default)]
    pub node: Option<u32>,
}

/// A block as `track` found it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackedBlock {
    pub block: u32,
    pub node: Option<u32>,
    /// Pages not free (what offlining must migrate).
    pub in_use_pages: u64,
    /// Of those, pages some process maps: `settle` follows these. The others (page
    /// cache no process maps, movable kernel pages) cannot be followed.
    pub mapped_pages: u64,
}

/// Free memory of a node that allocations may still take: per zone, free pages above
/// the high watermark and the reserve kept for higher zones; outside tracked blocks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRoom {
    pub node: u32,
    pub free_pages: u64,
}

/// Where a block's tracked pages went.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettledBlock {
    pub block: u32,
    pub node: Option<u32>,
    /// Pages tracked (mapped when `track` ran).
    pub tracked_pages: u64,
    /// Still in the block: not migrated (the offlining failed before reaching them).
    pub unmoved_pages: u64,
    /// Migrated, and now on the block's node (moved back ones included).
    pub on_node_pages: u64,
    /// Of `on_node_pages`, those `settle` moved back from another node.
    pub moved_back_pages: u64,
    /// Migrated, and now on another node.
    pub off_node_pages: u64,
    /// No longer mapped, or their process exited: not followed.
    pub gone_pages: u64,
}

impl RequestFrame {
    pub fn new(id: u64, request: Request) -> Self {
        RequestFrame {
            version: crate::PROTOCOL_VERSION,
            id,
            request,
        }
    }
}

impl ResponseFrame {
    pub fn new(id: u64, result: Result<Response, AgentError>) -> Self {
        ResponseFrame {
            version: crate::PROTOCOL_VERSION,
            id,
            result: match result {
                Ok(r) => Outcome::Ok(r),
                Err(e) => Outcome::Error(e),
            },
        }
    }

    pub fn into_result(self) -> Result<Response, AgentError> {
        match self.result {
            Outcome::Ok(r) => Ok(r),
            Outcome::Error(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::psi::{Pressure, Stall};
    use crate::{read_frame, write_frame, NodeSignals, VmCounters};

    fn round_trip<T: Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug>(
        value: T,
    ) {
        let mut wire = Vec::new();
        write_frame(&mut wire, &value).unwrap();
        assert_eq!(read_frame::<T>(&mut wire.as_slice()).unwrap(), value);
    }

    #[test]
    fn every_request_round_trips() {
        for request in [
            Request::Hello,
            Request::Inventory,
            Request::Offline {
                blocks: vec![40, 41],
            },
            Request::Online {
                blocks: vec![40],
                movable: true,
            },
            Request::BlockUsage { blocks: vec![] },
            Request::Fill {
                node: 1,
                bytes: 64 << 20,
                seed: 7,
            },
            Request::Locate { handle: 1 },
            Request::Verify { handle: 1 },
            Request::Pin {
                node: 1,
                bytes: 4 << 20,
            },
            Request::Release { handle: 1 },
            Request::FillInterleaved {
                node: 0,
                bytes: 8 << 20,
                seed: 5,
                keep_one_in: 2,
                run_pages: 1024,
            },
            Request::Vmstat,
            Request::Shutdown,
            Request::Poke {
                addr: 5 << 30,
                len: 4096,
                byte: 0x5a,
            },
            Request::Track {
                blocks: vec![40, 41],
            },
            Request::Settle {
                token: 3,
                move_back: true,
            },
            Request::CompactNode { node: 1 },
            Request::Signals,
        ] {
            // Its name is its JSON type, and one of the names every agent may serve.
            let name: &'static str = (&request).into();
            let json = serde_json::to_value(&request).unwrap();
            assert_eq!(json["type"], name);
            assert!(<Request as strum::VariantNames>::VARIANTS.contains(&name));
            round_trip(RequestFrame::new(9, request));
        }
    }

    #[test]
    fn every_response_round_trips() {
        let block = MemoryBlock {
            id: 40,
            start: 5 << 30,
            size: 128 << 20,
            node: Some(1),
            zone: "Movable".into(),
            online: true,
            removable: true,
        };
        for response in [
            Ok(Response::Hello {
                protocol_version: 1,
                agent_version: "0.1.0".into(),
                kernel: "6.1.192".into(),
                capabilities: vec!["fill".into()],
            }),
            Ok(Response::Inventory {
                block_size: 128 << 20,
                nodes: vec![NodeInventory {
                    id: 1,
                    cpus: vec![1],
                    mem_total_kib: 1,
                }],
                blocks: vec![block],
            }),
            Ok(Response::BlockResults {
                results: vec![
                    BlockResult {
                        block: 40,
                        error: None,
                    },
                    BlockResult {
                        block: 41,
                        error: Some(AgentError::new(16, "Device or resource busy")),
                    },
                ],
            }),
            Ok(Response::BlockUsage {
                usage: vec![BlockUsage {
                    block: 40,
                    pages: 32768,
                    free_pages: 32700,
                    node: Some(1),
                }],
            }),
            Ok(Response::Filled {
                handle: 1,
                node: 1,
                bytes: 4096,
                blocks: vec![BlockPages {
                    block: 40,
                    pages: 1,
                    node: Some(1),
                }],
            }),
            Ok(Response::Located {
                handle: 1,
                blocks: vec![],
            }),
            Ok(Response::Verified {
                handle: 1,
                checked_bytes: 4096,
                mismatched_bytes: 0,
            }),
            Ok(Response::Pinned {
                handle: 2,
                node: 1,
                bytes: 4 << 20,
            }),
            Ok(Response::Released { handle: 1 }),
            Ok(Response::FilledInterleaved {
                kept: 1,
                kept_bytes: 4096,
                other: 2,
                other_bytes: 4096,
            }),
            Ok(Response::Vmstat {
                counters: BTreeMap::from([("pgmigrate_success".to_string(), 5)]),
            }),
            Ok(Response::ShuttingDown),
            Ok(Response::Poked {
                addr: 5 << 30,
                len: 4096,
                ones_before: 4096,
                ones_after: 4096,
                written_after: 0,
            }),
            Ok(Response::Tracked {
                token: 3,
                node_local_offline: true,
                blocks: vec![TrackedBlock {
                    block: 40,
                    node: Some(1),
                    in_use_pages: 16384,
                    mapped_pages: 16000,
                }],
                rooms: vec![NodeRoom {
                    node: 1,
                    free_pages: 50_000,
                }],
            }),
            Ok(Response::Settled {
                token: 3,
                blocks: vec![SettledBlock {
                    block: 40,
                    node: Some(1),
                    tracked_pages: 16000,
                    on_node_pages: 15990,
                    moved_back_pages: 15990,
                    off_node_pages: 8,
                    gone_pages: 2,
                    ..SettledBlock::default()
                }],
            }),
            Ok(Response::NodeCompacted { node: 1 }),
            Ok(Response::Signals(GuestSignals {
                nodes: vec![NodeSignals {
                    node: 1,
                    free_bytes: 64 << 20,
                    file_bytes: 3 << 20,
                    anon_bytes: 5 << 20,
                    online_bytes: 512 << 20,
                }],
                pressure: Some(Pressure {
                    some: Stall {
                        avg10: 12.34,
                        avg60: 0.01,
                        total_us: 5_214_310,
                    },
                    full: Stall {
                        avg10: 100.0,
                        avg60: 0.0,
                        total_us: 1_432_765,
                    },
                }),
                counters: VmCounters {
                    oom_kill: Some(1),
                    workingset_refault_anon: Some(2),
                    workingset_refault_file: Some(3),
                    pgmajfault: Some(4),
                    allocstall: None,
                },
            })),
            Ok(Response::Signals(GuestSignals {
                nodes: vec![],
                pressure: None,
                counters: VmCounters::default(),
            })),
            Err(AgentError::new(22, "no such fill handle: 9")),
        ] {
            round_trip(ResponseFrame::new(3, response));
        }
    }

    #[test]
    fn json_shapes_are_stable() {
        let json =
            serde_json::to_string(&RequestFrame::new(1, Request::Offline { blocks: vec![40] }))
                .unwrap();
        assert_eq!(
            json,
            r#"{"version":1,"id":1,"request":{"type":"offline","blocks":[40]}}"#
        );
        let json = serde_json::to_string(&ResponseFrame::new(1, Err(AgentError::new(16, "busy"))))
            .unwrap();
        assert_eq!(
            json,
            r#"{"version":1,"id":1,"result":{"error":{"errno":16,"message":"busy"}}}"#
        );
        let json = serde_json::to_string(&RequestFrame::new(
            2,
            Request::Pin {
                node: 1,
                bytes: 4 << 20,
            },
        ))
        .unwrap();
        assert_eq!(
            json,
            r#"{"version":1,"id":2,"request":{"type":"pin","node":1,"bytes":4194304}}"#
        );
        let json = serde_json::to_string(&ResponseFrame::new(
            2,
            Ok(Response::Pinned {
                handle: 3,
                node: 1,
                bytes: 4 << 20,
            }),
        ))
        .unwrap();
        assert_eq!(
            json,
            r#"{"version":1,"id":2,"result":{"ok":{"type":"pinned","handle":3,"node":1,"bytes":4194304}}}"#
        );
    }

    #[test]
    fn interleaved_fills_default_to_one_page_runs() {
        let json = r#"{"type":"fill_interleaved","node":1,"bytes":8192,"seed":3,"keep_one_in":2}"#;
        let r: Request = serde_json::from_str(json).unwrap();
        assert_eq!(
            r,
            Request::FillInterleaved {
                node: 1,
                bytes: 8192,
                seed: 3,
                keep_one_in: 2,
                run_pages: 1,
            }
        );
    }

    #[test]
    fn answers_without_nodes_still_parse() {
        // Agents before `node` was reported: the field is optional.
        let usage: BlockUsage =
            serde_json::from_str(r#"{"block":40,"pages":8,"free_pages":2}"#).unwrap();
        assert_eq!(usage.node, None);
        let pages: BlockPages = serde_json::from_str(r#"{"block":40,"pages":8}"#).unwrap();
        assert_eq!(pages.node, None);
        let json = serde_json::to_string(&RequestFrame::new(
            4,
            Request::Settle {
                token: 2,
                move_back: false,
            },
        ))
        .unwrap();
        assert_eq!(
            json,
            r#"{"version":1,"id":4,"request":{"type":"settle","token":2,"move_back":false}}"#
        );
    }

    #[test]
    fn malformed_requests_are_errors() {
        for bad in [
            r#"{"version":1,"id":1,"request":{"type":"format_disk"}}"#,
            r#"{"version":1,"id":1,"request":{"type":"offline"}}"#,
            r#"{"version":1,"id":1,"request":{"type":"offline","blocks":[-1]}}"#,
            r#"{"version":1,"id":1,"request":{"type":"offline","blocks":[1],"extra":1}}"#,
            r#"{"version":1,"id":1,"request":{"type":"pin","node":0}}"#,
            r#"{"version":1,"id":1,"request":{"type":"pin","node":0,"bytes":-1}}"#,
            r#"{"version":1,"id":1,"request":{"type":"pin","node":0,"bytes":1,"seed":1}}"#,
            r#"{"version":1,"id":1,"request":{"type":"fill_interleaved","node":0,"bytes":1,"seed":1,"keep_one_in":2,"run_pages":-1}}"#,
            r#"{"version":1,"id":1,"request":{"type":"poke","addr":0,"len":1,"byte":256}}"#,
            r#"{"version":1,"id":1,"request":{"type":"poke","addr":0,"len":-1,"byte":1}}"#,
            r#"{"version":1,"id":1,"request":{"type":"fill_interleaved","node":0,"bytes":1,"seed":1}}"#,
            r#"{"version":1,"id":1,"request":{"type":"fill_interleaved","node":0,"bytes":1,"seed":1,"keep_one_in":-2}}"#,
            r#"{"version":1,"request":{"type":"hello"}}"#,
            r#"{"version":1,"id":1,"request":{"type":"settle","token":1}}"#,
            r#"{"version":1,"id":1,"request":{"type":"track","blocks":[1],"node":1}}"#,
            r#"[]"#,
        ] {
            assert!(serde_json::from_str::<RequestFrame>(bad).is_err(), "{bad}");
        }
    }
}
