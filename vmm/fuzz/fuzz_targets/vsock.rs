//! Fuzzes the vsock device from both sides, on its real event loop: the
//! guest's tx packets (any header, payload and descriptor layout) and rx
//! buffers, and the host's ends (the connector's streams, hybrid-socket
//! clients with any handshake bytes, a host socket the guest connects to),
//! which write, read, half-close and hang up, with timeouts short enough to
//! expire.
//!
//! Invariants:
//! - no panic;
//! - connections never exceed MAX_CONNECTIONS;
//! - the device uses only chains the driver made available, tx chains with
//!   length 0, and rx chains with no more than their writable bytes.

#![no_main]

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use libfuzzer_sys::fuzz_target;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm::devices::virtio::vsock::muxer::MAX_CONNECTIONS;
use vmm::devices::virtio::vsock::{
    Timeouts, VsockConnector, VsockDevice, VsockEventHandler, EPHEMERAL_PORT_START,
};
use vmm::devices::virtio::{ActivateContext, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use vmm_fuzz::Input;
use vmm_sys_util::eventfd::EventFd;

const GUEST_CID: u64 = 3;
const MEM_SIZE: u64 = 0x8_0000;
const QSIZE: u16 = 16;
/// Each chain has at most two descriptors: `SLOTS` chains in flight.
const SLOTS: u16 = QSIZE / 2;
const SLOT_SIZE: u64 = 0x2000;
const HDR: usize = 44;
/// Host port of the socket the guest may connect to (`<path>_1234`).
const HOST_PORT: u32 = 1234;
const MAX_STREAMS: usize = 8;

/// The driver side of one split ring: descriptors, avail ring, used ring.
struct Ring {
    base: u64,
    bufs: u64,
    next_avail: u16,
    last_used: u16,
    /// Writable bytes of each chain in flight, by head.
    in_flight: HashMap<u16, u32>,
}

impl Ring {
    fn new(index: u64) -> Self {
        Ring {
            base: index * 0x4000,
            bufs: 0x1_0000 + index * u64::from(SLOTS) * SLOT_SIZE,
            next_avail: 0,
            last_used: 0,
            in_flight: HashMap::new(),
        }
    }

    fn device_queue(&self) -> Queue {
        let mut q = Queue::new(QSIZE).unwrap();
        q.set_size(QSIZE);
        q.set_desc_table_address(Some(self.base as u32), Some(0));
        q.set_avail_ring_address(Some((self.base + 0x1000) as u32), Some(0));
        q.set_used_ring_address(Some((self.base + 0x2000) as u32), Some(0));
        q.set_ready(true);
        q
    }

    fn slot_addr(&self, slot: u16) -> u64 {
        self.bufs + u64::from(slot) * SLOT_SIZE
    }

    /// The slot for the next chain, if one is free.
    fn free_slot(&self) -> Option<u16> {
        (self.in_flight.len() < usize::from(SLOTS)).then(|| {
            (0..SLOTS)
                .find(|s| !self.in_flight.contains_key(&(s * 2)))
                .unwrap()
        })
    }

    /// Makes the chain `descs` (address, length, flags) available in `slot`.
    fn push(&mut self, mem: &GuestMemoryMmap, slot: u16, descs: &[(u64, u32, u16)]) {
        let head = slot * 2;
        let mut writable = 0u32;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let index = head + i as u16;
            let last = i + 1 == descs.len();
            let flags = if last {
                flags
            } else {
                flags | VRING_DESC_F_NEXT as u16
            };
            let at = GuestAddress(self.base + u64::from(index) * 16);
            mem.write_obj(addr, at).unwrap();
            mem.write_obj(len, at.unchecked_add(8)).unwrap();
            mem.write_obj(flags, at.unchecked_add(12)).unwrap();
            mem.write_obj(index + 1, at.unchecked_add(14)).unwrap();
            if flags & VRING_DESC_F_WRITE as u16 != 0 {
                writable = writable.saturating_add(len);
            }
        }
        let ring = self.base + 0x1000 + 4 + u64::from(self.next_avail % QSIZE) * 2;
        mem.write_obj(head, GuestAddress(ring)).unwrap();
        self.next_avail = self.next_avail.wrapping_add(1);
        mem.write_obj(self.next_avail, GuestAddress(self.base + 0x1000 + 2))
            .unwrap();
        self.in_flight.insert(head, writable);
    }

    /// Takes the used entries, checking each against what was made available.
    fn collect(&mut self, mem: &GuestMemoryMmap, tx: bool) {
        let used: u16 = mem.read_obj(GuestAddress(self.base + 0x2000 + 2)).unwrap();
        assert!(
            usize::from(used.wrapping_sub(self.last_used)) <= self.in_flight.len(),
            "more used than available"
        );
        while self.last_used != used {
            let at = self.base + 0x2000 + 4 + u64::from(self.last_used % QSIZE) * 8;
            let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
            let head = u16::try_from(id).expect("a head index");
            let writable = self.in_flight.remove(&head).expect("a chain in flight");
            if tx {
                assert_eq!(len, 0, "tx chains are used with length 0");
            } else {
                assert!(len <= writable, "rx: {len} bytes in {writable}");
            }
            self.last_used = self.last_used.wrapping_add(1);
        }
    }
}

struct Rig {
    mem: GuestMemoryMmap,
    rings: [Ring; 2],
    kicks: Vec<EventFd>,
    em: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
    device: Arc<Mutex<VsockDevice>>,
    connector: VsockConnector,
    streams: Vec<UnixStream>,
}

impl Rig {
    fn run(&mut self) {
        let _ = self.em.run_with_timeout(0);
        let [rx, tx] = &mut self.rings;
        rx.collect(&self.mem, false);
        tx.collect(&self.mem, true);
        assert!(self.device.lock().unwrap().connection_count() <= MAX_CONNECTIONS);
    }

    fn keep(&mut self, stream: UnixStream) {
        let _ = stream.set_nonblocking(true);
        if self.streams.len() < MAX_STREAMS {
            self.streams.push(stream);
        }
    }
}

/// Where the hybrid socket goes, and the host socket the guest may reach.
fn socket_dir() -> &'static (PathBuf, UnixListener) {
    static DIR: OnceLock<(PathBuf, UnixListener)> = OnceLock::new();
    DIR.get_or_init(|| {
        // tmpfs if there is one: each run binds (and removes) the socket.
        let shm = PathBuf::from("/dev/shm");
        let base = if shm.is_dir() {
            shm
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("mempower-vsock-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("v.sock");
        let port = dir.join(format!("v.sock_{HOST_PORT}"));
        let _ = std::fs::remove_file(&port);
        let listener = UnixListener::bind(&port).unwrap();
        listener.set_nonblocking(true).unwrap();
        (path, listener)
    })
}

fn rig() -> Rig {
    let (path, host) = socket_dir();
    // Connections the guest made in an earlier run.
    while host.accept().is_ok() {}
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
    let rings = [Ring::new(0), Ring::new(1)];
    let event = Ring::new(2);
    let kicks: Vec<EventFd> = (0..3)
        .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
        .collect();
    let clones = |k: &Vec<EventFd>| k.iter().map(|e| e.try_clone().unwrap()).collect();
    let mut device = VsockDevice::new(GUEST_CID, Some(path)).unwrap();
    let short = Duration::from_millis(1);
    device.set_timeouts(Timeouts {
        request: short,
        shutdown: short,
        handshake: short,
    });
    let connector = device.connector();
    let device = Arc::new(Mutex::new(device));
    let ctx = ActivateContext {
        mem: vm_memory::GuestMemoryAtomic::new(mem.clone()),
        queues: vec![
            rings[0].device_queue(),
            rings[1].device_queue(),
            event.device_queue(),
        ],
        queue_events: clones(&kicks),
        interrupt: Interrupt::new().unwrap(),
        acked_features: 1 << VIRTIO_F_VERSION_1,
    };
    device.lock().unwrap().activate(ctx).unwrap();
    let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
    let handler = VsockEventHandler::new(device.clone(), clones(&kicks));
    em.add_subscriber(Arc::new(Mutex::new(handler)));
    Rig {
        mem,
        rings,
        kicks,
        em,
        device,
        connector,
        streams: Vec::new(),
    }
}

/// A port: one the device or the fuzzer uses, or any.
fn port(pick: u8, raw: u32) -> u32 {
    match pick % 7 {
        0..=2 => EPHEMERAL_PORT_START + u32::from(pick % 3),
        3 => HOST_PORT,
        4 => 5252,
        5 => 1000 + (raw & 1),
        _ => raw,
    }
}

/// The guest sends one packet through the tx queue.
fn guest_packet(rig: &mut Rig, input: &mut Input) -> Option<()> {
    let bits = input.u8()?;
    let mut hdr = [0u8; HDR];
    let src_cid = if bits & 1 == 0 {
        GUEST_CID
    } else {
        input.u64()?
    };
    let dst_cid = if bits & 2 == 0 { 2 } else { input.u64()? };
    let src_port = port(input.u8()? / 3 + 5, input.u32()?);
    let dst_port = port(input.u8()?, input.u32()?);
    let op = u16::from(input.u8()? % 9);
    let type_ = if bits & 4 == 0 { 1 } else { input.u16()? };
    let flags = u32::from(input.u8()? % 4);
    let buf_alloc = input.u32()?;
    let fwd_cnt = input.u32()?;
    let payload = input.slice(512)?.to_vec();
    let len = if bits & 8 == 0 {
        payload.len() as u32
    } else {
        input.u32()?
    };
    hdr[0..8].copy_from_slice(&src_cid.to_le_bytes());
    hdr[8..16].copy_from_slice(&dst_cid.to_le_bytes());
    hdr[16..20].copy_from_slice(&src_port.to_le_bytes());
    hdr[20..24].copy_from_slice(&dst_port.to_le_bytes());
    hdr[24..28].copy_from_slice(&len.to_le_bytes());
    hdr[28..30].copy_from_slice(&type_.to_le_bytes());
    hdr[30..32].copy_from_slice(&op.to_le_bytes());
    hdr[32..36].copy_from_slice(&flags.to_le_bytes());
    hdr[36..40].copy_from_slice(&buf_alloc.to_le_bytes());
    hdr[40..44].copy_from_slice(&fwd_cnt.to_le_bytes());

    let ring = &mut rig.rings[1];
    let slot = ring.free_slot()?;
    let addr = ring.slot_addr(slot);
    rig.mem.write_slice(&hdr, GuestAddress(addr)).unwrap();
    rig.mem
        .write_slice(&payload, GuestAddress(addr + 64))
        .unwrap();
    let plen = payload.len() as u32;
    let layout: Vec<(u64, u32, u16)> = match (bits >> 4) % 6 {
        0 => vec![(addr, HDR as u32, 0), (addr + 64, plen, 0)],
        1 => {
            rig.mem
                .write_slice(&payload, GuestAddress(addr + HDR as u64))
                .unwrap();
            vec![(addr, HDR as u32 + plen, 0)]
        }
        2 => vec![(addr, HDR as u32, 0)],
        3 => vec![(addr, u32::from(input.u8()?), 0), (addr + 64, plen, 0)],
        4 => vec![
            (addr, HDR as u32, VRING_DESC_F_WRITE as u16),
            (addr + 64, plen, 0),
        ],
        _ => vec![
            (input.u64()?, HDR as u32, 0),
            (input.u64()?, input.u32()?, 0),
        ],
    };
    ring.push(&rig.mem, slot, &layout);
    rig.kicks[1].write(1).unwrap();
    Some(())
}

/// The guest posts one rx buffer.
fn guest_rx_buffer(rig: &mut Rig, input: &mut Input) -> Option<()> {
    let shape = input.u8()?;
    let ring = &mut rig.rings[0];
    let slot = ring.free_slot()?;
    let addr = ring.slot_addr(slot);
    let w = VRING_DESC_F_WRITE as u16;
    let layout: Vec<(u64, u32, u16)> = match shape % 5 {
        0 => vec![(addr, HDR as u32, w), (addr + 64, 4096, w)],
        1 => vec![(addr, HDR as u32 + u32::from(input.u16()? % 4096), w)],
        2 => vec![(addr, u32::from(input.u8()?), w)],
        3 => vec![(addr, HDR as u32, 0), (addr + 64, 4096, w)],
        _ => vec![(input.u64()?, input.u32()?, w)],
    };
    ring.push(&rig.mem, slot, &layout);
    rig.kicks[0].write(1).unwrap();
    Some(())
}

fn host_step(rig: &mut Rig, input: &mut Input) -> Option<()> {
    match input.u8()? % 7 {
        0 => {
            let port = port(input.u8()? % 7 + 3, input.u32()?);
            if let Ok(stream) = rig.connector.connect(port) {
                rig.keep(stream);
            }
        }
        1 => {
            let (path, _) = socket_dir();
            if let Ok(mut client) = UnixStream::connect(path) {
                let _ = client.set_nonblocking(true);
                if input.u8()? & 1 == 0 {
                    let port = port(input.u8()? % 7 + 3, input.u32()?);
                    let _ = client.write_all(format!("CONNECT {port}\n").as_bytes());
                }
                let _ = client.write_all(input.slice(64)?);
                rig.keep(client);
            }
        }
        2 => {
            if let Ok((stream, _)) = socket_dir().1.accept() {
                rig.keep(stream);
            }
        }
        step => {
            let i = usize::from(input.u8()?);
            let n = rig.streams.len();
            if n == 0 {
                return Some(());
            }
            let stream = &mut rig.streams[i % n];
            match step {
                3 => {
                    let data = input.slice(255)?;
                    let _ = stream.write(data);
                }
                4 => {
                    let mut buf = [0u8; 8192];
                    loop {
                        match stream.read(&mut buf) {
                            Ok(0) => break,
                            Ok(_) => {}
                            Err(e) if e.kind() == ErrorKind::Interrupted => {}
                            Err(_) => break,
                        }
                    }
                }
                5 => {
                    let _ = stream.shutdown(Shutdown::Write);
                }
                _ => {
                    rig.streams.swap_remove(i % n);
                }
            }
        }
    }
    Some(())
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let mut rig = rig();
    let mut naps = 0;
    while let Some(op) = input.u8() {
        let done = match op % 8 {
            0..=2 => guest_packet(&mut rig, &mut input),
            3 | 4 => guest_rx_buffer(&mut rig, &mut input),
            5 | 6 => host_step(&mut rig, &mut input),
            _ => {
                // Let the short timeouts expire, twice at most: it is slow.
                if op == u8::MAX && naps < 2 {
                    naps += 1;
                    std::thread::sleep(Duration::from_millis(2));
                }
                Some(())
            }
        };
        rig.run();
        if done.is_none() {
            break;
        }
    }
    for _ in 0..4 {
        rig.run();
    }
});
