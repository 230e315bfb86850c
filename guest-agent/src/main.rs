//! mempower's guest agent. As PID 1 (`/init` of the test initramfs) it sets up the
//! pseudo filesystems, reaps zombies and never exits, unless it panics or fails to
//! start: then it says so on the console and exits, which the kernel reports and turns
//! into a reboot. On a normal distro it runs as a service and mounts nothing. Either way
//! it prints one `MEMPOWER-READY` line with the guest's NUMA view and then takes commands
//! on the serial console and, if the guest has a vsock device, requests of the
//! `agent_protocol` on vsock port 5252.

mod console;
mod fill;
mod held;
mod init;
mod locality;
mod memory;
mod numa;
mod pagemap;
mod pin;
mod poke;
mod procpages;
mod requests;
mod session;
mod signals;
mod sys;
mod touch;
mod usage;
mod vmstat;
mod vsock;
mod zoneinfo;

use std::ffi::OsString;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use thiserror::Error;

use console::{Command, Response};
use init::{Halt, Role};
use numa::GuestView;
use requests::TestRequests;

const USAGE: &str = "\
usage: guest-agent [--daemon [--test-requests]] [--poweroff] [--help]

mempower's guest agent. As PID 1 it mounts /proc, /sys, /dev and /tmp, reaps zombies
and never exits; otherwise it runs as a service and mounts nothing. It prints one
MEMPOWER-READY line with the guest's NUMA view, then reads commands from stdin, one per
line: poweroff, reboot, ready, touch <node> <MiB>. If the guest has a vsock device it
also serves the mempower agent protocol on vsock port 5252, and keeps doing so after
stdin ends. As a service, a `shutdown` request (or `poweroff`) runs /sbin/poweroff: the
distribution's own clean shutdown (`systemctl poweroff` under systemd).

  --daemon               run as a service (see guest-agent/mempower-agent.service):
                         serve vsock only, never read stdin; exit with status 1 if
                         vsock cannot be served, so that the service manager restarts it;
                         refuse the requests only tests need (fill, fill_interleaved,
                         pin, poke), which fill, pin or write guest memory
  --test-requests        with --daemon: serve those requests too (test images only)
  poweroff, --poweroff   power off right after printing the READY line
  -h, --help             print this help";

#[derive(Debug, Error)]
enum AgentError {
    #[error(transparent)]
    Init(#[from] init::InitError),
    #[error(transparent)]
    Numa(#[from] numa::NumaError),
    #[error(transparent)]
    Console(#[from] console::ConsoleError),
    #[error(transparent)]
    Touch(#[from] touch::TouchError),
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Flags {
    daemon: bool,
    test_requests: bool,
    poweroff: bool,
    help: bool,
    /// Words we do not know; the kernel may pass stray ones to init.
    unknown: Vec<String>,
}

impl Flags {
    fn parse(args: impl IntoIterator<Item = OsString>) -> Self {
        let mut flags = Self::default();
        for arg in args {
            match arg.to_string_lossy().as_ref() {
                "--daemon" => flags.daemon = true,
                "--test-requests" => flags.test_requests = true,
                "poweroff" | "--poweroff" => flags.poweroff = true,
                "-h" | "--help" => flags.help = true,
                other => flags.unknown.push(other.to_owned()),
            }
        }
        flags
    }

    /// A daemon serves the test-only requests only when told to: it is how a production
    /// guest runs the agent. Init is the test initramfs's.
    fn test_requests(&self) -> TestRequests {
        if self.daemon && !self.test_requests {
            TestRequests::Refused
        } else {
            TestRequests::Served
        }
    }
}

/// Carries out commands, whichever channel they came from.
struct Agent {
    role: Role,
    /// Where procfs and sysfs are found below (`/proc`, `/sys`).
    root: PathBuf,
}

impl Agent {
    fn execute(&self, command: Command) -> Result<Response, AgentError> {
        match command {
            Command::Ready => Ok(Response::Ready(GuestView::collect(&self.root)?)),
            Command::PowerOff => Err(init::halt(self.role, Halt::PowerOff).into()),
            Command::Reboot => Err(init::halt(self.role, Halt::Reboot).into()),
            Command::Touch { node, mib } => {
                touch::touch(node, mib)?;
                Ok(Response::Touched { node, mib })
            }
        }
    }

    fn announce(&self) -> Result<(), AgentError> {
        let view = GuestView::collect(&self.root)?;
        console::emit(&mut console::Stdout, &console::ready_line(&view)?)?;
        Ok(())
    }
}

/// Ends the agent after a failure it cannot go on from. As init, the same way as a
/// panic: a `MEMPOWER-PANIC` line with `message`, then exit [`PANIC_EXIT`], which the
/// VMM reports as a guest reset quoting the line (exit status 3). Powering off instead
/// would end the VM as if all went well. A service reports `message` and exits with
/// status 1, so that the service manager restarts it.
fn fatal(role: Role, message: &str) -> ! {
    match role {
        Role::Init => {
            let line = console::panic_line(&format!("the agent failed: {message}"));
            // Nowhere left to report a broken console to.
            let _ = console::emit(&mut console::Stdout, &line);
            std::process::exit(PANIC_EXIT)
        }
        Role::Service => {
            console::report(message);
            std::process::exit(1)
        }
    }
}

/// Exit status after a panic (Rust's usual one). As PID 1 the kernel reports it
/// ("Attempted to kill init! exitcode=0x00006500") and, with `panic=1` as the VMM boots
/// it, reboots: an agent panic ends the VM as a reset, never as a clean power-off.
const PANIC_EXIT: i32 = 101;

/// On any thread's panic: a `MEMPOWER-PANIC` line on the console, then exit
/// [`PANIC_EXIT`] at once. Going on with one thread dead would leave the agent half
/// working; powering off would look like a clean shutdown.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("unnamed");
        let line = console::panic_line(&format!("thread '{name}' {info}"));
        // Nowhere left to report a broken console to.
        let _ = console::emit(&mut console::Stdout, &line);
        std::process::exit(PANIC_EXIT);
    }));
}

fn main() {
    install_panic_hook();
    let flags = Flags::parse(std::env::args_os().skip(1));
    // A daemon is a service whatever its pid (a container's entry point may be PID 1).
    let role = if flags.daemon {
        Role::Service
    } else {
        Role::detect()
    };
    if role == Role::Init {
        if let Err(e) = init::setup() {
            fatal(role, &e.to_string());
        }
    }

    if flags.help {
        println!("{USAGE}");
        if role == Role::Service {
            return;
        }
    }
    for word in &flags.unknown {
        console::report(&format!("unknown argument: {word}"));
    }

    let agent = Agent {
        role,
        root: PathBuf::from("/"),
    };
    // The port listens before the READY line, so the VMM may connect as soon as it sees
    // READY; and a missing vsock is reported before it, where the error line cannot be
    // mistaken for the answer to a console command sent after READY.
    let listener = match vsock::Listener::bind(agent_protocol::AGENT_PORT) {
        Ok(listener) => Some(listener),
        Err(e) => {
            console::report(&e.to_string());
            None
        }
    };
    if let Err(e) = agent.announce() {
        fatal(role, &e.to_string());
    }
    if flags.poweroff {
        let err = init::halt(role, Halt::PowerOff);
        fatal(role, &err.to_string());
    }

    let handler = Arc::new(requests::Handler::new(
        agent.root.clone(),
        flags.test_requests(),
    ));
    let vsock_up = listener.is_some_and(|listener| match vsock::start(listener, handler, role) {
        Ok(()) => true,
        Err(e) => {
            console::report(&e.to_string());
            false
        }
    });

    if flags.daemon {
        if vsock_up {
            init::idle_forever();
        }
        // Reported above; the service manager restarts us (Restart=always).
        std::process::exit(1);
    }
    let served = console::serve(io::stdin().lock(), &mut console::Stdout, |command| {
        agent.execute(command)
    });
    if let Err(e) = &served {
        console::report(&e.to_string());
    }
    match role {
        Role::Init => init::idle_forever(),
        // A service whose stdin is /dev/null still serves vsock.
        Role::Service if vsock_up => init::idle_forever(),
        Role::Service => std::process::exit(i32::from(served.is_err())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(words: &[&str]) -> Flags {
        Flags::parse(words.iter().map(OsString::from))
    }

    /// Runs in a child test process (the hook ends the process it runs in).
    #[test]
    fn a_panic_on_any_thread_prints_its_line_and_exits_101() {
        const CHILD: &str = "MEMPOWER_AGENT_PANIC_CHILD";
        if std::env::var_os(CHILD).is_some() {
            install_panic_hook();
            let worker = std::thread::Builder::new()
                .name("vsock-conn".into())
                .spawn(|| panic!("on purpose\nsecond line"))
                .unwrap();
            let _ = worker.join();
            unreachable!("the hook exits the process");
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "tests::a_panic_on_any_thread_prints_its_line_and_exits_101",
                "--nocapture",
            ])
            .env(CHILD, "1")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(PANIC_EXIT));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout
            .lines()
            .find(|l| l.starts_with(console::PANIC_PREFIX))
            .unwrap_or_else(|| panic!("no panic line in {stdout:?}"));
        assert!(line.contains("thread 'vsock-conn' panicked at"), "{line}");
        assert!(line.contains("on purpose second line"), "{line}");
    }

    /// Runs in a child test process, as `fatal` ends the process it runs in. Against a
    /// `fatal` that powers off, run it only where reboot(2) fails (`unshare --user
    /// --map-root-user`): as root it would power off the host.
    #[test]
    fn a_failure_of_init_reports_its_reason_and_exits_as_a_panic_does() {
        const CHILD: &str = "MEMPOWER_AGENT_FATAL_CHILD";
        const TEST: &str = "tests::a_failure_of_init_reports_its_reason_and_exits_as_a_panic_does";
        if let Some(role) = std::env::var_os(CHILD) {
            let role = if role == "init" {
                Role::Init
            } else {
                Role::Service
            };
            fatal(
                role,
                "cannot mount proc on /proc: Operation not permitted\n(os error 1)",
            );
        }
        // An agent that powers off or idles instead fails here rather than hang the test.
        let run = |role: &str| {
            let mut child = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", TEST, "--nocapture"])
                .env(CHILD, role)
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            while child.try_wait().unwrap().is_none() {
                if std::time::Instant::now() > deadline {
                    let _ = child.kill();
                    panic!("the {role} agent did not exit after its failure");
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            child.wait_with_output().unwrap()
        };
        let out = run("init");
        assert_eq!(out.status.code(), Some(PANIC_EXIT), "{out:?}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout
            .lines()
            .find(|l| l.starts_with(console::PANIC_PREFIX))
            .unwrap_or_else(|| panic!("no panic line in {stdout:?}"));
        assert!(
            line.ends_with("the agent failed: cannot mount proc on /proc: Operation not permitted (os error 1)"),
            "{line}"
        );
        // A service is restarted by its manager: status 1, an error line, no panic.
        let out = run("service");
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(!stdout.contains(console::PANIC_PREFIX), "{stdout}");
        assert!(stdout.contains(console::ERROR_PREFIX), "{stdout}");
    }

    #[test]
    fn flags() {
        assert_eq!(parse(&[]), Flags::default());
        assert!(parse(&["poweroff"]).poweroff);
        assert!(parse(&["--poweroff"]).poweroff);
        assert!(parse(&["--help"]).help && parse(&["-h"]).help);
        let flags = parse(&["--daemon"]);
        assert!(flags.daemon && !flags.poweroff && flags.unknown.is_empty());
        assert!(!parse(&["daemon"]).daemon, "only the flag form");
        assert_eq!(flags.test_requests(), TestRequests::Refused);
        let flags = parse(&["--daemon", "--test-requests"]);
        assert!(flags.daemon && flags.test_requests && flags.unknown.is_empty());
        assert_eq!(flags.test_requests(), TestRequests::Served);
        assert_eq!(parse(&[]).test_requests(), TestRequests::Served, "init");
        let flags = parse(&["ro", "poweroff", "--frob"]);
        assert!(flags.poweroff && !flags.help);
        assert_eq!(flags.unknown, ["ro", "--frob"]);
    }

    #[test]
    fn agent_answers_ready_from_its_root() {
        let fx = numa::tests::Fixture::new("agent");
        fx.node(0, "0-1\n", 1024).file("proc/uptime", "1.5 0\n");
        let agent = Agent {
            role: Role::Service,
            root: fx.0.clone(),
        };
        let Response::Ready(view) = agent.execute(Command::Ready).unwrap() else {
            panic!("ready must answer with the view");
        };
        assert_eq!(view.uptime_ms, 1500);
        assert_eq!(view.nodes[0].cpus, [0, 1]);
    }
}
