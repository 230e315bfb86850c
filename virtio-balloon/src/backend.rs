//! Host memory behind guest RAM, and who may discard which part of it.
//!
//! Addresses here are guest-physical. Two traits split the decision:
//! - [`BalloonBackend`]: which guest-physical ranges are RAM it can discard,
//!   and the discard itself ([`MemfdBackend`]: a hole punched in the memfd
//!   behind each RAM range);
//! - [`DiscardGuard`]: the VMM's policy on top, e.g. "only what is plugged
//!   now", because memory in unplugged virtio-mem blocks is not the guest's
//!   to report, and a guest naming it must not make the host touch it.
//!
//! The device discards only the intersection of both, page-aligned.

use std::fs::File;
use std::ops::Range;

use virtio_mem::MemBackend;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// The balloon's page size: 4 KiB whatever the guest's (virtio 1.2 section
/// 5.5.6: "addresses divided by 4096").
pub const PAGE_SIZE: u64 = 4096;

/// A backend operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// A guest memory region has no file behind it, so it cannot be punched.
    #[error("guest memory region at {addr:#x} is not file-backed")]
    NotFileBacked {
        /// Guest-physical start of the region.
        addr: u64,
    },
    /// RAM ranges overlap, are empty, or end past the address space.
    #[error("RAM range {start:#x}+{len:#x} is empty, overlaps another or overflows")]
    BadRange {
        /// Guest-physical start.
        start: u64,
        /// Length.
        len: u64,
    },
    /// The file descriptor of a region cannot be duplicated.
    #[error("cannot duplicate the file of the region at {addr:#x}: {source}")]
    Dup {
        /// Guest-physical start of the region.
        addr: u64,
        /// The OS error.
        source: std::io::Error,
    },
    /// A part of the range is not RAM of this backend: nothing was discarded.
    #[error("{start:#x}..{end:#x} is not entirely guest RAM")]
    NotRam {
        /// Start of the range.
        start: u64,
        /// End of the range.
        end: u64,
    },
    /// The memfd operation failed.
    #[error("RAM range at {addr:#x}: {source}")]
    Memfd {
        /// Guest-physical start of the RAM range.
        addr: u64,
        /// The memfd error.
        source: virtio_mem::BackendError,
    },
}

/// Guest RAM whose host memory the balloon can give back.
pub trait BalloonBackend {
    /// Calls `f` with each maximal part of `range` that is RAM of this
    /// backend, in increasing order.
    fn ram_parts(&self, range: Range<u64>, f: &mut dyn FnMut(Range<u64>));

    /// Gives the host memory of `range` back; the guest reads zeros there
    /// afterwards. If any part of it is not RAM, nothing is discarded.
    fn discard(&self, range: Range<u64>) -> Result<(), BackendError>;

    /// Host-resident bytes in the RAM parts of `range`.
    fn resident_bytes(&self, range: Range<u64>) -> Result<u64, BackendError>;
}

/// The VMM's say on what may be discarded, checked after the backend's.
pub trait DiscardGuard {
    /// Calls `f` with each part of `range` whose host memory may be discarded
    /// now. The device clamps what it gets to `range` and to whole pages, so a
    /// wrong answer can shrink a discard but never widen it.
    fn allowed_parts(&self, range: Range<u64>, f: &mut dyn FnMut(Range<u64>));

    /// Calls `f` with the guest memory that stopped being RAM since the last call
    /// (a virtio-mem unplug), once: its pages leave the balloon, as the guest no longer
    /// has them to give up. The default knows of none.
    fn take_unplugged(&self, _f: &mut dyn FnMut(Range<u64>)) {}
}

/// Calls `f` with each non-empty intersection of `range` with `sorted`
/// (ascending, non-overlapping ranges).
pub fn for_each_overlap(range: &Range<u64>, sorted: &[Range<u64>], f: &mut dyn FnMut(Range<u64>)) {
    let first = sorted.partition_point(|r| r.end <= range.start);
    for r in &sorted[first..] {
        if r.start >= range.end {
            break;
        }
        let part = r.start.max(range.start)..r.end.min(range.end);
        if !part.is_empty() {
            f(part);
        }
    }
}

/// Sorts ranges and merges the overlapping or adjacent ones.
pub fn merge(mut ranges: Vec<Range<u64>>) -> Vec<Range<u64>> {
    ranges.sort_unstable_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// A guard that allows every RAM range (a VM without virtio-mem).
#[derive(Debug, Clone, Copy, Default)]
pub struct AllowAll;

impl DiscardGuard for AllowAll {
    fn allowed_parts(&self, range: Range<u64>, f: &mut dyn FnMut(Range<u64>)) {
        f(range);
    }
}

/// A guard that allows a fixed set of ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowedRanges(Vec<Range<u64>>);

impl AllowedRanges {
    /// Sorts and merges `ranges`; empty ones are dropped.
    pub fn new(mut ranges: Vec<Range<u64>>) -> Self {
        ranges.retain(|r| !r.is_empty());
        Self(merge(ranges))
    }

    /// The allowed ranges, sorted and disjoint.
    pub fn ranges(&self) -> &[Range<u64>] {
        &self.0
    }
}

impl DiscardGuard for AllowedRanges {
    fn allowed_parts(&self, range: Range<u64>, f: &mut dyn FnMut(Range<u64>)) {
        for_each_overlap(&range, &self.0, f);
    }
}

impl<T: DiscardGuard + ?Sized> DiscardGuard for std::sync::Arc<T> {
    fn allowed_parts(&self, range: Range<u64>, f: &mut dyn FnMut(Range<u64>)) {
        (**self).allowed_parts(range, f)
    }

    fn take_unplugged(&self, f: &mut dyn FnMut(Range<u64>)) {
        (**self).take_unplugged(f)
    }
}

impl<T: DiscardGuard + ?Sized> DiscardGuard for Box<T> {
    fn allowed_parts(&self, range: Range<u64>, f: &mut dyn FnMut(Range<u64>)) {
        (**self).allowed_parts(range, f)
    }

    fn take_unplugged(&self, f: &mut dyn FnMut(Range<u64>)) {
        (**self).take_unplugged(f)
    }
}

/// One guest RAM range and the memfd slice behind it.
#[derive(Debug)]
struct RamRange {
    gpa: Range<u64>,
    file: virtio_mem::MemfdBackend,
}

/// Guest RAM backed by memfd (or any shmem/tmpfs/hugetlbfs file) slices: a
/// discard punches a hole (`FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`) in
/// the right file at the right offset; the guest's next touch of those pages
/// gets fresh zeroed host pages.
#[derive(Debug)]
pub struct MemfdBackend {
    ranges: Vec<RamRange>,
}

impl MemfdBackend {
    /// Guest RAM from `(guest-physical start, length, file, file offset)`
    /// tuples; each file must hold `offset + length` bytes, ranges must not
    /// overlap.
    pub fn new(ranges: Vec<(u64, u64, File, u64)>) -> Result<Self, BackendError> {
        let mut out = Vec::with_capacity(ranges.len());
        for (start, len, file, offset) in ranges {
            let bad = BackendError::BadRange { start, len };
            let end = start.checked_add(len).ok_or(bad)?;
            if len == 0 {
                return Err(BackendError::BadRange { start, len });
            }
            let file = virtio_mem::MemfdBackend::new(file, offset, len).map_err(|source| {
                BackendError::Memfd {
                    addr: start,
                    source,
                }
            })?;
            out.push(RamRange {
                gpa: start..end,
                file,
            });
        }
        out.sort_by_key(|r| r.gpa.start);
        if let Some(w) = out.windows(2).find(|w| w[1].gpa.start < w[0].gpa.end) {
            return Err(BackendError::BadRange {
                start: w[1].gpa.start,
                len: w[1].gpa.end - w[1].gpa.start,
            });
        }
        Ok(Self { ranges: out })
    }

    /// The files behind the guest RAM, which discards act on.
    pub fn files(&self) -> impl Iterator<Item = &File> {
        self.ranges.iter().map(|r| r.file.file())
    }

    /// Every region of `mem`, each with the file and offset its mapping uses
    /// (as a VMM that maps memfds into the guest builds it). Each file
    /// descriptor is duplicated.
    pub fn from_guest_memory<M: GuestMemoryBackend>(mem: &M) -> Result<Self, BackendError> {
        let mut ranges = Vec::new();
        for region in mem.iter() {
            let addr = region.start_addr().0;
            let fo = region
                .file_offset()
                .ok_or(BackendError::NotFileBacked { addr })?;
            let file = fo
                .file()
                .try_clone()
                .map_err(|source| BackendError::Dup { addr, source })?;
            ranges.push((addr, region.len(), file, fo.start()));
        }
        Self::new(ranges)
    }

    /// The guest RAM ranges, in order.
    pub fn ram_ranges(&self) -> Vec<Range<u64>> {
        self.ranges.iter().map(|r| r.gpa.clone()).collect()
    }

    /// The RAM ranges overlapping `range`, each with the overlap.
    fn overlaps(&self, range: &Range<u64>) -> impl Iterator<Item = (&RamRange, Range<u64>)> {
        let first = self.ranges.partition_point(|r| r.gpa.end <= range.start);
        let range = range.clone();
        self.ranges[first..]
            .iter()
            .take_while(move |r| r.gpa.start < range.end)
            .map(move |r| (r, r.gpa.start.max(range.start)..r.gpa.end.min(range.end)))
            .filter(|(_, part)| !part.is_empty())
    }
}

impl BalloonBackend for MemfdBackend {
    fn ram_parts(&self, range: Range<u64>, f: &mut dyn FnMut(Range<u64>)) {
        // Adjacent RAM ranges (two files, or two slices of one) form one part.
        let mut pending: Option<Range<u64>> = None;
        for (_, part) in self.overlaps(&range) {
            match &mut pending {
                Some(p) if p.end == part.start => p.end = part.end,
                _ => {
                    if let Some(p) = pending.replace(part) {
                        f(p);
                    }
                }
            }
        }
        if let Some(p) = pending {
            f(p);
        }
    }

    fn discard(&self, range: Range<u64>) -> Result<(), BackendError> {
        let not_ram = || BackendError::NotRam {
            start: range.start,
            end: range.end,
        };
        let mut covered = range.start;
        for (_, part) in self.overlaps(&range) {
            if part.start != covered {
                return Err(not_ram());
            }
            covered = part.end;
        }
        if covered != range.end && !range.is_empty() {
            return Err(not_ram());
        }
        for (ram, part) in self.overlaps(&range) {
            ram.file
                .discard(part.start - ram.gpa.start, part.end - part.start)
                .map_err(|source| BackendError::Memfd {
                    addr: ram.gpa.start,
                    source,
                })?;
        }
        Ok(())
    }

    fn resident_bytes(&self, range: Range<u64>) -> Result<u64, BackendError> {
        let mut total = 0;
        for (ram, part) in self.overlaps(&range) {
            total += ram
                .file
                .resident_bytes(part.start - ram.gpa.start, part.end - part.start)
                .map_err(|source| BackendError::Memfd {
                    addr: ram.gpa.start,
                    source,
                })?;
        }
        Ok(total)
    }
}

impl<T: BalloonBackend + ?Sized> BalloonBackend for Box<T> {
    fn ram_parts(&self, range: Range<u64>, f: &mut dyn FnMut(Range<u64>)) {
        (**self).ram_parts(range, f)
    }
    fn discard(&self, range: Range<u64>) -> Result<(), BackendError> {
        (**self).discard(range)
    }
    fn resident_bytes(&self, range: Range<u64>) -> Result<u64, BackendError> {
        (**self).resident_bytes(range)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::memfd;
    use std::os::unix::fs::FileExt;
    use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

    const P: u64 = PAGE_SIZE;
    const G: u64 = 1 << 32;

    fn parts(b: &impl BalloonBackend, r: Range<u64>) -> Vec<Range<u64>> {
        let mut v = Vec::new();
        b.ram_parts(r, &mut |p| v.push(p));
        v
    }

    /// Two files: RAM at [0, 16 pages) from file A offset 4 pages, and
    /// [G, G + 8 pages) + [G + 8 pages, G + 16 pages) from file B (two slices).
    fn backend() -> (MemfdBackend, File, File) {
        let a = memfd(32 * P);
        let b = memfd(16 * P);
        let dup = |f: &File| f.try_clone().unwrap();
        let backend = MemfdBackend::new(vec![
            (G + 8 * P, 8 * P, dup(&b), 8 * P),
            (0, 16 * P, dup(&a), 4 * P),
            (G, 8 * P, dup(&b), 0),
        ])
        .unwrap();
        (backend, a, b)
    }

    #[test]
    fn ram_parts_merge_adjacent_ranges_and_skip_holes() {
        let (b, _, _) = backend();
        assert_eq!(
            b.ram_ranges(),
            vec![0..16 * P, G..G + 8 * P, G + 8 * P..G + 16 * P]
        );
        assert_eq!(parts(&b, 0..u64::MAX), vec![0..16 * P, G..G + 16 * P]);
        assert_eq!(parts(&b, 8 * P..G + P), vec![8 * P..16 * P, G..G + P]);
        assert_eq!(parts(&b, 16 * P..G), vec![]);
        assert_eq!(
            parts(&b, G + 4 * P..G + 12 * P),
            vec![G + 4 * P..G + 12 * P]
        );
        assert_eq!(parts(&b, 5..5), vec![]);
    }

    #[test]
    fn discard_punches_the_right_file_at_the_right_offset() {
        let (b, fa, fb) = backend();
        fa.write_at(&vec![1u8; 32 * P as usize], 0).unwrap();
        fb.write_at(&vec![2u8; 16 * P as usize], 0).unwrap();
        b.discard(2 * P..4 * P).unwrap();
        // Guest page 2 is file A page 6.
        let mut page = vec![0xffu8; P as usize];
        fa.read_at(&mut page, 6 * P).unwrap();
        assert!(page.iter().all(|&x| x == 0));
        fa.read_at(&mut page, 8 * P).unwrap();
        assert!(page.iter().all(|&x| x == 1));
        assert_eq!(b.resident_bytes(0..16 * P).unwrap(), 14 * P);
        // Across the two slices of file B.
        b.discard(G + 7 * P..G + 9 * P).unwrap();
        assert_eq!(b.resident_bytes(G..G + 16 * P).unwrap(), 14 * P);
        assert_eq!(b.resident_bytes(0..u64::MAX).unwrap(), 28 * P);
        // Not entirely RAM: nothing is discarded.
        for r in [
            15 * P..17 * P,
            G - P..G + P,
            G + 15 * P..G + 17 * P,
            20 * P..21 * P,
        ] {
            assert!(matches!(b.discard(r), Err(BackendError::NotRam { .. })));
        }
        assert_eq!(b.resident_bytes(0..u64::MAX).unwrap(), 28 * P);
        b.discard(P..P).unwrap();
    }

    #[test]
    fn construction_is_checked() {
        let f = || memfd(8 * P);
        assert!(matches!(
            MemfdBackend::new(vec![(0, 4 * P, f(), 0), (2 * P, 4 * P, f(), 0)]),
            Err(BackendError::BadRange { .. })
        ));
        assert!(matches!(
            MemfdBackend::new(vec![(0, 0, f(), 0)]),
            Err(BackendError::BadRange { .. })
        ));
        assert!(matches!(
            MemfdBackend::new(vec![(u64::MAX - P, 2 * P, f(), 0)]),
            Err(BackendError::BadRange { .. })
        ));
        assert!(matches!(
            MemfdBackend::new(vec![(0, 8 * P, f(), P)]),
            Err(BackendError::Memfd { .. })
        ));
    }

    #[test]
    fn from_guest_memory_uses_each_regions_file_offset() {
        let file = memfd(64 * P);
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files([
            (
                GuestAddress(0),
                16 * P as usize,
                Some(FileOffset::new(file.try_clone().unwrap(), 0)),
            ),
            (
                GuestAddress(G),
                32 * P as usize,
                Some(FileOffset::new(file.try_clone().unwrap(), 16 * P)),
            ),
        ])
        .unwrap();
        let b = MemfdBackend::from_guest_memory(&mem).unwrap();
        assert_eq!(b.ram_ranges(), vec![0..16 * P, G..G + 32 * P]);
        use vm_memory::Bytes;
        mem.write_slice(&[7u8; 2 * P as usize], GuestAddress(G + P))
            .unwrap();
        assert_eq!(b.resident_bytes(G..G + 32 * P).unwrap(), 2 * P);
        b.discard(G + P..G + 2 * P).unwrap();
        assert_eq!(b.resident_bytes(0..u64::MAX).unwrap(), P);
        // The discarded page reads back as zero through the guest mapping.
        let v: u64 = mem.read_obj(GuestAddress(G + P)).unwrap();
        assert_eq!(v, 0);
        let anon =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 * P as usize)]).unwrap();
        assert!(matches!(
            MemfdBackend::from_guest_memory(&anon),
            Err(BackendError::NotFileBacked { addr: 0 })
        ));
    }

    #[test]
    fn guards() {
        let g = AllowedRanges::new(vec![10..20, 0..5, 4..8, 30..30, 18..25]);
        assert_eq!(g.ranges(), &[0..8, 10..25]);
        let mut v = Vec::new();
        g.allowed_parts(6..12, &mut |p| v.push(p));
        assert_eq!(v, vec![6..8, 10..12]);
        v.clear();
        AllowAll.allowed_parts(3..9, &mut |p| v.push(p));
        assert_eq!(v, vec![3..9]);
        v.clear();
        for_each_overlap(&(25..40), g.ranges(), &mut |p| v.push(p));
        assert!(v.is_empty());
    }
}
