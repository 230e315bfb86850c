//! Emulated devices and the buses that route guest port and MMIO accesses to them.

pub mod console_buffer;
pub mod console_log;
pub mod console_watch;
pub mod legacy;
pub mod released;
pub mod serial;
pub mod virtio;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::sync::Locked;
use vmm_sys_util::eventfd::EventFd;

/// A device on a bus. `offset` is relative to the base the device was inserted at.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("device range {base:#x}+{len:#x} overlaps another device")]
    Overlap { base: u64, len: u64 },
    #[error("device range at {0:#x} is empty")]
    Empty(u64),
}

type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Address-ordered devices. Accesses nobody claims read as all ones, like open bus.
#[derive(Default)]
pub struct Bus {
    devices: BTreeMap<u64, (u64, SharedDevice)>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.devices.iter().map(|(b, (l, _))| (*b, *l)))
            .finish()
    }
}

impl Bus {
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::Empty(base));
        }
        let end = base
            .checked_add(len)
            .ok_or(BusError::Overlap { base, len })?;
        let before = self.devices.range(..end).next_back();
        if let Some((&b, &(l, _))) = before {
            if b + l > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        self.devices.insert(base, (len, device));
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &SharedDevice)> {
        let (&base, (len, dev)) = self.devices.range(..=addr).next_back()?;
        (addr - base < *len).then_some((addr - base, dev))
    }

    pub fn read(&self, addr: u64, data: &mut [u8]) {
        match self.find(addr) {
            Some((offset, dev)) => dev.locked().read(offset, data),
            None => data.fill(0xff),
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) {
        if let Some((offset, dev)) = self.find(addr) {
            dev.locked().write(offset, data);
        }
    }
}

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    PowerOff,
    /// Stopped by the VMM itself (the API's shutdown), not by the guest.
    Stopped(String),
    Reset(String),
    /// The guest broke the machine's rules, e.g. it touched memory it had unplugged.
    GuestFault(String),
    Error(String),
}

/// Set once by whoever stops the VM (a vCPU, a device, the API); wakes the main loop.
#[derive(Debug)]
pub struct VmExit {
    reason: Mutex<Option<ExitReason>>,
    pub event: EventFd,
}

impl VmExit {
    pub fn new() -> std::io::Result<Self> {
        Ok(VmExit {
            reason: Mutex::new(None),
            event: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Records the first reason only: later ones are consequences of it.
    pub fn set(&self, reason: ExitReason) {
        let mut slot = self.reason.locked();
        if slot.is_none() {
            *slot = Some(reason);
            let _ = self.event.write(1);
        }
    }

    pub fn is_set(&self) -> bool {
        self.reason.locked().is_some()
    }

    pub fn reason(&self) -> Option<ExitReason> {
        self.reason.locked().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Recorder(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn bus_routes_by_offset_and_refuses_overlaps() {
        let dev = Arc::new(Mutex::new(Recorder(vec![])));
        let mut bus = Bus::default();
        bus.insert(0x3f8, 8, dev.clone()).unwrap();
        assert_eq!(
            bus.insert(0x3f0, 9, dev.clone()),
            Err(BusError::Overlap {
                base: 0x3f0,
                len: 9
            })
        );
        assert_eq!(
            bus.insert(0x3ff, 1, dev.clone()),
            Err(BusError::Overlap {
                base: 0x3ff,
                len: 1
            })
        );
        assert_eq!(bus.insert(0x10, 0, dev.clone()), Err(BusError::Empty(0x10)));
        bus.insert(0x400, 1, dev.clone()).unwrap();
        let mut b = [0u8; 1];
        bus.read(0x3fb, &mut b);
        assert_eq!(b, [3]);
        bus.read(0x3f7, &mut b);
        assert_eq!(b, [0xff], "unclaimed port reads as open bus");
        bus.write(0x3f9, &[42]);
        bus.write(0x500, &[1]);
        assert_eq!(dev.lock().unwrap().0, vec![(1, vec![42])]);
    }

    #[test]
    fn first_exit_reason_wins() {
        let exit = VmExit::new().unwrap();
        assert!(!exit.is_set());
        exit.set(ExitReason::PowerOff);
        exit.set(ExitReason::Error("later".into()));
        assert_eq!(exit.reason(), Some(ExitReason::PowerOff));
        assert_eq!(exit.event.read().unwrap(), 1);
    }
}
