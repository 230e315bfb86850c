//! The answer to `signals`: what an autopilot samples of the guest, every second or so,
//! to decide how much memory each node can give back. One bounded answer holds every
//! node, so that a sample costs one round trip however many nodes there are.

use serde::{Deserialize, Serialize};

use crate::psi::Pressure;

/// Most nodes an answer names: Linux's `MAX_NUMNODES` on x86_64 (`NODES_SHIFT` 10). At
/// that many, an answer of the largest figures still fits a frame (see the tests).
pub const MAX_NODES: usize = 1024;

/// Guest-wide and per-node signals.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestSignals {
    /// Every node the guest kernel has online, by increasing id; at most [`MAX_NODES`].
    pub nodes: Vec<NodeSignals>,
    /// `/proc/pressure/memory`; `None` if the kernel keeps no pressure figures (built
    /// without `CONFIG_PSI`, or booted with `psi=0`).
    pub pressure: Option<Pressure>,
    pub counters: VmCounters,
}

/// One node's memory, from its `meminfo` and its memory blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSignals {
    pub node: u32,
    /// `MemFree`.
    pub free_bytes: u64,
    /// Page cache: `Active(file)` + `Inactive(file)`.
    pub file_bytes: u64,
    /// Anonymous memory: `Active(anon)` + `Inactive(anon)`.
    pub anon_bytes: u64,
    /// The node's online memory blocks, whole.
    pub online_bytes: u64,
}

/// Counters of `/proc/vmstat` that say reclaim hurts, each since boot; `None` where the
/// kernel has no such counter (`workingset_refault_*` came in 5.9).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmCounters {
    pub oom_kill: Option<u64>,
    pub workingset_refault_anon: Option<u64>,
    pub workingset_refault_file: Option<u64>,
    pub pgmajfault: Option<u64>,
    /// Every `allocstall_<zone>` summed: allocations that had to reclaim directly.
    pub allocstall: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignalsError {
    #[error("{0} nodes, above the limit of {MAX_NODES}")]
    TooManyNodes(usize),
    #[error("node {0} is out of order or named twice")]
    NodeOrder(u32),
}

impl GuestSignals {
    /// What the VMM checks of an answer from the (untrusted) guest, beyond what decoding
    /// did (percentages from 0 to 100): a bounded number of nodes, each named once.
    pub fn check(&self) -> Result<(), SignalsError> {
        if self.nodes.len() > MAX_NODES {
            return Err(SignalsError::TooManyNodes(self.nodes.len()));
        }
        for pair in self.nodes.windows(2) {
            if pair[0].node >= pair[1].node {
                return Err(SignalsError::NodeOrder(pair[1].node));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::psi::Stall;
    use crate::{write_frame, Response, ResponseFrame};

    fn node(node: u32) -> NodeSignals {
        NodeSignals {
            node,
            free_bytes: u64::MAX,
            file_bytes: u64::MAX,
            anon_bytes: u64::MAX,
            online_bytes: u64::MAX,
        }
    }

    fn largest() -> GuestSignals {
        let stall = Stall {
            avg10: 99.99,
            avg60: 99.99,
            total_us: u64::MAX,
        };
        GuestSignals {
            nodes: (u32::MAX - MAX_NODES as u32 + 1..=u32::MAX)
                .map(node)
                .collect(),
            pressure: Some(Pressure {
                some: stall,
                full: stall,
            }),
            counters: VmCounters {
                oom_kill: Some(u64::MAX),
                workingset_refault_anon: Some(u64::MAX),
                workingset_refault_file: Some(u64::MAX),
                pgmajfault: Some(u64::MAX),
                allocstall: Some(u64::MAX),
            },
        }
    }

    #[test]
    fn the_largest_answer_fits_a_frame() {
        let signals = largest();
        assert_eq!(signals.check(), Ok(()));
        let frame = ResponseFrame::new(u64::MAX, Ok(Response::Signals(signals)));
        let mut wire = Vec::new();
        write_frame(&mut wire, &frame).unwrap();
        // Room to spare: a fifth of the limit.
        assert!(wire.len() < crate::MAX_FRAME as usize / 5, "{}", wire.len());
    }

    #[test]
    fn check_refuses_too_many_nodes_and_disorder() {
        let mut signals = largest();
        signals.nodes.insert(0, node(0));
        assert_eq!(
            signals.check(),
            Err(SignalsError::TooManyNodes(MAX_NODES + 1))
        );
        signals.nodes = vec![node(0), node(2), node(1)];
        assert_eq!(signals.check(), Err(SignalsError::NodeOrder(1)));
        signals.nodes = vec![node(3), node(3)];
        assert_eq!(signals.check(), Err(SignalsError::NodeOrder(3)));
        signals.nodes = vec![];
        assert_eq!(signals.check(), Ok(()), "a guest may report no node");
    }

    #[test]
    fn json_shape_is_stable() {
        let signals = GuestSignals {
            nodes: vec![NodeSignals {
                node: 1,
                free_bytes: 4096,
                file_bytes: 8192,
                anon_bytes: 0,
                online_bytes: 1 << 27,
            }],
            pressure: None,
            counters: VmCounters {
                oom_kill: Some(0),
                pgmajfault: Some(12),
                ..VmCounters::default()
            },
        };
        let json = serde_json::to_string(&Response::Signals(signals)).unwrap();
        assert_eq!(
            json,
            r#"{"type":"signals","nodes":[{"node":1,"free_bytes":4096,"file_bytes":8192,"anon_bytes":0,"online_bytes":134217728}],"pressure":null,"counters":{"oom_kill":0,"workingset_refault_anon":null,"workingset_refault_file":null,"pgmajfault":12,"allocstall":null}}"#
        );
    }
}
