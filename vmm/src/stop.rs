//! How the VMM stops: it says why first, then tears down under a watchdog.
//!
//! As soon as the event loop ends, [`report`] logs the reason, and [`Watchdog::arm`]
//! starts a thread that ends the process with the reason's exit status if it is still
//! there [`TEARDOWN_LIMIT`] later. Nothing in the teardown (kicking vCPUs, stopping the
//! API thread, dropping devices and memory) can then hide the reason or keep the process
//! alive. The one thing the watchdog cannot end is a thread stuck inside the kernel:
//! process exit waits for it too.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use crate::devices::ExitReason;

/// Exit statuses of `mempower run`.
pub const EXIT_GUEST_POWEROFF: u8 = 0;
pub const EXIT_VMM_ERROR: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_GUEST_RESET: u8 = 3;
/// The guest broke the machine's rules (e.g. it touched memory it had unplugged).
pub const EXIT_GUEST_FAULT: u8 = 4;

/// How long the teardown may take before the watchdog ends the process.
pub const TEARDOWN_LIMIT: Duration = Duration::from_secs(5);
/// How long the watchdog waits for stderr to take its last line.
const LAST_WORDS_WAIT: Duration = Duration::from_millis(500);

/// The exit status of `mempower run` once the VM stopped for `reason`.
pub fn status(reason: &ExitReason) -> u8 {
    match reason {
        ExitReason::PowerOff | ExitReason::Stopped(_) => EXIT_GUEST_POWEROFF,
        ExitReason::Reset(_) => EXIT_GUEST_RESET,
        ExitReason::GuestFault(_) => EXIT_GUEST_FAULT,
        ExitReason::Error(_) => EXIT_VMM_ERROR,
    }
}

/// Logs why the VM stopped.
pub fn report(reason: &ExitReason) {
    match reason {
        ExitReason::PowerOff => log::info!("guest powered off"),
        ExitReason::Stopped(why) => log::info!("VM stopped: {why}"),
        ExitReason::Reset(why) => log::warn!("guest reset ({why})"),
        ExitReason::GuestFault(why) => log::error!("guest fault: {why}"),
        ExitReason::Error(why) => log::error!("{why}"),
    }
}

/// The message of a caught panic.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    match (
        payload.downcast_ref::<&str>(),
        payload.downcast_ref::<String>(),
    ) {
        (Some(s), _) => s,
        (_, Some(s)) => s,
        _ => "(no message)",
    }
}

/// Ends the process if the teardown takes too long. Dropping the handle leaves it armed
/// until the process exits; only [`Watchdog::disarm`] stops it.
#[derive(Debug)]
pub struct Watchdog {
    disarm: Sender<()>,
}

impl Watchdog {
    /// Starts the watchdog thread: unless disarmed, it exits the process with `status`
    /// once `limit` has passed, saying so on stderr. The thread calls `enter` first (the
    /// VMM installs the thread's seccomp filter there).
    pub fn arm(
        limit: Duration,
        status: u8,
        enter: impl FnOnce() + Send + 'static,
    ) -> io::Result<Watchdog> {
        let deadline = Instant::now() + limit;
        let (disarm, disarmed) = mpsc::channel();
        std::thread::Builder::new()
            .name("mempower-watchdog".into())
            .spawn(move || {
                enter();
                let left = || deadline.saturating_duration_since(Instant::now());
                match disarmed.recv_timeout(left()) {
                    Ok(()) => return,
                    Err(RecvTimeoutError::Timeout) => {}
                    // The handle is gone, not disarmed: wait out the limit.
                    Err(RecvTimeoutError::Disconnected) => std::thread::sleep(left()),
                }
                fire(limit, status)
            })?;
        Ok(Watchdog { disarm })
    }

    /// The teardown finished: stop the watchdog.
    pub fn disarm(self) {
        let _ = self.disarm.send(());
    }
}

/// Says why on stderr, without the logger (whose lock a stuck thread may hold) and
/// without waiting for a stderr that takes nothing, then ends the process.
fn fire(limit: Duration, status: u8) -> ! {
    let line = crate::logger::line_now(
        log::Level::Error,
        module_path!(),
        &format!(
            "the teardown took longer than {limit:?}; exiting with status {status} without finishing it"
        ),
    );
    let stderr = io::stderr();
    let mut poll = libc::pollfd {
        fd: stderr.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    let wait_ms = LAST_WORDS_WAIT.as_millis() as libc::c_int;
    // SAFETY: one valid pollfd, for the duration of the call.
    let ready = unsafe { libc::poll(&mut poll, 1, wait_ms) };
    if ready == 1 && poll.revents & libc::POLLOUT != 0 {
        // One write of less than a pipe buffer: it does not block on a writable pipe.
        // SAFETY: the pointer and length describe `line`, alive for the call.
        unsafe { libc::write(poll.fd, line.as_ptr().cast(), line.len()) };
    }
    // SAFETY: _exit ends the process at once, which is the point: the teardown is stuck.
    unsafe { libc::_exit(status.into()) }
}

#[cfg(test)]
mod tests;
