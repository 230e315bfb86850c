//! A simulated guest for evacuation tests: an agent that offlines and onlines memory
//! blocks, and a virtio-mem driver that unplugs offline blocks first, as Linux's does,
//! both on a real memfd-backed device.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent_protocol::{
    AgentError, BlockResult, BlockUsage, NodeRoom, Request, Response, SettledBlock, TrackedBlock,
};
use virtio_mem::{BlockRange, ResponseType, VirtioMem};
use vm_memory::{Bytes, GuestAddress};

use super::node::{AgentCall, DeviceMemory, Geometry, MemSnapshot, NodeError, NodeMemory};
use crate::agent::AgentCallError;
use crate::devices::virtio::mem::MemDevice;
use crate::layout::MemoryLayout;
use crate::memory::GuestRam;

pub const MIB: u64 = 1 << 20;
/// Data written at the start of each region: above compaction's minimum gain.
pub const DATA: u64 = 4 * MIB;
pub const BASE: u64 = 1 << 32;

pub struct GuestState {
    /// The guest's memory block size (its inventory says it).
    pub block_size: u64,
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
    /// Every requested size the device was given, in order.
    pub requested: Vec<u64>,
    /// The agent panics on offline and block usage (a bug, simulated).
    pub agent_panics: bool,
    /// The next block usage waits until the sender side says go (or is dropped).
    pub hold_usage: Option<std::sync::mpsc::Receiver<()>>,
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
    /// Offlining happens, but its answer is lost: the call times out, which drops the
    /// connection, and the next `reconnect_calls` calls find the agent not connected.
    pub offline_answer_lost: bool,
    pub reconnect_calls: u32,
    /// Calls still to be refused as not connected.
    pub not_connected: u32,
}

impl Default for GuestState {
    fn default() -> Self {
        GuestState {
            block_size: 128 * MIB,
            offline: BTreeSet::new(),
            unmovable: BTreeSet::new(),
            agent_down: None,
            driver_stuck: false,
            driver_greedy: false,
            agent_lies: false,
            migrated_pages: 0,
            in_use_pages: BTreeMap::new(),
            calls: Vec::new(),
            requested: Vec::new(),
            agent_panics: false,
            hold_usage: None,
            hold: None,
            node: 0,
            rooms: None,
            offline_leaves_node: false,
            tracks: BTreeMap::new(),
            global_migrated: None,
            offline_answer_lost: false,
            reconnect_calls: 0,
            not_connected: 0,
        }
    }
}

/// A guest: its agent and its virtio-mem driver, on a real device and memfd.
#[derive(Clone)]
pub struct SimGuest {
    pub device: DeviceMemory,
    pub state: Arc<Mutex<GuestState>>,
    pub ram: Arc<GuestRam>,
}

impl SimGuest {
    /// A node with 4 regions (512 MiB), all plugged, [`DATA`] bytes written into each.
    pub fn new() -> Self {
        let guest = Self::with_regions(4, 128 * MIB);
        for region in 0..4 {
            guest.write(region, region as u8 + 1);
        }
        guest
    }

    /// A node of `regions` regions of `region_size` bytes at [`BASE`], all plugged,
    /// nothing written.
    pub fn with_regions(regions: u32, region_size: u64) -> Self {
        let size = u64::from(regions) * region_size;
        let layout =
            MemoryLayout::with_hotplug_aligned(&[64 * MIB], &[size], &[region_size]).unwrap();
        assert_eq!(layout.hotplug[0].guest_addr, BASE);
        let ram = GuestRam::new(&layout, 1).unwrap();
        let dev = MemDevice::new(&layout.hotplug[0], &ram.node_files[0], 0).unwrap();
        let guest = SimGuest {
            device: DeviceMemory::new(Arc::new(Mutex::new(dev)), region_size).unwrap(),
            state: Arc::default(),
            ram: Arc::new(ram),
        };
        guest.set_requested_size(size).unwrap();
        guest
    }

    fn region_addr(&self, region: u32) -> GuestAddress {
        GuestAddress(BASE + u64::from(region) * self.device.region_size)
    }

    pub fn write(&self, region: u32, byte: u8) {
        self.ram
            .memory
            .write_slice(&vec![byte; DATA as usize], self.region_addr(region))
            .unwrap();
    }

    pub fn data_intact(&self, region: u32) -> bool {
        let mut buf = vec![0u8; DATA as usize];
        self.ram
            .memory
            .read_slice(&mut buf, self.region_addr(region))
            .unwrap();
        buf.iter().all(|b| *b == region as u8 + 1)
    }

    pub fn st(&self) -> std::sync::MutexGuard<'_, GuestState> {
        self.state.lock().unwrap()
    }

    /// Plugged device blocks per region.
    pub fn plugged_regions(&self) -> Vec<usize> {
        let s = self.snapshot();
        let g = self.geometry();
        (0..g.regions())
            .map(|r| s.plugged_in(g.device_blocks(r)))
            .collect()
    }

    /// The driver: unplug offline memory blocks first, then the highest; plug lowest.
    /// A memory block left without plugged memory is removed from the guest (and so is
    /// no longer offline: when plugged again, it comes back online).
    pub fn drive(&self) {
        let mut st = self.st();
        if st.driver_stuck {
            return;
        }
        let mut dev = self.device.device.lock().unwrap();
        let model = dev.model_mut();
        let g = model.geometry();
        let per_block = (st.block_size / g.block_size()) as usize;
        let first_block = (g.addr() / st.block_size) as u32;
        for block in st.offline.iter().rev() {
            if let Some(b) = block.checked_sub(first_block) {
                let start = b as usize * per_block;
                unplug_highest(model, start..(start + per_block).min(g.block_count()));
            }
        }
        unplug_highest(model, 0..g.block_count());
        if st.driver_greedy {
            let victim = (0..g.block_count())
                .rev()
                .find(|b| model.block_state(*b) == Some(true))
                .unwrap();
            execute(model, false, victim..victim + 1);
        } else {
            plug_lowest(model);
        }
        st.offline.retain(|block| {
            let Some(b) = block.checked_sub(first_block) else {
                return true;
            };
            let start = b as usize * per_block;
            (start..start + per_block).any(|d| model.block_state(d) == Some(true))
        });
    }
}

type Model = VirtioMem<crate::devices::virtio::mem::SlotBackend>;

/// Plugs or unplugs `blocks` in requests of at most u16::MAX blocks.
fn execute(model: &mut Model, plug: bool, blocks: Range<usize>) {
    let g = model.geometry();
    let mut start = blocks.start;
    while start < blocks.end {
        let n = (blocks.end - start).min(u16::MAX as usize);
        let range = BlockRange {
            addr: g.block_addr(start),
            nb_blocks: n as u16,
        };
        let request = match plug {
            true => virtio_mem::Request::Plug(range),
            false => virtio_mem::Request::Unplug(range),
        };
        assert_eq!(model.execute(&request).kind, ResponseType::Ack);
        start += n;
    }
}

/// Unplugs plugged blocks of `blocks`, highest first, while more is plugged than asked.
fn unplug_highest(model: &mut Model, blocks: Range<usize>) {
    let bs = model.geometry().block_size();
    let mut end = blocks.end;
    while end > blocks.start && model.plugged_size() > model.requested_size() {
        let excess = ((model.plugged_size() - model.requested_size()) / bs) as usize;
        if model.block_state(end - 1) != Some(true) {
            end -= 1;
            continue;
        }
        let mut start = end - 1;
        while start > blocks.start
            && end - start < excess
            && model.block_state(start - 1) == Some(true)
        {
            start -= 1;
        }
        execute(model, false, start..end);
        end = start;
    }
}

/// Plugs unplugged blocks, lowest first, while less is plugged than asked.
fn plug_lowest(model: &mut Model) {
    let (bs, count) = (
        model.geometry().block_size(),
        model.geometry().block_count(),
    );
    let mut start = 0;
    while start < count && model.plugged_size() < model.requested_size() {
        let lack = ((model.requested_size() - model.plugged_size()) / bs) as usize;
        if model.block_state(start) != Some(false) {
            start += 1;
            continue;
        }
        let mut end = start + 1;
        while end < count && end - start < lack && model.block_state(end) == Some(false) {
            end += 1;
        }
        execute(model, true, start..end);
        start = end;
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
        self.st().requested.push(bytes);
        self.drive();
        Ok(())
    }
    fn resident_bytes(&self, region: u32) -> Result<u64, NodeError> {
        self.device.resident_bytes(region)
    }
}

impl AgentCall for SimGuest {
    fn call(&self, request: Request, timeout: Duration) -> Result<Response, AgentCallError> {
        if let Request::BlockUsage { .. } = &request {
            let held = self.st().hold_usage.take();
            if let Some(go) = held {
                let _ = go.recv();
            }
        }
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
        if st.agent_panics
            && matches!(
                request,
                Request::Offline { .. } | Request::BlockUsage { .. }
            )
        {
            drop(st);
            panic!("the simulated agent call panics");
        }
        if let Some(e) = st.agent_down.clone() {
            return Err(e);
        }
        if st.not_connected > 0 {
            st.not_connected -= 1;
            return Err(AgentCallError::NotConnected(Some("reconnecting".into())));
        }
        if let (Request::Offline { blocks }, true) = (&request, st.offline_answer_lost) {
            st.offline.extend(blocks);
            st.not_connected = st.reconnect_calls;
            return Err(AgentCallError::Timeout(timeout));
        }
        let result = |block, error| BlockResult { block, error };
        let pages = st.block_size / 4096;
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
            Request::Inventory => Response::Inventory {
                block_size: st.block_size,
                nodes: vec![],
                blocks: vec![],
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
                        pages,
                        free_pages: pages - st.in_use_pages.get(&block).copied().unwrap_or(0),
                        node: Some(st.node),
                    })
                    .collect(),
            },
            other => panic!("unexpected request {other:?}"),
        })
    }
}
