//! Sorted, disjoint, coalesced byte ranges `[start, end)`: the open parts of a region.

/// A set of byte ranges, kept sorted, disjoint and coalesced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ranges(Vec<(u64, u64)>);

impl Ranges {
    /// The set of `ranges` (in any order, overlapping or not; empty ones are dropped).
    pub fn of(ranges: impl IntoIterator<Item = (u64, u64)>) -> Self {
        let mut set = Ranges::default();
        for (start, end) in ranges {
            set.insert(start, end);
        }
        set
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.0.iter().copied()
    }

    /// Whether the set is exactly `[0, len)`.
    pub fn is_whole(&self, len: u64) -> bool {
        self.0 == [(0, len)]
    }

    /// The part of the set within `[start, end)`, as offsets from `start`.
    pub fn window(&self, start: u64, end: u64) -> Ranges {
        let first = self.0.partition_point(|&(_, e)| e <= start);
        Ranges(
            self.0[first..]
                .iter()
                .take_while(|&&(s, _)| s < end)
                .map(|&(s, e)| (s.max(start) - start, e.min(end) - start))
                .collect(),
        )
    }

    /// Adds `[start, end)`, merging it with the ranges it overlaps or touches.
    pub fn insert(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let (mut lo, mut hi) = (start, end);
        // Ranges that end before `start` or begin after `end` stay; the rest merge.
        let first = self.0.partition_point(|&(_, e)| e < lo);
        let last = self.0.partition_point(|&(s, _)| s <= hi);
        if first < last {
            lo = lo.min(self.0[first].0);
            hi = hi.max(self.0[last - 1].1);
        }
        self.0.splice(first..last, [(lo, hi)]);
    }

    /// Takes `[start, end)` out of the set; returns what was in it.
    pub fn remove(&mut self, start: u64, end: u64) -> Ranges {
        if start >= end {
            return Ranges::default();
        }
        self.intersect(&Ranges::of([(0, start), (end, u64::MAX)]))
    }

    /// Keeps only what also lies in `keep`; returns what was taken out.
    pub fn intersect(&mut self, keep: &Ranges) -> Ranges {
        let (mut kept, mut taken) = (Vec::new(), Ranges::default());
        for (start, end) in self.iter() {
            let mut at = start;
            for (ks, ke) in keep.iter() {
                let (lo, hi) = (ks.max(start), ke.min(end));
                if lo >= hi {
                    continue;
                }
                taken.insert(at, lo);
                kept.push((lo, hi));
                at = hi;
            }
            taken.insert(at, end);
        }
        self.0 = kept;
        taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inserts_merge_what_overlaps_or_touches() {
        let mut r = Ranges::of([(10, 20), (30, 40)]);
        r.insert(20, 25);
        assert_eq!(r.iter().collect::<Vec<_>>(), [(10, 25), (30, 40)]);
        r.insert(0, 5);
        r.insert(24, 31);
        assert_eq!(r.iter().collect::<Vec<_>>(), [(0, 5), (10, 40)]);
        r.insert(7, 7);
        r.insert(0, 100);
        assert!(r.is_whole(100));
    }

    #[test]
    fn a_window_is_relative_to_its_start() {
        let r = Ranges::of([(0, 10), (20, 30), (40, 50)]);
        assert_eq!(
            r.window(25, 45).iter().collect::<Vec<_>>(),
            [(0, 5), (15, 20)]
        );
        assert!(r.window(10, 20).is_empty());
        assert!(r.window(0, 100).iter().eq(r.iter()));
    }

    #[test]
    fn removing_splits_and_returns_what_it_took() {
        let mut r = Ranges::of([(0, 10), (20, 30)]);
        let taken = r.remove(5, 25);
        assert_eq!(r.iter().collect::<Vec<_>>(), [(0, 5), (25, 30)]);
        assert_eq!(taken.iter().collect::<Vec<_>>(), [(5, 10), (20, 25)]);
        assert!(r.remove(10, 20).is_empty());
        assert!(r.remove(7, 7).is_empty());
        r.remove(0, u64::MAX);
        assert!(r.is_empty());
    }

    #[test]
    fn intersecting_returns_what_was_taken() {
        let mut r = Ranges::of([(0, 100)]);
        let taken = r.intersect(&Ranges::of([(10, 20), (50, 60)]));
        assert_eq!(r.iter().collect::<Vec<_>>(), [(10, 20), (50, 60)]);
        assert_eq!(
            taken.iter().collect::<Vec<_>>(),
            [(0, 10), (20, 50), (60, 100)]
        );
        let taken = r.intersect(&Ranges::default());
        assert!(r.is_empty());
        assert_eq!(taken.iter().collect::<Vec<_>>(), [(10, 20), (50, 60)]);
        let mut r = Ranges::of([(0, 10)]);
        assert!(r.intersect(&Ranges::of([(0, 64)])).is_empty());
        assert!(r.is_whole(10));
    }
}
