//! `RegionSet`: a bitmap of a node's regions, sized from its region count, so that a
//! node of 1 TiB in 128 MiB regions (8192) needs 128 words and no limit is built in.

use std::fmt;

const WORD_BITS: u32 = u64::BITS;

/// A set of region numbers below a fixed count.
#[derive(Clone, PartialEq, Eq)]
pub struct RegionSet {
    words: Vec<u64>,
    regions: u32,
}

impl RegionSet {
    /// An empty set of regions `0..regions`.
    pub fn new(regions: u32) -> Self {
        RegionSet {
            words: vec![0; regions.div_ceil(WORD_BITS) as usize],
            regions,
        }
    }

    /// The set of `regions` out of `0..count`, or the first region that is out of range.
    pub fn of(count: u32, regions: &[u32]) -> Result<Self, u32> {
        let mut set = RegionSet::new(count);
        for &r in regions {
            if !set.insert(r) && r >= count {
                return Err(r);
            }
        }
        Ok(set)
    }

    /// How many regions the set can hold (`0..regions()`).
    pub fn regions(&self) -> u32 {
        self.regions
    }

    /// Adds `region`; false if it was there already or is out of range.
    pub fn insert(&mut self, region: u32) -> bool {
        if region >= self.regions {
            return false;
        }
        let (word, bit) = split(region);
        let had = self.words[word] & bit != 0;
        self.words[word] |= bit;
        !had
    }

    pub fn contains(&self, region: u32) -> bool {
        let (word, bit) = split(region);
        region < self.regions && self.words[word] & bit != 0
    }

    /// Adds every region of `other` (of the same node).
    pub fn or(&mut self, other: &RegionSet) {
        debug_assert_eq!(self.regions, other.regions);
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
    }

    /// Removes every region of `other` (of the same node).
    pub fn and_not(&mut self, other: &RegionSet) {
        debug_assert_eq!(self.regions, other.regions);
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a &= !b;
        }
    }

    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|w| *w == 0)
    }

    pub fn len(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// The regions in the set, lowest first.
    pub fn iter_ones(&self) -> impl Iterator<Item = u32> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &word)| {
            let mut rest = word;
            std::iter::from_fn(move || {
                if rest == 0 {
                    return None;
                }
                let bit = rest.trailing_zeros();
                rest &= rest - 1;
                Some(i as u32 * WORD_BITS + bit)
            })
        })
    }
}

fn split(region: u32) -> (usize, u64) {
    ((region / WORD_BITS) as usize, 1 << (region % WORD_BITS))
}

impl fmt::Debug for RegionSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter_ones()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_set_of_8192_regions() {
        let mut a = RegionSet::new(8192);
        assert!(a.is_empty());
        for r in [0, 63, 64, 4095, 8191] {
            assert!(a.insert(r));
        }
        assert!(!a.insert(64), "already there");
        assert!(!a.insert(8192), "out of range");
        assert!(a.contains(8191) && !a.contains(8192) && !a.contains(u32::MAX));
        assert_eq!(a.iter_ones().collect::<Vec<_>>(), [0, 63, 64, 4095, 8191]);
        assert_eq!(a.len(), 5);
        let b = RegionSet::of(8192, &[63, 100, 8191, 100]).unwrap();
        let mut c = a.clone();
        c.or(&b);
        assert_eq!(c.len(), 6);
        c.and_not(&a);
        assert_eq!(c.iter_ones().collect::<Vec<_>>(), [100]);
        c.and_not(&b);
        assert!(c.is_empty());
        assert_eq!(RegionSet::of(8192, &[1, 8192, 9000]), Err(8192));
        let all = RegionSet::of(8192, &(0..8192).collect::<Vec<_>>()).unwrap();
        assert_eq!(all.len(), 8192);
        assert_eq!(all.iter_ones().last(), Some(8191));
        assert_eq!(format!("{b:?}"), "{63, 100, 8191}");
    }

    #[test]
    fn counts_that_are_not_a_multiple_of_64() {
        let mut s = RegionSet::new(3);
        assert!(s.insert(2) && !s.insert(3));
        assert_eq!(s.iter_ones().collect::<Vec<_>>(), [2]);
        assert!(RegionSet::new(0).is_empty());
        assert!(!RegionSet::new(0).contains(0));
    }
}
