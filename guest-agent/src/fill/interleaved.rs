//! `fill_interleaved`: two fills written run by run in turn, so that their pages
//! interleave in physical memory (the page allocator hands out pages in the order they
//! are touched). Releasing one leaves holes of the run's size between live data: with
//! one-page runs, memory that holds no free 2 MiB chunk; with 4 MiB runs, the
//! fragmented node that compaction is for.
//!
//! One request instead of a fill and a release per run: in a nested guest each call
//! costs a vsock round trip and a pagemap walk, and a 4 GiB node has 512 runs of 4 MiB.

use std::ops::RangeInclusive;
use std::path::Path;
use std::sync::Arc;

use thiserror::Error;

use super::{bad_size, bind, check_room, pattern_word, Fill, FillError, Fills, Mapping, MAX_FILL};
use crate::memory::PAGE_SIZE;

/// One run in every 2 to 512 is kept.
pub const INTERLEAVE: RangeInclusive<u32> = 2..=512;
/// Runs of one page up to 1 GiB.
pub const RUN_PAGES: RangeInclusive<u32> = 1..=(1 << 18);
const PAGE_WORDS: u64 = PAGE_SIZE / 8;

#[derive(Debug, Error)]
pub enum InterleaveError {
    #[error("an interleaved fill keeps one run in every 2 to 512, not {0}")]
    BadKeep(u32),
    #[error("an interleaved fill's runs are 1 to 262144 pages, not {0}")]
    BadRun(u32),
    #[error(
        "an interleaved fill of {bytes} bytes in runs of {run_pages} pages has no run \
         to free: give more than one run"
    )]
    NothingFreed { bytes: u64, run_pages: u32 },
    #[error(transparent)]
    Fill(#[from] FillError),
}

impl InterleaveError {
    pub fn errno(&self) -> i32 {
        match self {
            Self::BadKeep(_) | Self::BadRun(_) | Self::NothingFreed { .. } => libc::EINVAL,
            Self::Fill(e) => e.errno(),
        }
    }
}

/// The pages of the kept and the other fill: runs `r` with `r % keep_one_in == 0` are
/// kept, the last run may be short.
fn split(pages: u64, keep_one_in: u64, run_pages: u64) -> (u64, u64) {
    let full_runs = pages / run_pages;
    let tail = pages % run_pages;
    let mut kept = full_runs.div_ceil(keep_one_in) * run_pages;
    if tail > 0 && full_runs % keep_one_in == 0 {
        kept += tail;
    }
    (kept, pages - kept)
}

/// A fresh mapping of `pages` bound to `node`.
fn bound(node: u32, pages: u64) -> Result<Mapping, FillError> {
    let len = pages * PAGE_SIZE;
    // At most MAX_FILL: fits a 64-bit usize.
    let map = Mapping::new(len as usize).map_err(|source| FillError::Map { bytes: len, source })?;
    bind(&map, node).map_err(|source| FillError::Bind { node, source })?;
    Ok(map)
}

/// Writes the pattern of `seed` into `pages` pages of `map` from page `first`: the
/// words a fill of the whole mapping has there.
fn write_pages(map: &mut Mapping, first: u64, pages: u64, seed: u64) {
    assert!(
        (first + pages) * PAGE_SIZE <= map.len as u64,
        "pages {first}+{pages} are outside the mapping"
    );
    // SAFETY: the pages lie inside `map` (checked above), a fresh writable mapping
    // borrowed mutably here, so nothing else reads or writes them meanwhile.
    let words = unsafe {
        std::slice::from_raw_parts_mut(
            (map.addr as *mut u64).add((first * PAGE_WORDS) as usize),
            (pages * PAGE_WORDS) as usize,
        )
    };
    let start = first * PAGE_WORDS;
    for (i, word) in words.iter_mut().enumerate() {
        *word = pattern_word(seed, start + i as u64);
    }
}

impl Fills {
    /// Two fills of `bytes` (rounded up to pages) in all on `node`, written run by run
    /// in turn: the first run of every `keep_one_in` goes to the kept fill (pattern of
    /// `seed`), the others to the other fill (`seed + 1`). Returns each one's handle and
    /// bytes: kept, then other.
    pub fn fill_interleaved(
        &self,
        root: &Path,
        node: u32,
        bytes: u64,
        seed: u64,
        keep_one_in: u32,
        run_pages: u32,
    ) -> Result<[(u64, u64); 2], InterleaveError> {
        if !INTERLEAVE.contains(&keep_one_in) {
            return Err(InterleaveError::BadKeep(keep_one_in));
        }
        if !RUN_PAGES.contains(&run_pages) {
            return Err(InterleaveError::BadRun(run_pages));
        }
        if bytes == 0 || bytes > MAX_FILL {
            return Err(bad_size(bytes).into());
        }
        let pages = bytes.div_ceil(PAGE_SIZE);
        let run = u64::from(run_pages);
        let (kept_pages, other_pages) = split(pages, u64::from(keep_one_in), run);
        if other_pages == 0 {
            return Err(InterleaveError::NothingFreed { bytes, run_pages });
        }
        check_room(root, node, pages * PAGE_SIZE)?;
        // Each mapping and the next page to write in it.
        let mut kept = (bound(node, kept_pages)?, 0u64);
        let mut other = (bound(node, other_pages)?, 0u64);
        let mut page = 0;
        let mut index = 0u64;
        while page < pages {
            let n = run.min(pages - page);
            let (target, seed) = if index % u64::from(keep_one_in) == 0 {
                (&mut kept, seed)
            } else {
                (&mut other, seed.wrapping_add(1))
            };
            write_pages(&mut target.0, target.1, n, seed);
            target.1 += n;
            page += n;
            index += 1;
        }
        let mut table = self.lock();
        let mut out = [(0, 0); 2];
        for (slot, (map, seed)) in out
            .iter_mut()
            .zip([(kept.0, seed), (other.0, seed.wrapping_add(1))])
        {
            let handle = self.handles.next();
            let len = map.len as u64;
            let fill = Fill {
                map,
                bytes: len,
                seed,
            };
            table.fills.insert(handle, Arc::new(fill));
            *slot = (handle, len);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::numa::tests::Fixture;

    const MIB: u64 = 1 << 20;

    #[test]
    fn runs_split_between_the_two_fills() {
        assert_eq!(split(11, 3, 1), (4, 7));
        assert_eq!(split(4096, 2, 1024), (2048, 2048));
        // Runs 0 and 2 kept, the short run 2 too.
        assert_eq!(split(2 * 1024 + 5, 2, 1024), (1024 + 5, 1024));
        assert_eq!(split(5, 2, 1024), (5, 0));
    }

    #[test]
    fn interleaved_runs_verify_and_release_apart() {
        let fills = Fills::default();
        let root = Path::new("/");
        let [(kept, kept_bytes), (other, other_bytes)] =
            fills.fill_interleaved(root, 0, 8 * MIB, 5, 2, 256).unwrap();
        assert_eq!((kept_bytes, other_bytes), (4 * MIB, 4 * MIB));
        assert_ne!(kept, other);
        assert_eq!(fills.verify(kept).unwrap(), (4 * MIB, 0));
        assert_eq!(fills.verify(other).unwrap(), (4 * MIB, 0));
        let placed = fills.locate(root, kept).unwrap();
        let pages: u64 = placed.blocks.iter().map(|b| b.pages).sum();
        assert_eq!(pages, 4 * MIB / PAGE_SIZE);
        fills.release(other).unwrap();
        assert_eq!(fills.verify(kept).unwrap(), (4 * MIB, 0));
        // The kept fill holds the words an ordinary fill of its bytes has.
        let plain = fills.fill(root, 0, 4 * MIB, 5).unwrap();
        assert_eq!(
            fills.get(kept).unwrap().words().0,
            fills.get(plain.handle).unwrap().words().0
        );
        // One-page runs, one in three kept, and a bit more than whole pages.
        let [(_, kept_bytes), (_, other_bytes)] = fills
            .fill_interleaved(root, 0, 10 * PAGE_SIZE + 5, 3, 3, 1)
            .unwrap();
        assert_eq!((kept_bytes, other_bytes), (4 * PAGE_SIZE, 7 * PAGE_SIZE));
    }

    #[test]
    fn bad_interleavings_are_refused() {
        let fills = Fills::default();
        let root = Path::new("/");
        for (bytes, keep, run) in [
            (MIB, 1, 1),
            (MIB, 513, 1),
            (MIB, 2, 0),
            (MIB, 2, (1 << 18) + 1),
            (0, 2, 1),
            (MAX_FILL + 1, 2, 1),
            (MIB, 2, 256),
        ] {
            let e = fills
                .fill_interleaved(root, 0, bytes, 1, keep, run)
                .unwrap_err();
            assert_eq!(e.errno(), libc::EINVAL, "{bytes} {keep} {run}: {e}");
        }
        let fx = Fixture::new("fill-interleaved-room");
        fx.node(0, "0", 1024).node(1, "1", 1024);
        let e = fills
            .fill_interleaved(&fx.0, 1, 2 * MIB, 1, 2, 1)
            .unwrap_err();
        assert_eq!(e.errno(), libc::ENOMEM, "{e}");
    }
}
