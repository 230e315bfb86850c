//! Guest memory statistics from the stats queue (virtio 1.2 section 5.5.6.3):
//! an array of packed 10-byte `struct virtio_balloon_stat { le16 tag; le64 val; }`.
//!
//! Tags 0 to 9 are in the spec; Linux 6.12 and later also send 10 to 15. Any
//! other tag is ignored, as the spec requires; when a tag repeats, the last
//! entry wins.

use serde::Serialize;

/// Size of one `struct virtio_balloon_stat`.
pub const STAT_SIZE: usize = 10;

/// `VIRTIO_BALLOON_S_SWAP_IN`: bytes swapped in.
pub const S_SWAP_IN: u16 = 0;
/// `VIRTIO_BALLOON_S_SWAP_OUT`: bytes swapped out.
pub const S_SWAP_OUT: u16 = 1;
/// `VIRTIO_BALLOON_S_MAJFLT`: major page faults.
pub const S_MAJFLT: u16 = 2;
/// `VIRTIO_BALLOON_S_MINFLT`: minor page faults.
pub const S_MINFLT: u16 = 3;
/// `VIRTIO_BALLOON_S_MEMFREE`: bytes not used for anything.
pub const S_MEMFREE: u16 = 4;
/// `VIRTIO_BALLOON_S_MEMTOT`: total bytes the guest manages.
pub const S_MEMTOT: u16 = 5;
/// `VIRTIO_BALLOON_S_AVAIL`: bytes available to new applications without swapping.
pub const S_AVAIL: u16 = 6;
/// `VIRTIO_BALLOON_S_CACHES`: bytes of disk caches (reclaimable without I/O).
pub const S_CACHES: u16 = 7;
/// `VIRTIO_BALLOON_S_HTLB_PGALLOC`: successful hugetlb page allocations.
pub const S_HTLB_PGALLOC: u16 = 8;
/// `VIRTIO_BALLOON_S_HTLB_PGFAIL`: failed hugetlb page allocations.
pub const S_HTLB_PGFAIL: u16 = 9;
/// `VIRTIO_BALLOON_S_OOM_KILL`: OOM killer invocations (Linux 6.12+).
pub const S_OOM_KILL: u16 = 10;
/// `VIRTIO_BALLOON_S_ALLOC_STALL`: allocation stalls (Linux 6.12+).
pub const S_ALLOC_STALL: u16 = 11;
/// `VIRTIO_BALLOON_S_ASYNC_SCAN`: bytes scanned by kswapd (Linux 6.12+).
pub const S_ASYNC_SCAN: u16 = 12;
/// `VIRTIO_BALLOON_S_DIRECT_SCAN`: bytes scanned by direct reclaim (Linux 6.12+).
pub const S_DIRECT_SCAN: u16 = 13;
/// `VIRTIO_BALLOON_S_ASYNC_RECLAIM`: bytes reclaimed by kswapd (Linux 6.12+).
pub const S_ASYNC_RECLAIM: u16 = 14;
/// `VIRTIO_BALLOON_S_DIRECT_RECLAIM`: bytes reclaimed directly (Linux 6.12+).
pub const S_DIRECT_RECLAIM: u16 = 15;

/// The statistics of one stats buffer; `None` for what the driver did not send.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct BalloonStats {
    /// Bytes swapped in.
    pub swap_in: Option<u64>,
    /// Bytes swapped out.
    pub swap_out: Option<u64>,
    /// Major page faults.
    pub major_faults: Option<u64>,
    /// Minor page faults.
    pub minor_faults: Option<u64>,
    /// Free bytes.
    pub free_memory: Option<u64>,
    /// Total bytes.
    pub total_memory: Option<u64>,
    /// Available bytes.
    pub available_memory: Option<u64>,
    /// Disk cache bytes.
    pub disk_caches: Option<u64>,
    /// Successful hugetlb allocations.
    pub hugetlb_allocations: Option<u64>,
    /// Failed hugetlb allocations.
    pub hugetlb_failures: Option<u64>,
    /// OOM killer invocations.
    pub oom_kills: Option<u64>,
    /// Allocation stalls.
    pub alloc_stalls: Option<u64>,
    /// Bytes scanned asynchronously.
    pub async_scans: Option<u64>,
    /// Bytes scanned directly.
    pub direct_scans: Option<u64>,
    /// Bytes reclaimed asynchronously.
    pub async_reclaims: Option<u64>,
    /// Bytes reclaimed directly.
    pub direct_reclaims: Option<u64>,
}

impl BalloonStats {
    /// Decodes whole entries of `bytes` (its length must be a multiple of
    /// [`STAT_SIZE`]; the caller checks). Returns the statistics and how many
    /// entries had an unknown tag.
    pub fn parse(bytes: &[u8]) -> (Self, u64) {
        let mut stats = Self::default();
        let mut unknown = 0;
        for entry in bytes.chunks_exact(STAT_SIZE) {
            let tag = u16::from_le_bytes([entry[0], entry[1]]);
            let mut val = [0u8; 8];
            val.copy_from_slice(&entry[2..]);
            match stats.field(tag) {
                Some(field) => *field = Some(u64::from_le_bytes(val)),
                None => unknown += 1,
            }
        }
        (stats, unknown)
    }

    fn field(&mut self, tag: u16) -> Option<&mut Option<u64>> {
        Some(match tag {
            S_SWAP_IN => &mut self.swap_in,
            S_SWAP_OUT => &mut self.swap_out,
            S_MAJFLT => &mut self.major_faults,
            S_MINFLT => &mut self.minor_faults,
            S_MEMFREE => &mut self.free_memory,
            S_MEMTOT => &mut self.total_memory,
            S_AVAIL => &mut self.available_memory,
            S_CACHES => &mut self.disk_caches,
            S_HTLB_PGALLOC => &mut self.hugetlb_allocations,
            S_HTLB_PGFAIL => &mut self.hugetlb_failures,
            S_OOM_KILL => &mut self.oom_kills,
            S_ALLOC_STALL => &mut self.alloc_stalls,
            S_ASYNC_SCAN => &mut self.async_scans,
            S_DIRECT_SCAN => &mut self.direct_scans,
            S_ASYNC_RECLAIM => &mut self.async_reclaims,
            S_DIRECT_RECLAIM => &mut self.direct_reclaims,
            _ => return None,
        })
    }
}

/// Encodes `(tag, value)` entries as a driver does (for tests, fuzzing, benches).
pub fn encode(entries: &[(u16, u64)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * STAT_SIZE);
    for &(tag, val) in entries {
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&val.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_known_tag_lands_in_its_field() {
        let entries: Vec<(u16, u64)> = (0..16u16).map(|t| (t, 1000 + u64::from(t))).collect();
        let (s, unknown) = BalloonStats::parse(&encode(&entries));
        assert_eq!(unknown, 0);
        let got = [
            s.swap_in,
            s.swap_out,
            s.major_faults,
            s.minor_faults,
            s.free_memory,
            s.total_memory,
            s.available_memory,
            s.disk_caches,
            s.hugetlb_allocations,
            s.hugetlb_failures,
            s.oom_kills,
            s.alloc_stalls,
            s.async_scans,
            s.direct_scans,
            s.async_reclaims,
            s.direct_reclaims,
        ];
        for (t, v) in got.iter().enumerate() {
            assert_eq!(*v, Some(1000 + t as u64), "tag {t}");
        }
    }

    #[test]
    fn unknown_tags_are_ignored_any_order_last_wins() {
        let bytes = encode(&[
            (S_MEMTOT, 8 << 30),
            (16, 1),
            (0xffff, 2),
            (S_MEMFREE, 1),
            (S_MEMFREE, 5),
        ]);
        let (s, unknown) = BalloonStats::parse(&bytes);
        assert_eq!(unknown, 2);
        assert_eq!((s.total_memory, s.free_memory), (Some(8 << 30), Some(5)));
        assert_eq!(s.swap_in, None);
        assert_eq!(BalloonStats::parse(&[]), (BalloonStats::default(), 0));
        // The wire format is packed: tag at 0, value at 2.
        assert_eq!(encode(&[(7, 0x0102)]), [7, 0, 2, 1, 0, 0, 0, 0, 0, 0]);
    }
}
