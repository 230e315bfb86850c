//! What a forbidden system call does in `kill` mode: the filter traps it (SIGSYS, as
//! Firecracker's filters do), and this handler says which call it was on stderr, then
//! ends the process with [`EXIT_BAD_SYSCALL`]. A plain `KillProcess` action would end the
//! VMM without a word about the call, which leaves a user nothing to report.

use std::cell::Cell;
use std::sync::Once;

/// Exit status after a forbidden system call: 128 + SIGSYS, what a shell shows for a
/// process SIGSYS killed.
pub const EXIT_BAD_SYSCALL: i32 = 128 + libc::SIGSYS;

/// `si_code` of a SIGSYS sent by a seccomp filter (linux/siginfo.h `SYS_SECCOMP`).
const SYS_SECCOMP: libc::c_int = 1;

/// The longest thread name Linux keeps (`comm`, 15 bytes and a NUL).
const NAME_LEN: usize = 16;

thread_local! {
    /// This thread's name, noted when it installs its filter, for the handler (which
    /// may not ask the kernel: prctl is not in any list).
    static NAME: Cell<[u8; NAME_LEN]> = const { Cell::new([0; NAME_LEN]) };
}

/// Notes the calling thread's name for the handler's line.
pub fn note_thread_name() {
    let mut name = [0u8; NAME_LEN];
    if let Some(n) = std::thread::current().name() {
        let n = &n.as_bytes()[..n.len().min(NAME_LEN)];
        name[..n.len()].copy_from_slice(n);
    }
    NAME.with(|cell| cell.set(name));
}

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

/// What the handler knows of the forbidden call.
struct Trapped<'a> {
    thread: &'a str,
    tid: i64,
    nr: i64,
    /// The path a file-opening call named, as far as it could be read.
    path: Option<&'a str>,
}

/// The line the handler writes into `out`; answers its length. `core::fmt` formats
/// without allocating, which matters here: the handler may run anywhere, even inside
/// malloc.
fn line(t: &Trapped, out: &mut [u8; 400]) -> usize {
    let mut line = Line { out, len: 0 };
    let path = t.path.unwrap_or("");
    let (open, close) = if t.path.is_some() {
        (" (", ")")
    } else {
        ("", "")
    };
    let _ = std::fmt::Write::write_fmt(
        &mut line,
        format_args!(
            "mempower: seccomp: thread '{}' ({}) made system call {}{open}{path}{close}, \
             which its allow-list forbids (vmm/src/seccomp.rs); the VMM stops\n",
            t.thread, t.tid, t.nr
        ),
    );
    line.len
}

/// The longest path the handler's line shows.
const PATH_LEN: usize = 200;

/// Bytes read at a time, so that no read crosses a page boundary: a string that ends
/// just before an unreadable page is read in full, and the read past it fails alone.
const CHUNK: usize = 64;

/// Copies `buf.len()` bytes at `addr` of this process into `buf` with
/// `process_vm_readv`, which fails with EFAULT where a plain read would fault the
/// handler: the address is the untrusted register of a call that broke its contract.
/// Answers whether all of them were read.
fn read_own(addr: usize, buf: &mut [u8]) -> bool {
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: getpid has no arguments and cannot fail; process_vm_readv writes only into
    // `local`, which is `buf`, and reads `remote` through the kernel, which checks it.
    let read = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
    usize::try_from(read).is_ok_and(|n| n == buf.len())
}

/// The NUL-terminated string at `addr`, up to `buf`'s length or the first unreadable
/// byte, if it is non-empty valid UTF-8. Any address is safe to pass.
fn c_string(addr: usize, buf: &mut [u8; PATH_LEN]) -> Option<&str> {
    let mut len = 0;
    while len < buf.len() {
        let at = addr.checked_add(len)?;
        // Up to the next chunk boundary of the address space (pages are multiples).
        let n = (CHUNK - at % CHUNK).min(buf.len() - len);
        if !read_own(at, &mut buf[len..len + n]) {
            break;
        }
        match buf[len..len + n].iter().position(|&b| b == 0) {
            Some(nul) => {
                len += nul;
                break;
            }
            None => len += n,
        }
    }
    if len == 0 {
        return None;
    }
    std::str::from_utf8(&buf[..len]).ok()
}

extern "C" fn on_sigsys(_signal: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
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
    // SAFETY: `ctx` is the ucontext_t of the trapped thread (SA_SIGINFO); its registers
    // hold the call's arguments as the thread passed them (rdi, rsi, ...).
    let (arg0, arg1) = unsafe {
        let regs = &(*ctx.cast::<libc::ucontext_t>()).uc_mcontext.gregs;
        (
            regs[libc::REG_RDI as usize] as usize,
            regs[libc::REG_RSI as usize] as usize,
        )
    };
    let path_arg = match nr {
        n if n == libc::SYS_open || n == libc::SYS_stat => Some(arg0),
        n if n == libc::SYS_openat || n == libc::SYS_newfstatat => Some(arg1),
        _ => None,
    };
    let mut path_buf = [0u8; PATH_LEN];
    let path = path_arg.and_then(|addr| c_string(addr, &mut path_buf));
    let name = NAME.with(Cell::get);
    let name_len = name.iter().position(|&b| b == 0).unwrap_or(NAME_LEN);
    let thread = std::str::from_utf8(&name[..name_len]).unwrap_or("?");
    // SAFETY: gettid has no arguments and cannot fail.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) };
    let mut out = [0u8; 400];
    let n = line(
        &Trapped {
            thread,
            tid,
            nr,
            path,
        },
        &mut out,
    );
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
        let mut out = [0u8; 400];
        let t = Trapped {
            thread: "vcpu0",
            tid: 1234,
            nr: 59,
            path: None,
        };
        let n = line(&t, &mut out);
        assert_eq!(
            std::str::from_utf8(&out[..n]).unwrap(),
            "mempower: seccomp: thread 'vcpu0' (1234) made system call 59, which its \
             allow-list forbids (vmm/src/seccomp.rs); the VMM stops\n"
        );
        let t = Trapped {
            path: Some("/proc/self/maps"),
            nr: 257,
            ..t
        };
        let n = line(&t, &mut out);
        assert!(std::str::from_utf8(&out[..n])
            .unwrap()
            .contains("system call 257 (/proc/self/maps),"));
        let path = std::ffi::CString::new("/etc/passwd").unwrap();
        let mut buf = [0u8; PATH_LEN];
        let read = c_string(path.as_ptr() as usize, &mut buf);
        assert_eq!(read, Some("/etc/passwd"));
    }

    /// Two pages, the second unreadable, for the tests of bad path pointers.
    struct Guarded(*mut u8);

    impl Guarded {
        const PAGE: usize = 4096;

        fn new() -> Self {
            // SAFETY: a fresh anonymous mapping of two pages, checked below; then
            // mprotect on its second page, which is ours.
            unsafe {
                let at = libc::mmap(
                    std::ptr::null_mut(),
                    2 * Self::PAGE,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                assert_ne!(at, libc::MAP_FAILED);
                let at = at.cast::<u8>();
                let guard = at.add(Self::PAGE).cast();
                assert_eq!(libc::mprotect(guard, Self::PAGE, libc::PROT_NONE), 0);
                Guarded(at)
            }
        }

        /// Writes `bytes` to end exactly at the unreadable page; answers their address.
        fn at_the_end(&self, bytes: &[u8]) -> usize {
            let start = Self::PAGE - bytes.len();
            // SAFETY: `start..PAGE` lies in the first, writable page of the mapping.
            unsafe {
                std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.0.add(start), bytes.len())
            };
            self.0 as usize + start
        }

        fn unreadable(&self) -> usize {
            self.0 as usize + Self::PAGE
        }
    }

    impl Drop for Guarded {
        fn drop(&mut self) {
            // SAFETY: the mapping `new` made, unmapped once.
            unsafe { libc::munmap(self.0.cast(), 2 * Self::PAGE) };
        }
    }

    /// A bad path pointer in the trapped call's register must not fault the handler: it
    /// reads no string, or the part before the unreadable byte.
    #[test]
    fn a_bad_path_pointer_reads_as_no_path_or_its_readable_part() {
        let guarded = Guarded::new();
        let mut buf = [0u8; PATH_LEN];
        assert_eq!(c_string(0, &mut buf), None);
        assert_eq!(c_string(8, &mut buf), None);
        assert_eq!(c_string(usize::MAX - 3, &mut buf), None);
        assert_eq!(c_string(guarded.unreadable(), &mut buf), None);
        // Unterminated up to the unreadable page: what was readable.
        let addr = guarded.at_the_end(b"/tmp/unterminated");
        assert_eq!(c_string(addr, &mut buf), Some("/tmp/unterminated"));
        // Terminated right before it: read in full.
        let addr = guarded.at_the_end(b"/tmp/x\0");
        assert_eq!(c_string(addr, &mut buf), Some("/tmp/x"));
        // Longer than the line shows: cut at PATH_LEN.
        let long = [b'a'; 300];
        assert_eq!(
            c_string(long.as_ptr() as usize, &mut buf).map(str::len),
            Some(PATH_LEN)
        );
    }
}
