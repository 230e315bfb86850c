//! `track`, `settle` and `compact_node`: keeping evacuated memory on its NUMA node.
//!
//! Offlining a block migrates its pages. Upstream Linux sends them to *other* nodes
//! first (`do_migrate_range` clears the source node from the target mask); the mempower
//! guest kernel's patch (`memory_hotplug.offline_node_local`) keeps them on the block's
//! node when it has room. `track`, before offlining, records every process page in the
//! blocks and says how much room each node has; `settle`, after it, finds where those
//! pages went and can move the ones that left back to their node with move_pages(2),
//! which is how a guest kernel without the patch keeps its mapped memory on its node.
//! Pages no process maps (unmapped page cache, movable kernel pages) cannot be followed.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use agent_protocol::{NodeRoom, SettledBlock, TrackedBlock};
use thiserror::Error;

use crate::held::Handles;
use crate::memory::{self, MemoryError, PAGE_SIZE};
use crate::pagemap::{self, PagemapError};
use crate::procpages::{self, MappedPage, Process, ScanError};
use crate::usage::{self, UsageError};
use crate::zoneinfo::{self, ZoneinfoError};

/// Tracks kept at once; a VMM that never settles cannot make the agent grow.
const MAX_TRACKS: usize = 16;
/// Pages per move_pages call.
const MOVE_BATCH: usize = 1024;
/// `MPOL_MF_MOVE_ALL`: also pages other processes map (the agent has CAP_SYS_NICE).
const MPOL_MF_MOVE_ALL: libc::c_int = 1 << 2;
/// Where the patched guest kernel says whether offlining stays on the node.
const NODE_LOCAL_PARAM: &str = "sys/module/memory_hotplug/parameters/offline_node_local";

#[derive(Debug, Error)]
pub enum LocalityError {
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Usage(#[from] UsageError),
    #[error(transparent)]
    Scan(#[from] ScanError),
    #[error(transparent)]
    Zoneinfo(#[from] ZoneinfoError),
    #[error(transparent)]
    Pagemap(#[from] PagemapError),
    #[error("no such track token: {0}")]
    UnknownToken(u64),
    #[error("node {0} does not exist")]
    NoSuchNode(u32),
    #[error("compacting node {node}: {source}")]
    Compact { node: u32, source: io::Error },
}

impl LocalityError {
    pub fn errno(&self) -> i32 {
        match self {
            Self::Memory(e) => e.errno(),
            Self::Usage(e) => e.errno(),
            Self::Scan(e) => e.errno(),
            Self::Zoneinfo(e) => e.errno(),
            Self::Pagemap(e) => e.errno(),
            Self::UnknownToken(_) => libc::EINVAL,
            Self::NoSuchNode(_) => libc::ENOENT,
            Self::Compact { source, .. } => crate::sys::errno_of(source),
        }
    }
}

/// What `track` answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tracked {
    pub token: u64,
    pub node_local_offline: bool,
    pub blocks: Vec<TrackedBlock>,
    pub rooms: Vec<NodeRoom>,
}

/// One tracked block: where it is and which pages were mapped in it.
struct Track {
    blocks: Vec<(u32, Option<u32>, Range<u64>)>,
    pages: Vec<MappedPage>,
}

/// The tracks between `track` and `settle`, by token. Tokens come from the handles of
/// fills and pins, so that `release` can forget a track that will not be settled.
#[derive(Default)]
pub struct Tracks {
    tracks: Mutex<BTreeMap<u64, Track>>,
    handles: Arc<Handles>,
}

impl Tracks {
    pub fn new(handles: Arc<Handles>) -> Self {
        Self {
            tracks: Mutex::default(),
            handles,
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, Track>> {
        self.tracks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets a track; false if there is none with this token.
    pub fn forget(&self, token: u64) -> bool {
        self.lock().remove(&token).is_some()
    }

    /// Records the mapped pages of `blocks` and reports their usage and each node's room.
    pub fn track(&self, root: &Path, blocks: &[u32]) -> Result<Tracked, LocalityError> {
        let usage = usage::block_usage(root, blocks)?;
        let pages_per_block = memory::block_size(root)? / PAGE_SIZE;
        let mut tracked = Vec::with_capacity(usage.len());
        let mut kept = Vec::with_capacity(usage.len());
        // Free pages of the blocks themselves: offlining isolates them, so they are no
        // room for what it migrates.
        let mut own_free: HashMap<u32, u64> = HashMap::new();
        for u in &usage {
            let online = memory::read_state(root, u.block)? == "online";
            let first = u64::from(u.block) * pages_per_block;
            kept.push((u.block, u.node, first..first + pages_per_block));
            if let (true, Some(node)) = (online, u.node) {
                *own_free.entry(node).or_default() += u.free_pages;
            }
            tracked.push(TrackedBlock {
                block: u.block,
                node: u.node,
                in_use_pages: if online {
                    u.pages.saturating_sub(u.free_pages)
                } else {
                    0
                },
                mapped_pages: 0,
            });
        }
        let ranges: Vec<Range<u64>> = kept.iter().map(|(_, _, r)| r.clone()).collect();
        let pages = procpages::mapped_pages_in(root, &ranges)?;
        for page in &pages {
            if let Some(i) = ranges.iter().position(|r| r.contains(&page.pfn)) {
                tracked[i].mapped_pages += 1;
            }
        }
        let rooms = zoneinfo::node_rooms(root)?
            .into_iter()
            .map(|(node, free)| NodeRoom {
                node,
                free_pages: free.saturating_sub(own_free.get(&node).copied().unwrap_or(0)),
            })
            .collect();
        let token = self.handles.next();
        let mut tracks = self.lock();
        if tracks.len() >= MAX_TRACKS {
            tracks.pop_first();
        }
        tracks.insert(
            token,
            Track {
                blocks: kept,
                pages,
            },
        );
        Ok(Tracked {
            token,
            node_local_offline: node_local_offline(root),
            blocks: tracked,
            rooms,
        })
    }

    /// Where the pages of `token` are now; with `move_back`, those that left their
    /// block's node are moved back to it. Forgets the token.
    pub fn settle(
        &self,
        root: &Path,
        token: u64,
        move_back: bool,
    ) -> Result<Vec<SettledBlock>, LocalityError> {
        let track = self
            .lock()
            .remove(&token)
            .ok_or(LocalityError::UnknownToken(token))?;
        let pages_per_block = memory::block_size(root)? / PAGE_SIZE;
        let mut settled: Vec<SettledBlock> = track
            .blocks
            .iter()
            .map(|(block, node, _)| SettledBlock {
                block: *block,
                node: *node,
                ..SettledBlock::default()
            })
            .collect();
        let mut nodes = NodeOf::new(root, pages_per_block);
        let mut by_process: BTreeMap<Process, Vec<&MappedPage>> = BTreeMap::new();
        for page in &track.pages {
            by_process.entry(page.process).or_default().push(page);
        }
        for (process, pages) in by_process {
            let now = current_frames(root, process, &pages)?;
            let mut away: Vec<(usize, u64, u32)> = Vec::new(); // (block index, page, node)
            for (page, pfn) in pages.iter().zip(now) {
                let Some(i) = track.blocks.iter().position(|b| b.2.contains(&page.pfn)) else {
                    continue;
                };
                let (_, node, range) = &track.blocks[i];
                let s = &mut settled[i];
                s.tracked_pages += 1;
                match pfn {
                    None => s.gone_pages += 1,
                    Some(pfn) if range.contains(&pfn) => s.unmoved_pages += 1,
                    Some(pfn) => match node {
                        Some(want) if nodes.of(pfn) != Some(*want) => {
                            away.push((i, page.page, *want));
                        }
                        _ => s.on_node_pages += 1,
                    },
                }
            }
            let moved = if move_back {
                move_pages(process.pid, &away)
            } else {
                vec![false; away.len()]
            };
            for ((i, _, _), back) in away.iter().zip(moved) {
                if back {
                    settled[*i].moved_back_pages += 1;
                    settled[*i].on_node_pages += 1;
                } else {
                    settled[*i].off_node_pages += 1;
                }
            }
        }
        Ok(settled)
    }
}

/// The frames of `pages` (of one process) now, in order; None for a page no longer
/// present, or all None if the process is gone or was replaced.
fn current_frames(
    root: &Path,
    process: Process,
    pages: &[&MappedPage],
) -> Result<Vec<Option<u64>>, LocalityError> {
    let mut frames = vec![None; pages.len()];
    if procpages::process(root, process.pid) != Some(process) {
        return Ok(frames);
    }
    let path = root.join(format!("proc/{}/pagemap", process.pid));
    let Ok(file) = pagemap::open(&path) else {
        return Ok(frames); // it exited meanwhile
    };
    let mut order: Vec<usize> = (0..pages.len()).collect();
    order.sort_by_key(|&i| pages[i].page);
    // One read per run of consecutive pages.
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && pages[order[end]].page == pages[order[end - 1]].page + 1 {
            end += 1;
        }
        let first = pages[order[start]].page;
        let run = &order[start..end];
        let read = pagemap::for_each_present(&file, first, run.len() as u64, |page, pfn| {
            if let Some(&i) = run.get((page - first) as usize) {
                frames[i] = Some(pfn);
            }
        });
        match read {
            Ok(()) => {}
            Err(e) => {
                let e = e.with_path(path.clone());
                if e.errno() == libc::ESRCH || e.errno() == libc::ENOENT {
                    return Ok(vec![None; pages.len()]);
                }
                return Err(e.into());
            }
        }
        start = end;
    }
    Ok(frames)
}

/// Moves each `(_, page, node)` of process `pid` to its node; says which pages got there.
fn move_pages(pid: u32, pages: &[(usize, u64, u32)]) -> Vec<bool> {
    let mut moved = Vec::with_capacity(pages.len());
    for chunk in pages.chunks(MOVE_BATCH) {
        let addrs: Vec<*mut libc::c_void> = chunk
            .iter()
            .map(|(_, page, _)| (page * PAGE_SIZE) as *mut libc::c_void)
            .collect();
        let nodes: Vec<libc::c_int> = chunk.iter().map(|(_, _, n)| *n as libc::c_int).collect();
        let mut status: Vec<libc::c_int> = vec![-libc::EAGAIN; chunk.len()];
        // SAFETY: the three arrays hold `chunk.len()` elements each and live across the
        // call; the kernel only reads `addrs` and `nodes` (addresses in another process,
        // never dereferenced here) and writes `status`.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_move_pages,
                pid as libc::c_int,
                chunk.len() as libc::c_ulong,
                addrs.as_ptr(),
                nodes.as_ptr(),
                status.as_mut_ptr(),
                MPOL_MF_MOVE_ALL,
            )
        };
        // rc < 0: nothing moved (e.g. the process exited); rc > 0: pages not migrated,
        // and `status` says which.
        moved.extend(
            status
                .iter()
                .zip(&nodes)
                .map(|(s, want)| rc >= 0 && s == want),
        );
    }
    moved
}

/// Node of a frame, through its memory block's sysfs entry, cached per block.
struct NodeOf<'a> {
    root: &'a Path,
    pages_per_block: u64,
    cache: HashMap<u64, Option<u32>>,
}

impl<'a> NodeOf<'a> {
    fn new(root: &'a Path, pages_per_block: u64) -> Self {
        Self {
            root,
            pages_per_block: pages_per_block.max(1),
            cache: HashMap::new(),
        }
    }

    fn of(&mut self, pfn: u64) -> Option<u32> {
        let block = pfn / self.pages_per_block;
        let root = self.root;
        *self.cache.entry(block).or_insert_with(|| {
            u32::try_from(block)
                .ok()
                .and_then(|b| memory::block_node(root, b).ok().flatten())
        })
    }
}

/// Whether this kernel's offlining keeps pages on their node (the patch's parameter).
fn node_local_offline(root: &Path) -> bool {
    fs::read_to_string(root.join(NODE_LOCAL_PARAM)).is_ok_and(|v| v.trim() == "Y")
}

/// Compacts every zone of `node`; returns when the kernel is done.
pub fn compact_node(root: &Path, node: u32) -> Result<(), LocalityError> {
    let dir: PathBuf = root.join(format!("sys/devices/system/node/node{node}"));
    if !dir.is_dir() {
        return Err(LocalityError::NoSuchNode(node));
    }
    fs::write(dir.join("compact"), "1").map_err(|source| LocalityError::Compact { node, source })
}

#[cfg(test)]
mod tests;
