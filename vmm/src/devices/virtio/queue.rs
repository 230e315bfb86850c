//! A virtqueue as the driver sets it up through the transport's registers, turned into a
//! `virtio_queue::Queue` (and checked) only when the driver starts the device.

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// A queue as the driver configured it, checked only when the driver sets DRIVER_OK.
#[derive(Debug, Clone, Copy)]
pub(super) struct QueueConfig {
    pub max: u16,
    pub size: u32,
    pub ready: bool,
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
}

impl QueueConfig {
    pub fn new(max: u16) -> Self {
        QueueConfig {
            max,
            size: u32::from(max),
            ready: false,
            desc: 0,
            driver: 0,
            device: 0,
        }
    }

    /// The queue the device gets, or why the driver's setup is unusable.
    pub fn build(&self, mem: &GuestMemoryMmap, event_idx: bool) -> Result<Queue, &'static str> {
        if !self.ready {
            return Err("not ready");
        }
        let mut queue = Queue::new(self.max).map_err(|_| "invalid maximum size")?;
        u16::try_from(self.size)
            .ok()
            .and_then(|size| queue.try_set_size(size).ok())
            .ok_or("size is not a power of two between 1 and QueueNumMax")?;
        queue
            .try_set_desc_table_address(GuestAddress(self.desc))
            .map_err(|_| "descriptor table is not 16-byte aligned")?;
        queue
            .try_set_avail_ring_address(GuestAddress(self.driver))
            .map_err(|_| "driver area is not 2-byte aligned")?;
        queue
            .try_set_used_ring_address(GuestAddress(self.device))
            .map_err(|_| "device area is not 4-byte aligned")?;
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        if !queue.is_valid(mem) {
            return Err("a ring is outside guest memory");
        }
        Ok(queue)
    }
}

/// Sets the low or high half of a 64-bit register pair.
pub(super) fn set_half(reg: &mut u64, high: bool, value: u32) {
    *reg = if high {
        (*reg & 0xffff_ffff) | u64::from(value) << 32
    } else {
        (*reg & !0xffff_ffff) | u64::from(value)
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halves_of_a_64_bit_register_are_set_independently() {
        let mut reg = 0;
        set_half(&mut reg, true, 0x1234_5678);
        set_half(&mut reg, false, 0x9abc_def0);
        assert_eq!(reg, 0x1234_5678_9abc_def0);
        set_half(&mut reg, false, 1);
        assert_eq!(reg, 0x1234_5678_0000_0001);
    }
}
