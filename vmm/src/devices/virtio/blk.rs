//! A disk: the `virtio-blk` crate's device model over a raw image file, on the
//! virtio-mmio transport, and the event-loop subscriber that serves its request queue,
//! so that the file I/O runs on the event-loop thread, never on a vCPU thread.

use virtio_blk::{DiskConfig, MetricsSnapshot, RawFile, RoundBudget, VirtioBlk};
use vm_memory::GuestAddressSpace;

use super::kick::{KickHandler, Round, ServeQueue};
use super::{
    ActivateContext, ActivateError, FeaturesRefused, GuestMemoryView, Interrupt, VirtioDevice,
};

#[derive(Debug, thiserror::Error)]
pub enum BlkDeviceError {
    #[error("disk {path}: {source}")]
    Open {
        path: String,
        source: virtio_blk::Error,
    },
}

/// One `--disk`.
pub struct BlkDevice {
    model: VirtioBlk<RawFile>,
    /// Set at activation: the queue runs against this memory and signals this interrupt.
    /// Guest memory is reached only through it, in `process_queue` and `activate`; it
    /// holds no released region. Dropped when the queue turns out unusable, until the
    /// driver resets the device.
    running: Option<(GuestMemoryView, Interrupt)>,
}

impl BlkDevice {
    /// Opens (and locks) the image `config` names.
    pub fn open(config: &DiskConfig) -> Result<Self, BlkDeviceError> {
        let model = VirtioBlk::open(config).map_err(|source| BlkDeviceError::Open {
            path: config.path.display().to_string(),
            source,
        })?;
        log::info!(
            "disk {}: {} MiB{}, id {}",
            config.path.display(),
            model.capacity() >> 11,
            if model.read_only() { ", read-only" } else { "" },
            model.id()
        );
        Ok(BlkDevice {
            model,
            running: None,
        })
    }

    /// Serves one round of pending requests, at most [`RoundBudget::EVENT_LOOP`] (the
    /// I/O is synchronous, on the event loop), and interrupts the guest if it needs to
    /// know. [`Round::More`]: requests may be pending, the guest will not kick for them.
    ///
    /// Bad requests get error answers; an error here is the queue itself, so the device
    /// stops and asks the driver for a reset (DEVICE_NEEDS_RESET), as virtio-mem does.
    pub fn process_queue(&mut self) -> Round {
        let Some((view, interrupt)) = &self.running else {
            return Round::Done; // A kick before DRIVER_OK, after a reset, or while one is needed.
        };
        // This round's map of guest memory, dropped at its end (see `memory::slots`).
        let outcome = self
            .model
            .process_queue_within(&*view.memory(), &RoundBudget::EVENT_LOOP);
        let more = outcome.as_ref().is_ok_and(|o| o.more);
        let id = self.model.id();
        let served = outcome.map(|o| o.needs_notification);
        if !interrupt.queue_served(served, || format!("virtio-blk {id}")) {
            self.running = None;
            return Round::Done;
        }
        if more {
            Round::More
        } else {
            Round::Done
        }
    }

    /// The disk's request counters.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.model.metrics().snapshot()
    }
}

impl VirtioDevice for BlkDevice {
    fn device_type(&self) -> u32 {
        self.model.device_type()
    }

    fn queue_max_sizes(&self) -> &[u16] {
        self.model.queue_max_sizes()
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

    fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        let queue = ctx
            .queues
            .pop()
            .ok_or_else(|| ActivateError::Device("virtio-blk needs its request queue".into()))?;
        self.model
            .activate(queue, &*ctx.mem.memory())
            .map_err(|e| ActivateError::Device(e.to_string()))?;
        self.running = Some((ctx.mem, ctx.interrupt));
        Ok(())
    }

    fn reset(&mut self) {
        // Requests run to completion inside process_queue: nothing is in flight.
        self.model.reset();
        self.running = None;
    }
}

/// Serves the request queue when the guest kicks it (the queue's ioeventfd).
pub type BlkQueueHandler = KickHandler<BlkDevice>;

impl ServeQueue for BlkDevice {
    fn serve_queue(&mut self) {
        while self.process_queue() == Round::More {}
    }

    fn serve_round(&mut self) -> Round {
        self.process_queue()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::mmio::MmioTransport;
    use crate::devices::virtio::test_utils::{driver_ok, negotiate, setup_queue, V1};
    use crate::devices::virtio::{INTERRUPT_USED_RING, TYPE_BLOCK};
    use std::sync::{Arc, Mutex};
    use virtio_bindings::virtio_blk::VIRTIO_BLK_F_RO;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const NEXT: u16 = 1;
    const WRITE: u16 = 2;

    /// A 4-sector image whose sector `n` is filled with byte `n + 1`.
    fn image(name: &str) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("mempower-blk-{name}-{}", std::process::id()));
        let bytes: Vec<u8> = (0..4u8).flat_map(|s| [s + 1; 512]).collect();
        std::fs::write(&path, bytes).unwrap();
        path
    }

    /// Plays the guest's driver: writes a 3-descriptor request (header, 512-byte data,
    /// status) at ring slot `slot` and publishes it.
    fn request(mem: &GuestMemoryMmap, slot: u16, kind: u32, sector: u64) {
        let base = 0x4000 + u64::from(slot) * 0x1000;
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&kind.to_le_bytes());
        header[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&header, GuestAddress(base)).unwrap();
        let data_flags = if kind == 0 { WRITE } else { 0 };
        let descs = [
            (base, 16u32, NEXT),
            (base + 0x100, 512, NEXT | data_flags),
            (base + 0x800, 1, WRITE),
        ];
        for (i, (addr, len, flags)) in descs.into_iter().enumerate() {
            let index = slot * 3 + i as u16;
            let at = DESC + u64::from(index) * 16;
            mem.write_obj(addr, GuestAddress(at)).unwrap();
            mem.write_obj(len, GuestAddress(at + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
            mem.write_obj(index + 1, GuestAddress(at + 14)).unwrap();
        }
        mem.write_obj(slot * 3, GuestAddress(AVAIL + 4 + u64::from(slot) * 2))
            .unwrap();
        mem.write_obj(slot + 1, GuestAddress(AVAIL + 2)).unwrap();
    }

    fn status(mem: &GuestMemoryMmap, slot: u16) -> u8 {
        mem.read_obj(GuestAddress(0x4800 + u64::from(slot) * 0x1000))
            .unwrap()
    }

    /// A disk over `path` that a driver set up on the MMIO transport: VERSION_1 only
    /// (so writes are write-through), a 16-entry queue.
    fn running(path: &std::path::Path) -> (Arc<Mutex<BlkDevice>>, GuestMemoryMmap, MmioTransport) {
        let device = Arc::new(Mutex::new(BlkDevice::open(&DiskConfig::new(path)).unwrap()));
        let mem = crate::devices::virtio::test_utils::memory();
        let mut t =
            MmioTransport::new(device.clone(), GuestMemoryAtomic::new(mem.clone())).unwrap();
        negotiate(&mut t, V1);
        setup_queue(&mut t, 16, DESC, AVAIL, USED);
        driver_ok(&mut t);
        (device, mem, t)
    }

    #[test]
    fn a_disk_serves_the_guest_through_the_mmio_transport() {
        let path = image("rw");
        let (device, mem, t) = running(&path);
        assert_eq!(device.lock().unwrap().device_type(), TYPE_BLOCK);
        let mut capacity = [0u8; 8];
        device.lock().unwrap().read_config(0, &mut capacity);
        assert_eq!(u64::from_le_bytes(capacity), 4);
        assert!(t.is_activated());

        // Read sector 2, then write sector 1, then read past the end.
        request(&mem, 0, 0, 2);
        device.lock().unwrap().process_queue();
        let mut data = [0u8; 512];
        mem.read_slice(&mut data, GuestAddress(0x4100)).unwrap();
        assert_eq!(data, [3u8; 512]);
        assert_eq!(status(&mem, 0), 0, "VIRTIO_BLK_S_OK");
        assert_ne!(t.interrupt().status() & INTERRUPT_USED_RING, 0);

        mem.write_slice(&[0xee; 512], GuestAddress(0x5100)).unwrap();
        request(&mem, 1, 1, 1);
        request(&mem, 2, 0, 4);
        // Write-through (no FLUSH negotiated): one durable write a round.
        device.lock().unwrap().serve_queue();
        assert_eq!(status(&mem, 1), 0);
        assert_eq!(status(&mem, 2), 1, "VIRTIO_BLK_S_IOERR past the end");
        let used_idx: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
        assert_eq!(used_idx, 3);
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(&on_disk[512..1024], &[0xee; 512]);
        assert_eq!(&on_disk[1024..1536], &[3; 512], "other sectors untouched");
        let m = device.lock().unwrap().metrics();
        assert_eq!((m.read_ops, m.write_ops, m.write_bytes), (1, 1, 512));

        // After a reset a kick serves nothing and breaks nothing.
        device.lock().unwrap().reset();
        request(&mem, 3, 0, 0);
        device.lock().unwrap().process_queue();
        assert_eq!(mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap(), 3);
        std::fs::remove_file(&path).unwrap();
    }

    /// A guest writing flat out with write-through (no FLUSH negotiated) gets one
    /// durable write per event-loop turn, not the whole queue at once.
    #[test]
    fn a_round_stops_at_its_budget_and_asks_to_come_back() {
        let path = image("budget");
        let (device, mem, _t) = running(&path);
        for slot in 0..3 {
            mem.write_slice(
                &[0xa0 + slot as u8; 512],
                GuestAddress(0x4100 + u64::from(slot) * 0x1000),
            )
            .unwrap();
            request(&mem, slot, 1, u64::from(slot));
        }
        let used = || mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap();
        let mut rounds = vec![];
        loop {
            let round = device.lock().unwrap().serve_round();
            rounds.push((round, used()));
            if round == Round::Done {
                break;
            }
        }
        assert_eq!(
            rounds,
            [
                (Round::More, 1),
                (Round::More, 2),
                (Round::More, 3),
                (Round::Done, 3)
            ]
        );
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(&on_disk[1024..1536], &[0xa2; 512]);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_read_only_disk_says_so_and_refuses_writes() {
        let path = image("ro");
        let config = DiskConfig {
            readonly: true,
            id: Some("root".into()),
            ..DiskConfig::new(&path)
        };
        let device = Arc::new(Mutex::new(BlkDevice::open(&config).unwrap()));
        assert_ne!(device.lock().unwrap().features() & 1 << VIRTIO_BLK_F_RO, 0);
        let mem = crate::devices::virtio::test_utils::memory();
        let mut t =
            MmioTransport::new(device.clone(), GuestMemoryAtomic::new(mem.clone())).unwrap();
        negotiate(&mut t, V1 | 1 << VIRTIO_BLK_F_RO);
        setup_queue(&mut t, 16, DESC, AVAIL, USED);
        driver_ok(&mut t);
        request(&mem, 0, 1, 0);
        device.lock().unwrap().process_queue();
        assert_eq!(status(&mem, 0), 1, "IOERR");
        assert_eq!(std::fs::read(&path).unwrap()[0], 1, "nothing written");
        std::fs::remove_file(&path).unwrap();

        let missing = BlkDevice::open(&DiskConfig::new("/nonexistent/disk.img"));
        let err = missing.err().expect("a missing image is refused");
        assert!(err.to_string().contains("/nonexistent/disk.img"), "{err}");
    }
}
