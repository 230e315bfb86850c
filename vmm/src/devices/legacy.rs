//! The two ways a guest stops the machine: the ACPI sleep/reset register that the FADT
//! advertises, and the i8042 keyboard controller's reset line.

use std::sync::Arc;

use vm_superio::{I8042Device, Trigger};

use super::{BusDevice, ExitReason, VmExit};
use crate::acpi::{RESET_VALUE, S5_SLEEP_VALUE};

/// The FADT's sleep-control, sleep-status and reset register, one IO port.
#[derive(Debug)]
pub struct AcpiPmDevice {
    exit: Arc<VmExit>,
}

impl AcpiPmDevice {
    pub fn new(exit: Arc<VmExit>) -> Self {
        AcpiPmDevice { exit }
    }
}

impl BusDevice for AcpiPmDevice {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Sleep status: never "woken", nothing pending.
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        match data.first().copied() {
            Some(S5_SLEEP_VALUE) => self.exit.set(ExitReason::PowerOff),
            Some(RESET_VALUE) => self.exit.set(ExitReason::Reset("ACPI reset".into())),
            _ => {}
        }
    }
}

/// A reset request from the i8042 (vm-superio's device) ends the VM as a reset.
#[derive(Debug)]
pub struct ResetTrigger(pub Arc<VmExit>);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.set(ExitReason::Reset("i8042 reset".into()));
        Ok(())
    }
}

/// The i8042 at ports 0x60..=0x64, for Linux's `reboot=k`.
pub struct I8042(pub I8042Device<ResetTrigger>);

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(self.0.read(offset as u8));
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&value) = data.first() {
            let Ok(()) = self.0.write(offset as u8, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_powers_off_and_reset_value_resets() {
        let exit = Arc::new(VmExit::new().unwrap());
        let mut pm = AcpiPmDevice::new(exit.clone());
        pm.write(0, &[0x14]); // SLP_TYP=5 without SLP_EN: ignored
        pm.write(0, &[]);
        assert!(!exit.is_set());
        pm.write(0, &[S5_SLEEP_VALUE]);
        assert_eq!(exit.reason(), Some(ExitReason::PowerOff));

        let exit = Arc::new(VmExit::new().unwrap());
        AcpiPmDevice::new(exit.clone()).write(0, &[RESET_VALUE]);
        assert!(matches!(exit.reason(), Some(ExitReason::Reset(_))));
    }

    #[test]
    fn i8042_resets_on_fe_at_the_command_port_only() {
        let exit = Arc::new(VmExit::new().unwrap());
        let mut kbd = I8042(I8042Device::new(ResetTrigger(exit.clone())));
        let mut status = [0xffu8];
        kbd.read(4, &mut status);
        assert_eq!(status, [0], "always ready");
        kbd.write(4, &[0xad]);
        kbd.write(0, &[0xfe]);
        assert!(!exit.is_set());
        kbd.write(4, &[0xfe]);
        assert!(matches!(exit.reason(), Some(ExitReason::Reset(_))));
    }
}
