//! COM1: vm-superio's 16550A, its interrupt delivered through an irqfd, its output to
//! stdout or a log file (through [`super::console_buffer`], so that a vCPU never waits
//! for the console), and the VMM's stdin forwarded to it.
//!
//! Input is never dropped: the UART's receive FIFO holds 64 bytes, so what does not fit
//! waits in [`SerialInput`] (up to [`PENDING_MAX`], then stdin is not read until there is
//! room: the writer waits instead) and goes in when the guest has read the FIFO empty,
//! which the UART says through [`RxDrained`].

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vm_superio::serial::SerialEvents;
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

/// Signals its eventfd when the guest has read the receive FIFO empty (on the vCPU
/// thread that read it): [`SerialInput`] then moves more input in.
#[derive(Debug)]
pub struct RxDrained(EventFd);

impl SerialEvents for RxDrained {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        let _ = self.0.write(1);
    }
}

pub type Uart = Serial<IrqTrigger, RxDrained, Box<dyn Write + Send>>;

/// The UART on the port bus.
pub struct SerialDevice(pub Uart);

impl SerialDevice {
    /// A UART that interrupts through `irq` and writes to `out`, and the eventfd that
    /// says when its receive FIFO was read empty (for [`SerialInput::new`]).
    pub fn new(irq: IrqTrigger, out: Box<dyn Write + Send>) -> std::io::Result<(Self, EventFd)> {
        let drained = EventFd::new(libc::EFD_NONBLOCK)?;
        let events = RxDrained(drained.try_clone()?);
        Ok((SerialDevice(Serial::with_events(irq, events, out)), drained))
    }
}

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

/// Input kept for the guest while its FIFO is full: beyond this, stdin waits.
pub const PENDING_MAX: usize = 4096;

/// Forwards bytes from an input fd (the VMM's stdin) into the UART's receive FIFO, as
/// fast as the guest reads them and without losing any.
pub struct SerialInput<R: Read + AsRawFd> {
    input: R,
    serial: Arc<Mutex<SerialDevice>>,
    /// Signalled when the guest read the FIFO empty ([`RxDrained`]).
    drained: EventFd,
    /// Read from `input`, not yet in the FIFO.
    pending: VecDeque<u8>,
    /// Whether `input` is watched: not while `pending` is full, nor after its end.
    watching: bool,
    ended: bool,
}

impl<R: Read + AsRawFd> SerialInput<R> {
    pub fn new(input: R, serial: Arc<Mutex<SerialDevice>>, drained: EventFd) -> Self {
        SerialInput {
            input,
            serial,
            drained,
            pending: VecDeque::new(),
            watching: false,
            ended: false,
        }
    }

    /// Reads what `input` has now (as much as `pending` takes) and moves what fits into
    /// the FIFO. Returns false at the end of input.
    fn receive(&mut self) -> bool {
        let mut buf = [0u8; 1024];
        let room = buf.len().min(PENDING_MAX - self.pending.len());
        match self.input.read(&mut buf[..room]) {
            Ok(0) if room > 0 => return false,
            Ok(n) => self.pending.extend(&buf[..n]),
            Err(e) => {
                let transient = matches!(
                    e.kind(),
                    std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock
                );
                if !transient {
                    return false;
                }
            }
        }
        self.refill();
        true
    }

    /// Moves as much pending input as the FIFO has room for.
    fn refill(&mut self) {
        let mut serial = self.serial.locked();
        let room = serial.0.fifo_capacity().min(self.pending.len());
        if room == 0 {
            return;
        }
        let bytes: Vec<u8> = self.pending.drain(..room).collect();
        // It fits: `room` is the FIFO's free space, and the lock is held.
        let _ = serial.0.enqueue_raw_bytes(&bytes);
    }

    /// Watches `input` when there is room for more of it, and not otherwise.
    fn watch(&mut self, ops: &mut EventOps) {
        let want = !self.ended && self.pending.len() < PENDING_MAX;
        let fd = Events::new(&self.input.as_raw_fd(), EventSet::IN);
        if want && !self.watching {
            // epoll refuses regular files and /dev/null: then there is simply no input.
            self.watching = ops.add(fd).is_ok();
            self.ended |= !self.watching;
        } else if !want && self.watching {
            let _ = ops.remove(fd);
            self.watching = false;
        }
    }
}

impl<R: Read + AsRawFd> MutEventSubscriber for SerialInput<R> {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.drained.as_raw_fd() {
            let _ = self.drained.read();
            self.refill();
        } else {
            let readable = events.event_set().contains(EventSet::IN);
            if !readable || !self.receive() {
                // End of input or hang-up: what is pending still goes in; the guest
                // keeps running.
                self.ended = true;
            }
        }
        self.watch(ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(&self.drained, EventSet::IN));
        self.watch(ops);
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
        let (dev, drained) = SerialDevice::new(
            IrqTrigger(irq.try_clone().unwrap()),
            Box::new(out.clone()) as Box<dyn Write + Send>,
        )
        .unwrap();
        let serial = Arc::new(Mutex::new(dev));
        for b in b"hi\n" {
            serial.lock().unwrap().write(0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi\n");

        // Enable the "data available" interrupt (IER bit 0), then feed input.
        serial.lock().unwrap().write(1, &[1]);
        let (reader, mut writer) = std::os::unix::net::UnixStream::pair().unwrap();
        writer.write_all(b"poweroff\n").unwrap();
        let mut input = SerialInput::new(reader, serial.clone(), drained);
        assert!(input.receive());
        assert_eq!(irq.read().unwrap(), 1, "guest interrupted");
        let mut got = vec![];
        for _ in 0..9 {
            let mut b = [0u8];
            serial.lock().unwrap().read(0, &mut b);
            got.push(b[0]);
        }
        assert_eq!(got, b"poweroff\n");
        drop(writer);
        assert!(!input.receive(), "EOF ends forwarding");
    }

    /// A line longer than the FIFO (what a person pastes, or a test types) arrives
    /// whole, in order: the rest waits until the guest has read the FIFO empty.
    #[test]
    fn input_beyond_the_fifo_waits_and_is_not_lost() {
        let (dev, drained) = SerialDevice::new(
            IrqTrigger(EventFd::new(libc::EFD_NONBLOCK).unwrap()),
            Box::new(std::io::sink()) as Box<dyn Write + Send>,
        )
        .unwrap();
        let serial = Arc::new(Mutex::new(dev));
        let (reader, mut writer) = std::os::unix::net::UnixStream::pair().unwrap();
        reader.set_nonblocking(true).unwrap();
        let line: Vec<u8> = (0..1000u32).map(|i| b'a' + (i % 26) as u8).collect();
        writer.write_all(&line).unwrap();
        let mut input = SerialInput::new(reader, serial.clone(), drained.try_clone().unwrap());
        assert!(input.receive());
        let mut got = Vec::new();
        while got.len() < line.len() {
            // The guest reads until the FIFO is empty (LSR bit 0: data ready).
            let mut b = [0u8];
            loop {
                serial.lock().unwrap().read(5, &mut b);
                if b[0] & 1 == 0 {
                    break;
                }
                serial.lock().unwrap().read(0, &mut b);
                got.push(b[0]);
            }
            assert_eq!(drained.read().unwrap(), 1, "the UART said it is empty");
            input.refill();
        }
        assert_eq!(got, line);
    }

    #[test]
    fn wide_accesses_are_ignored() {
        let (mut dev, _) = SerialDevice::new(
            IrqTrigger(EventFd::new(0).unwrap()),
            Box::new(std::io::sink()) as Box<dyn Write + Send>,
        )
        .unwrap();
        let mut wide = [0u8; 2];
        dev.read(0, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
        dev.write(0, &[1, 2]);
    }
}
