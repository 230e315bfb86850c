//! The VM's virtio-balloon device (the `virtio-balloon` crate's model) on the virtio-mmio
//! transport, the guard that keeps its discards inside memory the guest may give back,
//! and the event-loop subscriber that serves its queues and polls its statistics.
//!
//! # Memory access points
//!
//! The device touches guest memory in two places only: the memfd backend built from the
//! guest's memory at creation ([`BalloonDevice::new`], through the files, never the
//! mappings), and the memory the transport hands over at activation, which every queue
//! operation uses.
//!
//! # Locks
//!
//! The balloon is locked before a node's virtio-mem device: [`PluggedRam`] locks the mem
//! devices while the balloon is locked (queue work and API calls). A mem device, and
//! whoever holds one locked, must never lock the balloon.

use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_balloon::{
    for_each_overlap, queue_layout, BackendError, BalloonParams, DiscardGuard, MemfdBackend,
    VirtioBalloon,
};
use vm_memory::{GuestAddressSpace, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::{
    ActivateContext, ActivateError, FeaturesRefused, GuestMemoryView, Interrupt, VirtioDevice,
};
use crate::devices::virtio::mem::MemDevice;
use crate::layout::MemoryLayout;
use crate::sync::Locked;

#[derive(Debug, thiserror::Error)]
pub enum BalloonError {
    #[error("virtio-balloon: {0}")]
    Backend(#[from] BackendError),
    #[error("virtio-balloon: {0}")]
    Device(#[from] virtio_balloon::Error),
    #[error("balloon target of {target} bytes is above the guest's {ram} bytes of RAM")]
    TargetAboveRam { target: u64, ram: u64 },
    #[error("cannot create the stats timer: {0}")]
    Timer(std::io::Error),
}

/// The guest memory the balloon may discard now: boot memory, and the plugged blocks of
/// each node's virtio-mem region (from the device's block bitmap, read at each call).
/// Anything else, holes and unplugged blocks included, is refused. It also tells the
/// balloon which blocks were unplugged since it last asked, so that their pages leave it.
pub struct PluggedRam {
    /// The boot memory ranges, sorted.
    boot: Vec<Range<u64>>,
    /// Each hotplug region and its node's device.
    hotplug: Vec<(Range<u64>, Arc<Mutex<MemDevice>>)>,
}

impl PluggedRam {
    /// `devices[n]`: node n's virtio-mem device, if it has a hotplug region. A region of
    /// the layout without its device is refused whole.
    pub fn new(layout: &MemoryLayout, devices: &[Option<Arc<Mutex<MemDevice>>>]) -> Self {
        let mut boot: Vec<Range<u64>> = layout
            .ranges
            .iter()
            .map(|r| r.guest_addr..r.end())
            .collect();
        boot.sort_by_key(|r| r.start);
        let hotplug = layout
            .hotplug
            .iter()
            .filter_map(|r| {
                let device = devices.get(r.node as usize)?.clone()?;
                Some((r.guest_addr..r.end(), device))
            })
            .collect();
        PluggedRam { boot, hotplug }
    }
}

impl DiscardGuard for PluggedRam {
    fn allowed_parts(&self, range: Range<u64>, f: &mut dyn FnMut(Range<u64>)) {
        for_each_overlap(&range, &self.boot, f);
        for (region, device) in &self.hotplug {
            let part = region.start.max(range.start)..region.end.min(range.end);
            if part.is_empty() {
                continue;
            }
            // Lock order: the balloon (our caller) before a mem device.
            let device = device.locked();
            let g = device.model().geometry();
            let block = g.block_size();
            let first = ((part.start - g.addr()) / block) as usize;
            let last = ((part.end - 1 - g.addr()) / block) as usize;
            let mut run: Option<Range<u64>> = None;
            for index in first..=last {
                let start = g.block_addr(index).max(part.start);
                let end = (g.block_addr(index) + block).min(part.end);
                match (device.model().block_state(index), &mut run) {
                    (Some(true), Some(r)) => r.end = end,
                    (Some(true), None) => run = Some(start..end),
                    _ => {
                        if let Some(r) = run.take() {
                            f(r);
                        }
                    }
                }
            }
            if let Some(r) = run {
                f(r);
            }
        }
    }

    fn take_unplugged(&self, f: &mut dyn FnMut(Range<u64>)) {
        for (_, device) in &self.hotplug {
            // Lock order: the balloon (our caller) before a mem device.
            let device = device.locked();
            device.take_unplugged().into_iter().for_each(&mut *f);
        }
    }
}

/// The balloon model as the VMM runs it.
pub type BalloonModel = VirtioBalloon<MemfdBackend, PluggedRam>;

/// The VM's virtio-balloon device.
pub struct BalloonDevice {
    model: BalloonModel,
    /// Set at activation: the queues run against this memory (no released region in it)
    /// and signal this interrupt. None again after a reset, or once the device asked
    /// for one.
    running: Option<(GuestMemoryView, Interrupt)>,
}

impl BalloonDevice {
    /// A device over `mem` (every region memfd-backed) that discards only what `guard`
    /// allows, with an initial target of `target` bytes.
    pub fn new(
        params: BalloonParams,
        mem: &GuestMemoryMmap,
        guard: PluggedRam,
        target: u64,
    ) -> Result<Self, BalloonError> {
        let backend = MemfdBackend::from_guest_memory(mem)?;
        let mut model = VirtioBalloon::new(params, backend, guard)?;
        model.set_target_bytes(target)?;
        Ok(BalloonDevice {
            model,
            running: None,
        })
    }

    /// Serves queue `index` (the i-th queue the driver set up) and interrupts the guest
    /// if it needs to know. Malformed requests are counted and answered; an error here is
    /// the queue itself (rings the device cannot follow), so the device stops and asks
    /// the driver for a reset (DEVICE_NEEDS_RESET), as virtio-mem and virtio-blk do.
    pub fn process_queue(&mut self, index: usize) {
        let Some((view, _)) = &self.running else {
            return; // A kick before DRIVER_OK, after a reset, or while one is needed.
        };
        let round = match self.model.process_queue(index, &*view.memory()) {
            // A kick of a queue the acked features do not use: nothing to serve.
            Err(virtio_balloon::Error::NoSuchQueue(_)) => return,
            round => round.map(|o| o.needs_notification),
        };
        self.served(round);
    }

    /// Hands the stats buffer back so that the driver sends fresh statistics.
    pub fn request_stats(&mut self) {
        let Some((view, _)) = &self.running else {
            return;
        };
        let round = match self.model.request_stats(&*view.memory()) {
            Err(virtio_balloon::Error::StatsNotNegotiated) => return,
            round => round.map(|o| o.needs_notification),
        };
        self.served(round);
    }

    fn served(&mut self, round: Result<bool, virtio_balloon::Error>) {
        let Some((_, interrupt)) = &self.running else {
            return;
        };
        if !interrupt.queue_served(round, || "virtio-balloon".to_string()) {
            self.running = None;
        }
    }

    /// Asks the guest to inflate or deflate to `bytes`; refused above `guest_ram` bytes.
    pub fn set_target_bytes(&mut self, bytes: u64, guest_ram: u64) -> Result<(), BalloonError> {
        if bytes > guest_ram {
            return Err(BalloonError::TargetAboveRam {
                target: bytes,
                ram: guest_ram,
            });
        }
        if self.model.set_target_bytes(bytes)? {
            if let Some((_, interrupt)) = &self.running {
                let _ = interrupt.signal_config_change();
            }
        }
        Ok(())
    }

    /// Whether the driver has set the device up (DRIVER_OK, no reset since) and the
    /// device has not asked for a reset.
    pub fn driver_ready(&self) -> bool {
        self.running.is_some()
    }

    /// The device model, for its figures.
    pub fn model(&self) -> &BalloonModel {
        &self.model
    }

    /// The balloon's size as the device saw it inflated, without the pages of blocks
    /// unplugged since.
    pub fn inflated_bytes(&mut self) -> u64 {
        self.model.inflated_bytes()
    }
}

impl VirtioDevice for BalloonDevice {
    fn device_type(&self) -> u32 {
        self.model.device_type()
    }

    fn queue_max_sizes(&self) -> &[u16] {
        self.model.queue_max_sizes()
    }

    fn queues_needed(&self, acked: u64) -> usize {
        queue_layout(acked & self.model.avail_features()).len()
    }

    fn features(&self) -> u64 {
        self.model.avail_features()
    }

    fn ack_features(&mut self, features: u64) -> Result<(), FeaturesRefused> {
        self.model.set_acked_features(features);
        Ok(())
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.model.read_config(offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.model.write_config(offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.model
            .activate(ctx.queues, &*ctx.mem.memory())
            .map_err(|e| ActivateError::Device(e.to_string()))?;
        self.running = Some((ctx.mem, ctx.interrupt));
        // Linux primes the stats queue and kicks it before DRIVER_OK, when kicks are
        // dropped; it never kicks again. Kick every queue once so the event loop serves
        // what is already there.
        for kick in &ctx.queue_events {
            let _ = kick.write(1);
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.model.reset();
        self.running = None;
    }

    fn config_generation(&self) -> u32 {
        self.model.config_generation()
    }
}

/// Event data of the stats timer; queue kicks carry their queue index.
const TIMER: u32 = u32::MAX;

/// Serves the balloon's queues when the guest kicks them, and asks for statistics at
/// the device's polling interval.
pub struct BalloonHandler {
    device: Arc<Mutex<BalloonDevice>>,
    kicks: Vec<EventFd>,
    timer: Option<TimerFd>,
}

impl BalloonHandler {
    /// `kicks`: the transport's per-queue notification eventfds. The stats timer runs
    /// if the device offers the stats queue.
    pub fn new(
        device: Arc<Mutex<BalloonDevice>>,
        kicks: Vec<EventFd>,
    ) -> Result<Self, BalloonError> {
        let interval = device.locked().model().stats_interval();
        let timer = match interval {
            Some(every) => {
                let mut timer = TimerFd::new().map_err(|e| BalloonError::Timer(e.into()))?;
                timer
                    .reset(every, Some(every))
                    .map_err(|e| BalloonError::Timer(e.into()))?;
                Some(timer)
            }
            None => None,
        };
        Ok(BalloonHandler {
            device,
            kicks,
            timer,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BalloonDevice> {
        self.device.locked()
    }
}

impl MutEventSubscriber for BalloonHandler {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let data = events.data();
        if data == TIMER {
            if let Some(timer) = &mut self.timer {
                // Readable: the read does not block.
                let _ = timer.wait();
            }
            self.lock().request_stats();
        } else if let Some(kick) = self.kicks.get(data as usize) {
            let _ = kick.read();
            self.lock().process_queue(data as usize);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (index, kick) in self.kicks.iter().enumerate() {
            ops.add(Events::with_data(kick, index as u32, EventSet::IN))
                .expect("a fresh eventfd can always join the epoll set");
        }
        if let Some(timer) = &self.timer {
            ops.add(Events::with_data_raw(
                timer.as_raw_fd(),
                TIMER,
                EventSet::IN,
            ))
            .expect("a fresh timerfd can always join the epoll set");
        }
    }
}

#[cfg(test)]
mod tests;
