//! glibc's malloc makes two system calls of its own accord that no allow-list has, from
//! whichever thread happens to allocate or free:
//! - past 8 arenas it sizes their limit from `/sys/devices/system/cpu/online`;
//! - the first time it shrinks the heap of an arena other than the main one (a large free
//!   on any thread but the first), it opens `/proc/sys/vm/overcommit_memory`
//!   (`check_may_shrink_heap` in glibc's `malloc-sysdep.h`), and keeps the answer for the
//!   life of the process.
//!
//! [`settle`] makes both happen, or never happen, before any filter is installed: a fixed
//! arena limit, and one arena shrink done on purpose. The thresholds are fixed too, at
//! glibc's defaults, so that the shrink is certain: left dynamic, a large free earlier in
//! the process could have raised the trim threshold above what is freed here.

use std::io;

/// The arena limit: eight serve the VMM's few busy threads.
const ARENA_MAX: i32 = 8;
/// glibc's default mmap and trim thresholds (128 KiB), fixed.
const THRESHOLD: i32 = 128 << 10;
/// What the shrink frees, in chunks below the mmap threshold so that they come from the
/// arena's heap: 4 MiB, far above the trim threshold.
const CHUNK: usize = 64 << 10;
const CHUNKS: usize = 64;

fn set(param: i32, value: i32, name: &str) -> io::Result<()> {
    // SAFETY: mallopt only sets one of malloc's parameters; it returns 0 on failure.
    if unsafe { libc::mallopt(param, value) } == 0 {
        return Err(io::Error::other(format!("mallopt({name}, {value}) failed")));
    }
    Ok(())
}

/// Fixes malloc's limits and shrinks a thread arena once. Before any filter, and best
/// before other threads start (their arenas then share the fixed limits).
pub fn settle() -> io::Result<()> {
    set(libc::M_ARENA_MAX, ARENA_MAX, "M_ARENA_MAX")?;
    set(libc::M_MMAP_THRESHOLD, THRESHOLD, "M_MMAP_THRESHOLD")?;
    set(libc::M_TRIM_THRESHOLD, THRESHOLD, "M_TRIM_THRESHOLD")?;
    // A new thread allocates from an arena of its own (or a free one, never the main
    // one); freeing the chunks in order merges them into its top, which is trimmed.
    std::thread::Builder::new()
        .name("mempower-malloc".into())
        .spawn(|| {
            let chunks: Vec<Vec<u8>> = (0..CHUNKS).map(|_| vec![1u8; CHUNK]).collect();
            drop(chunks);
        })?
        .join()
        .map_err(|_| io::Error::other("the arena shrink's thread panicked"))
}
