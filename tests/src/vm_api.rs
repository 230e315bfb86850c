//! A running VMM's API, through the `mempower` client subcommands, with typed answers:
//! what the integration tests, the demo and the bench share.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agent_protocol::{BlockPages, Request, Response};
use mempower_api::{AgentInfo, Job, JobAccepted, JobState, NodeStatus, RegionStatus};
use serde::de::DeserializeOwned;

use crate::vmm_bin;

pub type ApiResult<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Memory the guest agent filled with a pattern, kept until released.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fill {
    /// The agent's handle.
    pub handle: u64,
    /// The node it was allocated on.
    pub node: u32,
    /// Its size.
    pub bytes: u64,
    /// Its pages per memory block when it was written.
    pub blocks: Vec<BlockPages>,
}

/// Pages in `block` of a block list (from a fill or [`VmApi::locate`]).
pub fn pages_in(blocks: &[BlockPages], block: u32) -> u64 {
    blocks
        .iter()
        .filter(|b| b.block == block)
        .map(|b| b.pages)
        .sum()
}

/// One VMM's API socket.
#[derive(Debug, Clone)]
pub struct VmApi {
    socket: PathBuf,
}

impl VmApi {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        VmApi {
            socket: socket.into(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `mempower ARGS --api-socket SOCKET`, its stdout.
    pub fn cli(&self, args: &[&str]) -> ApiResult<String> {
        vmm_bin::api_client(&self.socket, args)
    }

    /// A client subcommand whose output is JSON.
    pub fn json<T: DeserializeOwned>(&self, args: &[&str]) -> ApiResult<T> {
        let out = self.cli(args)?;
        serde_json::from_str(&out).map_err(|e| format!("mempower {args:?}: {e}: {out}").into())
    }

    pub fn nodes(&self) -> ApiResult<Vec<NodeStatus>> {
        self.json(&["nodes"])
    }

    pub fn regions(&self, node: u32) -> ApiResult<Vec<RegionStatus>> {
        self.json(&["regions", "--node", &node.to_string()])
    }

    /// One agent request through the VMM, timed.
    pub fn agent(&self, request: &Request) -> ApiResult<Response> {
        let json = serde_json::to_string(request)?;
        let t = Instant::now();
        let answer = self.cli(&["agent", &json])?;
        let shown: String = json.chars().take(80).collect();
        println!(
            "agent: {shown} -> {} bytes in {:.2} s",
            answer.len(),
            t.elapsed().as_secs_f64()
        );
        Ok(serde_json::from_str(&answer)?)
    }

    /// One node's status.
    pub fn node(&self, id: u32) -> ApiResult<NodeStatus> {
        self.nodes()?
            .into_iter()
            .find(|n| n.id == id)
            .ok_or_else(|| format!("no node {id}").into())
    }

    /// Has the agent allocate `bytes` on `node` and fill them with the pattern of `seed`;
    /// the memory stays until [`VmApi::release`]. Prints how long it took.
    pub fn fill(&self, node: u32, bytes: u64, seed: u64) -> ApiResult<Fill> {
        let t = Instant::now();
        match self.agent(&Request::Fill { node, bytes, seed })? {
            Response::Filled {
                handle,
                node,
                bytes,
                blocks,
            } => {
                crate::print_phase(
                    &format!("fill {} MiB on node {node}", bytes >> 20),
                    t.elapsed(),
                );
                println!("fill {handle}: {blocks:?}");
                Ok(Fill {
                    handle,
                    node,
                    bytes,
                    blocks,
                })
            }
            other => Err(format!("fill: {other:?}").into()),
        }
    }

    /// Two fills of `bytes` in all on `node`, written in runs of `run_bytes` (whole
    /// pages) in turn, the first of every `keep_one_in` runs into the kept fill: (kept,
    /// other) handles and bytes. Prints how long it took.
    pub fn fill_interleaved(
        &self,
        node: u32,
        bytes: u64,
        seed: u64,
        keep_one_in: u32,
        run_bytes: u64,
    ) -> ApiResult<[(u64, u64); 2]> {
        let run_pages = u32::try_from(run_bytes / 4096)?;
        let t = Instant::now();
        let request = Request::FillInterleaved {
            node,
            bytes,
            seed,
            keep_one_in,
            run_pages,
        };
        match self.agent(&request)? {
            Response::FilledInterleaved {
                kept,
                kept_bytes,
                other,
                other_bytes,
            } => {
                crate::print_phase(
                    &format!(
                        "fill_interleaved {} MiB on node {node} in runs of {} KiB",
                        bytes >> 20,
                        run_bytes >> 10
                    ),
                    t.elapsed(),
                );
                Ok([(kept, kept_bytes), (other, other_bytes)])
            }
            other => Err(format!("fill_interleaved: {other:?}").into()),
        }
    }

    /// Frees a fill or a pin.
    pub fn release(&self, handle: u64) -> ApiResult<()> {
        match self.agent(&Request::Release { handle })? {
            Response::Released { .. } => Ok(()),
            other => Err(format!("release {handle}: {other:?}").into()),
        }
    }

    /// Checks every byte of a fill; an error unless all of them were checked and match.
    pub fn verify(&self, fill: &Fill) -> ApiResult<()> {
        let handle = fill.handle;
        let (checked_bytes, mismatched_bytes) = self.verify_counts(handle)?;
        println!("verify fill {handle}: {mismatched_bytes} of {checked_bytes} bytes differ");
        if (checked_bytes, mismatched_bytes) != (fill.bytes, 0) {
            return Err(format!(
                "fill {handle} is damaged: {mismatched_bytes} of {checked_bytes} bytes differ, \
                 {} bytes were written",
                fill.bytes
            )
            .into());
        }
        Ok(())
    }

    /// Checks every byte of a fill: (checked, mismatched) bytes.
    pub fn verify_counts(&self, handle: u64) -> ApiResult<(u64, u64)> {
        self.expect(&Request::Verify { handle }, |r| match r {
            Response::Verified {
                checked_bytes,
                mismatched_bytes,
                ..
            } => Some((checked_bytes, mismatched_bytes)),
            _ => None,
        })
    }

    /// The memory blocks a fill's pages are in now.
    pub fn locate(&self, handle: u64) -> ApiResult<Vec<BlockPages>> {
        match self.agent(&Request::Locate { handle })? {
            Response::Located { blocks, .. } => Ok(blocks),
            other => Err(format!("locate {handle}: {other:?}").into()),
        }
    }

    /// A counter of the guest's /proc/vmstat.
    pub fn vmstat(&self, counter: &str) -> ApiResult<u64> {
        match self.agent(&Request::Vmstat)? {
            Response::Vmstat { counters } => Ok(counters.get(counter).copied().unwrap_or(0)),
            other => Err(format!("vmstat: {other:?}").into()),
        }
    }

    /// An agent request whose answer `pick` accepts, or an error naming the answer.
    pub fn expect<T>(
        &self,
        request: &Request,
        pick: impl FnOnce(Response) -> Option<T>,
    ) -> ApiResult<T> {
        let answer = self.agent(request)?;
        let shown = format!("{answer:?}");
        pick(answer).ok_or_else(|| format!("{request:?}: unexpected answer {shown}").into())
    }

    /// Waits until the VMM's agent client is connected; returns how long it took.
    pub fn wait_agent(&self, timeout: Duration) -> ApiResult<Duration> {
        let t = Instant::now();
        loop {
            let info: AgentInfo = self.json(&["agent"])?;
            if info.connected {
                return Ok(t.elapsed());
            }
            if t.elapsed() > timeout {
                return Err(format!(
                    "the agent did not connect within {timeout:?} (last error: {:?})",
                    info.last_error
                )
                .into());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until every node has plugged what is requested.
    pub fn wait_plugged(&self, timeout: Duration) -> ApiResult<Vec<NodeStatus>> {
        let t = Instant::now();
        loop {
            let nodes = self.nodes()?;
            if nodes.iter().all(|n| n.plugged_bytes == n.requested_bytes) {
                return Ok(nodes);
            }
            if t.elapsed() > timeout {
                return Err(format!(
                    "the guest did not plug what was requested within {timeout:?}: {nodes:?}"
                )
                .into());
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Starts a job (`evacuate` or `compact` arguments) and waits for its end.
    pub fn run_job(&self, args: &[&str], timeout: Duration) -> ApiResult<Job> {
        let accepted: JobAccepted = self.json(args)?;
        let t = Instant::now();
        loop {
            let job: Job = self.json(&["jobs", "--job", &accepted.job.to_string()])?;
            if job.state == JobState::Done {
                return Ok(job);
            }
            if t.elapsed() > timeout {
                return Err(format!("job {} not done within {timeout:?}: {job:?}", job.id).into());
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}
