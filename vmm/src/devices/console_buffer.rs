//! A bounded buffer between the UART and the console (stdout or the console log), and
//! the thread that writes it out, `mempower-console`.
//!
//! The UART's transmit register is written by a vCPU holding the serial lock, which the
//! event loop needs to forward input. Written straight to a stdout nobody reads (a full
//! pipe, a suspended terminal), the vCPU blocked with the lock held, and the event loop
//! blocked behind it. Now a vCPU only copies the byte here; when the buffer is full the
//! byte is dropped and counted (the guest cannot be made to wait, as a real UART's
//! line would not), with one warning, and the writer never holds the serial lock.

use crate::sync::Locked;
use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Bytes buffered before output is dropped: a burst of several boot logs.
pub const CAPACITY: usize = 256 << 10;

#[derive(Default)]
struct State {
    bytes: VecDeque<u8>,
    /// Bytes dropped because the buffer was full, in all.
    dropped: u64,
    /// Dropped bytes already reported.
    reported: u64,
    /// The writer holds bytes it took but has not written yet.
    writing: bool,
    /// The handle is gone: the writer ends once the buffer is empty.
    closed: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Bytes arrived, or the handle closed.
    ready: Condvar,
    /// The writer finished a chunk.
    written: Condvar,
    capacity: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.locked()
    }
}

/// The vCPUs' side: never blocks on the console.
pub struct ConsoleBuffer {
    shared: Arc<Shared>,
}

/// Waits for what is buffered to be written, at teardown.
#[derive(Clone)]
pub struct ConsoleDrain {
    shared: Arc<Shared>,
}

impl ConsoleBuffer {
    /// Starts `mempower-console`, which runs `thread_start` (its seccomp filter) and
    /// then writes what the buffer receives to `out`.
    pub fn start(
        out: Box<dyn Write + Send>,
        capacity: usize,
        thread_start: fn(),
    ) -> io::Result<(Self, ConsoleDrain)> {
        let shared = Arc::new(Shared {
            state: Mutex::default(),
            ready: Condvar::new(),
            written: Condvar::new(),
            capacity,
        });
        let writer = shared.clone();
        std::thread::Builder::new()
            .name("mempower-console".into())
            .spawn(move || {
                thread_start();
                write_out(&writer, out);
            })?;
        let drain = ConsoleDrain {
            shared: shared.clone(),
        };
        Ok((ConsoleBuffer { shared }, drain))
    }
}

impl Write for ConsoleBuffer {
    /// Takes what fits and drops the rest; always "writes" all of `buf`.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut state = self.shared.lock();
        let was_empty = state.bytes.is_empty();
        let room = self.shared.capacity.saturating_sub(state.bytes.len());
        let taken = buf.len().min(room);
        state.bytes.extend(&buf[..taken]);
        state.dropped += (buf.len() - taken) as u64;
        drop(state);
        // The writer sleeps only on an empty buffer: one wake-up per burst, not a byte.
        if was_empty && taken > 0 {
            self.shared.ready.notify_one();
        }
        Ok(buf.len())
    }

    /// Nothing to do here: the UART flushes after every byte, and the writer flushes
    /// after every chunk. [`ConsoleDrain::drain`] waits for the output.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for ConsoleBuffer {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.ready.notify_one();
    }
}

impl ConsoleDrain {
    /// Waits at most `limit` for the buffer to be written out; true if it was. Reports
    /// the bytes dropped in all, if any.
    pub fn drain(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut state = self.shared.lock();
        while !state.bytes.is_empty() || state.writing {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            state = self
                .shared
                .written
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        if state.dropped > 0 {
            log::warn!(
                "{} bytes of the guest's console output were dropped: the console did not keep up",
                state.dropped
            );
        }
        state.bytes.is_empty() && !state.writing
    }

    /// Bytes dropped so far.
    pub fn dropped(&self) -> u64 {
        self.shared.lock().dropped
    }
}

/// The writer's loop: take everything buffered, write it without the lock.
fn write_out(shared: &Shared, mut out: Box<dyn Write + Send>) {
    let mut state = shared.lock();
    loop {
        while state.bytes.is_empty() && !state.closed {
            state = crate::sync::wait(&shared.ready, state);
        }
        if state.bytes.is_empty() {
            return; // Closed and written out.
        }
        let chunk: Vec<u8> = state.bytes.drain(..).collect();
        state.writing = true;
        let first_drop = state.reported == 0 && state.dropped > 0;
        state.reported = state.dropped;
        drop(state);
        if first_drop {
            log::warn!(
                "the guest's console output is dropped while the console does not keep up \
                 (further drops are only counted)"
            );
        }
        // A closed stdout must not stop the guest: its output is lost, as it would be.
        let _ = out.write_all(&chunk).and_then(|()| out.flush());
        state = shared.lock();
        state.writing = false;
        shared.written.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::serial::{IrqTrigger, SerialDevice};
    use crate::devices::BusDevice;
    use std::sync::mpsc;
    use vmm_sys_util::eventfd::EventFd;

    /// Blocks its first write until told to go on (a stdout nobody reads), then keeps
    /// everything.
    struct Stalled {
        gate: Option<mpsc::Receiver<()>>,
        entered: mpsc::Sender<()>,
        out: Arc<Mutex<Vec<u8>>>,
    }

    impl Write for Stalled {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if let Some(gate) = self.gate.take() {
                let _ = self.entered.send(());
                let _ = gate.recv();
            }
            self.out.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A UART whose console is stalled: a vCPU's writes return at once, what does not
    /// fit is dropped and counted, and the rest comes out once the console moves.
    #[test]
    fn a_vcpu_never_waits_for_a_stalled_console() {
        let (go, gate) = mpsc::channel();
        let (entered_tx, entered) = mpsc::channel();
        let out = Arc::new(Mutex::new(Vec::new()));
        let stalled = Stalled {
            gate: Some(gate),
            entered: entered_tx,
            out: out.clone(),
        };
        let (buffer, drain) = ConsoleBuffer::start(Box::new(stalled), 1000, || {}).unwrap();
        let (uart, _) = SerialDevice::new(
            IrqTrigger(EventFd::new(libc::EFD_NONBLOCK).unwrap()),
            Box::new(buffer) as Box<dyn Write + Send>,
        )
        .unwrap();
        let serial = Arc::new(Mutex::new(uart));

        // The vCPU: one byte, which the console gets stuck writing, then 3000 more.
        let vcpu_serial = serial.clone();
        let (done_tx, done) = mpsc::channel();
        std::thread::spawn(move || {
            vcpu_serial.lock().unwrap().write(0, b"<");
            entered
                .recv_timeout(Duration::from_secs(5))
                .expect("the console took the first byte");
            for i in 0..3000u32 {
                vcpu_serial
                    .lock()
                    .unwrap()
                    .write(0, &[b'a' + (i % 26) as u8]);
            }
            let _ = done_tx.send(());
        });
        done.recv_timeout(Duration::from_secs(5))
            .expect("the vCPU's writes returned while the console was stalled");
        // Nor is the serial lock held by the console: the event loop gets it at once.
        assert!(serial.try_lock().is_ok());
        assert_eq!(drain.dropped(), 2000);
        let text = crate::evacuation::metrics::render_console(drain.dropped());
        assert!(
            text.ends_with("\nmempower_console_dropped_bytes_total 2000\n"),
            "{text}"
        );
        assert!(!drain.drain(Duration::from_millis(50)), "still stalled");

        go.send(()).unwrap();
        assert!(drain.drain(Duration::from_secs(5)));
        assert_eq!(out.lock().unwrap().len(), 1 + 1000);
        assert_eq!(&out.lock().unwrap()[..4], b"<abc");
        // Output flows again once there is room.
        serial.lock().unwrap().write(0, b"!");
        assert!(drain.drain(Duration::from_secs(5)));
        assert_eq!(out.lock().unwrap().last(), Some(&b'!'));
    }
}
