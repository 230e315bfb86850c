//! The filters are installed in child processes ([`crate::test_child`]), so that a kill
//! takes the child, not the tests. A scenario reads `<mode>:<kind>:<action>`.

use std::collections::HashMap;
use std::io::Write;
use std::os::fd::RawFd;
use std::process::Output;

use super::*;
use crate::devices::console_log::ConsoleLog;
use crate::test_child::{self, show};

/// Printed by a child once its filter is installed.
const INSTALLED: &str = "seccomp-test: filter installed";
/// Printed by a child that finished its scenario.
const SURVIVED: &str = "seccomp-test: survived";

fn kind_named(name: &str) -> ThreadKind {
    ThreadKind::ALL
        .into_iter()
        .find(|k| format!("{k:?}") == name)
        .unwrap_or_else(|| panic!("no thread kind {name}"))
}

/// What the filtered thread does in a child; `console` is a log opened beforehand and
/// `memfd` the file the event loop's filter lets it release memory of.
fn act(action: &str, console: Option<&mut ConsoleLog>, memfd: RawFd) {
    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    match action {
        // Allowed everywhere: allocate and free (mmap for the large one), hash (random
        // keys), sleep, lock, log to stderr.
        "work" => {
            let big = vec![7u8; 64 << 20];
            let sum: u64 = big.iter().step_by(4096).map(|&b| u64::from(b)).sum();
            drop(big);
            let map: HashMap<u64, u64> = (0..100).map(|i| (i, i * 2)).collect();
            std::thread::sleep(std::time::Duration::from_millis(5));
            let lock = std::sync::Mutex::new(sum + map[&3]);
            let line = format!("seccomp-test: worked {}\n", *lock.lock().unwrap());
            std::io::stderr().write_all(line.as_bytes()).unwrap();
        }
        // The canonical forbidden call: running another program.
        "execve" => {
            let path = c"/bin/true";
            let argv = [path.as_ptr(), std::ptr::null()];
            let envp = [std::ptr::null()];
            // SAFETY: a NUL-terminated path and NULL-terminated argv and envp arrays.
            unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        }
        // A harmless call that no list has.
        "getppid" => {
            // SAFETY: getppid has no arguments.
            unsafe { libc::getppid() };
        }
        // ioctl is allowed on vCPU threads, but only with KVM_RUN and the register reads.
        "tcgets" => {
            let mut termios = std::mem::MaybeUninit::<libc::termios>::uninit();
            // SAFETY: TCGETS writes one termios, which `termios` has room for.
            unsafe { libc::ioctl(0, libc::TCGETS, termios.as_mut_ptr()) };
        }
        // fallocate is allowed on the event loop for preallocation and punching holes.
        "collapse-range" => {
            // SAFETY: fallocate takes no pointers; on fd 0 it fails harmlessly if run.
            unsafe { libc::fallocate(0, libc::FALLOC_FL_COLLAPSE_RANGE, 0, 4096) };
        }
        // A forbidden call whose path register holds a bad pointer: the handler's
        // line must still come, without the path.
        "open-bad-pointer" => {
            // SAFETY: openat with a bad path pointer fails with EFAULT if it runs; the
            // kernel checks the pointer, this thread never reads it.
            unsafe { libc::syscall(libc::SYS_openat, libc::AT_FDCWD, 8usize, libc::O_RDONLY) };
        }
        // The same with a good path, which the line names.
        "open-path" => {
            // SAFETY: a NUL-terminated path; the descriptor, if any, is left to the exit.
            unsafe { libc::open(c"/etc/hostname".as_ptr(), libc::O_RDONLY) };
        }
        // The event loop and the release threads release guest memory, on the guest
        // memory's files only.
        "punch-memfd" => {
            // SAFETY: fallocate takes no pointers; `memfd` is the child's own memfd.
            let rc = unsafe { libc::fallocate(memfd, punch, 0, 4096) };
            assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        }
        "punch-other" => {
            // SAFETY: fallocate takes no pointers; on stdin it fails harmlessly if run.
            unsafe { libc::fallocate(0, punch, 0, 4096) };
        }
        // The vCPUs read and truncate the console log's files only.
        "ftruncate-other" => {
            // SAFETY: ftruncate takes no pointers; on stdin it fails harmlessly if run.
            unsafe { libc::ftruncate(0, 0) };
        }
        // The autopilot reads the host's files, opened beforehand.
        "pread-memfd" => {
            let mut byte = 0u8;
            // SAFETY: pread writes at most one byte into `byte`; `memfd` is the child's.
            let rc = unsafe { libc::pread(memfd, (&raw mut byte).cast(), 1, 0) };
            assert_eq!(rc, 1, "{}", std::io::Error::last_os_error());
        }
        "pread-other" => {
            let mut byte = 0u8;
            // SAFETY: pread writes at most one byte into `byte`.
            unsafe { libc::pread(0, (&raw mut byte).cast(), 1, 0) };
        }
        // Passing a descriptor over a socket, as no thread may.
        "sendmsg" => {
            // SAFETY: a zeroed msghdr sends nothing; on fd 0 it fails harmlessly if run.
            let msg: libc::msghdr = unsafe { std::mem::zeroed() };
            // SAFETY: `msg` is a valid, empty msghdr alive for the call.
            unsafe { libc::sendmsg(0, &msg, 0) };
        }
        // Starting a thread (clone3 refused, clone with CLONE_THREAD) that ends again.
        "thread" => std::thread::Builder::new()
            .name("seccomp-test".into())
            .spawn(move || act("work", None, memfd))
            .unwrap()
            .join()
            .unwrap(),
        // Many threads at once, each allocating: past 8 malloc arenas glibc sizes their
        // limit, from /sys/devices/system/cpu/online unless `prepare` fixed it.
        "many-threads" => {
            let threads: Vec<_> = (0..24)
                .map(|i| {
                    std::thread::spawn(move || {
                        let v = vec![i as u8; 1 << 20];
                        std::thread::sleep(std::time::Duration::from_millis(200));
                        v.iter().map(|&b| u64::from(b)).sum::<u64>()
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
        }
        // A large free in this thread's arena (not the main one): glibc shrinks the
        // arena's heap, and the first shrink in a process opens
        // /proc/sys/vm/overcommit_memory unless `prepare` made it happen already.
        "shrink-arena" => {
            let chunks: Vec<Vec<u8>> = (0..64).map(|i| vec![i as u8; 64 << 10]).collect();
            let sum: u64 = chunks.iter().map(|c| u64::from(c[0])).sum();
            drop(chunks);
            println!("seccomp-test: freed 4 MiB in 64 KiB chunks ({sum})");
        }
        // The console log rotates with descriptors only (its files are open already).
        "console-rotate" => {
            let console = console.expect("a console log");
            for _ in 0..3 {
                console.write_all(b"0123456789\n").unwrap();
            }
        }
        other => panic!("unknown action {other}"),
    }
}

/// The child's side: install the filter of `kind` on a thread (under the event loop's,
/// for the kinds it starts) and act. Returns normally only if it survived.
fn child(scenario: &str) {
    let mut parts = scenario.split(':');
    let (mode, kind, action) = match (parts.next(), parts.next(), parts.next()) {
        (Some(m), Some(k), Some(a)) => (m, kind_named(k), a.to_string()),
        _ => panic!("bad scenario {scenario}"),
    };
    let mode = match mode {
        "kill" => SeccompMode::Kill,
        "log" => SeccompMode::Log,
        other => panic!("bad mode {other}"),
    };
    test_child::no_core_dumps();
    prepare(mode).unwrap();
    let dir = std::env::temp_dir().join(format!("mempower-seccomp-{}", std::process::id()));
    let mut console = (action == "console-rotate").then(|| {
        std::fs::create_dir_all(&dir).unwrap();
        ConsoleLog::open(&dir.join("console.log"), 16).unwrap()
    });
    // SAFETY: a NUL-terminated name; the result is checked.
    let memfd = unsafe { libc::memfd_create(c"seccomp-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(memfd >= 0, "{}", std::io::Error::last_os_error());
    // SAFETY: ftruncate on the memfd just made.
    assert_eq!(unsafe { libc::ftruncate(memfd, 1 << 20) }, 0);
    // As `mempower run` does before the threads start; "unrestricted" forgets to.
    if action != "unrestricted" {
        let console_fds = console.as_ref().map_or(Vec::new(), |c| c.fds().to_vec());
        restrict_to_files(ThreadKind::Vcpu, &console_fds).unwrap();
        restrict_to_files(ThreadKind::EventLoop, &[memfd]).unwrap();
        restrict_to_files(ThreadKind::Release, &[memfd]).unwrap();
        restrict_to_files(ThreadKind::Autopilot, &[memfd]).unwrap();
    }
    let mut run = move || {
        if let Err(e) = apply(kind) {
            println!("seccomp-test: not installed: {e}");
            return;
        }
        println!("{INSTALLED}");
        act(&action, console.as_mut(), memfd);
    };
    // A thread of its own, which ends under its filter; this one checks the outcome.
    let filtered = std::thread::spawn(move || {
        if kind.started_by_event_loop() {
            apply(ThreadKind::EventLoop).unwrap();
            std::thread::spawn(run).join().unwrap();
        } else {
            run();
        }
    });
    filtered.join().unwrap();
    if dir.exists() {
        let rotated = std::fs::read(dir.join("console.log.1")).unwrap();
        assert_eq!(
            rotated, b"0123456789\n",
            "the second line, moved by the third"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
    println!("{SURVIVED}");
}

/// Runs `scenario` in a child that runs only `test` (of this module).
fn in_child(test: &str, scenario: &str) -> Output {
    test_child::run(&format!("seccomp::tests::{test}"), scenario)
}

/// Runs the child's side instead of the test, in a child.
fn as_child() -> bool {
    test_child::scenario().map(|s| child(&s)).is_some()
}

/// The child stopped at a forbidden call, with the trap handler's line and status.
fn killed_by_sigsys(output: &Output) -> bool {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    output.status.code() == Some(EXIT_BAD_SYSCALL)
        && stderr.contains("which its allow-list forbids")
        && stdout.contains(INSTALLED)
        && !stdout.contains(SURVIVED)
}

fn survived(output: &Output) -> bool {
    output.status.success() && String::from_utf8_lossy(&output.stdout).contains(SURVIVED)
}

/// Runs each of `scenarios` of `test` in a child: each must stop at a forbidden call.
fn all_killed(test: &str, scenarios: &[&str]) {
    for scenario in scenarios {
        let output = in_child(test, scenario);
        assert!(killed_by_sigsys(&output), "{scenario}: {}", show(&output));
    }
}

/// Runs each of `scenarios` of `test` in a child: each must finish.
fn all_survive(test: &str, scenarios: &[&str]) {
    for scenario in scenarios {
        let output = in_child(test, scenario);
        assert!(survived(&output), "{scenario}: {}", show(&output));
    }
}

#[test]
fn a_forbidden_call_kills_the_vmm_from_any_thread() {
    if as_child() {
        return;
    }
    for kind in ThreadKind::ALL {
        let output = in_child(
            "a_forbidden_call_kills_the_vmm_from_any_thread",
            &format!("kill:{kind:?}:execve"),
        );
        assert!(killed_by_sigsys(&output), "{kind:?}: {}", show(&output));
        let stderr = String::from_utf8_lossy(&output.stderr);
        let call = format!("made system call {}, ", libc::SYS_execve);
        assert!(stderr.contains(&call), "{kind:?}: {stderr}");
    }
}

#[test]
fn the_line_names_the_path_of_a_call_and_survives_a_bad_one() {
    if as_child() {
        return;
    }
    let test = "the_line_names_the_path_of_a_call_and_survives_a_bad_one";
    let output = in_child(test, "kill:Vcpu:open-path");
    assert!(killed_by_sigsys(&output), "{}", show(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let call = format!("made system call {} (/etc/hostname), ", libc::SYS_openat);
    assert!(stderr.contains(&call), "{stderr}");
    for kind in ThreadKind::ALL {
        let output = in_child(test, &format!("kill:{kind:?}:open-bad-pointer"));
        assert!(killed_by_sigsys(&output), "{kind:?}: {}", show(&output));
        let stderr = String::from_utf8_lossy(&output.stderr);
        let call = format!("made system call {}, ", libc::SYS_openat);
        assert!(stderr.contains(&call), "{kind:?}: {stderr}");
    }
}

#[test]
fn argument_rules_refuse_other_ioctls_and_fallocate_modes() {
    if as_child() {
        return;
    }
    let test = "argument_rules_refuse_other_ioctls_and_fallocate_modes";
    all_killed(test, &["kill:Vcpu:tcgets", "kill:EventLoop:collapse-range"]);
}

#[test]
fn every_thread_kind_works_starts_and_ends_under_its_filter() {
    if as_child() {
        return;
    }
    let test = "every_thread_kind_works_starts_and_ends_under_its_filter";
    for kind in ThreadKind::ALL {
        let output = in_child(test, &format!("kill:{kind:?}:work"));
        assert!(survived(&output), "{kind:?}: {}", show(&output));
        assert!(String::from_utf8_lossy(&output.stderr).contains("seccomp-test: worked 114694"));
    }
    // The event loop starts threads (clone3 fails with ENOSYS, clone goes through), many
    // of them, each with its own malloc arena; the vCPUs write the console, which
    // rotates past its cap.
    all_survive(
        test,
        &[
            "kill:EventLoop:thread",
            "kill:Autopilot:thread",
            "kill:EventLoop:many-threads",
            "kill:Vcpu:console-rotate",
        ],
    );
}

#[test]
fn a_large_free_shrinks_an_arena_under_every_filter() {
    if as_child() {
        return;
    }
    for kind in ThreadKind::ALL {
        let output = in_child(
            "a_large_free_shrinks_an_arena_under_every_filter",
            &format!("kill:{kind:?}:shrink-arena"),
        );
        assert!(survived(&output), "{kind:?}: {}", show(&output));
    }
}

#[test]
fn log_mode_lets_forbidden_calls_through() {
    if as_child() {
        return;
    }
    let test = "log_mode_lets_forbidden_calls_through";
    let output = in_child(test, "log:Vcpu:getppid");
    assert!(survived(&output), "{}", show(&output));
    // The same call in kill mode: the control.
    let output = in_child(test, "kill:Vcpu:getppid");
    assert!(killed_by_sigsys(&output), "{}", show(&output));
}

#[test]
fn file_calls_reach_only_the_files_they_were_restricted_to() {
    if as_child() {
        return;
    }
    let test = "file_calls_reach_only_the_files_they_were_restricted_to";
    all_survive(
        test,
        &[
            "kill:EventLoop:punch-memfd",
            "kill:Release:punch-memfd",
            "kill:Autopilot:pread-memfd",
            "kill:Vcpu:console-rotate",
        ],
    );
    all_killed(
        test,
        &[
            "kill:EventLoop:punch-other",
            "kill:Release:punch-other",
            "kill:Autopilot:pread-other",
            "kill:Helper:punch-other",
            "kill:Vcpu:ftruncate-other",
            "kill:Vcpu:pread-other",
        ],
    );
    // A thread whose files were never named does not start filtered, so it stops.
    for kind in ["Vcpu", "EventLoop", "Release", "Autopilot"] {
        let output = in_child(test, &format!("kill:{kind}:unrestricted"));
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            stdout.contains("were never restricted to their files") && !stdout.contains(INSTALLED),
            "{kind}: {}",
            show(&output)
        );
    }
    // No descriptor passing, from any thread.
    for kind in ThreadKind::ALL {
        let output = in_child(test, &format!("kill:{kind:?}:sendmsg"));
        assert!(killed_by_sigsys(&output), "{kind:?}: {}", show(&output));
    }
}

/// The kinds the event loop starts inherit its filter: anything beyond it would be
/// refused anyway, so a list that claims more is wrong.
#[test]
fn threads_started_by_the_event_loop_need_no_more_than_it_allows() {
    let ctx = Context::current();
    let event_loop = allow_list(ThreadKind::EventLoop, &ctx);
    for kind in ThreadKind::ALL
        .into_iter()
        .filter(|k| k.started_by_event_loop())
    {
        let extra: Vec<c_long> = allow_list(kind, &ctx)
            .calls()
            .filter(|c| !event_loop.allows(*c))
            .collect();
        assert!(extra.is_empty(), "{kind:?} also needs {extra:?}");
    }
}

/// The autopilot's shrinks start pool threads, which stay under its filter.
#[test]
fn helpers_started_by_the_autopilot_need_no_more_than_it_allows() {
    let ctx = Context::current();
    let autopilot = allow_list(ThreadKind::Autopilot, &ctx);
    let extra: Vec<c_long> = allow_list(ThreadKind::Helper, &ctx)
        .calls()
        .filter(|c| !autopilot.allows(*c))
        .collect();
    assert!(extra.is_empty(), "Helper also needs {extra:?}");
}

#[test]
fn lists_compile_within_the_bpf_limit_and_their_sizes_are_reported() {
    let ctx = Context::current();
    for kind in ThreadKind::ALL {
        let list = allow_list(kind, &ctx);
        let program = compile(kind, SeccompMode::Kill, &ctx).unwrap();
        // BPF_MAXINSNS; seccompiler refuses longer programs, this keeps a margin.
        assert!(
            program.len() < 2048,
            "{kind:?}: {} instructions",
            program.len()
        );
        assert!(list.allows(libc::SYS_exit) && list.allows(libc::SYS_futex));
        assert!(!list.allows(libc::SYS_execve) && !list.allows(libc::SYS_openat));
        println!(
            "seccomp {kind:?}: {} system calls, {} argument rules, {} BPF instructions",
            list.len(),
            list.rule_count(),
            program.len()
        );
    }
    // The log mode compiles the same lists.
    assert!(compile(ThreadKind::Vcpu, SeccompMode::Log, &ctx).is_ok());
}

#[test]
fn lists_merge_any_arguments_over_rules() {
    let list = AllowList::default()
        .when(1, &[&[Arg::Eq(0, 1)]])
        .when(1, &[&[Arg::Eq(0, 1)], &[Arg::Eq(0, 2)]]);
    assert_eq!(list.rule_count(), 2, "duplicate rules merge");
    let list = list.with(AllowList::default().any(&[1]));
    assert_eq!(
        (list.len(), list.rule_count()),
        (1, 0),
        "any arguments wins"
    );
    let list = list.when(1, &[&[Arg::Eq(0, 3)]]);
    assert_eq!(list.rule_count(), 0, "and stays");
}

#[test]
fn kvm_ioctl_numbers_are_the_kernels() {
    // linux/kvm.h on x86_64.
    assert_eq!(kvm::KVM_RUN, 0xae80);
    assert_eq!(kvm::KVM_GET_REGS, 0x8090_ae81);
    assert_eq!(kvm::KVM_GET_SREGS, 0x8138_ae83);
    assert_eq!(kvm::KVM_SET_USER_MEMORY_REGION, 0x4020_ae46);
    assert_eq!(kvm::KVM_TRANSLATE, 0xc018_ae85);
}

#[test]
fn threads_that_measure_resident_memory_may_use_mincore() {
    // Resident bytes of a hugetlbfs node come from mincore on its mappings.
    let ctx = Context::current();
    for kind in [
        ThreadKind::EventLoop,
        ThreadKind::Evacuation,
        ThreadKind::Helper,
    ] {
        assert!(allow_list(kind, &ctx).allows(libc::SYS_mincore), "{kind:?}");
    }
    assert!(!allow_list(ThreadKind::Vcpu, &ctx).allows(libc::SYS_mincore));
}
