//! A mock guest driver for the vsock tests: split rings built with `MockSplitQueue` in a
//! `GuestMemoryMmap`, a device activated on them, and the device's event handler on a
//! real event-manager loop (no KVM).
//!
//! `MockSplitQueue` puts its used ring over the second half of its avail ring, so each
//! queue's used ring lives at a separate address, which the device's queue is given and
//! the driver reads.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use virtio_vsock::packet::PKT_HEADER_SIZE;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::connection::Timeouts;
use super::defs::*;
use super::header::Hdr;
use super::{VsockConnector, VsockDevice, VsockEventHandler, VSOCK_HOST_CID};
use crate::devices::virtio::{
    ActivateContext, GuestMemoryView, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1,
};

pub const GUEST_CID: u64 = 3;
pub const MEM_SIZE: usize = 8 << 20;
/// The last MiB of memory is a region of its own (only the unused event queue's buffers
/// are there), which a test can take out of the device's view, as a released region.
pub const SPARE_REGION: u64 = 7 << 20;
/// Ring size the driver uses (the device allows 256).
pub const QSIZE: u16 = 64;
/// Each chain uses descriptors 2s and 2s+1 and the buffers of slot s.
const SLOTS: u16 = QSIZE / 2;
const SLOT_SIZE: u64 = 0x11000;
/// Payload room of the rx buffers the driver posts.
pub const RX_DATA: u32 = 4096;
/// Rx buffers the driver keeps posted, unless a test says otherwise.
const RX_POSTED: u16 = 16;

pub struct DriverQueue {
    vq: MockSplitQueue<'static, GuestMemoryMmap>,
    used_ring: u64,
    bufs: u64,
    next: u16,
    last_used: u16,
}

impl DriverQueue {
    fn new(mem: &'static GuestMemoryMmap, base: u64, used_ring: u64, bufs: u64) -> Self {
        DriverQueue {
            vq: MockSplitQueue::create(mem, GuestAddress(base), QSIZE),
            used_ring,
            bufs,
            next: 0,
            last_used: 0,
        }
    }

    fn device_queue(&self) -> Queue {
        let mut q: Queue = self.vq.create_queue().unwrap();
        q.set_used_ring_address(Some(self.used_ring as u32), Some(0));
        q
    }

    fn slot_addr(&self, slot: u16) -> u64 {
        self.bufs + u64::from(slot) * SLOT_SIZE
    }

    fn outstanding(&self, mem: &GuestMemoryMmap) -> u16 {
        self.next.wrapping_sub(self.used_idx(mem))
    }

    fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.used_ring + 2)).unwrap()
    }

    /// Publishes a chain of `(addr, len, device_writable)` descriptors (at most two);
    /// returns its slot.
    pub fn push(&mut self, descs: &[(u64, u32, bool)]) -> u16 {
        assert!(descs.len() <= 2);
        let slot = self.next % SLOTS;
        for (i, &(addr, len, writable)) in descs.iter().enumerate() {
            let mut flags = if writable {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            let index = slot * 2 + i as u16;
            if i + 1 < descs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let desc = SplitDescriptor::new(addr, len, flags, index + 1);
            self.vq
                .desc_table()
                .store(index, RawDescriptor::from(desc))
                .unwrap();
        }
        let avail = self.vq.avail();
        avail
            .ring()
            .ref_at(usize::from(self.next % QSIZE))
            .unwrap()
            .store(slot * 2);
        self.next = self.next.wrapping_add(1);
        avail.idx().store(self.next);
        slot
    }

    /// New used entries: `(slot, len)`.
    pub fn take_used(&mut self, mem: &GuestMemoryMmap) -> Vec<(u16, u32)> {
        let idx = self.used_idx(mem);
        let mut out = Vec::new();
        while self.last_used != idx {
            let at = self.used_ring + 4 + u64::from(self.last_used % QSIZE) * 8;
            let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
            out.push(((id / 2) as u16, len));
            self.last_used = self.last_used.wrapping_add(1);
        }
        out
    }
}

pub struct Rig {
    pub mem: &'static GuestMemoryMmap,
    /// The device's view of `mem`.
    pub view: GuestMemoryView,
    pub rx: DriverQueue,
    pub tx: DriverQueue,
    pub kicks: Vec<EventFd>,
    pub irq: Interrupt,
    pub dev: Arc<Mutex<VsockDevice>>,
    pub em: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
    pub connector: VsockConnector,
    /// Packets received and not yet looked at.
    pub inbox: Vec<(Hdr, Vec<u8>)>,
    /// Rx buffers to keep posted.
    pub rx_posted: u16,
    /// Rx buffers the device returned without a packet.
    pub empty_used: usize,
}

impl Rig {
    pub fn new(socket: Option<&Path>) -> Rig {
        Self::with_timeouts(socket, Timeouts::default())
    }

    pub fn with_timeouts(socket: Option<&Path>, timeouts: Timeouts) -> Rig {
        let spare = SPARE_REGION as usize;
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
            GuestMemoryMmap::from_ranges(&[
                (GuestAddress(0), spare),
                (GuestAddress(SPARE_REGION), MEM_SIZE - spare),
            ])
            .unwrap(),
        ));
        let view = GuestMemoryView::new(mem.clone());
        let rx = DriverQueue::new(mem, 0, 0x8000, 0x10_0000);
        let tx = DriverQueue::new(mem, 0x1_0000, 0x1_8000, 0x40_0000);
        let ev = DriverQueue::new(mem, 0x2_0000, 0x2_8000, 0x70_0000);
        let kicks: Vec<EventFd> = (0..3)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        let irq = Interrupt::new().unwrap();
        let mut device = VsockDevice::new(GUEST_CID, socket).unwrap();
        device.set_timeouts(timeouts);
        let connector = device.connector();
        let dev = Arc::new(Mutex::new(device));
        let clones = |k: &Vec<EventFd>| -> Vec<EventFd> {
            k.iter().map(|e| e.try_clone().unwrap()).collect()
        };
        let ctx = ActivateContext {
            mem: view.clone(),
            queues: vec![rx.device_queue(), tx.device_queue(), ev.device_queue()],
            queue_events: clones(&kicks),
            interrupt: irq.clone(),
            acked_features: 1 << VIRTIO_F_VERSION_1,
        };
        dev.lock().unwrap().activate(ctx).unwrap();
        let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
        let handler = VsockEventHandler::new(dev.clone(), clones(&kicks));
        em.add_subscriber(Arc::new(Mutex::new(handler)));
        let mut rig = Rig {
            mem,
            view,
            rx,
            tx,
            kicks,
            irq,
            dev,
            em,
            connector,
            inbox: Vec::new(),
            rx_posted: RX_POSTED,
            empty_used: 0,
        };
        rig.refill_rx();
        rig
    }

    /// Keeps `rx_posted` rx buffers posted (header and payload descriptors).
    pub fn refill_rx(&mut self) {
        let mut added = false;
        while self.rx.outstanding(self.mem) < self.rx_posted {
            let slot = self.rx.next % SLOTS;
            let hdr = self.rx.slot_addr(slot);
            self.rx.push(&[
                (hdr, PKT_HEADER_SIZE as u32, true),
                (hdr + 64, RX_DATA, true),
            ]);
            added = true;
        }
        if added {
            self.kicks[0].write(1).unwrap();
        }
    }

    /// Runs the event loop once (up to 10 ms), then collects what the device sent.
    pub fn step(&mut self) {
        self.em.run_with_timeout(10).unwrap();
        for (slot, len) in self.rx.take_used(self.mem) {
            if (len as usize) < PKT_HEADER_SIZE {
                self.empty_used += 1;
                continue;
            }
            let addr = self.rx.slot_addr(slot);
            let mut b = [0u8; PKT_HEADER_SIZE];
            self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
            let hdr = Hdr::from_bytes(&b);
            assert_eq!(len as usize, PKT_HEADER_SIZE + hdr.len as usize);
            let mut data = vec![0u8; hdr.len as usize];
            self.mem
                .read_slice(&mut data, GuestAddress(addr + 64))
                .unwrap();
            self.inbox.push((hdr, data));
        }
        self.refill_rx();
    }

    /// Steps until `cond` holds (true) or 5 s passed (false).
    pub fn run_until(&mut self, mut cond: impl FnMut(&mut Rig) -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if cond(self) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            self.step();
        }
    }

    /// Steps for `ms` milliseconds.
    pub fn settle(&mut self, ms: u64) {
        let end = Instant::now() + Duration::from_millis(ms);
        while Instant::now() < end {
            self.step();
        }
    }

    /// The first received packet `pred` accepts (removed from the inbox).
    pub fn expect(&mut self, what: &str, pred: impl Fn(&Hdr) -> bool) -> (Hdr, Vec<u8>) {
        let found = self.run_until(|r| r.inbox.iter().any(|(h, _)| pred(h)));
        assert!(found, "no {what} from the device; got {:?}", self.inbox);
        let i = self.inbox.iter().position(|(h, _)| pred(h)).unwrap();
        self.inbox.remove(i)
    }

    /// Puts a raw chain on the rx queue and kicks it.
    pub fn post_raw_rx(&mut self, descs: &[(u64, u32, bool)]) {
        self.rx.push(descs);
        self.kicks[0].write(1).unwrap();
    }

    /// Puts a raw chain on the tx queue and kicks it.
    pub fn send_raw(&mut self, descs: &[(u64, u32, bool)]) {
        self.tx.push(descs);
        self.kicks[1].write(1).unwrap();
    }

    /// The tx slot the next chain uses, to write its buffers first.
    pub fn tx_slot_addr(&self) -> u64 {
        self.tx.slot_addr(self.tx.next % SLOTS)
    }

    /// Sends a packet (header, then payload in a second descriptor if any).
    pub fn send(&mut self, hdr: &Hdr, data: &[u8]) {
        let addr = self.tx_slot_addr();
        self.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(addr))
            .unwrap();
        if data.is_empty() {
            self.send_raw(&[(addr, PKT_HEADER_SIZE as u32, false)]);
        } else {
            self.mem.write_slice(data, GuestAddress(addr + 64)).unwrap();
            self.send_raw(&[
                (addr, PKT_HEADER_SIZE as u32, false),
                (addr + 64, data.len() as u32, false),
            ]);
        }
    }

    /// Steps until the host end has `n` bytes (or EOF, or 5 s).
    pub fn host_read(&mut self, stream: &mut UnixStream, n: usize) -> Vec<u8> {
        use std::io::Read;
        stream.set_nonblocking(true).unwrap();
        let mut out = Vec::new();
        let mut eof = false;
        self.run_until(|_| {
            let mut buf = [0u8; 4096];
            while out.len() < n {
                match stream.read(&mut buf[..(n - out.len()).min(4096)]) {
                    Ok(0) => {
                        eof = true;
                        break;
                    }
                    Ok(k) => out.extend_from_slice(&buf[..k]),
                    Err(_) => break,
                }
            }
            eof || out.len() >= n
        });
        out
    }

    /// Steps until the host end reads EOF; false if it did not within 5 s.
    pub fn host_sees_eof(&mut self, stream: &mut UnixStream) -> bool {
        use std::io::Read;
        stream.set_nonblocking(true).unwrap();
        self.run_until(|_| {
            let mut buf = [0u8; 4096];
            loop {
                match stream.read(&mut buf) {
                    Ok(0) => return true,
                    Ok(_) => continue,
                    Err(_) => return false,
                }
            }
        })
    }
}

/// A packet from the guest (`src` guest port, `dst` host port).
pub fn from_guest(op: u16, src: u32, dst: u32) -> Hdr {
    Hdr {
        src_cid: GUEST_CID,
        dst_cid: VSOCK_HOST_CID,
        src_port: src,
        dst_port: dst,
        type_: TYPE_STREAM,
        op,
        buf_alloc: 256 * 1024,
        ..Hdr::default()
    }
}
