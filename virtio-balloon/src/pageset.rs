//! The set of guest pages currently in the balloon, by 4 KiB page frame number.
//!
//! Stored sparsely, one 512-bit word array per 2 MiB chunk holding any member,
//! so its size follows what the guest inflated (at most one bit per page of
//! guest RAM the device accepted), not the guest-physical address space.

use std::collections::BTreeMap;
use std::ops::Range;

/// Pages per chunk: 2 MiB of 4 KiB pages.
const CHUNK_PAGES: u64 = 512;
const WORDS: usize = (CHUNK_PAGES / 64) as usize;

/// A set of page frame numbers.
#[derive(Debug, Default, Clone)]
pub(crate) struct PageSet {
    chunks: BTreeMap<u64, [u64; WORDS]>,
    len: u64,
}

fn split(pfn: u64) -> (u64, usize, u64) {
    let bit = pfn % CHUNK_PAGES;
    (pfn / CHUNK_PAGES, (bit / 64) as usize, 1u64 << (bit % 64))
}

impl PageSet {
    /// Adds `pfn`; returns whether it was absent.
    pub(crate) fn insert(&mut self, pfn: u64) -> bool {
        let (chunk, word, mask) = split(pfn);
        let words = self.chunks.entry(chunk).or_insert([0; WORDS]);
        let absent = words[word] & mask == 0;
        words[word] |= mask;
        self.len += u64::from(absent);
        absent
    }

    /// Removes `pfn`; returns whether it was present.
    pub(crate) fn remove(&mut self, pfn: u64) -> bool {
        let (chunk, word, mask) = split(pfn);
        let Some(words) = self.chunks.get_mut(&chunk) else {
            return false;
        };
        let present = words[word] & mask != 0;
        words[word] &= !mask;
        if words.iter().all(|&w| w == 0) {
            self.chunks.remove(&chunk);
        }
        self.len -= u64::from(present);
        present
    }

    /// Removes every member of `pfns`; returns how many there were. Visits only the
    /// chunks that hold members, so a large range costs what it holds.
    pub(crate) fn remove_range(&mut self, pfns: Range<u64>) -> u64 {
        if pfns.is_empty() {
            return 0;
        }
        let first = pfns.start / CHUNK_PAGES;
        let last = (pfns.end - 1) / CHUNK_PAGES;
        let mut removed = 0;
        let mut emptied = Vec::new();
        for (&chunk, words) in self.chunks.range_mut(first..=last) {
            let base = chunk * CHUNK_PAGES;
            let lo = pfns.start.max(base) - base;
            let hi = pfns.end.min(base + CHUNK_PAGES) - base;
            for bit in lo..hi {
                let (word, mask) = ((bit / 64) as usize, 1u64 << (bit % 64));
                removed += u64::from(words[word] & mask != 0);
                words[word] &= !mask;
            }
            if words.iter().all(|&w| w == 0) {
                emptied.push(chunk);
            }
        }
        for chunk in emptied {
            self.chunks.remove(&chunk);
        }
        self.len -= removed;
        removed
    }

    #[cfg(test)]
    pub(crate) fn contains(&self, pfn: u64) -> bool {
        let (chunk, word, mask) = split(pfn);
        self.chunks.get(&chunk).is_some_and(|w| w[word] & mask != 0)
    }

    /// Number of pages in the set.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    pub(crate) fn clear(&mut self) {
        self.chunks.clear();
        self.len = 0;
    }

    /// The members as maximal runs of consecutive page frame numbers, in order.
    pub(crate) fn runs(&self) -> Vec<Range<u64>> {
        let mut runs: Vec<Range<u64>> = Vec::new();
        for (&chunk, words) in &self.chunks {
            for (w, &word) in words.iter().enumerate() {
                let mut bits = word;
                while bits != 0 {
                    let pfn =
                        chunk * CHUNK_PAGES + w as u64 * 64 + u64::from(bits.trailing_zeros());
                    bits &= bits - 1;
                    match runs.last_mut() {
                        Some(last) if last.end == pfn => last.end += 1,
                        _ => runs.push(pfn..pfn + 1),
                    }
                }
            }
        }
        runs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_remove_and_count() {
        let mut s = PageSet::default();
        assert!(s.insert(5));
        assert!(!s.insert(5));
        assert!(s.insert(511));
        assert!(s.insert(512));
        assert!(s.insert(u64::from(u32::MAX)));
        assert_eq!(s.len(), 4);
        assert!(s.contains(511) && s.contains(512) && !s.contains(6));
        assert!(s.remove(5));
        assert!(!s.remove(5));
        assert!(!s.remove(1 << 40));
        assert_eq!(s.len(), 3);
        s.clear();
        assert_eq!((s.len(), s.runs()), (0, vec![]));
    }

    #[test]
    fn runs_merge_across_words_and_chunks() {
        let mut s = PageSet::default();
        for pfn in (60..70).chain(500..530).chain([1000, 1002]) {
            s.insert(pfn);
        }
        assert_eq!(s.runs(), vec![60..70, 500..530, 1000..1001, 1002..1003]);
        // Emptied chunks are dropped.
        for pfn in 500..530 {
            s.remove(pfn);
        }
        assert_eq!(s.chunks.len(), 2);
        assert_eq!(s.len(), 12);
    }

    #[test]
    fn remove_range_takes_members_across_chunks_only() {
        let mut s = PageSet::default();
        for pfn in (500..530).chain([1000, 1002, 5000]) {
            s.insert(pfn);
        }
        assert_eq!(s.remove_range(510..1001), 21, "510..530 and 1000");
        assert_eq!(s.runs(), vec![500..510, 1002..1003, 5000..5001]);
        assert_eq!(s.len(), 12);
        assert_eq!(s.remove_range(1001..1002), 0);
        assert_eq!(s.remove_range(7..7), 0);
        assert_eq!(s.remove_range(0..u64::MAX), 12);
        assert_eq!(
            (s.len(), s.chunks.len()),
            (0, 0),
            "emptied chunks are dropped"
        );
    }
}
