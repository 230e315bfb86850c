//! The API handler on a real event loop behind a real API socket, with a slow fake
//! agent: long agent work never delays the requests that do not need the agent.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use agent_protocol::{read_frame, write_frame, Request, RequestFrame, Response, ResponseFrame};
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};

use super::{ApiHandler, NodeDevices};
use crate::agent::AgentClient;
use crate::config::{NodeConfig, VmConfig};
use crate::devices::virtio::mem::MemDevice;
use crate::devices::VmExit;
use crate::layout::MemoryLayout;
use crate::memory::GuestRam;

const MIB: u64 = 1 << 20;
/// How long the fake agent takes over anything but hello.
const AGENT_WORK: Duration = Duration::from_millis(1500);
const PROMPT: Duration = Duration::from_millis(100);

/// An agent that says hello at once and takes [`AGENT_WORK`] over anything else.
fn slow_agent(stream: UnixStream) {
    thread::spawn(move || {
        let mut s = &stream;
        while let Ok(frame) = read_frame::<RequestFrame>(&mut s) {
            let answer = match frame.request {
                Request::Hello => Response::Hello {
                    protocol_version: 1,
                    agent_version: "slow".into(),
                    kernel: "6.1".into(),
                    capabilities: vec![],
                },
                Request::BlockUsage { .. } => {
                    thread::sleep(AGENT_WORK);
                    Response::BlockUsage { usage: vec![] }
                }
                _ => {
                    thread::sleep(AGENT_WORK);
                    Response::Vmstat {
                        counters: Default::default(),
                    }
                }
            };
            let _ = write_frame(&mut s, &ResponseFrame::new(frame.id, Ok(answer)));
        }
    });
}

fn slow_client() -> AgentClient {
    AgentClient::start(Box::new(|| {
        let (ours, theirs) = UnixStream::pair()?;
        slow_agent(theirs);
        Ok(ours)
    }))
    .unwrap()
}

/// A VMM without vCPUs: the API handler for one node with a 128 MiB region, served by
/// an event loop on its own thread, until dropped.
struct Vmm {
    socket: PathBuf,
    stop: Arc<AtomicBool>,
    events: Option<JoinHandle<()>>,
    _server: mempower_api::ApiServer,
    _ram: GuestRam,
    _dir: vmm_sys_util::tempdir::TempDir,
}

impl Vmm {
    fn start() -> Vmm {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/mempower-evl-").unwrap();
        let socket = dir.as_path().join("api.sock");
        let layout = MemoryLayout::with_hotplug(&[64 * MIB], &[128 * MIB]).unwrap();
        let ram = GuestRam::new(&layout, 1).unwrap();
        let dev = MemDevice::new(&layout.hotplug[0], &ram.node_files[0], 0).unwrap();
        let devices: NodeDevices = vec![Some(Arc::new(Mutex::new(dev)))];
        let config = VmConfig {
            kernel: PathBuf::new(),
            initramfs: None,
            cmdline_extra: None,
            nodes: vec![NodeConfig {
                id: 0,
                cpus: vec![0],
                memory: 64 * MIB,
                ..Default::default()
            }],
            api_socket: Some(socket.clone()),
            vsock_socket: None,
            console_log: None,
            disks: Vec::new(),
            balloon: None,
        };
        let agent = slow_client();
        let exit = Arc::new(VmExit::new().unwrap());
        let (handler, server) = ApiHandler::start(
            &socket,
            &config,
            exit,
            devices,
            Some(agent.clone()),
            vec![slow_client()],
        )
        .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let events = {
            let stop = stop.clone();
            thread::spawn(move || {
                let mut events: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
                    EventManager::new().unwrap();
                events.add_subscriber(Arc::new(Mutex::new(handler)));
                while !stop.load(Ordering::SeqCst) {
                    events.run_with_timeout(50).unwrap();
                }
            })
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !agent.status().connected {
            assert!(Instant::now() < deadline, "the fake agent never connected");
            thread::sleep(Duration::from_millis(10));
        }
        Vmm {
            socket,
            stop,
            events: Some(events),
            _server: server,
            _ram: ram,
            _dir: dir,
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(events) = self.events.take() {
            let _ = events.join();
        }
    }
}

/// One request, from a thread: its status and how long it took arrive on the receiver.
fn request(
    socket: &Path,
    method: &'static str,
    path: &'static str,
    body: Option<&'static str>,
) -> mpsc::Receiver<(u16, Duration)> {
    let (tx, rx) = mpsc::channel();
    let socket = socket.to_path_buf();
    thread::spawn(move || {
        let started = Instant::now();
        let timeout = Duration::from_secs(30);
        let response =
            mempower_api::client::request_with_timeout(&socket, method, path, body, timeout);
        let status = response.map(|r| r.status).unwrap_or(0);
        let _ = tx.send((status, started.elapsed()));
    });
    rx
}

#[test]
fn a_busy_agent_does_not_delay_get_vm() {
    let vmm = Vmm::start();
    let call = request(
        &vmm.socket,
        "POST",
        "/api/v1/agent/call",
        Some(r#"{"type":"vmstat"}"#),
    );
    let regions = request(&vmm.socket, "GET", "/api/v1/nodes/0/regions", None);
    // Both are with the agent now.
    thread::sleep(Duration::from_millis(200));
    let mut worst = Duration::ZERO;
    for _ in 0..5 {
        let (status, took) = request(&vmm.socket, "GET", "/api/v1/vm", None)
            .recv_timeout(Duration::from_secs(30))
            .unwrap();
        assert_eq!(status, 200);
        worst = worst.max(took);
    }
    println!("GET /api/v1/vm while the agent works on two requests: worst of 5 took {worst:?}");
    assert!(worst < PROMPT, "{worst:?}");
    let (status, took) = call.recv_timeout(Duration::from_secs(30)).unwrap();
    assert_eq!(status, 200);
    assert!(
        took >= AGENT_WORK,
        "the agent call did wait for the agent: {took:?}"
    );
    let (status, _) = regions.recv_timeout(Duration::from_secs(30)).unwrap();
    assert_eq!(status, 200);
}
