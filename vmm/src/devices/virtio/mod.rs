//! virtio devices: the [`VirtioDevice`] trait a device model implements, the [`Interrupt`]
//! handle it signals the guest through, and the virtio-mmio transport ([`mmio`]) that puts
//! a device on the MMIO bus (virtio 1.2 section 4.2, the modern interface only).
//!
//! # Threads and locks
//!
//! The transport runs on the vCPU threads, under the MMIO bus's lock on it, and locks the
//! device for register accesses it forwards (features, config space, activation, reset).
//! The device's queue work runs on the VMM's event-loop thread, which locks the device
//! only. A device must therefore never lock its transport. [`Interrupt`] takes no lock.
//!
//! # Guest memory
//!
//! Devices get a [`GuestMemoryView`], not a map: hotplug regions leave it when the guest
//! unplugs them and come back when it plugs them (`memory::slots`). A device takes
//! `view.memory()` at the start of each processing round and drops it at the end, and
//! never keeps a map between rounds; an address in a removed region then fails like any
//! address outside guest memory, and the device treats it as a malformed chain. Queue
//! rounds run on the event-loop thread, which is also the only thread that removes
//! regions, between rounds; work on guest memory from any other thread would have to be
//! waited for before a removal (see `memory::slots`). Activation on a vCPU thread checks
//! ring addresses against the view but reads no guest memory.
//!
//! # Queue notifications and the event loop
//!
//! The transport owns one [`EventFd`] per queue for the VM's lifetime: KVM writes it when
//! the guest writes the queue's index to QueueNotify (an ioeventfd, see
//! [`mmio::MmioTransport::register_ioevents`]), and the transport writes it itself when
//! such a write reaches it anyway. The simplest subscriber registers clones of these
//! eventfds once, before the vCPUs start ([`mmio::MmioTransport::queue_events`]), with the
//! queue index as the event data, and on each event reads the eventfd, then processes
//! that queue if the device is active and drops the kick otherwise (a guest may kick
//! before DRIVER_OK or after a reset). The same eventfds, cloned, are in the
//! [`ActivateContext`] for devices that prefer to take them at activation.

pub mod balloon;
pub mod blk;
pub mod kick;
pub mod mem;
pub mod mmio;
mod queue;
#[cfg(test)]
pub(crate) mod test_utils;
pub mod vsock;

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

pub use crate::memory::slots::GuestMemoryView;

/// virtio device IDs (virtio 1.2 section 5).
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_VSOCK: u32 = 19;
pub const TYPE_MEM: u32 = 24;

/// Feature bits the transport itself handles (virtio 1.2 section 6).
pub const VIRTIO_F_VERSION_1: u32 = virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
pub const VIRTIO_RING_F_EVENT_IDX: u32 = virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// InterruptStatus bits: a used buffer notification, and a configuration change.
pub const INTERRUPT_USED_RING: u32 = VIRTIO_MMIO_INT_VRING;
pub const INTERRUPT_CONFIG_CHANGE: u32 = VIRTIO_MMIO_INT_CONFIG;

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("queue {index}: {reason}")]
    InvalidQueue { index: usize, reason: &'static str },
    #[error("cannot duplicate queue {index}'s notification eventfd: {source}")]
    QueueEvent { index: usize, source: io::Error },
    #[error("the device refused to activate: {0}")]
    Device(String),
}

/// Why a device refused the features a driver accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FeaturesRefused {
    #[error(
        "{device}: the driver did not accept {name} (feature bit {bit}) and {why}: \
         FEATURES_OK refused, the device stays unusable for this driver"
    )]
    MissingRequired {
        device: String,
        name: &'static str,
        bit: u32,
        why: &'static str,
    },
}

/// What a device gets when the driver sets DRIVER_OK: everything it needs to run.
#[derive(Debug)]
pub struct ActivateContext {
    /// Guest memory as it changes: take `mem.memory()` once per processing round.
    pub mem: GuestMemoryView,
    /// The first [`VirtioDevice::queues_needed`] queues, in order: checked to be ready, of
    /// a valid size, and with its rings inside guest memory. EVENT_IDX is enabled on them
    /// if the driver acknowledged it.
    pub queues: Vec<Queue>,
    /// `queue_events[i]` fires when the driver notifies queue `i` (clones of the
    /// transport's eventfds; see the module documentation).
    pub queue_events: Vec<EventFd>,
    /// Signals used buffers and configuration changes to the guest.
    pub interrupt: Interrupt,
    /// The features the driver acknowledged (also given to [`VirtioDevice::ack_features`]).
    pub acked_features: u64,
}

/// A virtio device model, independent of the transport.
///
/// Object safe: the transport holds it as `Arc<Mutex<dyn VirtioDevice>>`, so the VMM can
/// keep its own typed `Arc` to the same device for the event loop and the API.
pub trait VirtioDevice: Send {
    /// The virtio device ID, e.g. [`TYPE_MEM`].
    fn device_type(&self) -> u32;

    /// Maximum size of each queue; the length is the number of queues. Each must be a
    /// power of two no larger than 32768. Read once, when the transport is created.
    fn queue_max_sizes(&self) -> &[u16];

    /// How many queues, from index 0, a driver that accepted `acked` sets up. A driver
    /// sets up only the queues of the features it accepted, numbered without gaps (e.g.
    /// virtio-balloon without the stats queue); the transport checks and hands over these
    /// and ignores the rest. Default: every queue.
    fn queues_needed(&self, acked: u64) -> usize {
        let _ = acked;
        self.queue_max_sizes().len()
    }

    /// Device feature bits. The transport adds VIRTIO_F_VERSION_1 and removes features it
    /// does not implement (packed rings, notification data, queue reset).
    fn features(&self) -> u64;

    /// The driver's accepted features, once they passed the transport's checks (a subset
    /// of what was offered, including VERSION_1); called when the driver sets FEATURES_OK.
    /// An error refuses them: FEATURES_OK stays clear, which the driver reads back
    /// (virtio 1.2 section 3.1.1), and the device stays unusable until it is reset.
    fn ack_features(&mut self, features: u64) -> Result<(), FeaturesRefused>;

    /// Reads `data.len()` bytes of the device configuration space at `offset` (any width,
    /// any alignment). `data` is zeroed beforehand: leave bytes past the end untouched.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes the device configuration space. The guest is untrusted: ignore what is out
    /// of range or read-only.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// Starts the device, once per driver initialisation (DRIVER_OK). An error puts the
    /// transport in DEVICE_NEEDS_RESET; the driver must reset the device before trying again.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;

    /// The driver reset the device (wrote 0 to Status): drop the queues and the activation
    /// context and return to the initial state. Also called when the device was never
    /// activated.
    fn reset(&mut self);

    /// Changes whenever the configuration space changes in a way the driver must re-read
    /// atomically (virtio 1.2 section 2.5.1).
    fn config_generation(&self) -> u32 {
        0
    }
}

#[derive(Debug)]
struct InterruptInner {
    status: AtomicU32,
    irqfd: EventFd,
    /// The device asked for DEVICE_NEEDS_RESET; the transport shows it in Status.
    needs_reset: AtomicBool,
}

/// The device's interrupt: the transport's InterruptStatus register and the irqfd that
/// raises the device's GSI. Cheap to clone; every clone is the same interrupt.
#[derive(Debug, Clone)]
pub struct Interrupt {
    inner: Arc<InterruptInner>,
}

impl Interrupt {
    /// A new interrupt with a fresh, non-blocking irqfd.
    pub fn new() -> io::Result<Self> {
        Ok(Self::with_irqfd(EventFd::new(libc::EFD_NONBLOCK)?))
    }

    pub fn with_irqfd(irqfd: EventFd) -> Self {
        Interrupt {
            inner: Arc::new(InterruptInner {
                status: AtomicU32::new(0),
                irqfd,
                needs_reset: AtomicBool::new(false),
            }),
        }
    }

    fn signal(&self, bit: u32) -> io::Result<()> {
        // The bit must be visible before the guest's handler reads InterruptStatus.
        self.inner.status.fetch_or(bit, Ordering::SeqCst);
        self.inner.irqfd.write(1)
    }

    /// Tells the driver that the device added buffers to a used ring.
    pub fn signal_used_queue(&self) -> io::Result<()> {
        self.signal(INTERRUPT_USED_RING)
    }

    /// Tells the driver that the configuration space changed.
    pub fn signal_config_change(&self) -> io::Result<()> {
        self.signal(INTERRUPT_CONFIG_CHANGE)
    }

    /// The device cannot go on (its queue is unusable, say) until the driver resets it:
    /// sets DEVICE_NEEDS_RESET in the transport's Status and interrupts with a
    /// configuration change (virtio 1.2 section 2.1.2). The device should stop serving
    /// its queues; a reset clears the request.
    pub fn signal_needs_reset(&self) -> io::Result<()> {
        self.inner.needs_reset.store(true, Ordering::SeqCst);
        self.signal(INTERRUPT_CONFIG_CHANGE)
    }

    /// Acts on one round of serving a queue: interrupts the guest if the round says it
    /// must know. An error is the queue itself (rings the device cannot follow; bad
    /// requests get error answers instead), so the device asks for a reset and must
    /// serve nothing more until then: answers false in that case, after one warning
    /// naming the device (`device()`).
    pub fn queue_served<E: std::fmt::Display>(
        &self,
        round: Result<bool, E>,
        device: impl FnOnce() -> String,
    ) -> bool {
        match round {
            Ok(needs_notification) => {
                if needs_notification {
                    let _ = self.signal_used_queue();
                }
                true
            }
            Err(e) => {
                // Once per driver initialisation: the device serves nothing until reset.
                log::warn!(
                    "{}: {e}; the device stops until the driver resets it",
                    device()
                );
                let _ = self.signal_needs_reset();
                false
            }
        }
    }

    /// Whether the device asked for a reset since the last one.
    pub fn needs_reset(&self) -> bool {
        self.inner.needs_reset.load(Ordering::SeqCst)
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.inner.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: clears the given bits.
    pub fn ack(&self, bits: u32) {
        self.inner.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// The irqfd, to register with KVM for the device's GSI.
    pub fn irqfd(&self) -> &EventFd {
        &self.inner.irqfd
    }

    fn clear(&self) {
        self.inner.status.store(0, Ordering::SeqCst);
        self.inner.needs_reset.store(false, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interrupt_bits_are_set_by_signals_and_cleared_by_ack() {
        let irq = Interrupt::new().unwrap();
        let other = irq.clone();
        assert_eq!(irq.status(), 0);
        other.signal_used_queue().unwrap();
        assert_eq!(irq.status(), INTERRUPT_USED_RING);
        other.signal_config_change().unwrap();
        assert_eq!(irq.status(), INTERRUPT_USED_RING | INTERRUPT_CONFIG_CHANGE);
        assert_eq!(
            irq.irqfd().read().unwrap(),
            2,
            "each signal writes the irqfd"
        );
        irq.ack(INTERRUPT_USED_RING);
        assert_eq!(other.status(), INTERRUPT_CONFIG_CHANGE);
        irq.clear();
        assert_eq!(other.status(), 0);
    }

    #[test]
    fn a_reset_request_interrupts_with_a_config_change_until_cleared() {
        let irq = Interrupt::new().unwrap();
        assert!(!irq.needs_reset());
        irq.clone().signal_needs_reset().unwrap();
        assert!(irq.needs_reset());
        assert_eq!(irq.status(), INTERRUPT_CONFIG_CHANGE);
        assert_eq!(irq.irqfd().read().unwrap(), 1);
        irq.clear();
        assert!(!irq.needs_reset());
    }
}
