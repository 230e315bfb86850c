//! Keeping evacuated data on its NUMA node, and counting each region's own migration.
//!
//! Two hooks surround the offlining of one node's memory blocks (one region's, or a
//! batch's):
//!
//! * [`prepare`], before anything is offlined: the agent's `track` records the pages
//!   processes map in the blocks and reports each block's in-use pages and each node's
//!   room. It refuses when the node cannot take what the blocks hold, unless the data may
//!   go to other nodes (`allow_other_nodes`); with a guest kernel that offlines to other
//!   nodes first (no node-local patch), those must also have room for it on the way.
//! * [`settle`], after offlining, whether it succeeded or not: the agent's `settle` says
//!   where the tracked pages went, and moves those that left back to the node.
//!
//! A region's `migrated_bytes` is what its own blocks held in use when they were
//! offlined, so that concurrent jobs on other nodes never count in it (the guest's
//! `pgmigrate_success` is global).

use std::fmt;
use std::time::Duration;

use agent_protocol::{NodeRoom, Request, Response, SettledBlock, TrackedBlock};
use mempower_api::RegionResult;

use super::node::{AgentCall, NodeError, PAGE_SIZE};

/// Why blocks of a node may not be offlined. Texts are job errors and region reasons.
#[derive(Debug, thiserror::Error)]
pub enum LocalityError {
    #[error(
        "node {node} has no room for the {need} in use in {blocks}: it has {room} free \
         elsewhere; nothing was evacuated (\"allow_other_nodes\": true lets the data go \
         to other nodes)"
    )]
    NoRoom {
        node: u32,
        blocks: Blocks,
        need: Mib,
        room: Mib,
    },
    #[error(
        "no node has room for the {need} in use in {blocks}: node {node} has {room} free \
         elsewhere, the other nodes {others}; nothing was evacuated"
    )]
    NoRoomAnywhere {
        node: u32,
        blocks: Blocks,
        need: Mib,
        room: Mib,
        others: Mib,
    },
    #[error(
        "the guest kernel offlines to other nodes first, and they have {others} free for \
         the {need} in use in {blocks} (which would then come back to node {node}); \
         nothing was evacuated"
    )]
    NoTransitRoom {
        node: u32,
        blocks: Blocks,
        need: Mib,
        others: Mib,
    },
    #[error("tracking the pages of {blocks}: {source}")]
    Track { blocks: Blocks, source: NodeError },
}

/// Bytes, shown in MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mib(pub u64);

impl fmt::Display for Mib {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.1} MiB", self.0 as f64 / (1u64 << 20) as f64)
    }
}

/// Memory blocks, shown as `memory40, memory41`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocks(pub Vec<u32>);

impl fmt::Display for Blocks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<String> = self.0.iter().map(|b| format!("memory{b}")).collect();
        f.write_str(&names.join(", "))
    }
}

/// Blocks about to be offlined, as `track` found them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    pub token: u64,
    pub node: u32,
    /// The guest kernel keeps offlined pages on their node (the mempower patch).
    pub node_local_offline: bool,
    pub blocks: Vec<TrackedBlock>,
    /// The node has no room: the data will go to other nodes (allowed).
    pub spills: bool,
}

impl Prepared {
    /// Bytes `block` held in use when tracked (0 if it was not tracked).
    pub fn in_use_bytes(&self, block: u32) -> u64 {
        self.blocks
            .iter()
            .find(|b| b.block == block)
            .map_or(0, |b| b.in_use_pages.saturating_mul(PAGE_SIZE))
    }
}

/// Before offlining `blocks` of `node`: tracks their pages and checks the room.
/// Refusals leave nothing to undo (the agent forgets the track by itself).
pub fn prepare(
    agent: &dyn AgentCall,
    node: u32,
    blocks: &[u32],
    allow_other_nodes: bool,
    timeout: Duration,
) -> Result<Prepared, LocalityError> {
    let failed = |source| LocalityError::Track {
        blocks: Blocks(blocks.to_vec()),
        source,
    };
    let request = Request::Track {
        blocks: blocks.to_vec(),
    };
    let (token, node_local_offline, tracked, rooms) = match agent.call(request, timeout) {
        Ok(Response::Tracked {
            token,
            node_local_offline,
            blocks,
            rooms,
        }) => (token, node_local_offline, blocks, rooms),
        Ok(other) => {
            return Err(failed(NodeError::UnexpectedAnswer {
                request: "track",
                answer: Box::new(other),
            }))
        }
        Err(e) => return Err(failed(e.into())),
    };
    let need: u64 = tracked
        .iter()
        .filter(|t| blocks.contains(&t.block))
        .map(|t| t.in_use_pages.saturating_mul(PAGE_SIZE))
        .fold(0, u64::saturating_add);
    let check = check_room(
        node,
        blocks,
        need,
        &rooms,
        node_local_offline,
        allow_other_nodes,
    );
    match check {
        Ok(spills) => Ok(Prepared {
            token,
            node,
            node_local_offline,
            blocks: tracked,
            spills,
        }),
        Err(e) => {
            forget(agent, token, timeout);
            Err(e)
        }
    }
}

/// Tells the agent to drop a track that will not be settled (tracks share the handles of
/// fills and pins, so `release` forgets them). Best effort: the agent keeps few tracks
/// and drops the oldest anyway.
pub fn forget(agent: &dyn AgentCall, token: u64, timeout: Duration) {
    if let Err(e) = agent.call(Request::Release { handle: token }, timeout) {
        log::debug!("forgetting track {token}: {e}");
    }
}

/// Whether `need` bytes of `node`'s blocks fit: Ok(false) on the node, Ok(true) on other
/// nodes (only if allowed), or why not. A guest kernel without the node-local patch
/// puts everything on other nodes first, so they must have room for all of it.
pub fn check_room(
    node: u32,
    blocks: &[u32],
    need: u64,
    rooms: &[NodeRoom],
    node_local_offline: bool,
    allow_other_nodes: bool,
) -> Result<bool, LocalityError> {
    if need == 0 {
        return Ok(false);
    }
    let bytes = |pages: u64| pages.saturating_mul(PAGE_SIZE);
    let room = rooms
        .iter()
        .filter(|r| r.node == node)
        .map(|r| bytes(r.free_pages))
        .fold(0, u64::saturating_add);
    let others = rooms
        .iter()
        .filter(|r| r.node != node)
        .map(|r| bytes(r.free_pages))
        .fold(0, u64::saturating_add);
    let blocks = Blocks(blocks.to_vec());
    let spills = need > room;
    if spills && !allow_other_nodes {
        return Err(LocalityError::NoRoom {
            node,
            blocks,
            need: Mib(need),
            room: Mib(room),
        });
    }
    if spills && need > room.saturating_add(others) {
        return Err(LocalityError::NoRoomAnywhere {
            node,
            blocks,
            need: Mib(need),
            room: Mib(room),
            others: Mib(others),
        });
    }
    if !node_local_offline && need > others {
        return Err(LocalityError::NoTransitRoom {
            node,
            blocks,
            need: Mib(need),
            others: Mib(others),
        });
    }
    Ok(spills)
}

/// After offlining the prepared blocks (or failing to): where their pages went. Pages
/// that left the node are moved back to it, unless the data was allowed to spill
/// because the node has no room. None if the agent could not tell.
pub fn settle(
    agent: &dyn AgentCall,
    prepared: &Prepared,
    timeout: Duration,
) -> Option<Vec<SettledBlock>> {
    let request = Request::Settle {
        token: prepared.token,
        move_back: !prepared.spills,
    };
    match agent.call(request, timeout) {
        Ok(Response::Settled { blocks, .. }) => Some(blocks),
        Ok(other) => {
            log::warn!(
                "settling track {}: unexpected answer {other:?}",
                prepared.token
            );
            None
        }
        Err(e) => {
            log::warn!("settling track {}: {e}", prepared.token);
            None
        }
    }
}

/// Fills `result`'s migration fields for a region's `blocks`: what they held in use if
/// they went offline (all of it was migrated), else the tracked pages seen moving; and
/// where they are, from `settled`.
pub fn record(
    result: &mut RegionResult,
    prepared: &Prepared,
    blocks: &[u32],
    offlined: bool,
    settled: Option<&[SettledBlock]>,
) {
    let page_bytes = |pages: u64| pages.saturating_mul(PAGE_SIZE);
    let ours: Option<Vec<&SettledBlock>> =
        settled.map(|all| all.iter().filter(|s| blocks.contains(&s.block)).collect());
    let sum = |pages: fn(&SettledBlock) -> u64| {
        ours.as_ref()
            .map(|ours| page_bytes(ours.iter().map(|s| pages(s)).fold(0, u64::saturating_add)))
    };
    result.migrated_bytes = if offlined {
        Some(
            blocks
                .iter()
                .map(|b| prepared.in_use_bytes(*b))
                .fold(0, u64::saturating_add),
        )
    } else {
        sum(|s| s.on_node_pages.saturating_add(s.off_node_pages))
    };
    if ours.as_ref().is_some_and(|o| !o.is_empty()) {
        result.migrated_on_node_bytes = sum(|s| s.on_node_pages);
        result.migrated_off_node_bytes = sum(|s| s.off_node_pages);
        result.moved_back_bytes = sum(|s| s.moved_back_pages);
    }
}

#[cfg(test)]
mod tests;
