//! Carries out the requests of the vsock protocol (`agent_protocol::Request`).
//!
//! Every failure becomes an [`AgentError`]: the errno the kernel gave (or the closest
//! one: ENOENT for unknown blocks and nodes, EINVAL for bad arguments and unknown fill or
//! pin handles, ENOMEM for a fill or pin that does not fit) and a message.

use std::path::PathBuf;
use std::sync::Arc;

use agent_protocol::{AgentError, NodeInventory, Request, Response, PROTOCOL_VERSION};
use thiserror::Error;

use crate::fill::{FillError, Fills, InterleaveError};
use crate::held::{Handles, HeldError};
use crate::locality::{self, LocalityError, Tracks};
use crate::memory::{self, MemoryError, Target};
use crate::numa::{self, NumaError};
use crate::pin::{PinError, Pins};
use crate::poke::{self, PokeError};
use crate::signals::{self, SignalsError};
use crate::usage::{self, UsageError};
use crate::vmstat::{self, VmstatError};

/// The requests this agent serves, as `hello` reports them: every one the protocol has.
pub const CAPABILITIES: &[&str] = <Request as strum::VariantNames>::VARIANTS;

/// The requests only tests need: they fill, pin or write guest memory at the caller's
/// word, which no production client has reason to ask for.
pub const TEST_ONLY: [&str; 4] = ["fill", "fill_interleaved", "pin", "poke"];

/// Whether the agent serves the [`TEST_ONLY`] requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestRequests {
    Served,
    /// Refused with EPERM, and left out of `hello`'s capabilities.
    Refused,
}

/// The name of `request` if it is one of [`TEST_ONLY`].
fn test_only(request: &Request) -> Option<&'static str> {
    let name: &'static str = request.into();
    TEST_ONLY.contains(&name).then_some(name)
}

/// Any handler's failure.
#[derive(Debug, Error)]
pub enum RequestError {
    #[error(transparent)]
    Numa(#[from] NumaError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Usage(#[from] UsageError),
    #[error(transparent)]
    Fill(#[from] FillError),
    #[error(transparent)]
    Interleave(#[from] InterleaveError),
    #[error(transparent)]
    Pin(#[from] PinError),
    #[error(transparent)]
    Vmstat(#[from] VmstatError),
    #[error(transparent)]
    Poke(#[from] PokeError),
    #[error(transparent)]
    Locality(#[from] LocalityError),
    #[error(transparent)]
    Signals(#[from] SignalsError),
    /// `release` of a handle that is neither a fill's, a pin's nor a track's.
    #[error("no such fill, pin or track handle: {0}")]
    UnknownHandle(u64),
    #[error("{0} is a test request, which this agent refuses (it serves them when started with --test-requests)")]
    TestOnly(&'static str),
}

impl RequestError {
    pub fn errno(&self) -> i32 {
        match self {
            Self::Numa(e) => e.errno(),
            Self::Memory(e) => e.errno(),
            Self::Usage(e) => e.errno(),
            Self::Fill(e) => e.errno(),
            Self::Interleave(e) => e.errno(),
            Self::Pin(e) => e.errno(),
            Self::Vmstat(e) => e.errno(),
            Self::Poke(e) => e.errno(),
            Self::Locality(e) => e.errno(),
            Self::Signals(e) => e.errno(),
            Self::UnknownHandle(_) => libc::EINVAL,
            Self::TestOnly(_) => libc::EPERM,
        }
    }
}

impl From<RequestError> for AgentError {
    fn from(e: RequestError) -> Self {
        AgentError::new(e.errno(), e.to_string())
    }
}

/// Serves requests; shared by every connection.
pub struct Handler {
    /// Where procfs and sysfs are found below (`/proc`, `/sys`).
    root: PathBuf,
    fills: Fills,
    /// Shares its handle counter with `fills`, so a handle names one fill or one pin.
    pins: Pins,
    /// Pages followed from `track` to `settle`; its tokens are handles too.
    tracks: Tracks,
    test_requests: TestRequests,
}

impl Handler {
    pub fn new(root: PathBuf, test_requests: TestRequests) -> Self {
        let handles = Arc::new(Handles::default());
        Self {
            root,
            test_requests,
            fills: Fills::new(handles.clone()),
            pins: Pins::new(handles.clone()),
            tracks: Tracks::new(handles),
        }
    }

    /// Carries out one request. `Shutdown` only answers here: powering off is the
    /// caller's job, once the answer is on its way.
    pub fn handle(&self, request: Request) -> Result<Response, AgentError> {
        self.dispatch(request).map_err(AgentError::from)
    }

    fn dispatch(&self, request: Request) -> Result<Response, RequestError> {
        let root = self.root.as_path();
        let refused = self.test_requests == TestRequests::Refused;
        if let Some(name) = test_only(&request).filter(|_| refused) {
            return Err(RequestError::TestOnly(name));
        }
        Ok(match request {
            Request::Hello => Response::Hello {
                protocol_version: PROTOCOL_VERSION,
                agent_version: env!("CARGO_PKG_VERSION").to_owned(),
                kernel: numa::kernel_release()?,
                capabilities: CAPABILITIES
                    .iter()
                    .filter(|c| !(refused && TEST_ONLY.contains(c)))
                    .map(|&c| c.to_owned())
                    .collect(),
            },
            Request::Inventory => {
                let nodes = numa::read_nodes(root)?
                    .into_iter()
                    .map(|n| NodeInventory {
                        id: n.id,
                        cpus: n.cpus,
                        mem_total_kib: n.mem_total_kib,
                    })
                    .collect();
                let (block_size, blocks) = memory::blocks(root)?;
                Response::Inventory {
                    block_size,
                    nodes,
                    blocks,
                }
            }
            Request::Offline { blocks } => Response::BlockResults {
                results: memory::set_states(root, &blocks, Target::Offline)?,
            },
            Request::Online { blocks, movable } => Response::BlockResults {
                results: memory::set_states(root, &blocks, Target::Online { movable })?,
            },
            Request::BlockUsage { blocks } => Response::BlockUsage {
                usage: usage::block_usage(root, &blocks)?,
            },
            Request::Fill { node, bytes, seed } => {
                let placed = self.fills.fill(root, node, bytes, seed)?;
                Response::Filled {
                    handle: placed.handle,
                    node,
                    bytes,
                    blocks: placed.blocks,
                }
            }
            Request::FillInterleaved {
                node,
                bytes,
                seed,
                keep_one_in,
                run_pages,
            } => {
                let [kept, other] =
                    self.fills
                        .fill_interleaved(root, node, bytes, seed, keep_one_in, run_pages)?;
                Response::FilledInterleaved {
                    kept: kept.0,
                    kept_bytes: kept.1,
                    other: other.0,
                    other_bytes: other.1,
                }
            }
            Request::Locate { handle } => Response::Located {
                handle,
                blocks: self.fills.locate(root, handle)?.blocks,
            },
            Request::Verify { handle } => {
                let (checked_bytes, mismatched_bytes) = self.fills.verify(handle)?;
                Response::Verified {
                    handle,
                    checked_bytes,
                    mismatched_bytes,
                }
            }
            Request::Pin { node, bytes } => Response::Pinned {
                handle: self.pins.pin(root, node, bytes)?,
                node,
                bytes,
            },
            Request::Release { handle } => {
                self.release(handle)?;
                Response::Released { handle }
            }
            Request::Vmstat => Response::Vmstat {
                counters: vmstat::read(root)?,
            },
            Request::Shutdown => Response::ShuttingDown,
            Request::Poke { addr, len, byte } => {
                let poked = poke::poke(root, addr, len, byte)?;
                Response::Poked {
                    addr,
                    len,
                    ones_before: poked.ones_before,
                    ones_after: poked.ones_after,
                    written_after: poked.written_after,
                }
            }
            Request::Track { blocks } => {
                let t = self.tracks.track(root, &blocks)?;
                Response::Tracked {
                    token: t.token,
                    node_local_offline: t.node_local_offline,
                    blocks: t.blocks,
                    rooms: t.rooms,
                }
            }
            Request::Settle { token, move_back } => Response::Settled {
                token,
                blocks: self.tracks.settle(root, token, move_back)?,
            },
            Request::CompactNode { node } => {
                locality::compact_node(root, node)?;
                Response::NodeCompacted { node }
            }
            Request::Signals => Response::Signals(signals::read(root)?),
        })
    }

    /// Releases a fill, a pin or a track: they share handles, so at most one of them
    /// knows it.
    fn release(&self, handle: u64) -> Result<(), RequestError> {
        let unknown = |e: &HeldError| matches!(e, HeldError::UnknownHandle { .. });
        match self.fills.release(handle) {
            Err(FillError::Held(e)) if unknown(&e) => {}
            other => return Ok(other?),
        }
        match self.pins.release(handle) {
            Err(PinError::Held(e)) if unknown(&e) => {}
            other => return Ok(other?),
        }
        if self.tracks.forget(handle) {
            Ok(())
        } else {
            Err(RequestError::UnknownHandle(handle))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_only_requests_are_requests_of_the_protocol() {
        for name in TEST_ONLY {
            assert!(CAPABILITIES.contains(&name), "{name}");
        }
        assert_eq!(CAPABILITIES.len(), 18);
    }
    use crate::memory::tests::two_node_fixture;

    #[test]
    fn hello_names_every_request() {
        let handler = Handler::new(PathBuf::from("/"), TestRequests::Served);
        let Ok(Response::Hello {
            protocol_version,
            capabilities,
            kernel,
            ..
        }) = handler.handle(Request::Hello)
        else {
            panic!("hello must answer hello");
        };
        assert_eq!(protocol_version, PROTOCOL_VERSION);
        assert!(!kernel.is_empty());
        assert_eq!(capabilities.len(), CAPABILITIES.len());
        assert!(capabilities.iter().any(|c| c == "block_usage"));
        assert!(capabilities.iter().any(|c| c == "pin"));
    }

    /// Ignored by default, as not every machine shows its NUMA nodes in sysfs; CI runs
    /// it (`.ci/run`).
    #[test]
    #[ignore = "needs /sys/devices/system/node/node0; run with --ignored node_0"]
    fn fills_and_pins_share_handles_and_release_on_node_0() {
        assert!(
            std::path::Path::new("/sys/devices/system/node/node0").is_dir(),
            "this test needs /sys/devices/system/node/node0"
        );
        let handler = Handler::new(PathBuf::from("/"), TestRequests::Served);
        let Ok(Response::Filled { handle: fill, .. }) = handler.handle(Request::Fill {
            node: 0,
            bytes: 8192,
            seed: 1,
        }) else {
            panic!("fill must answer filled");
        };
        let answer = handler.handle(Request::Pin {
            node: 0,
            bytes: 8192,
        });
        let Ok(Response::Pinned {
            handle: pin,
            node: 0,
            bytes: 8192,
        }) = answer
        else {
            panic!("pin must answer pinned: {answer:?}");
        };
        assert_eq!((fill, pin), (1, 2));
        let err = handler.handle(Request::Verify { handle: pin }).unwrap_err();
        assert_eq!(err.errno, libc::EINVAL, "a pin is not a fill");
        for handle in [pin, fill] {
            assert_eq!(
                handler.handle(Request::Release { handle }),
                Ok(Response::Released { handle })
            );
            let err = handler.handle(Request::Release { handle }).unwrap_err();
            assert_eq!(
                (err.errno, err.message),
                (
                    libc::EINVAL,
                    format!("no such fill, pin or track handle: {handle}")
                )
            );
        }
        let err = handler
            .handle(Request::Pin { node: 0, bytes: 0 })
            .unwrap_err();
        assert_eq!(err.errno, libc::EINVAL);
        let err = handler
            .handle(Request::Pin {
                node: 9999,
                bytes: 1,
            })
            .unwrap_err();
        assert_eq!(
            (err.errno, err.message.as_str()),
            (libc::ENOENT, "node 9999 does not exist")
        );
    }

    #[test]
    fn a_refusing_handler_refuses_only_the_test_requests_and_hides_them() {
        let fx = two_node_fixture("requests-refused");
        let handler = Handler::new(fx.0.clone(), TestRequests::Refused);
        let test_requests = [
            Request::Fill {
                node: 0,
                bytes: 4096,
                seed: 1,
            },
            Request::FillInterleaved {
                node: 0,
                bytes: 4096,
                seed: 1,
                keep_one_in: 2,
                run_pages: 1,
            },
            Request::Pin {
                node: 0,
                bytes: 4096,
            },
            Request::Poke {
                addr: 0x1000,
                len: 1,
                byte: 0xff,
            },
        ];
        for (request, name) in test_requests.into_iter().zip(TEST_ONLY) {
            let err = handler.handle(request).unwrap_err();
            assert_eq!(err.errno, libc::EPERM, "{name}");
            assert!(
                err.message
                    .starts_with(&format!("{name} is a test request")),
                "{}",
                err.message
            );
        }
        // Everything else is served as before.
        assert!(matches!(
            handler.handle(Request::Inventory),
            Ok(Response::Inventory { .. })
        ));
        let Ok(Response::Hello { capabilities, .. }) = handler.handle(Request::Hello) else {
            panic!("hello must answer hello");
        };
        assert_eq!(capabilities.len(), CAPABILITIES.len() - TEST_ONLY.len());
        assert!(capabilities
            .iter()
            .all(|c| !TEST_ONLY.contains(&c.as_str())));
        // A serving handler carries the same poke out, to poke's own check of its byte.
        let handler = Handler::new(fx.0.clone(), TestRequests::Served);
        let err = handler
            .handle(Request::Poke {
                addr: 0x1000,
                len: 1,
                byte: 0xff,
            })
            .unwrap_err();
        assert_eq!(err.errno, libc::EINVAL, "{}", err.message);
        assert!(err.message.contains("cannot tell"), "{}", err.message);
    }

    #[test]
    fn signals_answers_a_sample_of_every_node() {
        let fx = crate::signals::tests::signals_fixture("requests-signals");
        // Not a test request: a refusing handler serves it.
        let handler = Handler::new(fx.0.clone(), TestRequests::Refused);
        let answer = handler.handle(Request::Signals);
        let Ok(Response::Signals(signals)) = answer else {
            panic!("signals must answer signals: {answer:?}");
        };
        let nodes: Vec<u32> = signals.nodes.iter().map(|n| n.node).collect();
        assert_eq!(nodes, [0, 1]);
        assert!(signals.pressure.is_some());
        // A node's missing meminfo fails the sample, with its errno and path.
        std::fs::remove_file(fx.0.join("sys/devices/system/node/node0/meminfo")).unwrap();
        let err = handler.handle(Request::Signals).unwrap_err();
        assert_eq!(err.errno, libc::ENOENT);
        assert!(err.message.contains("node0/meminfo"), "{}", err.message);
    }

    #[test]
    fn inventory_and_errors_of_a_fixture() {
        let fx = two_node_fixture("requests");
        let handler = Handler::new(fx.0.clone(), TestRequests::Served);
        let Ok(Response::Inventory {
            block_size,
            nodes,
            blocks,
        }) = handler.handle(Request::Inventory)
        else {
            panic!("inventory must answer inventory");
        };
        assert_eq!(block_size, 128 << 20);
        assert_eq!(nodes.iter().map(|n| n.id).collect::<Vec<_>>(), [0, 1]);
        assert_eq!(blocks.len(), 5);

        let err = handler
            .handle(Request::Offline { blocks: vec![3] })
            .unwrap_err();
        assert_eq!(err.errno, libc::ENOENT);
        let err = handler.handle(Request::Verify { handle: 5 }).unwrap_err();
        assert_eq!(
            (err.errno, err.message.as_str()),
            (libc::EINVAL, "no such fill handle: 5")
        );
        let err = handler.handle(Request::Vmstat).unwrap_err();
        assert_eq!(err.errno, libc::ENOENT);
        assert!(matches!(
            handler.handle(Request::Shutdown),
            Ok(Response::ShuttingDown)
        ));
    }
}
