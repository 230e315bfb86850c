//! What the guest finds at a hotplug region the host took back: nothing. Such a region
//! has no KVM memory slot (`memory::slots`), so a guest access to it exits to the VMM as
//! MMIO. This bus device, over a node's whole hotplug range, answers those exits: reads
//! return all ones, writes are dropped, no host memory is allocated, and a warning names
//! the address and the region, at most once per [`WARN_INTERVAL`]. Present regions have
//! slots, so their accesses never reach it.

use std::time::{Duration, Instant};

use super::BusDevice;

/// At most one warning per node in this interval; the next one counts those left out.
pub const WARN_INTERVAL: Duration = Duration::from_secs(1);

/// Lets one event through per interval and counts the others.
#[derive(Debug)]
pub struct RateLimit {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    pub fn new(interval: Duration) -> Self {
        RateLimit {
            interval,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(events suppressed since the last one let through)`, or `None` to stay quiet.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < self.interval => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// A node's hotplug range, as seen where no region is mapped.
#[derive(Debug)]
pub struct ReleasedMemory {
    node: u32,
    base: u64,
    region_size: u64,
    warnings: RateLimit,
    accesses: u64,
}

impl ReleasedMemory {
    /// For the hotplug range of `node` starting at guest address `base`, cut in regions
    /// of `region_size` bytes.
    pub fn new(node: u32, base: u64, region_size: u64) -> Self {
        ReleasedMemory {
            node,
            base,
            region_size: region_size.max(1),
            warnings: RateLimit::new(WARN_INTERVAL),
            accesses: 0,
        }
    }

    /// Guest accesses answered so far.
    pub fn accesses(&self) -> u64 {
        self.accesses
    }

    /// Counts an access; returns the warning to log, if one is due.
    fn access(&mut self, what: &str, offset: u64, len: usize, now: Instant) -> Option<String> {
        self.accesses += 1;
        let suppressed = self.warnings.allow(now)?;
        let region = offset / self.region_size;
        let start = self.base + region * self.region_size;
        let mut line = format!(
            "guest {what} of {len} bytes at {:#x}: region {region} of node {} \
             ({start:#x}..{:#x}) is released and has no memory slot, so reads return all ones \
             and writes are dropped",
            self.base + offset,
            self.node,
            start + self.region_size,
        );
        if suppressed > 0 {
            line += &format!(" ({suppressed} more such accesses since the last warning)");
        }
        Some(line)
    }
}

impl BusDevice for ReleasedMemory {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if let Some(line) = self.access("read", offset, data.len(), Instant::now()) {
            log::warn!("{line}");
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(line) = self.access("write", offset, data.len(), Instant::now()) {
            log::warn!("{line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn one_event_per_interval_passes_and_the_rest_are_counted() {
        let t0 = Instant::now();
        let mut limit = RateLimit::new(Duration::from_secs(1));
        assert_eq!(limit.allow(t0), Some(0));
        for ms in [1, 500, 999] {
            assert_eq!(limit.allow(t0 + Duration::from_millis(ms)), None);
        }
        assert_eq!(limit.allow(t0 + Duration::from_millis(1000)), Some(3));
        assert_eq!(limit.allow(t0 + Duration::from_millis(1500)), None);
        assert_eq!(limit.allow(t0 + Duration::from_millis(2600)), Some(1));
        // A clock that goes backwards stays quiet rather than panicking.
        assert_eq!(limit.allow(t0), None);
    }

    #[test]
    fn accesses_read_all_ones_and_warnings_name_the_region() {
        let mut dev = ReleasedMemory::new(1, 5 << 30, 128 * MIB);
        let mut data = [0u8; 8];
        dev.read(128 * MIB + 0x10, &mut data);
        assert_eq!(data, [0xff; 8]);
        dev.write(0, &[1, 2, 3, 4]);
        assert_eq!(dev.accesses(), 2);

        let t0 = Instant::now();
        let mut dev = ReleasedMemory::new(1, 5 << 30, 128 * MIB);
        let first = dev.access("write", 2 * 128 * MIB + 8, 4, t0).unwrap();
        assert_eq!(
            first,
            "guest write of 4 bytes at 0x150000008: region 2 of node 1 \
             (0x150000000..0x158000000) is released and has no memory slot, so reads return \
             all ones and writes are dropped"
        );
        for i in 0..1000 {
            let at = t0 + Duration::from_micros(i);
            assert_eq!(dev.access("read", 0, 8, at), None, "access {i}");
        }
        let next = dev.access("read", 0, 8, t0 + WARN_INTERVAL).unwrap();
        assert!(
            next.starts_with("guest read of 8 bytes at 0x140000000: region 0 of node 1")
                && next.ends_with("(1000 more such accesses since the last warning)"),
            "{next}"
        );
        assert_eq!(dev.accesses(), 1002);
    }
}
