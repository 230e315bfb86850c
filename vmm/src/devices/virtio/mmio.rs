//! The virtio-mmio transport, version 2 (virtio 1.2 section 4.2.2): the register window a
//! driver uses to negotiate features, set up queues and drive the status state machine.
//!
//! Every access comes from the untrusted guest: registers answer only aligned 4-byte
//! accesses (others read as 0 and are ignored on write), the configuration space at
//! 0x100 takes any width, and a bad queue setup ends in DEVICE_NEEDS_RESET, never a panic.

use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, VmFd};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE as ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER as DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK as DRIVER_OK, VIRTIO_CONFIG_S_FAILED as FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK as FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET as NEEDS_RESET,
    VIRTIO_F_NOTIFICATION_DATA, VIRTIO_F_RING_PACKED, VIRTIO_F_RING_RESET,
};
use virtio_bindings::virtio_mmio::*;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::eventfd::EventFd;

use super::queue::{set_half, QueueConfig};
use super::{
    ActivateContext, ActivateError, GuestMemoryView, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
use crate::devices::BusDevice;
use crate::sync::Locked;

/// "virt", little endian.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// The modern (virtio 1.x) register layout.
pub const MMIO_VERSION: u32 = 2;
pub const MMIO_VENDOR_ID: u32 = 0;
/// Size of a transport's register window; the bus range to insert it with.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Offset of QueueNotify, where the queue ioeventfds are registered.
pub const QUEUE_NOTIFY_OFFSET: u64 = VIRTIO_MMIO_QUEUE_NOTIFY as u64;
const CONFIG_SPACE_OFFSET: u64 = VIRTIO_MMIO_CONFIG as u64;
/// The largest queue the split ring allows.
const MAX_QUEUE_SIZE: u16 = 32768;
/// Features the transport never offers, whatever the device says.
const UNSUPPORTED_FEATURES: u64 =
    1 << VIRTIO_F_RING_PACKED | 1 << VIRTIO_F_NOTIFICATION_DATA | 1 << VIRTIO_F_RING_RESET;
/// The status bits the driver sets; NEEDS_RESET is the device's.
const DRIVER_STATUS_BITS: u32 = ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK | FAILED;

#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    #[error(
        "queue {index} has an invalid maximum size {max} (a power of two up to 32768 is needed)"
    )]
    InvalidQueueMax { index: usize, max: u16 },
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("KVM: {what} failed: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
}

/// One virtio device behind a virtio-mmio register window.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryView,
    interrupt: Interrupt,
    queue_events: Vec<EventFd>,
    queues: Vec<QueueConfig>,
    device_type: u32,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    activated: bool,
    /// Activation failures are the guest's doing: warn of the first one only.
    failure_logged: bool,
    /// So are refused features: one line per device, however often the driver retries.
    refusal_logged: bool,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device_type)
            .field("status", &self.status)
            .field("queues", &self.queues)
            .field("activated", &self.activated)
            .finish()
    }
}

impl MmioTransport {
    /// A transport for `device`, with a fresh irqfd and one notification eventfd per queue.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemoryView,
    ) -> Result<Self, MmioError> {
        let (device_type, maxes) = {
            let dev = device.locked();
            (dev.device_type(), dev.queue_max_sizes().to_vec())
        };
        for (index, &max) in maxes.iter().enumerate() {
            if max == 0 || max > MAX_QUEUE_SIZE || !max.is_power_of_two() {
                return Err(MmioError::InvalidQueueMax { index, max });
            }
        }
        let queue_events = maxes
            .iter()
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(MmioError::EventFd)?;
        Ok(MmioTransport {
            device,
            mem,
            interrupt: Interrupt::new().map_err(MmioError::EventFd)?,
            queue_events,
            queues: maxes.into_iter().map(QueueConfig::new).collect(),
            device_type,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            activated: false,
            failure_logged: false,
            refusal_logged: false,
        })
    }

    /// The device this transport serves.
    pub fn device(&self) -> Arc<Mutex<dyn VirtioDevice>> {
        self.device.clone()
    }

    /// The device's interrupt (also given to the device at activation).
    pub fn interrupt(&self) -> Interrupt {
        self.interrupt.clone()
    }

    /// Clones of the per-queue notification eventfds, for the device's event subscriber.
    pub fn queue_events(&self) -> std::io::Result<Vec<EventFd>> {
        self.queue_events.iter().map(EventFd::try_clone).collect()
    }

    /// The Status register, as the driver sees it: with DEVICE_NEEDS_RESET if the device
    /// asked for it at runtime ([`Interrupt::signal_needs_reset`]).
    pub fn status(&self) -> u32 {
        match self.interrupt.needs_reset() {
            true => self.status | NEEDS_RESET,
            false => self.status,
        }
    }

    /// Whether the device is running (DRIVER_OK accepted, no reset since).
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// Makes KVM signal queue `i`'s eventfd, without a VM exit, when the guest writes `i`
    /// to QueueNotify of the window at `mmio_base`.
    pub fn register_ioevents(&self, vm: &VmFd, mmio_base: u64) -> Result<(), MmioError> {
        let addr = IoEventAddress::Mmio(mmio_base + QUEUE_NOTIFY_OFFSET);
        for (index, event) in self.queue_events.iter().enumerate() {
            vm.register_ioevent(event, &addr, index as u32)
                .map_err(|source| MmioError::Kvm {
                    what: "KVM_IOEVENTFD",
                    source,
                })?;
        }
        Ok(())
    }

    /// Connects the interrupt's irqfd to `gsi`.
    pub fn register_irqfd(&self, vm: &VmFd, gsi: u32) -> Result<(), MmioError> {
        vm.register_irqfd(self.interrupt.irqfd(), gsi)
            .map_err(|source| MmioError::Kvm {
                what: "KVM_IRQFD",
                source,
            })
    }

    fn lock_device(&self) -> std::sync::MutexGuard<'_, dyn VirtioDevice + 'static> {
        self.device.locked()
    }

    /// What the driver may acknowledge.
    fn offered_features(&self) -> u64 {
        (self.lock_device().features() | 1 << VIRTIO_F_VERSION_1) & !UNSUPPORTED_FEATURES
    }

    fn selected_queue(&mut self) -> Option<&mut QueueConfig> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn read_register(&self, offset: u32) -> u32 {
        let queue = self.queues.get(self.queue_sel as usize);
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC_VALUE,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device_type,
            VIRTIO_MMIO_VENDOR_ID => MMIO_VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.offered_features() as u32,
                1 => (self.offered_features() >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max)),
            VIRTIO_MMIO_QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready)),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            VIRTIO_MMIO_STATUS => self.status(),
            // No shared memory regions: a region that does not exist has length -1.
            VIRTIO_MMIO_SHM_LEN_LOW
            | VIRTIO_MMIO_SHM_LEN_HIGH
            | VIRTIO_MMIO_SHM_BASE_LOW
            | VIRTIO_MMIO_SHM_BASE_HIGH => u32::MAX,
            VIRTIO_MMIO_CONFIG_GENERATION => self.lock_device().config_generation(),
            // Write-only and reserved registers.
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u32, value: u32) {
        // Queue registers take writes only while the queue is not ready and the device
        // not running; QueueReady itself only before DRIVER_OK.
        let queues_writable = !self.activated && self.status & DRIVER_OK == 0;
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            // The features are frozen once FEATURES_OK is set.
            VIRTIO_MMIO_DRIVER_FEATURES if self.status & FEATURES_OK == 0 => {
                match self.driver_features_sel {
                    0 => set_half(&mut self.driver_features, false, value),
                    1 => set_half(&mut self.driver_features, true, value),
                    _ => {}
                }
            }
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = value,
            VIRTIO_MMIO_QUEUE_NUM
            | VIRTIO_MMIO_QUEUE_DESC_LOW
            | VIRTIO_MMIO_QUEUE_DESC_HIGH
            | VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | VIRTIO_MMIO_QUEUE_USED_LOW
            | VIRTIO_MMIO_QUEUE_USED_HIGH => {
                let Some(q) = self
                    .selected_queue()
                    .filter(|q| queues_writable && !q.ready)
                else {
                    return;
                };
                let high = offset % 8 == 4;
                match offset {
                    VIRTIO_MMIO_QUEUE_NUM => q.size = value,
                    VIRTIO_MMIO_QUEUE_DESC_LOW | VIRTIO_MMIO_QUEUE_DESC_HIGH => {
                        set_half(&mut q.desc, high, value)
                    }
                    VIRTIO_MMIO_QUEUE_AVAIL_LOW | VIRTIO_MMIO_QUEUE_AVAIL_HIGH => {
                        set_half(&mut q.driver, high, value)
                    }
                    _ => set_half(&mut q.device, high, value),
                }
            }
            VIRTIO_MMIO_QUEUE_READY => {
                if let Some(q) = self.selected_queue().filter(|_| queues_writable) {
                    q.ready = value == 1;
                }
            }
            VIRTIO_MMIO_QUEUE_NOTIFY => {
                // KVM's ioeventfd normally takes these; kick the queue the same way if not.
                if let Some(event) = self.queue_events.get(value as usize) {
                    let _ = event.write(1);
                }
            }
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.ack(value),
            VIRTIO_MMIO_STATUS => self.write_status(value),
            // SHMSel: there are no regions to select. Read-only and reserved registers.
            _ => {}
        }
    }

    /// Whether the driver's features are acceptable: offered ones only, and VERSION_1.
    fn features_acceptable(&self) -> bool {
        self.driver_features & !self.offered_features() == 0
            && self.driver_features & 1 << VIRTIO_F_VERSION_1 != 0
    }

    /// The device status state machine (virtio 1.2 section 3.1.1). The driver sets bits
    /// one step at a time and clears them only by writing 0, which resets the device.
    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status & DRIVER_STATUS_BITS;
        let new = value & DRIVER_STATUS_BITS;
        if new & old != old {
            return;
        }
        if new & FAILED != 0 {
            self.status |= FAILED;
        }
        for bit in [ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK] {
            if new & bit == 0 || self.status & bit != 0 {
                continue;
            }
            let allowed = match bit {
                ACKNOWLEDGE => true,
                DRIVER => self.status & ACKNOWLEDGE != 0,
                // Refused by leaving FEATURES_OK clear, which the driver reads back.
                FEATURES_OK => self.status & DRIVER != 0 && self.features_acceptable(),
                _ => self.status & FEATURES_OK != 0 && self.status() & (FAILED | NEEDS_RESET) == 0,
            };
            if !allowed {
                return;
            }
            if bit == FEATURES_OK {
                let features = self.driver_features;
                let acked = self.lock_device().ack_features(features);
                if let Err(refused) = acked {
                    if !self.refusal_logged {
                        self.refusal_logged = true;
                        log::warn!("{refused}");
                    }
                    return;
                }
            }
            self.status |= bit;
            if bit == DRIVER_OK {
                self.activate();
            }
        }
    }

    fn activation_context(&self) -> Result<ActivateContext, ActivateError> {
        let event_idx = self.driver_features & 1 << VIRTIO_RING_F_EVENT_IDX != 0;
        let mem = self.mem.memory();
        let needed = self
            .lock_device()
            .queues_needed(self.driver_features)
            .min(self.queues.len());
        let queues = self.queues[..needed]
            .iter()
            .enumerate()
            .map(|(index, q)| {
                q.build(&mem, event_idx)
                    .map_err(|reason| ActivateError::InvalidQueue { index, reason })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let queue_events = self
            .queue_events
            .iter()
            .enumerate()
            .map(|(index, e)| {
                e.try_clone()
                    .map_err(|source| ActivateError::QueueEvent { index, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ActivateContext {
            mem: self.mem.clone(),
            queues,
            queue_events,
            interrupt: self.interrupt.clone(),
            acked_features: self.driver_features,
        })
    }

    fn activate(&mut self) {
        if self.activated {
            return;
        }
        let result = self
            .activation_context()
            .and_then(|ctx| self.lock_device().activate(ctx));
        match result {
            Ok(()) => self.activated = true,
            Err(e) => {
                let level = match std::mem::replace(&mut self.failure_logged, true) {
                    false => log::Level::Warn,
                    true => log::Level::Debug,
                };
                log::log!(
                    level,
                    "virtio device type {} not activated, it needs a reset: {e}",
                    self.device_type
                );
                self.status |= NEEDS_RESET;
                // The driver must hear of DEVICE_NEEDS_RESET once DRIVER_OK is set.
                let _ = self.interrupt.signal_config_change();
            }
        }
    }

    /// Device reset: the initial state of every register and queue.
    fn reset(&mut self) {
        self.lock_device().reset();
        self.activated = false;
        self.status = 0;
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        for q in &mut self.queues {
            *q = QueueConfig::new(q.max);
        }
        self.interrupt.clear();
    }

    /// The configuration-space range `offset..offset + len` relative to its start, if it
    /// lies inside the window.
    fn config_range(offset: u64, len: usize) -> Option<u64> {
        let end = offset.checked_add(len as u64)?;
        (offset >= CONFIG_SPACE_OFFSET && end <= MMIO_WINDOW_SIZE)
            .then(|| offset - CONFIG_SPACE_OFFSET)
    }

    /// The register at `offset`, if the access is an aligned 4-byte one.
    fn register(offset: u64, len: usize) -> Option<u32> {
        (len == 4 && offset % 4 == 0 && offset < CONFIG_SPACE_OFFSET).then_some(offset as u32)
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(config_offset) = Self::config_range(offset, data.len()) {
            self.lock_device().read_config(config_offset, data);
        } else if let Some(reg) = Self::register(offset, data.len()) {
            data.copy_from_slice(&self.read_register(reg).to_le_bytes());
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(config_offset) = Self::config_range(offset, data.len()) {
            self.lock_device().write_config(config_offset, data);
        } else if let (Some(reg), Ok(bytes)) = (
            Self::register(offset, data.len()),
            <[u8; 4]>::try_from(data),
        ) {
            self.write_register(reg, u32::from_le_bytes(bytes));
        }
    }
}

#[cfg(test)]
mod tests;
