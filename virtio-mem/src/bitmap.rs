//! A fixed-size bitmap of plugged blocks: the device's single source of truth
//! for which blocks are plugged (`plugged_size` is derived from it).

use std::ops::Range;

const WORD_BITS: usize = u64::BITS as usize;

/// One bit per block; a set bit means "plugged".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockBitmap {
    words: Vec<u64>,
    len: usize,
}

impl BlockBitmap {
    /// A bitmap of `len` blocks, all unplugged.
    pub fn new(len: usize) -> Self {
        Self {
            words: vec![0; len.div_ceil(WORD_BITS)],
            len,
        }
    }

    /// State of block `i`, `None` past the end.
    pub fn get(&self, i: usize) -> Option<bool> {
        (i < self.len).then(|| self.words[i / WORD_BITS] & (1u64 << (i % WORD_BITS)) != 0)
    }

    /// Number of set bits in `range` (clamped to the bitmap).
    pub fn count_ones_in(&self, range: Range<usize>) -> usize {
        self.word_masks(range)
            .map(|(word, mask)| (self.words[word] & mask).count_ones() as usize)
            .sum()
    }

    /// The words that `range` (clamped to the bitmap) touches, each with the mask of
    /// its bits inside the range.
    fn word_masks(&self, range: Range<usize>) -> impl Iterator<Item = (usize, u64)> {
        let end = range.end.min(self.len);
        let mut i = range.start.min(end);
        std::iter::from_fn(move || {
            if i >= end {
                return None;
            }
            let bit = i % WORD_BITS;
            let span = (WORD_BITS - bit).min(end - i);
            let mask = if span == WORD_BITS {
                u64::MAX
            } else {
                ((1u64 << span) - 1) << bit
            };
            let word = i / WORD_BITS;
            i += span;
            Some((word, mask))
        })
    }

    /// Number of set bits.
    pub fn count_ones(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Sets (or clears) every bit in `range` (clamped to the bitmap).
    pub fn set_range(&mut self, range: Range<usize>, value: bool) {
        for (word, mask) in self.word_masks(range) {
            if value {
                self.words[word] |= mask;
            } else {
                self.words[word] &= !mask;
            }
        }
    }

    /// Maximal runs of consecutive blocks whose bit equals `value`, in order.
    pub fn runs(&self, value: bool) -> Vec<Range<usize>> {
        let mut runs = Vec::new();
        let mut start = None;
        let mut i = 0;
        while i < self.len {
            let word = self.words[i / WORD_BITS];
            // Whole words that cannot end or start a run are skipped at once.
            if i % WORD_BITS == 0 && i + WORD_BITS <= self.len {
                let all_value = if value { u64::MAX } else { 0 };
                if (start.is_some() && word == all_value) || (start.is_none() && word == !all_value)
                {
                    i += WORD_BITS;
                    continue;
                }
            }
            let hit = word & (1u64 << (i % WORD_BITS)) != 0;
            match (hit == value, start) {
                (true, None) => start = Some(i),
                (false, Some(s)) => {
                    runs.push(s..i);
                    start = None;
                }
                _ => {}
            }
            i += 1;
        }
        if let Some(s) = start {
            runs.push(s..self.len);
        }
        runs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_count_and_runs() {
        let mut b = BlockBitmap::new(200);
        assert_eq!(b.count_ones(), 0);
        b.set_range(3..70, true);
        assert_eq!(b.count_ones(), 67);
        assert_eq!(b.count_ones_in(0..64), 61);
        assert_eq!(b.count_ones_in(64..200), 6);
        assert_eq!(b.count_ones_in(60..1000), 10);
        b.set_range(10..12, false);
        assert_eq!(b.runs(true), vec![3..10, 12..70]);
        assert_eq!(b.runs(false), vec![0..3, 10..12, 70..200]);
        b.set_range(190..500, true);
        assert_eq!(b.get(199), Some(true));
        assert_eq!(b.get(200), None);
        assert_eq!(b.runs(true).last(), Some(&(190..200)));
        b.set_range(0..200, false);
        assert_eq!(b.count_ones(), 0);
        assert!(b.runs(true).is_empty());
    }

    #[test]
    fn runs_match_a_naive_scan() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for len in [1usize, 63, 64, 65, 130, 500] {
            let mut b = BlockBitmap::new(len);
            for _ in 0..20 {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                let s = (seed >> 33) as usize % len;
                let n = (seed >> 13) as usize % 90;
                b.set_range(s..s + n, seed & 1 == 0);
                for value in [true, false] {
                    let mut naive = Vec::new();
                    let mut start = None;
                    for i in 0..len {
                        match (b.get(i) == Some(value), start) {
                            (true, None) => start = Some(i),
                            (false, Some(st)) => {
                                naive.push(st..i);
                                start = None;
                            }
                            _ => {}
                        }
                    }
                    if let Some(st) = start {
                        naive.push(st..len);
                    }
                    assert_eq!(b.runs(value), naive);
                }
                let ones = (0..len).filter(|&i| b.get(i) == Some(true)).count();
                assert_eq!(b.count_ones(), ones);
                assert_eq!(b.count_ones_in(0..len), ones);
            }
        }
    }

    #[test]
    fn empty_bitmap() {
        let mut b = BlockBitmap::new(0);
        assert_eq!(b.get(0), None);
        b.set_range(0..10, true);
        assert_eq!(b.count_ones(), 0);
        #[allow(clippy::reversed_empty_ranges)]
        let reversed = 5..1;
        assert_eq!(b.count_ones_in(reversed), 0);
        assert!(b.runs(true).is_empty());
    }
}
