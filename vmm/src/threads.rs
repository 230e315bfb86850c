//! Every long-lived VMM thread but the main one starts here: named, moved to its host
//! CPUs when it has some, then under its kind's seccomp filter, before it runs any of
//! its work. Pinning comes first because `sched_setaffinity` is in no filter.
//!
//! (Threads that run before the filters exist or that the event loop's own filter
//! covers get their filter through a hook instead: the watchdog in `stop`, the console
//! writer in `devices::console_buffer`, so that those modules need not know this one.)

use std::thread::{Builder, JoinHandle};

use crate::host_numa::{self, HostNumaError};
use crate::seccomp::{self, ThreadKind};

/// Starts `f` on a thread named `name`, on `cpus` if given, under `kind`'s filter.
/// Returns once the thread is pinned, or with the pinning's error (then `f` never runs).
pub fn spawn<F, T>(
    kind: ThreadKind,
    name: impl Into<String>,
    cpus: Option<Vec<usize>>,
    f: F,
) -> Result<JoinHandle<T>, HostNumaError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + Default + 'static,
{
    let name = name.into();
    host_numa::spawn_on(Builder::new().name(name.clone()), &name, cpus, move || {
        seccomp::enter(kind);
        f()
    })
}
