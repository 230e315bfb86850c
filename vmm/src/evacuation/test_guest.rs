//! A simulated guest for evacuation tests: an agent that offlines and onlines blocks,
//! and a virtio-mem driver that unplugs offline blocks first, as Linux's does, both on
//! a real memfd-backed device.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent_protocol::{
    AgentError, BlockResult, BlockUsage, NodeRoom, Request, Response, SettledBlock, TrackedBlock,
};
use vm_memory::{Bytes, GuestAddress};

use super::node::{AgentCall, Geometry, MemSnapshot, NodeError, NodeMemory, SharedMemDevice};
use crate::agent::AgentCallError;
use crate::devices::virtio::mem::MemDevice;
use crate::layout::MemoryLayout;
use crate::memory::GuestRam;

pub const MIB: u64 = 1 << 20;
/// Data written at the start of each region: above compaction's minimum gain.
pub const DATA: u64 = 4 * MIB;
pub const BASE: u64 = 1 << 32;
pub const FIRST_BLOCK: u32 = 32;

#[derive(Default)]
pub struct GuestState {
    pub offline: BTreeSet<u32>,
    /// Blocks whose offlining the kernel refuses (EBUSY, as with unmovable pages).
    pub unmovable: BTreeSet<u32>,
    /// The agent times out / is disconnected.
    pub agent_down: Option<AgentCallError>,
    /// The driver ignores requested-size changes.
    pub driver_stuck: bool,
    /// The driver also unplugs the highest plugged block of another region.
    pub driver_greedy: bool,
    /// The agent answers offline with no result for the block, and absurd counters.
    pub agent_lies: bool,
    pub migrated_pages: u64,
    /// Pages the guest uses per memory block (others are free).
    pub in_use_pages: BTreeMap<u32, u64>,
    pub calls: Vec<String>,
    /// Offlining this block waits until the sender side says go (or is dropped).
    pub hold: Option<(u32, std::sync::mpsc::Receiver<()>)>,
    /// The node this guest's blocks are on, and each node's free pages (`track`); None
    /// is plenty everywhere.
    pub node: u32,
    pub rooms: Option<Vec<NodeRoom>>,
    /// Offlining moves pages to other nodes first (a kernel without the mempower patch):
    /// `settle` then finds them there, or moves them back.
    pub offline_leaves_node: bool,
    /// Blocks of each `track` not yet settled or released.
    pub tracks: BTreeMap<u64, Vec<u32>>,
    /// The guest's `pgmigrate_success`, shared by every node of one guest when set.
    pub global_migrated: Option<Arc<std::sync::atomic::AtomicU64>>,
}

/// A guest: its agent and its virtio-mem driver, on a real device and memfd.
#[derive(Clone)]
pub struct SimGuest {
    pub device: SharedMemDevice,
    pub state: Arc<Mutex<GuestState>>,
    pub ram: Arc<GuestRam>,
}

impl SimGuest {
    /// A node with 4 regions (512 MiB), all plugged, [`DATA`] bytes written into each.
    pub fn new() -> Self {
        let layout = MemoryLayout::with_hotplug(&[64 * MIB], &[512 * MIB]).unwrap();
        let ram = GuestRam::new(&layout, 1).unwrap();
        let dev = MemDevice::new(&layout.hotplug[0], &ram.node_files[0], 0).unwrap();
        let guest = SimGuest {
            device: Arc::new(Mutex::new(dev)),
            state: Arc::default(),
            ram: Arc::new(ram),
        };
        guest.set_requested_size(512 * MIB).unwrap();
        for region in 0..4 {
            guest.write(region, region as u8 + 1);
        }
        guest
    }

    pub fn write(&self, region: u32, byte: u8) {
        let addr = GuestAddress(BASE + u64::from(region) * 128 * MIB);
        self.ram
            .memory
            .write_slice(&vec![byte; DATA as usize], addr)
            .unwrap();
    }

    pub fn data_intact(&self, region: u32) -> bool {
        let mut buf = vec![0u8; DATA as usize];
        let addr = GuestAddress(BASE + u64::from(region) * 128 * MIB);
        self.ram.memory.read_slice(&mut buf, addr).unwrap();
        buf.iter().all(|b| *b == region as u8 + 1)
    }

    pub fn st(&self) -> std::sync::MutexGuard<'_, GuestState> {
        self.state.lock().unwrap()
    }

    /// The driver: unplug offline memory blocks first, then the highest; plug lowest.
    pub fn drive(&self) {
        let st = self.st();
        if st.driver_stuck {
            return;
        }
        let mut dev = self.device.lock().unwrap();
        let model = dev.model_mut();
        let bs = model.geometry().block_size();
        let per_region = (128 * MIB / bs) as usize;
        let count = model.geometry().block_count();
        let mut order: Vec<usize> = (0..count).rev().collect();
        order.sort_by_key(|b| {
            !st.offline
                .contains(&(FIRST_BLOCK + (b / per_region) as u32))
        });
        for b in order {
            if model.plugged_size() <= model.requested_size() {
                break;
            }
            if model.block_state(b) == Some(true) {
                let r = virtio_mem::Request::Unplug(virtio_mem::BlockRange {
                    addr: BASE + b as u64 * bs,
                    nb_blocks: 1,
                });
                assert_eq!(model.execute(&r).kind, virtio_mem::ResponseType::Ack);
            }
        }
        if st.driver_greedy {
            let victim = (0..count)
                .rev()
                .find(|b| model.block_state(*b) == Some(true))
                .unwrap();
            let r = virtio_mem::Request::Unplug(virtio_mem::BlockRange {
                addr: BASE + victim as u64 * bs,
                nb_blocks: 1,
            });
            model.execute(&r);
            return; // It took too much: it plugs nothing back.
        }
        for b in 0..count {
            if model.plugged_size() >= model.requested_size() {
                break;
            }
            if model.block_state(b) == Some(false) {
                let r = virtio_mem::Request::Plug(virtio_mem::BlockRange {
                    addr: BASE + b as u64 * bs,
                    nb_blocks: 1,
                });
                model.execute(&r);
            }
        }
    }
}

impl NodeMemory for SimGuest {
    fn geometry(&self) -> Geometry {
        self.device.geometry()
    }
    fn snapshot(&self) -> MemSnapshot {
        self.device.snapshot()
    }
    fn set_requested_size(&self, bytes: u64) -> Result<(), NodeError> {
        self.device.set_requested_size(bytes)?;
        self.drive();
        Ok(())
    }
    fn resident_bytes(&self, region: u32) -> Result<u64, NodeError> {
        self.device.resident_bytes(region)
    }
}

impl AgentCall for SimGuest {
    fn call(&self, request: Request, _timeout: Duration) -> Result<Response, AgentCallError> {
        if let Request::Offline { blocks } = &request {
            let held = {
                let mut st = self.st();
                match &st.hold {
                    Some((b, _)) if blocks.contains(b) => st.hold.take(),
                    _ => None,
                }
            };
            if let Some((_, go)) = held {
                let _ = go.recv();
            }
        }
        let mut st = self.st();
        st.calls.push(format!("{request:?}"));
        if let Some(e) = st.agent_down.clone() {
            return Err(e);
        }
        let result = |block, error| BlockResult { block, error };
        Ok(match request {
            Request::Offline { .. } if st.agent_lies => Response::BlockResults { results: vec![] },
            Request::Vmstat if st.agent_lies => Response::Vmstat {
                counters: BTreeMap::from([("pgmigrate_success".into(), u64::MAX)]),
            },
            Request::BlockUsage { blocks } if st.agent_lies => Response::BlockUsage {
                usage: blocks
                    .into_iter()
                    .map(|block| BlockUsage {
                        block,
                        pages: u64::MAX,
                        free_pages: 0,
                        node: None,
                    })
                    .collect(),
            },
            Request::Offline { blocks } => Response::BlockResults {
                results: blocks
                    .into_iter()
                    .map(|b| {
                        if st.unmovable.contains(&b) {
                            result(b, Some(AgentError::new(16, "Device or resource busy")))
                        } else {
                            st.offline.insert(b);
                            let moved = 256 + st.in_use_pages.get(&b).copied().unwrap_or(0);
                            st.migrated_pages += moved;
                            if let Some(global) = &st.global_migrated {
                                global.fetch_add(moved, std::sync::atomic::Ordering::SeqCst);
                            }
                            result(b, None)
                        }
                    })
                    .collect(),
            },
            Request::Track { blocks } => {
                let token = 1000 + st.tracks.len() as u64 + st.calls.len() as u64;
                st.tracks.insert(token, blocks.clone());
                let node = st.node;
                Response::Tracked {
                    token,
                    node_local_offline: !st.offline_leaves_node,
                    blocks: blocks
                        .iter()
                        .map(|&block| {
                            let used = if st.offline.contains(&block) {
                                0
                            } else {
                                st.in_use_pages.get(&block).copied().unwrap_or(0)
                            };
                            TrackedBlock {
                                block,
                                node: Some(node),
                                in_use_pages: used,
                                mapped_pages: used,
                            }
                        })
                        .collect(),
                    rooms: st.rooms.clone().unwrap_or_else(|| {
                        (0..2)
                            .map(|node| NodeRoom {
                                node,
                                free_pages: 1 << 30,
                            })
                            .collect()
                    }),
                }
            }
            Request::Settle { token, move_back } => {
                let Some(blocks) = st.tracks.remove(&token) else {
                    return Ok(Response::Settled {
                        token,
                        blocks: vec![],
                    });
                };
                Response::Settled {
                    token,
                    blocks: blocks
                        .into_iter()
                        .map(|block| {
                            let used = st.in_use_pages.get(&block).copied().unwrap_or(0);
                            let mut s = SettledBlock {
                                block,
                                node: Some(st.node),
                                tracked_pages: used,
                                ..SettledBlock::default()
                            };
                            if !st.offline.contains(&block) {
                                s.unmoved_pages = used;
                            } else if !st.offline_leaves_node {
                                s.on_node_pages = used;
                            } else if move_back {
                                (s.on_node_pages, s.moved_back_pages) = (used, used);
                            } else {
                                s.off_node_pages = used;
                            }
                            s
                        })
                        .collect(),
                }
            }
            Request::Release { handle } if st.tracks.remove(&handle).is_some() => {
                Response::Released { handle }
            }
            Request::Online { blocks, .. } => Response::BlockResults {
                results: blocks
                    .into_iter()
                    .map(|b| {
                        if st.offline.remove(&b) {
                            result(b, None)
                        } else {
                            result(b, Some(AgentError::new(22, "Invalid argument")))
                        }
                    })
                    .collect(),
            },
            Request::Vmstat => Response::Vmstat {
                counters: BTreeMap::from([(
                    "pgmigrate_success".into(),
                    st.global_migrated.as_ref().map_or(st.migrated_pages, |g| {
                        g.load(std::sync::atomic::Ordering::SeqCst)
                    }),
                )]),
            },
            Request::BlockUsage { blocks } => Response::BlockUsage {
                usage: blocks
                    .into_iter()
                    .filter(|b| !st.offline.contains(b))
                    .map(|block| BlockUsage {
                        block,
                        pages: 32768,
                        free_pages: 32768 - st.in_use_pages.get(&block).copied().unwrap_or(0),
                        node: Some(st.node),
                    })
                    .collect(),
            },
            other => panic!("unexpected request {other:?}"),
        })
    }
}
