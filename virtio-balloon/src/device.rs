//! The virtio-balloon device: feature and queue negotiation, the four queue
//! loops, and the bookkeeping of the balloon, with no knowledge of KVM or of
//! the transport.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BALLOON;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemory;

use crate::backend::{merge, AllowAll, BalloonBackend, DiscardGuard, PAGE_SIZE};
use crate::chain::{read_pfns, read_stats, reported_ranges, ChainError};
use crate::config::BalloonConfig;
use crate::metrics::BalloonMetrics;
use crate::pageset::PageSet;
use crate::stats::BalloonStats;

/// Feature bit: the statistics queue is present.
pub const VIRTIO_BALLOON_F_STATS_VQ: u32 = 1;
/// Feature bit: the guest may deflate on out-of-memory.
pub const VIRTIO_BALLOON_F_DEFLATE_ON_OOM: u32 = 2;
/// Feature bit: the free page reporting queue is present
/// (`VIRTIO_BALLOON_F_PAGE_REPORTING` in the spec).
pub const VIRTIO_BALLOON_F_REPORTING: u32 = 5;
/// Virtio device type (5).
pub const DEVICE_TYPE: u32 = VIRTIO_ID_BALLOON;
/// Maximum size of every queue. Linux refuses a reporting queue smaller than
/// its 32-entry report capacity; the other queues carry one buffer at a time.
pub const QUEUE_MAX_SIZE: u16 = 128;
const _: () = assert!(
    QUEUE_MAX_SIZE >= 32,
    "Linux needs room for a 32-entry report"
);

/// What a queue carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueKind {
    /// Pages the guest gives up (inflateq).
    Inflate,
    /// Pages the guest takes back (deflateq).
    Deflate,
    /// Memory statistics (statsq).
    Stats,
    /// Free page reports (reporting_vq).
    Reporting,
}

/// The queues a driver sets up for `features`, in index order. Linux numbers
/// only the queues that exist, so an absent stats queue moves the reporting
/// queue from index 3 to 2.
pub fn queue_layout(features: u64) -> Vec<QueueKind> {
    let has = |bit: u32| features & (1u64 << bit) != 0;
    let mut layout = vec![QueueKind::Inflate, QueueKind::Deflate];
    if has(VIRTIO_BALLOON_F_STATS_VQ) {
        layout.push(QueueKind::Stats);
    }
    if has(VIRTIO_BALLOON_F_REPORTING) {
        layout.push(QueueKind::Reporting);
    }
    layout
}

/// A device operation failed (host side; guest mistakes are counted in the
/// metrics and answered on the queue, not returned here).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A stats polling interval of zero.
    #[error("the stats polling interval must be positive")]
    ZeroStatsInterval,
    /// Stats polling set on a device that does not offer the stats queue.
    #[error("the device was created without the stats queue")]
    StatsNotOffered,
    /// The target is not a whole number of 4 KiB pages.
    #[error("balloon target {0:#x} bytes is not a multiple of 4 KiB")]
    TargetNotPageAligned(u64),
    /// The target does not fit the 32-bit `num_pages` (16 TiB).
    #[error("balloon target {0:#x} bytes exceeds the 16 TiB that num_pages can express")]
    TargetTooLarge(u64),
    /// `activate` on an active device.
    #[error("device already activated")]
    AlreadyActivated,
    /// Queue work before `activate`.
    #[error("device not activated")]
    NotActivated,
    /// The driver did not accept `VIRTIO_F_VERSION_1` (the device is modern-only).
    #[error("driver did not accept VIRTIO_F_VERSION_1")]
    Version1NotAcked,
    /// Fewer queues than the negotiated features need.
    #[error("the negotiated features need {needed} queues, got {got}")]
    MissingQueues {
        /// Queues the features need.
        needed: usize,
        /// Queues given.
        got: usize,
    },
    /// A queue set up by the driver is not usable in guest memory.
    #[error("queue {0} is not ready or not inside guest memory")]
    InvalidQueue(usize),
    /// No active queue has this index.
    #[error("no active queue {0}")]
    NoSuchQueue(usize),
    /// The driver did not negotiate the stats queue.
    #[error("the driver did not negotiate the stats queue")]
    StatsNotNegotiated,
    /// The queue rings could not be accessed.
    #[error("queue: {0}")]
    Queue(virtio_queue::Error),
    /// The avail ring announces chains the device cannot fetch.
    #[error("queue announces work that cannot be fetched")]
    QueueStalled,
}

/// How the device is set up; each option offers its feature.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BalloonParams {
    /// `Some` offers the stats queue; the VMM calls
    /// [`VirtioBalloon::request_stats`] at this interval.
    pub stats_interval: Option<Duration>,
    /// Offers `VIRTIO_BALLOON_F_DEFLATE_ON_OOM`.
    pub deflate_on_oom: bool,
    /// Offers free page reporting.
    pub free_page_reporting: bool,
}

/// The latest statistics and when they arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatsUpdate {
    /// What the guest sent.
    pub stats: BalloonStats,
    /// When the device parsed them.
    pub received: Instant,
}

/// What one [`VirtioBalloon::process_queue`] or
/// [`VirtioBalloon::request_stats`] call did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcessOutcome {
    /// Chains taken from the avail ring (or, for `request_stats`, handed back).
    pub chains: u32,
    /// The caller must signal the used-buffer interrupt.
    pub needs_notification: bool,
}

#[derive(Debug)]
struct ActiveQueue {
    kind: QueueKind,
    /// `None` only while the queue is being processed.
    queue: Option<Queue>,
}

/// A virtio-balloon device over a [`BalloonBackend`], discarding only what a
/// [`DiscardGuard`] allows.
#[derive(Debug)]
pub struct VirtioBalloon<B, G = AllowAll> {
    params: BalloonParams,
    avail_features: u64,
    acked_features: u64,
    queue_sizes: Vec<u16>,
    config: BalloonConfig,
    generation: u32,
    /// Empty until activation.
    queues: Vec<ActiveQueue>,
    /// Head of the stats buffer the device holds until it wants new stats.
    stats_buffer: Option<u16>,
    last_stats: Option<StatsUpdate>,
    inflated: PageSet,
    backend: B,
    guard: G,
    metrics: Arc<BalloonMetrics>,
}

// The VMM's transport holds devices across threads.
const _: fn() = || {
    fn send<T: Send>() {}
    send::<VirtioBalloon<crate::MemfdBackend, crate::AllowedRanges>>();
};

impl<B: BalloonBackend, G: DiscardGuard> VirtioBalloon<B, G> {
    /// A device with an empty balloon and a target of 0.
    pub fn new(params: BalloonParams, backend: B, guard: G) -> Result<Self, Error> {
        if params.stats_interval == Some(Duration::ZERO) {
            return Err(Error::ZeroStatsInterval);
        }
        let mut avail_features = 1u64 << VIRTIO_F_VERSION_1;
        if params.stats_interval.is_some() {
            avail_features |= 1 << VIRTIO_BALLOON_F_STATS_VQ;
        }
        if params.deflate_on_oom {
            avail_features |= 1 << VIRTIO_BALLOON_F_DEFLATE_ON_OOM;
        }
        if params.free_page_reporting {
            avail_features |= 1 << VIRTIO_BALLOON_F_REPORTING;
        }
        Ok(Self {
            params,
            avail_features,
            acked_features: 0,
            queue_sizes: vec![QUEUE_MAX_SIZE; queue_layout(avail_features).len()],
            config: BalloonConfig::default(),
            generation: 0,
            queues: Vec::new(),
            stats_buffer: None,
            last_stats: None,
            inflated: PageSet::default(),
            backend,
            guard,
            metrics: Arc::default(),
        })
    }

    // ---- transport-facing API ----

    /// Virtio device type (5).
    pub fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    /// Maximum size of each queue the offered features allow. The driver may
    /// set up fewer: see [`queue_layout`] of the acked features.
    pub fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    /// Features offered to the driver.
    pub fn avail_features(&self) -> u64 {
        self.avail_features
    }

    /// Features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Records the driver's features; bits the device did not offer are dropped.
    pub fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    /// Configuration generation; changes whenever the device changes `num_pages`.
    pub fn config_generation(&self) -> u32 {
        self.generation
    }

    /// Driver read of the configuration space; any offset and length.
    pub fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    /// Driver write of the configuration space: only `actual` is writable,
    /// anything else is ignored and counted.
    pub fn write_config(&mut self, offset: u64, data: &[u8]) {
        if let Err(e) = self.config.write(offset, data) {
            log::debug!("virtio-balloon: {e}");
            BalloonMetrics::inc(&self.metrics.config_writes_ignored);
        }
    }

    /// Takes the queues once the driver set `DRIVER_OK`: `queues[i]` is queue
    /// `i`. The acked features say how many are used (see [`queue_layout`]);
    /// any beyond are dropped.
    pub fn activate<M: GuestMemory>(&mut self, queues: Vec<Queue>, mem: &M) -> Result<(), Error> {
        if self.is_activated() {
            return Err(Error::AlreadyActivated);
        }
        if self.acked_features & (1u64 << VIRTIO_F_VERSION_1) == 0 {
            return Err(Error::Version1NotAcked);
        }
        let layout = queue_layout(self.acked_features);
        if queues.len() < layout.len() {
            return Err(Error::MissingQueues {
                needed: layout.len(),
                got: queues.len(),
            });
        }
        if let Some(i) = (0..layout.len()).find(|&i| !queues[i].ready() || !queues[i].is_valid(mem))
        {
            return Err(Error::InvalidQueue(i));
        }
        self.queues = layout
            .into_iter()
            .zip(queues)
            .map(|(kind, queue)| ActiveQueue {
                kind,
                queue: Some(queue),
            })
            .collect();
        Ok(())
    }

    /// Whether `activate` succeeded and no reset happened since.
    pub fn is_activated(&self) -> bool {
        !self.queues.is_empty()
    }

    /// What active queue `index` carries.
    pub fn queue_kind(&self, index: usize) -> Option<QueueKind> {
        self.queues.get(index).map(|q| q.kind)
    }

    /// Device reset: drops the queues and the negotiated features, and empties
    /// the balloon (a reset driver starts with none; the pages come back to the
    /// guest on its next touch). The target stays.
    pub fn reset(&mut self) {
        self.acked_features = 0;
        self.queues.clear();
        self.stats_buffer = None;
        self.inflated.clear();
        self.config.actual = 0;
    }

    /// Serves every available chain of queue `index` (the canonical
    /// disable-notification / drain / enable-notification loop).
    /// On `Err` the queue is broken and the device needs a reset.
    pub fn process_queue<M: GuestMemory>(
        &mut self,
        index: usize,
        mem: &M,
    ) -> Result<ProcessOutcome, Error> {
        if !self.is_activated() {
            return Err(Error::NotActivated);
        }
        // Before any PFN is looked up: a page of a block unplugged (and maybe plugged
        // again) since is no longer in the balloon.
        self.forget_unplugged();
        let slot = self
            .queues
            .get_mut(index)
            .ok_or(Error::NoSuchQueue(index))?;
        let kind = slot.kind;
        let mut queue = slot.queue.take().ok_or(Error::NotActivated)?;
        let result = self.drain(kind, &mut queue, mem);
        self.queues[index].queue = Some(queue);
        result
    }

    fn drain<M: GuestMemory>(
        &mut self,
        kind: QueueKind,
        queue: &mut Queue,
        mem: &M,
    ) -> Result<ProcessOutcome, Error> {
        let mut outcome = ProcessOutcome::default();
        loop {
            queue.disable_notification(mem).map_err(Error::Queue)?;
            let mut popped = 0u32;
            while let Some(chain) = queue.iter(mem).map_err(Error::Queue)?.next() {
                popped += 1;
                if let Some(head) = self.serve(kind, chain) {
                    queue.add_used(mem, head, 0).map_err(Error::Queue)?;
                    if queue.needs_notification(mem).map_err(Error::Queue)? {
                        outcome.needs_notification = true;
                    }
                }
            }
            outcome.chains += popped;
            if !queue.enable_notification(mem).map_err(Error::Queue)? {
                return Ok(outcome);
            }
            if popped == 0 {
                // The avail index says there is work, yet no chain can be
                // fetched: looping again would spin forever.
                return Err(Error::QueueStalled);
            }
        }
    }

    /// Serves one chain; returns the head to put in the used ring, if any.
    fn serve<M: GuestMemory>(
        &mut self,
        kind: QueueKind,
        chain: DescriptorChain<&M>,
    ) -> Option<u16> {
        let head = chain.head_index();
        let m = Arc::clone(&self.metrics);
        let result = match kind {
            QueueKind::Inflate => {
                BalloonMetrics::inc(&m.inflate_chains);
                read_pfns(chain).map(|pfns| self.inflate(pfns))
            }
            QueueKind::Deflate => {
                BalloonMetrics::inc(&m.deflate_chains);
                read_pfns(chain).map(|pfns| self.deflate(pfns))
            }
            QueueKind::Reporting => {
                BalloonMetrics::inc(&m.report_chains);
                reported_ranges(chain).map(|ranges| self.report(&ranges))
            }
            QueueKind::Stats => read_stats(chain).map(|bytes| self.update_stats(&bytes)),
        };
        if let Err(e) = result {
            self.malformed(kind, &e);
        }
        if kind == QueueKind::Stats {
            // Kept until the host wants fresh stats; one the driver replaced
            // (it should not) goes back at once.
            self.stats_buffer.replace(head)
        } else {
            Some(head)
        }
    }

    fn malformed(&self, kind: QueueKind, e: &ChainError) {
        log::debug!("virtio-balloon: {kind:?} chain refused: {e}");
        BalloonMetrics::inc(&self.metrics.malformed_chains);
    }

    /// Puts pages in the balloon and discards them, adjacent pages as one range.
    fn inflate(&mut self, pfns: Vec<u64>) {
        for run in pfn_runs(pfns) {
            // PFNs are 32-bit, so these byte addresses stay below 2^44.
            let parts = self.allowed_parts(run.start * PAGE_SIZE..run.end * PAGE_SIZE);
            self.discard(&parts);
            let (mut new, mut again) = (0, 0);
            for part in parts {
                for pfn in part.start / PAGE_SIZE..part.end / PAGE_SIZE {
                    if self.inflated.insert(pfn) {
                        new += PAGE_SIZE;
                    } else {
                        again += PAGE_SIZE;
                    }
                }
            }
            BalloonMetrics::add(&self.metrics.inflated_bytes, new);
            BalloonMetrics::add(&self.metrics.reinflated_bytes, again);
        }
    }

    /// Takes pages out of the balloon. Nothing to do to host memory: the
    /// guest's next touch of a page allocates it again.
    fn deflate(&mut self, mut pfns: Vec<u64>) {
        pfns.sort_unstable();
        pfns.dedup();
        let (mut known, mut unknown) = (0, 0);
        for pfn in pfns {
            if self.inflated.remove(pfn) {
                known += PAGE_SIZE;
            } else {
                unknown += PAGE_SIZE;
            }
        }
        BalloonMetrics::add(&self.metrics.deflated_bytes, known);
        BalloonMetrics::add(&self.metrics.deflate_unknown_bytes, unknown);
    }

    /// Discards reported free ranges, each whole pages; adjacent ones as one.
    fn report(&mut self, entries: &[(u64, u32)]) {
        let mut parts = Vec::with_capacity(entries.len());
        for &(addr, len) in entries {
            let len = u64::from(len);
            match addr.checked_add(len) {
                Some(end) if len > 0 && addr % PAGE_SIZE == 0 && len % PAGE_SIZE == 0 => {
                    parts.extend(self.allowed_parts(addr..end))
                }
                _ => self.reject(len),
            }
        }
        // A range reported twice is discarded and counted once.
        let parts = merge(parts);
        let bytes = parts.iter().map(|p| p.end - p.start).sum();
        BalloonMetrics::add(&self.metrics.reported_bytes, bytes);
        self.discard(&parts);
    }

    fn reject(&self, bytes: u64) {
        BalloonMetrics::inc(&self.metrics.rejected_ranges);
        BalloonMetrics::add(&self.metrics.rejected_bytes, bytes);
    }

    /// The parts of the page-aligned `range` that are RAM and that the guard
    /// allows, sorted and merged; the rest is counted as rejected.
    fn allowed_parts(&self, range: Range<u64>) -> Vec<Range<u64>> {
        let mut ram = Vec::new();
        self.backend
            .ram_parts(range.clone(), &mut |p| ram.extend(clamp(&p, &range)));
        let mut allowed = Vec::new();
        for part in &ram {
            self.guard
                .allowed_parts(part.clone(), &mut |p| allowed.extend(clamp(&p, part)));
        }
        let allowed = merge(allowed);
        let allowed_bytes: u64 = allowed.iter().map(|p| p.end - p.start).sum();
        let refused = (range.end - range.start).saturating_sub(allowed_bytes);
        if refused > 0 {
            self.reject(refused);
        }
        allowed
    }

    /// Discards ranges [`Self::allowed_parts`] returned.
    fn discard(&self, parts: &[Range<u64>]) {
        for part in parts {
            match self.backend.discard(part.clone()) {
                Ok(()) => BalloonMetrics::add(&self.metrics.discarded_bytes, part.end - part.start),
                Err(e) => {
                    log::warn!("virtio-balloon: cannot discard {part:#x?}: {e}");
                    BalloonMetrics::inc(&self.metrics.discard_failures);
                }
            }
        }
    }

    fn update_stats(&mut self, bytes: &[u8]) {
        let (stats, unknown) = BalloonStats::parse(bytes);
        self.last_stats = Some(StatsUpdate {
            stats,
            received: Instant::now(),
        });
        BalloonMetrics::inc(&self.metrics.stats_updates);
        BalloonMetrics::add(&self.metrics.stats_unknown_tags, unknown);
    }

    // ---- host-facing API ----

    /// Sets the balloon size the driver should reach. Returns whether it
    /// changed, in which case the caller must raise a configuration-change
    /// interrupt (if the driver is up). The VMM checks it against guest RAM.
    pub fn set_target_bytes(&mut self, bytes: u64) -> Result<bool, Error> {
        if bytes % PAGE_SIZE != 0 {
            return Err(Error::TargetNotPageAligned(bytes));
        }
        let pages = u32::try_from(bytes / PAGE_SIZE).map_err(|_| Error::TargetTooLarge(bytes))?;
        if pages == self.config.num_pages {
            return Ok(false);
        }
        self.config.num_pages = pages;
        self.generation = self.generation.wrapping_add(1);
        BalloonMetrics::inc(&self.metrics.target_changes);
        Ok(true)
    }

    /// The target (`num_pages`), in bytes.
    pub fn target_bytes(&self) -> u64 {
        u64::from(self.config.num_pages) * PAGE_SIZE
    }

    /// The balloon size the driver claims (`actual`), in bytes: untrusted.
    pub fn actual_bytes(&self) -> u64 {
        u64::from(self.config.actual) * PAGE_SIZE
    }

    /// Takes the pages of memory the guard says was unplugged out of the balloon.
    pub fn forget_unplugged(&mut self) {
        let mut unplugged = Vec::new();
        self.guard.take_unplugged(&mut |r| unplugged.push(r));
        let mut pages = 0;
        for range in unplugged {
            // Whole pages only: a page partly unplugged is unplugged.
            let first = range.start / PAGE_SIZE;
            let end = range.end.div_ceil(PAGE_SIZE);
            pages += self.inflated.remove_range(first..end);
        }
        BalloonMetrics::add(&self.metrics.unplugged_bytes, pages * PAGE_SIZE);
    }

    /// The balloon size the device saw: distinct pages validly inflated and
    /// not deflated since, in bytes, without those of memory unplugged since
    /// (see [`Self::forget_unplugged`]).
    pub fn inflated_bytes(&mut self) -> u64 {
        self.forget_unplugged();
        self.inflated.len() * PAGE_SIZE
    }

    /// The guest-physical ranges in the balloon, maximal and in order (after
    /// [`Self::forget_unplugged`]).
    pub fn inflated_ranges(&mut self) -> Vec<Range<u64>> {
        self.forget_unplugged();
        self.inflated
            .runs()
            .into_iter()
            .map(|r| r.start * PAGE_SIZE..r.end * PAGE_SIZE)
            .collect()
    }

    /// Snapshot of the configuration space.
    pub fn config(&self) -> BalloonConfig {
        self.config
    }

    /// The stats polling interval, if the stats queue is offered.
    pub fn stats_interval(&self) -> Option<Duration> {
        self.params.stats_interval
    }

    /// Changes the stats polling interval (the VMM's timer reads it).
    pub fn set_stats_interval(&mut self, interval: Duration) -> Result<(), Error> {
        if self.params.stats_interval.is_none() {
            return Err(Error::StatsNotOffered);
        }
        if interval.is_zero() {
            return Err(Error::ZeroStatsInterval);
        }
        self.params.stats_interval = Some(interval);
        Ok(())
    }

    /// Asks the driver for fresh statistics by handing its buffer back; it
    /// answers with a new buffer on the stats queue. Does nothing
    /// (`chains == 0`) while the driver has not answered the last request.
    pub fn request_stats<M: GuestMemory>(&mut self, mem: &M) -> Result<ProcessOutcome, Error> {
        if !self.is_activated() {
            return Err(Error::NotActivated);
        }
        let slot = self
            .queues
            .iter_mut()
            .find(|q| q.kind == QueueKind::Stats)
            .ok_or(Error::StatsNotNegotiated)?;
        let Some(head) = self.stats_buffer.take() else {
            return Ok(ProcessOutcome::default());
        };
        let queue = slot.queue.as_mut().ok_or(Error::NotActivated)?;
        queue.add_used(mem, head, 0).map_err(Error::Queue)?;
        BalloonMetrics::inc(&self.metrics.stats_requests);
        Ok(ProcessOutcome {
            chains: 1,
            needs_notification: queue.needs_notification(mem).map_err(Error::Queue)?,
        })
    }

    /// The latest statistics the driver sent.
    pub fn last_stats(&self) -> Option<StatsUpdate> {
        self.last_stats
    }

    /// The device's counters, shareable with a metrics exporter.
    pub fn metrics(&self) -> Arc<BalloonMetrics> {
        Arc::clone(&self.metrics)
    }

    /// The memory backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The discard guard.
    pub fn guard(&self) -> &G {
        &self.guard
    }
}

/// `range` shrunk to `within` and to whole pages, if anything is left.
fn clamp(range: &Range<u64>, within: &Range<u64>) -> Option<Range<u64>> {
    let start = range
        .start
        .max(within.start)
        .checked_next_multiple_of(PAGE_SIZE)?;
    let end = range.end.min(within.end) / PAGE_SIZE * PAGE_SIZE;
    (start < end).then_some(start..end)
}

/// Page frame numbers in any order, with repeats, as maximal runs.
fn pfn_runs(mut pfns: Vec<u64>) -> Vec<Range<u64>> {
    pfns.sort_unstable();
    pfns.dedup();
    merge(pfns.into_iter().map(|p| p..p + 1).collect())
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod guest_tests;
