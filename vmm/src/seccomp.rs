//! seccomp filters: every VMM thread runs under an allow-list of the system calls its
//! kind of work needs, as in Firecracker. This file holds every list.
//!
//! `mempower run --seccomp kill|log|off` picks what a call outside the list does: `kill`
//! (the default) stops the whole VMM, after a line on stderr naming the call (exit
//! status 159, 128 + SIGSYS; see `trap.rs`), `log` lets it through and has the host
//! kernel log it (audit, in dmesg), `off` installs nothing. [`prepare`] compiles the
//! filters once, before any thread starts; each thread installs its own with [`enter`]
//! (or [`apply`]) as its first act, before it touches guest input.
//!
//! Filters are inherited and stack: a thread started by a filtered thread keeps its
//! creator's filter and adds its own, so what it may do is the intersection. The event
//! loop starts the short-lived helpers (agent calls, region lists, compaction plans) and
//! the teardown watchdog, so their lists must stay within the event loop's; a unit test
//! checks that. The other threads start before the event loop installs its filter.
//!
//! A filter sees a call's number and integer arguments, never what a pointer argument
//! points to (a path, a message). It can match a descriptor by number only when the
//! number is known as the filter is compiled: [`prepare`] runs before the VM's files are
//! open, so the calls only a kind's own files need (`file_calls`) are narrowed to them
//! by a second filter, [`restrict_to_files`], compiled once they are open and installed
//! with the list (a thread of such a kind refuses to start without it):
//! - vCPUs: `pread64` and `ftruncate` on the console log's two files (none on stdout);
//! - the event loop, and the helpers it starts: `fallocate` on the guest memory's files.
//!
//! No thread may `sendmsg` or `recvmsg`, which could pass descriptors over a socket.
//! What is still broad, and why:
//! - the event loop's `connect` reaches any Unix socket path: the vsock device connects
//!   a guest's connection to `<--vsock-socket>_<port>` (`vsock/hybrid.rs`), a path it
//!   builds itself from its configuration and a port number; `socket` is AF_UNIX only;
//! - the event loop's `unlink`, `statx` and `newfstatat` take any path: the teardown
//!   removes the API and vsock sockets, each only if it is still the file it bound
//!   (`mempower_api::unix_socket::SocketFile`); paths are pointers;
//! - the event loop's `preadv`, `pwritev` and `fdatasync` take any descriptor: virtio-blk
//!   requests on the disk files;
//! - reads and writes of sockets (`read`, `recvfrom`, `sendto`, `write`) take any
//!   descriptor: the API, vsock and agent connections are accepted or made at run time;
//! - every thread may `write` and `close` any descriptor (stderr, its own sockets), and
//!   read its own memory with `process_vm_readv` (the SIGSYS handler, `trap.rs`).
//!
//! To extend a list, add the call to the group or the thread kind that needs it below,
//! with argument rules where the call is dangerous with other arguments (ioctl numbers,
//! fallocate modes, socket families). `cargo test -p vmm seccomp -- --nocapture` prints
//! the sizes. Thread creation goes through `clone` with `CLONE_THREAD` only: `clone3`
//! (whose flags a filter cannot see) fails with ENOSYS, and glibc falls back to `clone`.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::RawFd;
use std::sync::{Mutex, OnceLock};

use crate::sync::Locked;
use libc::c_long;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use vmm_sys_util::ioctl::{ioctl_expr, _IOC_NONE, _IOC_READ, _IOC_WRITE};

mod malloc;
#[cfg(test)]
mod tests;
mod trap;

pub use trap::EXIT_BAD_SYSCALL;

/// What a system call outside a thread's allow-list does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SeccompMode {
    /// The VMM stops, saying which call it was (exit status [`EXIT_BAD_SYSCALL`]).
    Kill,
    /// The call goes through; the host kernel logs it (audit, dmesg).
    Log,
    /// No filters.
    Off,
}

/// The kinds of VMM threads, each with its own allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ThreadKind {
    /// `vcpuN`: runs the guest, emulates port and MMIO accesses, writes the console.
    Vcpu,
    /// The main thread once the VM runs: the devices' queues, vsock, the API handler,
    /// memory slots, then the teardown.
    EventLoop,
    /// `mempower-api`: HTTP on the API socket.
    Api,
    /// `mempower-agent`: the connection to the guest agent.
    Agent,
    /// `mempowerd/N`: a node's evacuation worker.
    Evacuation,
    /// The pooled helpers the event loop starts ([`crate::pool`]): `mempower-agent-call`,
    /// `mempower-regions`, `mempower-check`, `mempower-compact`, `mempower-resident`.
    Helper,
    /// The teardown watchdog ([`crate::stop`]).
    Watchdog,
    /// `mempower-release/N`: punches a node's unplugged blocks.
    Release,
    /// `mempower-autopilot`: reads the host's memory files, asks the agent, decides; its
    /// shrinks may start `Helper` threads.
    Autopilot,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 9] = [
        ThreadKind::Vcpu,
        ThreadKind::EventLoop,
        ThreadKind::Api,
        ThreadKind::Agent,
        ThreadKind::Evacuation,
        ThreadKind::Helper,
        ThreadKind::Watchdog,
        ThreadKind::Release,
        ThreadKind::Autopilot,
    ];

    /// Whether the event loop starts threads of this kind, which then inherit its filter.
    pub fn started_by_event_loop(self) -> bool {
        matches!(self, ThreadKind::Helper | ThreadKind::Watchdog)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp filter of the {kind:?} threads: {source}")]
    Compile {
        kind: ThreadKind,
        source: seccompiler::BackendError,
    },
    #[error("cannot install the seccomp filter of a {kind:?} thread: {source}")]
    Install {
        kind: ThreadKind,
        source: seccompiler::Error,
    },
    #[error("seccomp filter refusing clone3: {0}")]
    CompileClone3(seccompiler::BackendError),
    #[error("the seccomp filters were already prepared")]
    AlreadyPrepared,
    #[error("cannot prepare the process for its filters: {0}")]
    Handler(std::io::Error),
    #[error("seccomp filter narrowing the {kind:?} threads' file calls: {source}")]
    CompileFiles {
        kind: ThreadKind,
        source: seccompiler::BackendError,
    },
    #[error("the {0:?} threads' file calls were already restricted")]
    FilesAlreadyRestricted(ThreadKind),
    #[error("the {0:?} threads' file calls were never restricted to their files")]
    FilesNotRestricted(ThreadKind),
}

/// One argument condition of a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arg {
    /// Argument `.0` (from 0) equals `.1` (compared as 32 bits: every argument filtered
    /// here is an `int` or is truncated to one by the kernel).
    Eq(u8, u64),
    /// Argument `.0` ANDed with the mask `.1` equals `.2`.
    Masked(u8, u64, u64),
}

/// A rule: all of its conditions hold.
pub type Rule = Vec<Arg>;

/// An allow-list: each system call, with `None` for any arguments or the rules one of
/// which its arguments must satisfy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList {
    calls: BTreeMap<c_long, Option<Vec<Rule>>>,
}

impl AllowList {
    /// Allows `calls` with any arguments.
    fn any(mut self, calls: &[c_long]) -> Self {
        for &call in calls {
            self.calls.insert(call, None);
        }
        self
    }

    /// Allows `call` when its arguments satisfy one of `rules` (unless it is already
    /// allowed with any arguments).
    fn when(mut self, call: c_long, rules: &[&[Arg]]) -> Self {
        let entry = self.calls.entry(call).or_insert_with(|| Some(Vec::new()));
        if let Some(existing) = entry {
            for rule in rules {
                if !existing.iter().any(|r| r == rule) {
                    existing.push(rule.to_vec());
                }
            }
        }
        self
    }

    /// Everything `other` allows too.
    fn with(mut self, other: AllowList) -> Self {
        for (call, rules) in other.calls {
            self = match rules {
                None => self.any(&[call]),
                Some(rules) => {
                    let rules: Vec<&[Arg]> = rules.iter().map(Vec::as_slice).collect();
                    self.when(call, &rules)
                }
            };
        }
        self
    }

    /// How many system calls the list allows.
    pub fn len(&self) -> usize {
        self.calls.len()
    }

    pub fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }

    /// How many argument rules restrict them.
    pub fn rule_count(&self) -> usize {
        self.calls.values().flatten().map(Vec::len).sum()
    }

    pub fn allows(&self, call: c_long) -> bool {
        self.calls.contains_key(&call)
    }

    /// The system call numbers.
    pub fn calls(&self) -> impl Iterator<Item = c_long> + '_ {
        self.calls.keys().copied()
    }

    fn rules(&self) -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError> {
        let condition = |arg: &Arg| match *arg {
            Arg::Eq(index, value) => {
                SeccompCondition::new(index, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
            }
            Arg::Masked(index, mask, value) => SeccompCondition::new(
                index,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::MaskedEq(mask),
                value,
            ),
        };
        let mut out = BTreeMap::new();
        for (&call, rules) in &self.calls {
            let compiled = match rules {
                None => Vec::new(),
                Some(rules) => rules
                    .iter()
                    .map(|rule| {
                        SeccompRule::new(rule.iter().map(condition).collect::<Result<_, _>>()?)
                    })
                    .collect::<Result<_, _>>()?,
            };
            out.insert(call, compiled);
        }
        Ok(out)
    }
}

/// What some rules depend on: this process, and the signal that kicks vCPUs.
#[derive(Debug, Clone, Copy)]
pub struct Context {
    pub pid: u32,
    pub kick_signal: i32,
}

impl Context {
    pub fn current() -> Self {
        Context {
            // SAFETY: getpid has no arguments and cannot fail.
            pid: unsafe { libc::getpid() } as u32,
            kick_signal: crate::cpu::kick_signal(),
        }
    }
}

/// KVM ioctl numbers (linux/kvm.h), for the argument rules.
pub mod kvm {
    use super::*;

    const KVMIO: u32 = kvm_bindings::KVMIO;

    const fn size<T>() -> u32 {
        std::mem::size_of::<T>() as u32
    }

    pub const KVM_RUN: u64 = ioctl_expr(_IOC_NONE, KVMIO, 0x80, 0) as u64;
    pub const KVM_GET_REGS: u64 =
        ioctl_expr(_IOC_READ, KVMIO, 0x81, size::<kvm_bindings::kvm_regs>()) as u64;
    pub const KVM_GET_SREGS: u64 =
        ioctl_expr(_IOC_READ, KVMIO, 0x83, size::<kvm_bindings::kvm_sregs>()) as u64;
    pub const KVM_TRANSLATE: u64 = ioctl_expr(
        _IOC_READ | _IOC_WRITE,
        KVMIO,
        0x85,
        size::<kvm_bindings::kvm_translation>(),
    ) as u64;
    pub const KVM_SET_USER_MEMORY_REGION: u64 = ioctl_expr(
        _IOC_WRITE,
        KVMIO,
        0x46,
        size::<kvm_bindings::kvm_userspace_memory_region>(),
    ) as u64;
}

const PROT_EXEC: u64 = libc::PROT_EXEC as u64;

/// `ioctl` with one of `requests`.
fn ioctls(requests: &[u64]) -> AllowList {
    let rules: Vec<[Arg; 1]> = requests.iter().map(|&r| [Arg::Eq(1, r)]).collect();
    let rules: Vec<&[Arg]> = rules.iter().map(|r| r.as_slice()).collect();
    AllowList::default().when(libc::SYS_ioctl, &rules)
}

/// What every thread does: allocate (never executable memory), lock, read the clock,
/// sleep, log to stderr, close descriptors, exit, and abort on a double panic.
fn every_thread(ctx: &Context) -> AllowList {
    let no_exec: &[Arg] = &[Arg::Masked(2, PROT_EXEC, 0)];
    AllowList::default()
        .any(&[
            libc::SYS_brk,
            libc::SYS_munmap,
            libc::SYS_mremap,
            libc::SYS_madvise,
            libc::SYS_futex,
            libc::SYS_sched_yield,
            // glibc's malloc sizes its arenas by the CPUs a thread may run on.
            libc::SYS_sched_getaffinity,
            libc::SYS_clock_gettime,
            libc::SYS_clock_nanosleep,
            libc::SYS_nanosleep,
            libc::SYS_getrandom,
            libc::SYS_write,
            libc::SYS_close,
            // Thread exit: glibc blocks signals, Rust drops the alternate signal stack.
            libc::SYS_rt_sigprocmask,
            libc::SYS_sigaltstack,
            libc::SYS_rt_sigreturn,
            libc::SYS_exit,
            libc::SYS_exit_group,
            libc::SYS_getpid,
            libc::SYS_gettid,
        ])
        .when(libc::SYS_mmap, &[no_exec])
        .when(libc::SYS_mprotect, &[no_exec])
        // Debug builds check that a descriptor is open before closing it.
        .when(libc::SYS_fcntl, &[&[Arg::Eq(1, libc::F_GETFD as u64)]])
        .when(
            libc::SYS_tgkill,
            &[&[
                Arg::Eq(0, u64::from(ctx.pid)),
                Arg::Eq(2, libc::SIGABRT as u64),
            ]],
        )
        // The SIGSYS handler reads the path a trapped call named from this process
        // only, where a bad pointer fails with EFAULT instead of faulting (trap.rs).
        .when(
            libc::SYS_process_vm_readv,
            &[&[Arg::Eq(0, u64::from(ctx.pid)), Arg::Eq(5, 0)]],
        )
}

/// Starting threads (which then install their own filters under this one).
fn starting_threads() -> AllowList {
    AllowList::default()
        .any(&[libc::SYS_clone3, libc::SYS_set_robust_list, libc::SYS_rseq])
        .when(
            libc::SYS_clone,
            &[&[Arg::Masked(
                0,
                libc::CLONE_THREAD as u64,
                libc::CLONE_THREAD as u64,
            )]],
        )
        .when(
            libc::SYS_prctl,
            &[
                &[Arg::Eq(0, libc::PR_SET_NAME as u64)],
                &[Arg::Eq(0, libc::PR_SET_NO_NEW_PRIVS as u64)],
            ],
        )
        .when(
            libc::SYS_seccomp,
            &[&[Arg::Eq(0, u64::from(libc::SECCOMP_SET_MODE_FILTER))]],
        )
}

/// Unix stream sockets: reads, writes, non-blocking mode, shutdown. Not `sendmsg` or
/// `recvmsg`, which could pass descriptors (SCM_RIGHTS) to or from a peer: Rust's
/// streams send and receive with `sendto` and `recvfrom`.
fn unix_streams() -> AllowList {
    AllowList::default()
        .any(&[
            libc::SYS_read,
            libc::SYS_readv,
            libc::SYS_recvfrom,
            libc::SYS_writev,
            libc::SYS_sendto,
            libc::SYS_shutdown,
        ])
        .with(ioctls(&[libc::FIONBIO]))
}

/// Host memory queries of a memfd: which pages are resident (`mincore` on the mappings
/// of a hugetlbfs node, which has no `SEEK_DATA`).
fn resident_queries() -> AllowList {
    AllowList::default()
        .when(
            libc::SYS_lseek,
            &[
                &[Arg::Eq(2, libc::SEEK_DATA as u64)],
                &[Arg::Eq(2, libc::SEEK_HOLE as u64)],
            ],
        )
        .any(&[libc::SYS_mincore])
}

/// Releasing memory: `fallocate(PUNCH_HOLE | KEEP_SIZE)`.
fn punch_holes() -> AllowList {
    let mode = (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE) as u64;
    AllowList::default().when(libc::SYS_fallocate, &[&[Arg::Eq(1, mode)]])
}

/// The calls of `kind`'s list that only its own files need, on descriptors opened
/// after [`prepare`] compiled the list: it allows them on any descriptor, and
/// [`restrict_to_files`] narrows them to those files before the threads start.
fn file_calls(kind: ThreadKind) -> &'static [c_long] {
    match kind {
        // The console log's rotation (crate::devices::console_log).
        ThreadKind::Vcpu => &[libc::SYS_pread64, libc::SYS_ftruncate],
        // virtio-mem and the balloon, on the guest memory's files.
        ThreadKind::EventLoop => &[libc::SYS_fallocate],
        // Its node's file.
        ThreadKind::Release => &[libc::SYS_fallocate],
        // The host's meminfo and pressure files (crate::host_signals::HostFiles).
        ThreadKind::Autopilot => &[libc::SYS_pread64],
        _ => &[],
    }
}

/// The allow-list of `kind`.
pub fn allow_list(kind: ThreadKind, ctx: &Context) -> AllowList {
    let base = every_thread(ctx);
    match kind {
        ThreadKind::Vcpu => base
            .with(ioctls(&[
                kvm::KVM_RUN,
                kvm::KVM_GET_REGS,
                kvm::KVM_GET_SREGS,
                // Where a failed instruction fetch was, to tell the guest's fault.
                kvm::KVM_TRANSLATE,
            ]))
            // Activation duplicates the queue eventfds for the device.
            .when(
                libc::SYS_fcntl,
                &[&[Arg::Eq(1, libc::F_DUPFD_CLOEXEC as u64)]],
            )
            // The console log's rotation, on its files only (`file_calls`).
            .any(file_calls(ThreadKind::Vcpu)),
        ThreadKind::EventLoop => base
            .with(starting_threads())
            .with(unix_streams())
            .with(resident_queries())
            .with(ioctls(&[kvm::KVM_SET_USER_MEMORY_REGION]))
            .any(&[
                libc::SYS_epoll_wait,
                libc::SYS_epoll_pwait,
                libc::SYS_epoll_ctl,
                libc::SYS_timerfd_settime,
                libc::SYS_accept4,
                libc::SYS_connect,
                // The watchdog waits for stderr before its last words.
                libc::SYS_poll,
                // Teardown removes the API and vsock sockets, if they are still its own.
                libc::SYS_statx,
                libc::SYS_newfstatat,
                libc::SYS_unlink,
                // virtio-blk: its requests run here (virtio_blk::RawFile).
                libc::SYS_preadv,
                libc::SYS_pwritev,
                libc::SYS_fdatasync,
            ])
            .when(libc::SYS_socket, &[&[Arg::Eq(0, libc::AF_UNIX as u64)]])
            .when(
                libc::SYS_fcntl,
                &[&[Arg::Eq(1, libc::F_DUPFD_CLOEXEC as u64)]],
            )
            // virtio-mem: preallocating a plugged block, releasing an unplugged one; the
            // balloon: releasing pages. On the guest memory's files only (`file_calls`).
            .when(libc::SYS_fallocate, &[&[Arg::Eq(1, 0)]])
            .with(punch_holes())
            // Teardown kicks the vCPUs out of KVM_RUN.
            .when(
                libc::SYS_tgkill,
                &[&[
                    Arg::Eq(0, u64::from(ctx.pid)),
                    Arg::Eq(2, ctx.kick_signal as u64),
                ]],
            ),
        ThreadKind::Api => base.with(unix_streams()).any(&[
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_epoll_ctl,
            libc::SYS_accept4,
        ]),
        ThreadKind::Agent => base
            .with(unix_streams())
            .when(libc::SYS_socketpair, &[&[Arg::Eq(0, libc::AF_UNIX as u64)]])
            // Each read and write of a call gets what is left of its deadline.
            .when(
                libc::SYS_setsockopt,
                &[
                    &[
                        Arg::Eq(1, libc::SOL_SOCKET as u64),
                        Arg::Eq(2, libc::SO_RCVTIMEO as u64),
                    ],
                    &[
                        Arg::Eq(1, libc::SOL_SOCKET as u64),
                        Arg::Eq(2, libc::SO_SNDTIMEO as u64),
                    ],
                ],
            ),
        ThreadKind::Evacuation | ThreadKind::Helper => base.with(resident_queries()),
        ThreadKind::Watchdog => base.any(&[libc::SYS_poll]),
        // Removing a region's KVM slot, then punching its blocks on its node's file
        // only (`file_calls`).
        ThreadKind::Release => base
            .with(punch_holes())
            .with(ioctls(&[kvm::KVM_SET_USER_MEMORY_REGION])),
        // Reading the host's files, opened beforehand (`file_calls`); a shrink it starts
        // may start a pool thread (`Helper`), which stays under this filter too, so it
        // allows what those do.
        ThreadKind::Autopilot => base
            .any(file_calls(ThreadKind::Autopilot))
            .with(starting_threads())
            .with(resident_queries()),
    }
}

/// A thread kind's compiled filter.
struct Program {
    bpf: BpfProgram,
    /// Whether the kind starts threads: it gets [`Filters::no_clone3`] too.
    starts_threads: bool,
}

/// The compiled filters of this run.
struct Filters {
    mode: SeccompMode,
    programs: HashMap<ThreadKind, Program>,
    /// Makes `clone3` fail with ENOSYS.
    no_clone3: BpfProgram,
}

static FILTERS: OnceLock<Filters> = OnceLock::new();

/// The filters of [`restrict_to_files`], by thread kind.
static FILE_FILTERS: Mutex<BTreeMap<ThreadKind, BpfProgram>> = Mutex::new(BTreeMap::new());

/// Narrows the `file_calls` of `kind` to the descriptors `fds` (none: the calls are
/// refused): a filter that threads of `kind` install with their list, which refuses
/// those calls on any other descriptor as the list refuses a call. Once per kind, after
/// [`prepare`] and before the first thread of `kind` starts (nothing when unprepared or
/// off). Descriptor numbers are all a filter can see of a file, so the files must stay
/// open as long as the threads run.
pub fn restrict_to_files(kind: ThreadKind, fds: &[RawFd]) -> Result<(), SeccompError> {
    let Some(filters) = FILTERS.get().filter(|f| f.mode != SeccompMode::Off) else {
        return Ok(());
    };
    let compile_err = |source| SeccompError::CompileFiles { kind, source };
    // One rule per call: its descriptor is none of `fds`. No rule at all: any call.
    let other_fd = fds
        .iter()
        .map(|&fd| SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, fd as u64))
        .collect::<Result<Vec<_>, _>>()
        .map_err(compile_err)?;
    let mut rules = BTreeMap::new();
    for &call in file_calls(kind) {
        let rule = if other_fd.is_empty() {
            Vec::new()
        } else {
            vec![SeccompRule::new(other_fd.clone()).map_err(compile_err)?]
        };
        rules.insert(call, rule);
    }
    let refuse = match filters.mode {
        SeccompMode::Kill => SeccompAction::Trap,
        SeccompMode::Log | SeccompMode::Off => SeccompAction::Log,
    };
    let filter = SeccompFilter::new(rules, SeccompAction::Allow, refuse, TargetArch::x86_64)
        .map_err(compile_err)?;
    let bpf = BpfProgram::try_from(filter).map_err(compile_err)?;
    let mut file_filters = FILE_FILTERS.locked();
    if file_filters.contains_key(&kind) {
        return Err(SeccompError::FilesAlreadyRestricted(kind));
    }
    file_filters.insert(kind, bpf);
    Ok(())
}

/// Compiles the filter of `kind` for `mode` (`Off` compiles as `Log`).
pub fn compile(
    kind: ThreadKind,
    mode: SeccompMode,
    ctx: &Context,
) -> Result<BpfProgram, SeccompError> {
    let mismatch = match mode {
        SeccompMode::Kill => SeccompAction::Trap,
        SeccompMode::Log | SeccompMode::Off => SeccompAction::Log,
    };
    let compile_err = |source| SeccompError::Compile { kind, source };
    let rules = allow_list(kind, ctx).rules().map_err(compile_err)?;
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(compile_err)?;
    BpfProgram::try_from(filter).map_err(compile_err)
}

fn compile_no_clone3() -> Result<BpfProgram, seccompiler::BackendError> {
    let rules = BTreeMap::from([(libc::SYS_clone3, Vec::new())]);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    )?;
    BpfProgram::try_from(filter)
}

/// Compiles every thread's filter for `mode`, once per process, before the threads
/// start. Until it is called, [`apply`] and [`enter`] do nothing (unit tests).
pub fn prepare(mode: SeccompMode) -> Result<(), SeccompError> {
    let ctx = Context::current();
    let mut programs = HashMap::new();
    if mode == SeccompMode::Kill {
        trap::install().map_err(SeccompError::Handler)?;
    }
    if mode != SeccompMode::Off {
        malloc::settle().map_err(SeccompError::Handler)?;
        for kind in ThreadKind::ALL {
            let program = Program {
                bpf: compile(kind, mode, &ctx)?,
                starts_threads: allow_list(kind, &ctx).allows(libc::SYS_clone3),
            };
            programs.insert(kind, program);
        }
    }
    let no_clone3 = compile_no_clone3().map_err(SeccompError::CompileClone3)?;
    FILTERS
        .set(Filters {
            mode,
            programs,
            no_clone3,
        })
        .map_err(|_| SeccompError::AlreadyPrepared)
}

/// The mode [`prepare`] was given, if it was called.
pub fn mode() -> Option<SeccompMode> {
    FILTERS.get().map(|f| f.mode)
}

/// Installs the filter of `kind` on the calling thread (nothing if unprepared or off).
pub fn apply(kind: ThreadKind) -> Result<(), SeccompError> {
    let Some(filters) = FILTERS.get() else {
        return Ok(());
    };
    trap::note_thread_name();
    let Some(program) = filters.programs.get(&kind) else {
        return Ok(());
    };
    let install_err = |source| SeccompError::Install { kind, source };
    // Before the list, which may not allow installing another filter.
    if !file_calls(kind).is_empty() {
        let file_filters = FILE_FILTERS.locked();
        let files = file_filters
            .get(&kind)
            .ok_or(SeccompError::FilesNotRestricted(kind))?;
        seccompiler::apply_filter(files).map_err(install_err)?;
    }
    if program.starts_threads {
        seccompiler::apply_filter(&filters.no_clone3).map_err(install_err)?;
    }
    seccompiler::apply_filter(&program.bpf).map_err(install_err)
}

/// [`apply`] as a thread's first act: a thread that cannot be filtered must not go on,
/// so a failure stops the VMM (logged, exit status 1).
pub fn enter(kind: ThreadKind) {
    if let Err(e) = apply(kind) {
        log::error!("{e}; stopping the VMM");
        // SAFETY: _exit ends the process at once; nothing of ours needs to run first.
        unsafe { libc::_exit(crate::stop::EXIT_VMM_ERROR.into()) };
    }
}

/// `enter` for the API thread, as a plain function for the API server's hook.
pub fn enter_api() {
    enter(ThreadKind::Api);
}
