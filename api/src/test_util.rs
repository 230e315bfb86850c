//! Test helpers: a temporary directory, a fake VMM thread behind a real
//! [`ApiServer`], and a raw HTTP exchange.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::tempdir::TempDir;

use crate::http::Response;
use crate::server::{ApiServer, ServerConfig};
use crate::types::{ApiAction, ApiError, ApiReply, ApiResult, NodeInfo, VmInfo, VmState};

/// A fresh directory under /tmp (short, so socket paths fit `sun_path`).
pub(crate) fn tempdir() -> TempDir {
    TempDir::new_with_prefix("/tmp/mempower-api-").expect("create a temporary directory")
}

/// What the fake VMM answers.
pub(crate) fn sample_info() -> VmInfo {
    VmInfo {
        state: VmState::Running,
        vcpus: 2,
        nodes: vec![
            NodeInfo {
                id: 0,
                cpus: vec![0],
                boot_memory_bytes: 512 << 20,
            },
            NodeInfo {
                id: 1,
                cpus: vec![1],
                boot_memory_bytes: 256 << 20,
            },
        ],
    }
}

/// How the fake VMM treats each request.
#[derive(Clone)]
pub(crate) enum Behaviour {
    /// Answer like a healthy VMM.
    Answer,
    /// Answer every request with this error.
    Fail(ApiError),
    /// Drop the reply channel without answering.
    DropReply,
    /// Keep the request this long, then drop it.
    Hold(Duration),
    /// Answer like a healthy VMM, but agent calls only after this long and
    /// from a thread of their own, as the real VMM does.
    SlowAgent(Duration),
    /// Answer like a healthy VMM, with a metrics text of this many bytes.
    BigMetrics(usize),
}

/// What a healthy VMM answers.
fn healthy_answer(action: &ApiAction) -> ApiResult {
    match action {
        ApiAction::GetVmInfo => Ok(ApiReply::VmInfo(sample_info())),
        ApiAction::Shutdown => Ok(ApiReply::Empty),
        ApiAction::GetNodes => Ok(ApiReply::Nodes(vec![])),
        ApiAction::GetAgent => Ok(ApiReply::Agent(Default::default())),
        ApiAction::GetRegions { .. } => Ok(ApiReply::Regions(vec![])),
        ApiAction::AgentCall { request } => Ok(ApiReply::AgentResponse(request.clone())),
        ApiAction::SetRequestedSize { node, .. } if *node > 1 => {
            Err(ApiError::not_found(format!("no such node: {node}")))
        }
        ApiAction::SetRequestedSize { .. } => Ok(ApiReply::Empty),
        ApiAction::Evacuate { .. } | ApiAction::Compact { .. } => {
            Ok(ApiReply::Accepted(crate::evacuation::JobAccepted::new(1)))
        }
        ApiAction::GetJob { id } => Err(ApiError::not_found(format!("no such job: {id}"))),
        ApiAction::GetJobs => Ok(ApiReply::Jobs(vec![])),
        ApiAction::PlugRegion { .. } => Err(ApiError::conflict("region 0 of node 0 is plugged")),
        ApiAction::GetMetrics => Ok(ApiReply::Metrics("mempower_up 1\n".into())),
        ApiAction::GetBalloon | ApiAction::SetBalloonTarget { .. } => {
            Err(ApiError::not_found("this VM has no balloon"))
        }
        ApiAction::GetAutopilot { node } | ApiAction::SetAutopilot { node, .. } => Err(
            ApiError::not_found(format!("node {node} has no hotplug region")),
        ),
        ApiAction::GetEvents { .. } => Ok(ApiReply::Events(vec![])),
    }
}

/// A server on a temporary socket with a fake VMM thread behind it.
pub(crate) struct TestVmm {
    /// Keeps the socket directory alive.
    _dir: TempDir,
    pub path: PathBuf,
    pub server: Option<ApiServer>,
    /// A clone of the EventFd the server writes.
    pub notify: EventFd,
    vmm: Option<JoinHandle<Vec<ApiAction>>>,
    /// How many requests the fake VMM has received.
    received: Arc<(Mutex<usize>, Condvar)>,
}

impl TestVmm {
    /// Waits until the fake VMM has received `n` requests in all: the server has then
    /// passed them on, and their connections wait for the VMM. Panics after 10 s.
    pub(crate) fn wait_received(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let (count, changed) = &*self.received;
        let mut got = count.lock().unwrap();
        while *got < n {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "the VMM received {} of {n} requests in 10 s",
                *got
            );
            got = changed.wait_timeout(got, left).unwrap().0;
        }
    }

    /// Stops the server, then the fake VMM; returns the actions it saw.
    pub(crate) fn stop(mut self) -> Vec<ApiAction> {
        self.server.take();
        self.vmm
            .take()
            .map(|t| t.join().expect("fake VMM panicked"))
            .unwrap_or_default()
    }
}

/// [`start_with`] the default configuration.
pub(crate) fn start(behaviour: Behaviour) -> TestVmm {
    start_with(ServerConfig::default(), behaviour)
}

/// Starts a server on `<tempdir>/api.sock` and a fake VMM answering it.
pub(crate) fn start_with(config: ServerConfig, behaviour: Behaviour) -> TestVmm {
    let dir = tempdir();
    let path = dir.as_path().join("api.sock");
    let (tx, rx) = mpsc::channel::<crate::types::ApiRequest>();
    let notify = EventFd::new(EFD_NONBLOCK).unwrap();
    let server =
        ApiServer::spawn_with_config(&path, tx, notify.try_clone().unwrap(), config).unwrap();
    let received = Arc::new((Mutex::new(0), Condvar::new()));
    let counter = Arc::clone(&received);
    let vmm = thread::spawn(move || {
        let mut seen = Vec::new();
        for req in rx {
            seen.push(req.action.clone());
            *counter.0.lock().unwrap() += 1;
            counter.1.notify_all();
            let result = match (&behaviour, &req.action) {
                (Behaviour::Answer, action) => healthy_answer(action),
                (Behaviour::Fail(e), _) => Err(e.clone()),
                (Behaviour::DropReply, _) => continue,
                (Behaviour::Hold(d), _) => {
                    thread::sleep(*d);
                    continue;
                }
                (Behaviour::SlowAgent(d), action @ ApiAction::AgentCall { .. }) => {
                    let (d, result, reply) = (*d, healthy_answer(action), req.reply);
                    thread::spawn(move || {
                        thread::sleep(d);
                        let _ = reply.send(result);
                    });
                    continue;
                }
                (Behaviour::BigMetrics(n), ApiAction::GetMetrics) => {
                    Ok(ApiReply::Metrics("#".repeat(*n)))
                }
                (Behaviour::SlowAgent(_) | Behaviour::BigMetrics(_), action) => {
                    healthy_answer(action)
                }
            };
            let _ = req.reply.send(result);
        }
        seen
    });
    TestVmm {
        _dir: dir,
        path,
        server: Some(server),
        notify,
        vmm: Some(vmm),
        received,
    }
}

/// Sends `raw` on a new connection to `path`, half-closes it, and parses the
/// answer.
pub(crate) fn exchange(path: &Path, raw: &[u8]) -> Response {
    let mut stream = UnixStream::connect(path).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    // The server may answer and close before reading everything.
    let _ = stream.write_all(raw);
    // Half-close: a truncated request then ends in EOF, not a timeout.
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut buf = Vec::new();
    // A reset after the response (unread request bytes) is fine.
    let _ = stream.read_to_end(&mut buf);
    match Response::parse(&buf) {
        Ok(Some((response, used))) => {
            assert_eq!(used, buf.len(), "bytes after the response");
            response
        }
        other => panic!(
            "bad response {other:?} to {:?}: {:?}",
            String::from_utf8_lossy(&raw[..raw.len().min(80)]),
            String::from_utf8_lossy(&buf)
        ),
    }
}
