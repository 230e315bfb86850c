//! COM1: vm-superio's 16550A, its interrupt delivered through an irqfd, its output to
//! stdout or a log file (through [`super::console_buffer`], so that a vCPU never waits
//! for the console), and the VMM's stdin forwarded to it.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::BusDevice;
use crate::sync::Locked;

/// Raises the UART's interrupt line: an eventfd registered as the GSI's irqfd.
#[derive(Debug)]
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

pub type Uart = Serial<IrqTrigger, NoEvents, Box<dyn Write + Send>>;

/// The UART on the port bus.
pub struct SerialDevice(pub Uart);

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), &mut *data) {
            *byte = self.0.read(offset);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            // Output errors (a closed stdout) must not stop the guest.
            let _ = self.0.write(offset, *byte);
        }
    }
}

/// Forwards bytes from an input fd (the VMM's stdin) into the UART's receive FIFO.
pub struct SerialInput<R: Read + AsRawFd> {
    input: R,
    serial: Arc<Mutex<SerialDevice>>,
}

impl<R: Read + AsRawFd> SerialInput<R> {
    pub fn new(input: R, serial: Arc<Mutex<SerialDevice>>) -> Self {
        SerialInput { input, serial }
    }

    /// Moves what is readable now into the FIFO. Returns false at end of input.
    fn forward(&mut self) -> bool {
        let mut buf = [0u8; 64];
        match self.input.read(&mut buf) {
            Ok(0) => false,
            Ok(n) => {
                let mut serial = self.serial.locked();
                // A full FIFO drops input, as a real UART does; commands are short.
                let _ = serial.0.enqueue_raw_bytes(&buf[..n]);
                true
            }
            Err(e) => {
                e.kind() == std::io::ErrorKind::Interrupted
                    || e.kind() == std::io::ErrorKind::WouldBlock
            }
        }
    }
}

impl<R: Read + AsRawFd> MutEventSubscriber for SerialInput<R> {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let readable = events.event_set().contains(EventSet::IN);
        if !readable || !self.forward() {
            // End of input or hang-up: stop watching, the guest keeps running.
            let _ = ops.remove(Events::new(&self.input.as_raw_fd(), EventSet::IN));
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        // epoll refuses regular files and /dev/null: then there is simply no input.
        let _ = ops.add(Events::new(&self.input.as_raw_fd(), EventSet::IN));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);
    impl Write for SharedBuf {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_reaches_the_writer_and_input_reaches_the_guest() {
        let out = SharedBuf::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let uart = Serial::new(
            IrqTrigger(irq.try_clone().unwrap()),
            Box::new(out.clone()) as Box<dyn Write + Send>,
        );
        let serial = Arc::new(Mutex::new(SerialDevice(uart)));
        for b in b"hi\n" {
            serial.lock().unwrap().write(0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi\n");

        // Enable the "data available" interrupt (IER bit 0), then feed input.
        serial.lock().unwrap().write(1, &[1]);
        let (reader, mut writer) = std::os::unix::net::UnixStream::pair().unwrap();
        writer.write_all(b"poweroff\n").unwrap();
        let mut input = SerialInput::new(reader, serial.clone());
        assert!(input.forward());
        assert_eq!(irq.read().unwrap(), 1, "guest interrupted");
        let mut got = vec![];
        for _ in 0..9 {
            let mut b = [0u8];
            serial.lock().unwrap().read(0, &mut b);
            got.push(b[0]);
        }
        assert_eq!(got, b"poweroff\n");
        drop(writer);
        assert!(!input.forward(), "EOF ends forwarding");
    }

    #[test]
    fn wide_accesses_are_ignored() {
        let uart = Serial::new(
            IrqTrigger(EventFd::new(0).unwrap()),
            Box::new(std::io::sink()) as Box<dyn Write + Send>,
        );
        let mut dev = SerialDevice(uart);
        let mut wide = [0u8; 2];
        dev.read(0, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
        dev.write(0, &[1, 2]);
    }
}
