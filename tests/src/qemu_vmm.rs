//! QEMU as the inner VMM, for the reset control experiment (`tests/examples/reset_control.rs`,
//! images/README.md): the usual two-node guest booted by QEMU with KVM inside the test
//! host, its virtio-mem devices resized through QMP and its agent reached over
//! vhost-vsock. Under QEMU the guest kernel is `images/build.sh qemu-kernel`'s bzImage
//! (the same source and config plus virtio-pci: QEMU's virtio-mem is a PCI device).

use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agent_protocol::{read_frame, write_frame, Request, RequestFrame, Response, ResponseFrame};
use serde_json::{json, Value};

/// The guest's vsock CID under QEMU (`vhost-vsock-pci,guest-cid=`).
pub const GUEST_CID: u32 = 3;
/// mempower's kernel command line (`vmm/src/vm.rs`) without `pci=off`: QEMU's devices
/// are on PCI.
pub const CMDLINE: &str =
    "console=ttyS0 panic=1 mitigations=off memhp_default_state=online_movable";

#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("cannot connect to QMP at {}: {source}", path.display())]
    QmpConnect { path: PathBuf, source: io::Error },
    #[error("QMP I/O: {0}")]
    QmpIo(#[source] io::Error),
    #[error("QMP closed the connection (QEMU exited)")]
    QmpClosed,
    #[error("QMP line is not JSON: {line}")]
    QmpMalformed { line: String },
    #[error("QMP {command} failed: {error}")]
    QmpCommand { command: String, error: String },
    #[error("cannot connect to the agent on vsock {cid}:{port}: {source}")]
    VsockConnect {
        cid: u32,
        port: u32,
        source: io::Error,
    },
    #[error("agent request {request}: {reason}")]
    Agent { request: String, reason: String },
}

/// The guest QEMU boots: nodes 0 and 1 with one vCPU (its own socket, as mempower
/// presents them) and `boot_mib` MiB each, and per node a virtio-mem device of
/// `hotplug_mib` MiB with `requested_mib` MiB requested at boot.
#[derive(Debug, Clone)]
pub struct QemuGuest {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub boot_mib: u64,
    pub hotplug_mib: u64,
    pub requested_mib: u64,
    pub qmp: PathBuf,
}

impl QemuGuest {
    /// The `qemu-system-x86_64` arguments. The serial console is QEMU's stdio; a reset
    /// (a triple fault) ends QEMU like a power-off (`-no-reboot`): QMP's `SHUTDOWN`
    /// event tells them apart.
    pub fn args(&self) -> Vec<OsString> {
        let nodes = 2;
        let boot = self.boot_mib * nodes;
        let max = boot + self.hotplug_mib * nodes;
        let mut args: Vec<String> = [
            "-accel",
            "kvm",
            "-machine",
            "pc",
            "-cpu",
            "host",
            "-smp",
            "2,sockets=2,cores=1,threads=1",
            "-m",
        ]
        .iter()
        .map(ToString::to_string)
        .collect();
        args.push(format!("{boot}M,slots=1,maxmem={max}M"));
        for n in 0..nodes {
            args.extend([
                "-object".into(),
                format!("memory-backend-memfd,id=ram{n},size={}M", self.boot_mib),
                "-numa".into(),
                format!("node,nodeid={n},cpus={n},memdev=ram{n}"),
            ]);
        }
        for n in 0..nodes {
            args.extend([
                "-object".into(),
                format!("memory-backend-memfd,id=hot{n},size={}M", self.hotplug_mib),
                "-device".into(),
                format!(
                    "virtio-mem-pci,id=vmem{n},memdev=hot{n},node={n},requested-size={}M",
                    self.requested_mib
                ),
            ]);
        }
        args.extend([
            "-device".into(),
            format!("vhost-vsock-pci,guest-cid={GUEST_CID}"),
            "-kernel".into(),
            self.kernel.display().to_string(),
            "-initrd".into(),
            self.initramfs.display().to_string(),
            "-append".into(),
            CMDLINE.into(),
            "-display".into(),
            "none".into(),
            "-serial".into(),
            "stdio".into(),
            "-monitor".into(),
            "none".into(),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", self.qmp.display()),
            "-no-reboot".into(),
        ]);
        args.into_iter().map(OsString::from).collect()
    }
}

/// One QMP line: a command's answer or an asynchronous event.
#[derive(Debug, Clone, PartialEq)]
pub enum QmpMessage {
    Greeting,
    Return(Value),
    Error(String),
    Event { name: String, data: Value },
}

impl QmpMessage {
    pub fn parse(line: &str) -> Result<Self, QemuError> {
        let malformed = || QemuError::QmpMalformed {
            line: line.chars().take(200).collect(),
        };
        let value: Value = serde_json::from_str(line).map_err(|_| malformed())?;
        if value.get("QMP").is_some() {
            Ok(Self::Greeting)
        } else if let Some(ret) = value.get("return") {
            Ok(Self::Return(ret.clone()))
        } else if let Some(error) = value.get("error") {
            Ok(Self::Error(
                error["desc"].as_str().unwrap_or("?").to_string(),
            ))
        } else if let Some(name) = value.get("event").and_then(Value::as_str) {
            Ok(Self::Event {
                name: name.to_string(),
                data: value.get("data").cloned().unwrap_or(Value::Null),
            })
        } else {
            Err(malformed())
        }
    }
}

/// How the guest ended, from QMP's `SHUTDOWN` event: `guest-shutdown` is a power-off,
/// `guest-reset` a reset (a triple fault, or a reboot after a kernel panic).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestEnd {
    PowerOff,
    Reset,
    Other(String),
}

impl GuestEnd {
    fn from_reason(reason: &str) -> Self {
        match reason {
            "guest-shutdown" => Self::PowerOff,
            "guest-reset" => Self::Reset,
            other => Self::Other(other.to_string()),
        }
    }
}

/// A QMP connection. Events are kept as they come in.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    pub events: Vec<(String, Value)>,
}

impl Qmp {
    /// Connects (QEMU creates the socket as it starts: retried for `timeout`) and leaves
    /// the capabilities negotiation.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, QemuError> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(stream) => break stream,
                Err(source) if Instant::now() >= deadline => {
                    return Err(QemuError::QmpConnect {
                        path: path.to_path_buf(),
                        source,
                    })
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(QemuError::QmpIo)?;
        let writer = stream.try_clone().map_err(QemuError::QmpIo)?;
        let mut qmp = Self {
            reader: BufReader::new(stream),
            writer,
            events: Vec::new(),
        };
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn next(&mut self) -> Result<QmpMessage, QemuError> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err(QemuError::QmpClosed),
            Ok(_) => QmpMessage::parse(line.trim()),
            Err(e) => Err(QemuError::QmpIo(e)),
        }
    }

    /// Runs one command and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QemuError> {
        let line = json!({ "execute": command, "arguments": arguments }).to_string();
        self.writer
            .write_all(format!("{line}\n").as_bytes())
            .map_err(QemuError::QmpIo)?;
        loop {
            match self.next()? {
                QmpMessage::Greeting => {}
                QmpMessage::Return(value) => return Ok(value),
                QmpMessage::Error(error) => {
                    return Err(QemuError::QmpCommand {
                        command: command.to_string(),
                        error,
                    })
                }
                QmpMessage::Event { name, data } => self.events.push((name, data)),
            }
        }
    }

    /// A virtio-mem device's plugged size (`size`) and `requested-size`, in bytes.
    pub fn virtio_mem_sizes(&mut self, id: &str) -> Result<(u64, u64), QemuError> {
        let path = format!("/machine/peripheral/{id}");
        let mut get = |property: &str| {
            let value = self.execute("qom-get", json!({ "path": path, "property": property }))?;
            value.as_u64().ok_or_else(|| QemuError::QmpCommand {
                command: format!("qom-get {path} {property}"),
                error: format!("not a size: {value}"),
            })
        };
        Ok((get("size")?, get("requested-size")?))
    }

    /// Asks virtio-mem device `id` to hold `bytes`.
    pub fn resize(&mut self, id: &str, bytes: u64) -> Result<(), QemuError> {
        let path = format!("/machine/peripheral/{id}");
        self.execute(
            "qom-set",
            json!({ "path": path, "property": "requested-size", "value": bytes }),
        )?;
        Ok(())
    }

    /// Reads events until QEMU closes the connection (it has exited) or `timeout`
    /// passes, and says how the guest ended, if a `SHUTDOWN` event said so.
    pub fn guest_end(&mut self, timeout: Duration) -> Option<GuestEnd> {
        let deadline = Instant::now() + timeout;
        while let Some(left) = deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
        {
            // A QEMU that still runs sends nothing: wait no longer than asked.
            if self.reader.get_ref().set_read_timeout(Some(left)).is_err() {
                break;
            }
            match self.next() {
                Ok(QmpMessage::Event { name, data }) => self.events.push((name, data)),
                Ok(_) => {}
                Err(QemuError::QmpIo(e))
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => break,
            }
        }
        self.events
            .iter()
            .find(|(name, _)| name == "SHUTDOWN")
            .map(|(_, data)| GuestEnd::from_reason(data["reason"].as_str().unwrap_or("")))
    }
}

/// A connection to the guest agent over vsock (the test host's vhost-vsock).
pub struct AgentClient {
    stream: UnixStream,
    next_id: u64,
}

impl AgentClient {
    pub fn connect(cid: u32, port: u32, timeout: Duration) -> Result<Self, QemuError> {
        let err = |source| QemuError::VsockConnect { cid, port, source };
        // SAFETY: socket(2) with constant arguments; the result is checked before use.
        let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(err(io::Error::last_os_error()));
        }
        // SAFETY: `fd` is the socket just created, owned by nothing else; OwnedFd closes it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_vm is a plain C struct for which all zeroes is a valid value.
        let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_cid = cid;
        addr.svm_port = port;
        // SAFETY: `addr` is an initialised sockaddr_vm that outlives the call, and the
        // length passed is its size.
        let rc = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_vm).cast::<libc::sockaddr>(),
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(err(io::Error::last_os_error()));
        }
        // A vsock stream socket reads and writes like any stream socket.
        let stream = UnixStream::from(fd);
        stream.set_read_timeout(Some(timeout)).map_err(err)?;
        Ok(Self { stream, next_id: 1 })
    }

    /// One request and its answer (the read times out after the connect's `timeout`).
    pub fn request(&mut self, request: Request) -> Result<Response, QemuError> {
        let shown: String = serde_json::to_string(&request)
            .unwrap_or_default()
            .chars()
            .take(80)
            .collect();
        let fail = |reason: String| QemuError::Agent {
            request: shown.clone(),
            reason,
        };
        let id = self.next_id;
        self.next_id += 1;
        write_frame(&mut self.stream, &RequestFrame::new(id, request))
            .map_err(|e| fail(e.to_string()))?;
        let answer: ResponseFrame =
            read_frame(&mut self.stream).map_err(|e| fail(e.to_string()))?;
        answer.into_result().map_err(|e| fail(format!("{e:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest() -> QemuGuest {
        QemuGuest {
            kernel: "/k/bzImage".into(),
            initramfs: "/k/initramfs.cpio".into(),
            boot_mib: 256,
            hotplug_mib: 1024,
            requested_mib: 512,
            qmp: "/tmp/q.sock".into(),
        }
    }

    fn after<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn qemu_gets_the_layout_of_the_mempower_guest() {
        let args: Vec<String> = guest()
            .args()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert_eq!(after(&args, "-m"), ["512M,slots=1,maxmem=2560M"]);
        assert_eq!(
            after(&args, "-numa"),
            [
                "node,nodeid=0,cpus=0,memdev=ram0",
                "node,nodeid=1,cpus=1,memdev=ram1"
            ]
        );
        let devices = after(&args, "-device");
        assert_eq!(
            devices,
            [
                "virtio-mem-pci,id=vmem0,memdev=hot0,node=0,requested-size=512M",
                "virtio-mem-pci,id=vmem1,memdev=hot1,node=1,requested-size=512M",
                "vhost-vsock-pci,guest-cid=3",
            ]
        );
        assert!(after(&args, "-object").contains(&"memory-backend-memfd,id=hot1,size=1024M"));
        assert_eq!(after(&args, "-append"), [CMDLINE]);
        assert!(!CMDLINE.contains("pci=off"));
        assert!(args.contains(&"-no-reboot".to_string()));
    }

    /// A QMP server on a socket in a fresh directory: greets, answers the capabilities
    /// negotiation, then sends `then` and closes, or with `then` empty stays silent.
    fn fake_qemu(name: &str, then: &'static str) -> (PathBuf, std::thread::JoinHandle<()>) {
        use std::io::Read;
        let dir = std::env::temp_dir().join(format!("mempower-qmp-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("qmp.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            stream
                .write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n")
                .unwrap();
            let mut buf = [0u8; 256];
            let n = stream.read(&mut buf).unwrap();
            assert!(String::from_utf8_lossy(&buf[..n]).contains("qmp_capabilities"));
            stream.write_all(b"{\"return\": {}}\r\n").unwrap();
            if then.is_empty() {
                // Silent, as a QEMU whose guest runs on: hold the connection a while.
                std::thread::sleep(Duration::from_secs(2));
            } else {
                stream.write_all(then.as_bytes()).unwrap();
            }
        });
        (path, server)
    }

    #[test]
    fn a_reset_is_told_from_a_power_off_by_the_shutdown_event() {
        for (reason, end) in [
            ("guest-reset", GuestEnd::Reset),
            ("guest-shutdown", GuestEnd::PowerOff),
        ] {
            let event: &'static str = Box::leak(
                format!(
                    "{{\"event\": \"SHUTDOWN\", \"data\": {{\"guest\": true, \"reason\": \"{reason}\"}}}}\r\n"
                )
                .into_boxed_str(),
            );
            let (path, server) = fake_qemu(reason, event);
            let mut qmp = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
            assert_eq!(qmp.guest_end(Duration::from_secs(5)), Some(end));
            server.join().unwrap();
            let _ = std::fs::remove_dir_all(path.parent().unwrap());
        }
    }

    #[test]
    fn a_qemu_that_says_nothing_gives_no_end_within_the_timeout() {
        let (path, server) = fake_qemu("silent", "");
        let mut qmp = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        let t = Instant::now();
        assert_eq!(qmp.guest_end(Duration::from_millis(300)), None);
        assert!(
            t.elapsed() < Duration::from_millis(1500),
            "{:?}",
            t.elapsed()
        );
        server.join().unwrap();
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn qmp_lines_parse_into_answers_and_events() {
        assert_eq!(
            QmpMessage::parse(r#"{"QMP": {"version": {}, "capabilities": []}}"#).unwrap(),
            QmpMessage::Greeting
        );
        assert_eq!(
            QmpMessage::parse(r#"{"return": 536870912}"#).unwrap(),
            QmpMessage::Return(json!(536870912))
        );
        assert_eq!(
            QmpMessage::parse(r#"{"error": {"class": "GenericError", "desc": "no such"}}"#)
                .unwrap(),
            QmpMessage::Error("no such".into())
        );
        let event = QmpMessage::parse(
            r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-reset"}}"#,
        )
        .unwrap();
        let QmpMessage::Event { name, data } = event else {
            panic!("an event: {event:?}");
        };
        assert_eq!(name, "SHUTDOWN");
        assert_eq!(
            GuestEnd::from_reason(data["reason"].as_str().unwrap()),
            GuestEnd::Reset
        );
        assert_eq!(GuestEnd::from_reason("guest-shutdown"), GuestEnd::PowerOff);
        assert_eq!(
            GuestEnd::from_reason("host-qmp-quit"),
            GuestEnd::Other("host-qmp-quit".into())
        );
        assert!(QmpMessage::parse("not json").is_err());
        assert!(QmpMessage::parse(r#"{"something": 1}"#).is_err());
    }
}
