//! The virtio-vsock device model: configuration space, activation, and the work on its
//! rx and tx queues (the event queue is never used).

use std::path::Path;
use std::time::Instant;

use virtio_queue::{DescriptorChain, Queue, QueueT};
use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vm_memory::{Bytes, GuestAddressSpace, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::header::Hdr;
use super::hybrid::HybridListener;
use super::muxer::Muxer;
use super::{Timeouts, VsockConnector, VsockError, MAX_PKT_DATA, QUEUE_SIZE, RX_QUEUE, TX_QUEUE};
use crate::devices::virtio::{
    ActivateContext, ActivateError, FeaturesRefused, GuestMemoryView, Interrupt, VirtioDevice,
    TYPE_VSOCK,
};

const QUEUE_SIZES: [u16; 3] = [QUEUE_SIZE; 3];

/// What the device runs with between activation and reset.
struct Running {
    /// Taken once per round: buffers in regions the guest unplugged are refused.
    mem: GuestMemoryView,
    rx: Queue,
    tx: Queue,
    /// To come back to the tx queue when one round did not empty it.
    tx_kick: EventFd,
    interrupt: Interrupt,
}

/// The virtio-vsock device. Wrap it in `Arc<Mutex<_>>`: the transport and the
/// [`VsockEventHandler`](super::VsockEventHandler) share it.
pub struct VsockDevice {
    cid: u64,
    muxer: Muxer,
    running: Option<Running>,
    acked_features: u64,
    /// Payload bounce buffer, at most [`MAX_PKT_DATA`] bytes.
    scratch: Vec<u8>,
}

impl std::fmt::Debug for VsockDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VsockDevice")
            .field("cid", &self.cid)
            .field("active", &self.running.is_some())
            .field("connections", &self.muxer.connection_count())
            .finish()
    }
}

impl VsockDevice {
    /// A device for guest CID `cid`. With `socket`, also listens there for hybrid
    /// clients (`CONNECT <port>\n`) and lets the guest reach host sockets `<socket>_<port>`;
    /// the socket file is created mode 0600 (a stale one is replaced) and removed when the
    /// device is dropped.
    pub fn new(cid: u64, socket: Option<&Path>) -> Result<Self, VsockError> {
        if cid <= 2 || cid >= u64::from(u32::MAX) {
            return Err(VsockError::InvalidCid(cid));
        }
        let listener = socket.map(HybridListener::bind).transpose()?;
        Ok(VsockDevice {
            cid,
            muxer: Muxer::new(cid, listener)?,
            running: None,
            acked_features: 0,
            scratch: Vec::with_capacity(MAX_PKT_DATA as usize),
        })
    }

    pub fn cid(&self) -> u64 {
        self.cid
    }

    /// A handle that opens host-initiated connections, from any thread.
    pub fn connector(&self) -> VsockConnector {
        self.muxer.connector()
    }

    pub fn is_active(&self) -> bool {
        self.running.is_some()
    }

    /// Open connections, in any state.
    pub fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }

    /// Changes the timeouts (defaults: 2 s each) for connections opened from now on.
    pub fn set_timeouts(&mut self, timeouts: Timeouts) {
        self.muxer.set_timeouts(timeouts);
    }

    pub(crate) fn muxer(&mut self) -> &mut Muxer {
        &mut self.muxer
    }

    /// Takes every packet the guest queued for the host.
    pub(crate) fn process_tx(&mut self, now: Instant) {
        let Some(run) = self.running.as_mut() else {
            return; // A kick before DRIVER_OK or after a reset.
        };
        let round = run.mem.memory();
        let mem: &GuestMemoryMmap = &round;
        let mut used = false;
        let mut budget = run.tx.size();
        while let Some(mut chain) = run.tx.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let probe = chain.clone();
            match VsockPacket::from_tx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
                Ok(pkt) => {
                    let hdr = Hdr::from_packet(&pkt);
                    self.scratch.clear();
                    if let Some(slice) = pkt.data_slice() {
                        self.scratch.resize(slice.len(), 0);
                        let n = slice.copy_to(&mut self.scratch[..]);
                        self.scratch.truncate(n);
                    }
                    self.muxer.send_from_guest(&hdr, &self.scratch, now);
                }
                Err(_) => {
                    if let Some(hdr) = readable_header(mem, probe) {
                        self.muxer.malformed_from_guest(&hdr);
                    }
                }
            }
            let _ = run.tx.add_used(mem, head, 0);
            used = true;
            budget = budget.saturating_sub(1);
            if budget == 0 {
                // Let other events in; this kick brings us back.
                let _ = run.tx_kick.write(1);
                break;
            }
        }
        if used {
            notify(&mut run.tx, mem, &run.interrupt);
        }
    }

    /// Fills rx buffers while the muxer has packets for the guest.
    pub(crate) fn process_rx(&mut self, now: Instant) {
        let Some(run) = self.running.as_mut() else {
            return;
        };
        let round = run.mem.memory();
        let mem: &GuestMemoryMmap = &round;
        let mut used = false;
        while self.muxer.has_pending_rx() {
            let Some(mut chain) = run.rx.pop_descriptor_chain(mem) else {
                break; // The guest's next rx kick brings us back.
            };
            let head = chain.head_index();
            let len = match VsockPacket::from_rx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
                Ok(mut pkt) => {
                    let room = pkt.data_slice().map_or(0, |s| s.len());
                    let room = room.min(MAX_PKT_DATA as usize);
                    match self.muxer.next_rx(room, &mut self.scratch, now) {
                        Some(hdr) => write_packet(&mut pkt, &hdr, &self.scratch),
                        None => 0,
                    }
                }
                // Unusable (too short, read-only, outside memory): returned empty.
                Err(_) => 0,
            };
            let _ = run.rx.add_used(mem, head, len);
            used = true;
        }
        if used {
            notify(&mut run.rx, mem, &run.interrupt);
        }
    }
}

/// The header in the first descriptor of a tx chain that failed to parse, if readable.
fn readable_header(
    mem: &GuestMemoryMmap,
    mut chain: DescriptorChain<&GuestMemoryMmap>,
) -> Option<Hdr> {
    let desc = chain.next()?;
    if desc.is_write_only() || (desc.len() as usize) < PKT_HEADER_SIZE {
        return None;
    }
    let mut bytes = [0u8; PKT_HEADER_SIZE];
    mem.read_slice(&mut bytes, desc.addr()).ok()?;
    Some(Hdr::from_bytes(&bytes))
}

/// Writes `hdr` and `data` into an rx buffer; returns the used length.
fn write_packet(pkt: &mut VsockPacket<'_, ()>, hdr: &Hdr, data: &[u8]) -> u32 {
    if pkt.set_header_from_raw(&hdr.to_bytes()).is_err() {
        return 0;
    }
    if !data.is_empty() {
        let written = pkt.data_slice().map(|s| s.write_slice(data, 0));
        if !matches!(written, Some(Ok(()))) {
            return 0;
        }
    }
    (PKT_HEADER_SIZE + data.len()) as u32
}

fn notify(queue: &mut Queue, mem: &GuestMemoryMmap, interrupt: &Interrupt) {
    if queue.needs_notification(mem).unwrap_or(true) {
        let _ = interrupt.signal_used_queue();
    }
}

impl VirtioDevice for VsockDevice {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        // Stream sockets only (no VIRTIO_VSOCK_F_SEQPACKET); the transport adds VERSION_1.
        0
    }

    fn ack_features(&mut self, features: u64) -> Result<(), FeaturesRefused> {
        self.acked_features = features;
        Ok(())
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        let config = self.cid.to_le_bytes();
        let Some(src) = usize::try_from(offset).ok().and_then(|o| config.get(o..)) else {
            return;
        };
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // guest_cid is read-only.
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let refuse = |what: &str| ActivateError::Device(format!("virtio-vsock: {what}"));
        if ctx.queues.len() != QUEUE_SIZES.len() || ctx.queue_events.len() != QUEUE_SIZES.len() {
            return Err(refuse("needs its rx, tx and event queues"));
        }
        let mut queues = ctx.queues.into_iter();
        let rx = queues.next().ok_or_else(|| refuse("no rx queue"))?;
        let tx = queues.next().ok_or_else(|| refuse("no tx queue"))?;
        let tx_kick = ctx
            .queue_events
            .into_iter()
            .nth(TX_QUEUE)
            .ok_or_else(|| refuse("no tx queue event"))?;
        debug_assert_eq!((RX_QUEUE, TX_QUEUE), (0, 1));
        self.acked_features = ctx.acked_features;
        self.running = Some(Running {
            mem: ctx.mem,
            rx,
            tx,
            tx_kick,
            interrupt: ctx.interrupt,
        });
        // Host connections may be waiting to send their REQUEST: wake the handler.
        let _ = self.muxer.control_event().write(1);
        Ok(())
    }

    fn reset(&mut self) {
        self.running = None;
        self.acked_features = 0;
        self.muxer.reset();
    }
}
