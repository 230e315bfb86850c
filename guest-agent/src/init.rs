//! PID-1 duties: mounting the pseudo filesystems, ignoring signals, reaping zombies and
//! powering off. As a service none of this happens except powering off, which then runs
//! the distro's own /sbin/poweroff or /sbin/reboot.

use std::ffi::{c_int, c_ulong, CStr};
use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum InitError {
    #[error("cannot mount {fstype} on {target}: {source}")]
    Mount {
        fstype: String,
        target: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot install a handler for signal {signal}: {source}")]
    Signal {
        signal: c_int,
        #[source]
        source: io::Error,
    },
    #[error("reboot(2) for {how:?} failed: {source}")]
    Reboot {
        how: Halt,
        #[source]
        source: io::Error,
    },
    #[error("cannot run {program}: {source}")]
    Exec {
        program: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Whether the agent is the guest's init or an ordinary service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Init,
    Service,
}

impl Role {
    pub fn detect() -> Self {
        if std::process::id() == 1 {
            Self::Init
        } else {
            Self::Service
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Halt {
    PowerOff,
    Reboot,
}

struct Mount {
    fstype: &'static CStr,
    target: &'static CStr,
    flags: c_ulong,
    data: &'static CStr,
}

const MOUNTS: [Mount; 4] = [
    Mount {
        fstype: c"proc",
        target: c"/proc",
        flags: libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        data: c"",
    },
    Mount {
        fstype: c"sysfs",
        target: c"/sys",
        flags: libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        data: c"",
    },
    Mount {
        fstype: c"devtmpfs",
        target: c"/dev",
        flags: libc::MS_NOSUID,
        data: c"mode=0755",
    },
    Mount {
        fstype: c"tmpfs",
        target: c"/tmp",
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        data: c"mode=1777",
    },
];

/// Signals init ignores. They get a no-op handler rather than `SIG_IGN` so that children
/// started later get the default dispositions back on exec.
const IGNORED_SIGNALS: [c_int; 10] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGTSTP,
    libc::SIGTTIN,
    libc::SIGTTOU,
    libc::SIGPWR,
];

/// Everything PID 1 does before it reports READY.
pub fn setup() -> Result<(), InitError> {
    for signal in IGNORED_SIGNALS {
        set_handler(signal, ignore_signal, libc::SA_RESTART)?;
    }
    set_handler(
        libc::SIGCHLD,
        reap_children,
        libc::SA_RESTART | libc::SA_NOCLDSTOP,
    )?;
    MOUNTS.iter().try_for_each(mount)
}

/// EBUSY means this file system is already mounted there (devtmpfs may be mounted by
/// the kernel), which is as good as mounting it.
fn mount(m: &Mount) -> Result<(), InitError> {
    // SAFETY: all pointers are NUL-terminated static strings; mount(2) only reads them.
    let rc = unsafe {
        libc::mount(
            m.fstype.as_ptr(),
            m.target.as_ptr(),
            m.fstype.as_ptr(),
            m.flags,
            m.data.as_ptr().cast(),
        )
    };
    let source = io::Error::last_os_error();
    if rc == 0 || source.raw_os_error() == Some(libc::EBUSY) {
        return Ok(());
    }
    Err(InitError::Mount {
        fstype: m.fstype.to_string_lossy().into_owned(),
        target: m.target.to_string_lossy().into_owned(),
        source,
    })
}

extern "C" fn ignore_signal(_: c_int) {}

/// Reaps every exited child, including orphans reparented to init. Note for later: code
/// that waits for its own children must not rely on their status while this is installed.
extern "C" fn reap_children(_: c_int) {
    // SAFETY: __errno_location returns this thread's errno slot, valid while it runs.
    let errno = unsafe { *libc::__errno_location() };
    // SAFETY: waitpid is async-signal-safe; a null status pointer means nothing is written.
    while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
    // SAFETY: as above; restores the interrupted code's errno.
    unsafe { *libc::__errno_location() = errno };
}

fn set_handler(
    signal: c_int,
    handler: extern "C" fn(c_int),
    flags: c_int,
) -> Result<(), InitError> {
    // SAFETY: sigaction is plain data; all-zero is a valid value, completed below.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = handler as libc::sighandler_t;
    action.sa_flags = flags;
    // SAFETY: `action.sa_mask` is a valid, writable sigset_t.
    unsafe { libc::sigemptyset(&raw mut action.sa_mask) };
    // SAFETY: `action` is fully initialised and the handlers are async-signal-safe.
    if unsafe { libc::sigaction(signal, &raw const action, std::ptr::null_mut()) } != 0 {
        return Err(InitError::Signal {
            signal,
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Syncs and powers off or reboots. Returns only if that failed.
pub fn halt(role: Role, how: Halt) -> InitError {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    // The tty layer sends console output asynchronously; without this the last lines
    // (the READY line of a `poweroff` boot) are lost when the machine stops.
    // SAFETY: tcdrain only waits on the given descriptor; an error (not a tty) is harmless.
    unsafe { libc::tcdrain(libc::STDOUT_FILENO) };
    match role {
        Role::Init => {
            let cmd = match how {
                Halt::PowerOff => libc::RB_POWER_OFF,
                Halt::Reboot => libc::RB_AUTOBOOT,
            };
            // SAFETY: no memory is involved; filesystems were synced above and PID 1 has
            // nothing else to clean up.
            unsafe { libc::reboot(cmd) };
            InitError::Reboot {
                how,
                source: io::Error::last_os_error(),
            }
        }
        Role::Service => {
            let program = match how {
                Halt::PowerOff => "/sbin/poweroff",
                Halt::Reboot => "/sbin/reboot",
            };
            let source = Command::new(program).exec();
            InitError::Exec { program, source }
        }
    }
}

/// What init does when it has nothing left to do: sleep, while the SIGCHLD handler reaps.
pub fn idle_forever() -> ! {
    loop {
        std::thread::park();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tests_run_as_a_service() {
        assert_eq!(Role::detect(), Role::Service);
    }

    #[test]
    fn mount_table() {
        let targets: Vec<_> = MOUNTS.iter().map(|m| m.target.to_str().unwrap()).collect();
        assert_eq!(targets, ["/proc", "/sys", "/dev", "/tmp"]);
        let types: Vec<_> = MOUNTS.iter().map(|m| m.fstype.to_str().unwrap()).collect();
        assert_eq!(types, ["proc", "sysfs", "devtmpfs", "tmpfs"]);
    }
}
