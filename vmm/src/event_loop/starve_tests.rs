//! The event loop cannot be starved: a guest writing to its disk flat out, with the
//! ring always full, while a client polls `GET /api/v1/vm` and another scrapes
//! `/metrics`, on a real event loop behind a real API socket.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_blk::VIRTIO_BLK_F_FLUSH;
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::api_tests::{Subscriber, Vmm};
use crate::devices::virtio::blk::{BlkDevice, BlkQueueHandler};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::test_utils::{driver_ok, negotiate, setup_queue, V1};

const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const HEADERS: u64 = 0x1_0000;
const DATA: u64 = 0x10_0000;
const QUEUE: u16 = 256;
/// Requests in flight: three descriptors each, the whole table.
const CHAINS: u16 = 85;
/// Bytes each request moves.
const CHUNK: u32 = 256 << 10;
/// Every this many requests, one is a FLUSH (the guest negotiated it, as Linux does).
const FLUSH_EVERY: u16 = 8;
const NEXT: u16 = 1;
const WRITE: u16 = 2;

/// The guest's driver: `CHAINS` requests, each put back on the ring as soon as it is
/// used, and a kick each time: the ring is never empty while it runs.
fn flood(mem: GuestMemoryMmap, kick: EventFd, stop: Arc<AtomicBool>) -> thread::JoinHandle<u64> {
    for chain in 0..CHAINS {
        let header = HEADERS + u64::from(chain) * 32;
        let flush = chain % FLUSH_EVERY == FLUSH_EVERY - 1;
        let kind: u32 = if flush { 4 } else { 1 };
        let sector = u64::from(chain) * u64::from(CHUNK) / 512;
        let mut bytes = [0u8; 16];
        bytes[..4].copy_from_slice(&kind.to_le_bytes());
        bytes[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&bytes, GuestAddress(header)).unwrap();
        let data = DATA + u64::from(chain) * u64::from(CHUNK);
        let data_flags = if flush { NEXT | WRITE } else { NEXT };
        let descs = [
            (header, 16, NEXT),
            (data, CHUNK, data_flags),
            (header + 16, 1, WRITE),
        ];
        for (i, (addr, len, flags)) in descs.into_iter().enumerate() {
            let index = chain * 3 + i as u16;
            let at = DESC + u64::from(index) * 16;
            mem.write_obj(addr, GuestAddress(at)).unwrap();
            mem.write_obj(len, GuestAddress(at + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
            mem.write_obj(index + 1, GuestAddress(at + 14)).unwrap();
        }
        let slot = AVAIL + 4 + u64::from(chain) * 2;
        mem.write_obj(chain * 3, GuestAddress(slot)).unwrap();
    }
    mem.write_obj(CHAINS, GuestAddress(AVAIL + 2)).unwrap();
    kick.write(1).unwrap();
    thread::spawn(move || {
        let (mut seen, mut avail) = (0u16, CHAINS);
        let mut served = 0u64;
        while !stop.load(Ordering::SeqCst) {
            let used: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
            if used == seen {
                thread::sleep(Duration::from_micros(100));
                continue;
            }
            while seen != used {
                let at = USED + 4 + u64::from(seen % QUEUE) * 8;
                let head: u32 = mem.read_obj(GuestAddress(at)).unwrap();
                let slot = AVAIL + 4 + u64::from(avail % QUEUE) * 2;
                mem.write_obj(head as u16, GuestAddress(slot)).unwrap();
                (seen, avail) = (seen.wrapping_add(1), avail.wrapping_add(1));
                served += 1;
            }
            mem.write_obj(avail, GuestAddress(AVAIL + 2)).unwrap();
            kick.write(1).unwrap();
        }
        served
    })
}

/// A request slower than this fails the test (the p99 bound is far below).
const TIMEOUT: Duration = Duration::from_secs(2);

struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// The `q` quantile of sorted `samples`.
fn quantile(samples: &[Duration], q: f64) -> Duration {
    samples[((samples.len() - 1) as f64 * q).round() as usize]
}

#[test]
fn a_guest_writing_its_disk_flat_out_does_not_delay_the_api() {
    // The image is a memfd: the round's own cost, without loading the host's disk.
    let size = u64::from(CHAINS) * u64::from(CHUNK);
    let file =
        virtio_mem::memfd::create("starve-disk", size, virtio_mem::memfd::Pages::Small).unwrap();
    let image = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&file));
    let disk = BlkDevice::open(&virtio_blk::DiskConfig::new(&image)).unwrap();
    let device = Arc::new(Mutex::new(disk));
    let size = (DATA + u64::from(CHAINS) * u64::from(CHUNK)) as usize;
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap();
    let mut t = MmioTransport::new(device.clone(), GuestMemoryAtomic::new(mem.clone())).unwrap();
    negotiate(&mut t, V1 | 1 << VIRTIO_BLK_F_FLUSH);
    setup_queue(&mut t, u32::from(QUEUE), DESC, AVAIL, USED);
    driver_ok(&mut t);
    let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let guest_kick = kick.try_clone().unwrap();
    let handler: Subscriber = Arc::new(Mutex::new(BlkQueueHandler::new(device.clone(), kick)));
    let vmm = Vmm::start_with(Duration::ZERO, vec![handler]);

    let stop = Arc::new(AtomicBool::new(false));
    // A failed request ends the test at once: the guest and the scraper stop with it.
    let _stop_on_failure = StopOnDrop(stop.clone());
    let guest = flood(mem, guest_kick, stop.clone());
    let scraper = {
        let (socket, stop) = (vmm.socket.clone(), stop.clone());
        thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let got = mempower_api::client::request_with_timeout(
                    &socket, "GET", "/metrics", None, TIMEOUT,
                );
                assert_eq!(got.map(|r| r.status).ok(), Some(200));
            }
        })
    };
    thread::sleep(Duration::from_millis(200)); // The disk is busy now.
    let mut samples = Vec::new();
    for _ in 0..300 {
        let started = Instant::now();
        let got = mempower_api::client::request_with_timeout(
            &vmm.socket,
            "GET",
            "/api/v1/vm",
            None,
            TIMEOUT,
        );
        samples.push(started.elapsed());
        assert_eq!(got.map(|r| r.status).ok(), Some(200));
    }
    stop.store(true, Ordering::SeqCst);
    let served = guest.join().unwrap();
    scraper.join().unwrap();
    samples.sort();
    let (p50, p99, max) = (
        quantile(&samples, 0.5),
        quantile(&samples, 0.99),
        samples[samples.len() - 1],
    );
    let m = device.lock().unwrap().metrics();
    println!(
        "GET /api/v1/vm under disk load: p50 {p50:?}, p99 {p99:?}, max {max:?}; the disk \
         served {served} requests ({} MiB written, {} flushes)",
        m.write_bytes >> 20,
        m.flush_ops
    );
    assert!(served > u64::from(CHAINS), "the disk kept going: {served}");
    assert!(p99 < Duration::from_millis(50), "p99 {p99:?}");
}
