//! What a forbidden system call does in `kill` mode: the filter traps it (SIGSYS, as
//! Firecracker's filters do), and this handler says which call it was on stderr, then
//! ends the process with [`EXIT_BAD_SYSCALL`]. A plain `KillProcess` action would end the
//! VMM without a word about the call, which leaves a user nothing to report.

use std::sync::Once;

/// Exit status after a forbidden system call: 128 + SIGSYS, what a shell shows for a
/// process SIGSYS killed.
pub const EXIT_BAD_SYSCALL: i32 = 128 + libc::SIGSYS;

/// `si_code` of a SIGSYS sent by a seccomp filter (linux/siginfo.h `SYS_SECCOMP`).
const SYS_SECCOMP: libc::c_int = 1;

/// Installs the SIGSYS handler, once per process, before any filter.
pub fn install() -> std::io::Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; the handler
        // is an extern "C" function with the SA_SIGINFO signature, and sigaction only
        // reads `action` during the call.
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigsys as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut())
        };
        if rc != 0 {
            result = Err(std::io::Error::last_os_error());
        }
    });
    result
}

/// A fixed buffer `core::fmt` writes into; what does not fit is dropped.
struct Line<'a> {
    out: &'a mut [u8],
    len: usize,
}

impl std::fmt::Write for Line<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let end = (self.len + s.len()).min(self.out.len());
        self.out[self.len..end].copy_from_slice(&s.as_bytes()[..end - self.len]);
        self.len = end;
        Ok(())
    }
}

/// The line the handler writes into `out`; answers its length. `core::fmt` formats
/// integers without allocating, which matters here: the handler may run anywhere, even
/// inside malloc.
fn line(nr: i64, tid: i64, out: &mut [u8; 160]) -> usize {
    let mut line = Line { out, len: 0 };
    let _ = std::fmt::Write::write_fmt(
        &mut line,
        format_args!(
            "mempower: seccomp: thread {tid} made system call {nr}, which its allow-list \
             forbids (vmm/src/seccomp.rs); the VMM stops\n"
        ),
    );
    line.len
}

extern "C" fn on_sigsys(_signal: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel hands a valid siginfo_t. For a seccomp SIGSYS its union holds
    // `_sigsys { void *_call_addr; int _syscall; unsigned _arch; }`, which starts at
    // byte 16 on x86_64 (si_signo, si_errno, si_code, padding), so the call's number is
    // the int at byte 24.
    let (code, nr) = unsafe {
        let code = (*info).si_code;
        let nr = *(info as *const u8).add(24).cast::<libc::c_int>();
        (code, nr)
    };
    let nr = if code == SYS_SECCOMP {
        i64::from(nr)
    } else {
        -1
    };
    // SAFETY: gettid has no arguments and cannot fail.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) };
    let mut out = [0u8; 160];
    let n = line(nr, tid, &mut out);
    // SAFETY: write and _exit are async-signal-safe and in every thread's allow-list;
    // `out[..n]` is initialised. Nothing else may run: the thread broke its contract.
    unsafe {
        libc::write(2, out.as_ptr().cast(), n);
        libc::_exit(EXIT_BAD_SYSCALL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_names_the_thread_and_the_call() {
        let mut out = [0u8; 160];
        let n = line(59, 1234, &mut out);
        assert_eq!(
            std::str::from_utf8(&out[..n]).unwrap(),
            "mempower: seccomp: thread 1234 made system call 59, which its allow-list \
             forbids (vmm/src/seccomp.rs); the VMM stops\n"
        );
        let n = line(-1, 0, &mut out);
        assert!(std::str::from_utf8(&out[..n])
            .unwrap()
            .contains("system call -1,"));
    }
}
