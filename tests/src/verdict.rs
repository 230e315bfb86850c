//! Whose failure it was: the emulated machine's, which the harness may retry, or ours,
//! which fails at once.
//!
//! Under QEMU TCG's nested SVM a vCPU of a nested guest is now and then reset: a triple
//! fault at the reset vector (`rip=0xfff0`, the VMCB already reset), after which the
//! VMM stops with its reset status (images/README.md). That alone is the emulated
//! machine's. Any other end of a VMM (a seccomp kill, a panic, an error exit, a reset
//! elsewhere) is a bug of ours or of the guest, and a retry would hide it.
//!
//! A trial may only be run again for a reset of a guest that trial booted: each trial
//! has a [`TrialRecord`], which guests booted on the trial's thread report their end to.

use std::cell::RefCell;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

/// `mempower run`'s exit status once the guest powered off (the VMM's `EXIT_GUEST_POWEROFF`).
const EXIT_POWEROFF: i32 = 0;
/// `mempower run`'s exit status once the guest reset (the VMM's `EXIT_GUEST_RESET`).
const EXIT_RESET: i32 = 3;
/// The start of the VMM's line for a reset, e.g. `guest reset (triple fault or shutdown:
/// vCPU 1 rip=0xfff0 rsp=...)` or `guest reset (vCPU halted with interrupts off)`.
const RESET_LINE: &str = "guest reset (";
/// What the reset line says of a vCPU shutdown.
const TRIPLE_FAULT: &str = "triple fault";
/// x86's reset vector, where a vCPU reset by the emulated machine is found.
const RESET_VECTOR: &str = "0xfff0";

/// How a guest's VMM ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmmEnd {
    /// The guest powered off.
    PowerOff,
    /// A vCPU triple faulted at the reset vector and the VMM, otherwise healthy, stopped
    /// with its reset status: the emulated machine's failure.
    EmulatedReset,
    /// The guest reset itself some other way (a triple fault elsewhere, a halt with
    /// interrupts off): the guest's failure, not retried.
    GuestReset,
    /// The VMM failed: another status, a signal, or a panic on its way out.
    VmmFailed,
}

/// Classifies a VMM's end from its exit status and its own (stderr) lines.
pub fn classify<'a>(status: ExitStatus, vmm_lines: impl IntoIterator<Item = &'a str>) -> VmmEnd {
    let mut reset_at_vector = None;
    let mut panicked = false;
    for line in vmm_lines {
        if let Some(at) = line.find(RESET_LINE) {
            let why = &line[at + RESET_LINE.len()..];
            let rip = why.split_whitespace().find_map(|w| w.strip_prefix("rip="));
            reset_at_vector = Some(why.starts_with(TRIPLE_FAULT) && rip == Some(RESET_VECTOR));
        }
        // Rust's panic message; the VMM catches some panics and still stops "cleanly".
        panicked |= line.contains("panicked at");
    }
    match (status.code(), reset_at_vector) {
        (Some(EXIT_POWEROFF), _) if !panicked => VmmEnd::PowerOff,
        (Some(EXIT_RESET), Some(true)) if !panicked => VmmEnd::EmulatedReset,
        (Some(EXIT_RESET), Some(false)) if !panicked => VmmEnd::GuestReset,
        _ => VmmEnd::VmmFailed,
    }
}

/// What the guests of one trial's run came to.
#[derive(Debug, Default)]
pub struct TrialRecord {
    /// Booted guests reset by the emulated machine.
    emulated_resets: AtomicU32,
    /// VMMs that failed (see [`VmmEnd::VmmFailed`]).
    vmm_failures: AtomicU32,
}

impl TrialRecord {
    /// Notes how a guest's VMM ended (guests killed by the harness are not noted).
    pub fn note(&self, end: VmmEnd) {
        let counter = match end {
            VmmEnd::EmulatedReset => &self.emulated_resets,
            VmmEnd::VmmFailed => &self.vmm_failures,
            VmmEnd::PowerOff | VmmEnd::GuestReset => return,
        };
        counter.fetch_add(1, Ordering::SeqCst);
    }

    /// Whether a failed run of the trial may be the emulated machine's: one of its guests
    /// was reset by it, and none of its VMMs failed.
    pub fn emulated_machine_failed(&self) -> bool {
        self.emulated_resets.load(Ordering::SeqCst) > 0
            && self.vmm_failures.load(Ordering::SeqCst) == 0
    }
}

thread_local! {
    /// The record of the trial running on this thread, if any.
    static CURRENT: RefCell<Option<Arc<TrialRecord>>> = const { RefCell::new(None) };
}

/// Runs `f` as a trial's run on this thread: guests it boots here report to `record`.
pub fn within<T>(record: &Arc<TrialRecord>, f: impl FnOnce() -> T) -> T {
    /// Puts the previous record back, also when `f` panics.
    struct Restore(Option<Arc<TrialRecord>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            CURRENT.with(|c| *c.borrow_mut() = self.0.take());
        }
    }
    let _restore = Restore(CURRENT.with(|c| c.borrow_mut().replace(Arc::clone(record))));
    f()
}

/// The record of the trial running on this thread. Guests booted elsewhere (a thread of
/// the trial's own) report nowhere, and so never earn a rerun.
pub fn current() -> Option<Arc<TrialRecord>> {
    CURRENT.with(|c| c.borrow().clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    fn exit(code: i32) -> ExitStatus {
        ExitStatus::from_raw(code << 8)
    }

    const AT_VECTOR: &str = "2026-12-01T10:00:00Z WARN  [main] mempower::stop: guest reset \
         (triple fault or shutdown: vCPU 1 rip=0xfff0 rsp=0x0 rflags=0x2 cr0=0x60000010)";

    #[test]
    fn only_a_reset_vector_triple_fault_of_a_healthy_vmm_is_the_emulated_machines() {
        assert_eq!(classify(exit(3), [AT_VECTOR]), VmmEnd::EmulatedReset);
        assert_eq!(classify(exit(0), ["guest powered off"]), VmmEnd::PowerOff);
        let elsewhere = AT_VECTOR.replace("rip=0xfff0", "rip=0xffffffff81000000");
        assert_eq!(classify(exit(3), [elsewhere.as_str()]), VmmEnd::GuestReset);
        let halted = "guest reset (vCPU halted with interrupts off)";
        assert_eq!(classify(exit(3), [halted]), VmmEnd::GuestReset);
        // The reset line, but the VMM did not stop with its reset status.
        for status in [
            exit(1),
            exit(101),
            exit(159),
            ExitStatus::from_raw(libc::SIGSEGV),
        ] {
            assert_eq!(classify(status, [AT_VECTOR]), VmmEnd::VmmFailed, "{status}");
        }
        // The reset status without the line, or with a panic beside it.
        assert_eq!(classify(exit(3), ["vcpu 1 rip=0xfff0"]), VmmEnd::VmmFailed);
        let panic = "thread 'vcpu1' panicked at vmm/src/cpu.rs:10:5";
        assert_eq!(classify(exit(3), [panic, AT_VECTOR]), VmmEnd::VmmFailed);
        assert_eq!(classify(exit(0), [panic]), VmmEnd::VmmFailed);
    }

    #[test]
    fn a_trial_earns_a_rerun_only_by_its_own_guests_resets() {
        let record = Arc::new(TrialRecord::default());
        let other = Arc::new(TrialRecord::default());
        assert!(current().is_none());
        within(&record, || {
            current().unwrap().note(VmmEnd::EmulatedReset);
            within(&other, || current().unwrap().note(VmmEnd::PowerOff));
            assert!(Arc::ptr_eq(&current().unwrap(), &record));
        });
        assert!(current().is_none());
        assert!(record.emulated_machine_failed());
        assert!(!other.emulated_machine_failed());
        // A thread of the trial's own reports nowhere.
        within(&other, || {
            std::thread::spawn(|| assert!(current().is_none()))
                .join()
                .unwrap()
        });
        // A failed VMM beside the reset: ours, no rerun.
        record.note(VmmEnd::VmmFailed);
        assert!(!record.emulated_machine_failed());
        // A panic in the run puts the previous record back.
        let caught = std::panic::catch_unwind(|| within(&other, || panic!("boom")));
        assert!(caught.is_err());
        assert!(current().is_none());
    }
}
