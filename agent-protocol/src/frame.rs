//! Length-prefixed frames: `u32` little-endian length, then the payload.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Largest payload either side accepts (an inventory of thousands of blocks fits).
pub const MAX_FRAME: u32 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("the peer closed the connection")]
    Closed,
    #[error("frame of {0} bytes is above the {MAX_FRAME}-byte limit")]
    TooLarge(u64),
    #[error("truncated frame: {got} of {want} bytes before the connection closed")]
    Truncated { got: usize, want: usize },
    #[error("malformed frame: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

impl FrameError {
    /// Whether the connection is unusable afterwards (everything but a bad payload, which
    /// was read whole, so the stream is still in step).
    pub fn is_fatal(&self) -> bool {
        !matches!(self, FrameError::Malformed(_))
    }
}

/// Writes `value` as one frame.
pub fn write_frame<T: Serialize>(out: &mut impl Write, value: &T) -> Result<(), FrameError> {
    let payload = serde_json::to_vec(value)?;
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|&l| l <= MAX_FRAME)
        .ok_or(FrameError::TooLarge(payload.len() as u64))?;
    let mut frame = Vec::with_capacity(4 + payload.len());
    frame.extend_from_slice(&len.to_le_bytes());
    frame.extend_from_slice(&payload);
    out.write_all(&frame)?;
    out.flush()?;
    Ok(())
}

fn read_exact_or(input: &mut impl Read, buf: &mut [u8], at_start: bool) -> Result<(), FrameError> {
    let mut got = 0;
    while got < buf.len() {
        match input.read(&mut buf[got..]) {
            Ok(0) if got == 0 && at_start => return Err(FrameError::Closed),
            Ok(0) => {
                return Err(FrameError::Truncated {
                    got,
                    want: buf.len(),
                })
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Reads one frame and decodes it. The length is checked before the payload is read.
pub fn read_frame<T: DeserializeOwned>(input: &mut impl Read) -> Result<T, FrameError> {
    let mut len = [0u8; 4];
    read_exact_or(input, &mut len, true)?;
    let len = u32::from_le_bytes(len);
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(u64::from(len)));
    }
    let mut payload = vec![0u8; len as usize];
    read_exact_or(input, &mut payload, false)?;
    Ok(serde_json::from_slice(&payload)?)
}

/// A stream whose reads and writes all end by one deadline, however the peer paces its
/// bytes: each operation gets the time left as its socket timeout, so a peer that drips
/// a frame a byte at a time, or sends one frame after another, cannot stretch it.
/// Once the deadline has passed, operations fail with `TimedOut`.
#[derive(Debug)]
pub struct DeadlineStream<'a> {
    stream: &'a UnixStream,
    deadline: Instant,
}

impl<'a> DeadlineStream<'a> {
    pub fn new(stream: &'a UnixStream, deadline: Instant) -> Self {
        DeadlineStream { stream, deadline }
    }

    /// The time left, or `TimedOut` if there is none.
    fn left(&self) -> io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"));
        }
        Ok(left)
    }
}

impl Read for DeadlineStream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.set_read_timeout(Some(self.left()?))?;
        (&mut &*self.stream).read(buf)
    }
}

impl Write for DeadlineStream<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.set_write_timeout(Some(self.left()?))?;
        (&mut &*self.stream).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_stream_stays_in_step_after_a_bad_payload() {
        let mut wire = Vec::new();
        write_frame(&mut wire, &vec![1u32, 2, 3]).unwrap();
        wire.extend_from_slice(&5u32.to_le_bytes());
        wire.extend_from_slice(b"{bad}");
        write_frame(&mut wire, &"after").unwrap();
        let mut input = wire.as_slice();
        assert_eq!(read_frame::<Vec<u32>>(&mut input).unwrap(), vec![1, 2, 3]);
        let err = read_frame::<Vec<u32>>(&mut input).unwrap_err();
        assert!(matches!(err, FrameError::Malformed(_)) && !err.is_fatal());
        assert_eq!(read_frame::<String>(&mut input).unwrap(), "after");
        assert!(matches!(
            read_frame::<String>(&mut input),
            Err(FrameError::Closed)
        ));
    }

    #[test]
    fn oversized_lengths_are_refused_before_allocating() {
        let wire = u32::MAX.to_le_bytes();
        let err = read_frame::<String>(&mut wire.as_slice()).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge(4294967295)) && err.is_fatal());
        let big = "x".repeat(MAX_FRAME as usize);
        assert!(matches!(
            write_frame(&mut Vec::new(), &big),
            Err(FrameError::TooLarge(_))
        ));
    }

    #[test]
    fn a_deadline_bounds_a_dripped_frame_not_each_read() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let dripper = std::thread::spawn(move || {
            let mut wire = Vec::new();
            write_frame(&mut wire, &"x".repeat(100)).unwrap();
            for byte in wire {
                if (&theirs).write_all(&[byte]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        let started = Instant::now();
        let mut stream = DeadlineStream::new(&ours, started + Duration::from_millis(200));
        let err = read_frame::<String>(&mut stream).unwrap_err();
        let took = started.elapsed();
        assert!(
            matches!(&err, FrameError::Io(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)),
            "{err}"
        );
        assert!(took < Duration::from_millis(500), "{took:?}");
        // Past the deadline nothing blocks at all.
        let err = stream.read(&mut [0u8; 1]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        drop(ours);
        dripper.join().unwrap();
    }

    #[test]
    fn a_deadline_stream_carries_frames_both_ways() {
        let (a, b) = UnixStream::pair().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        write_frame(&mut DeadlineStream::new(&a, deadline), &vec![7u8; 3]).unwrap();
        let got: Vec<u8> = read_frame(&mut DeadlineStream::new(&b, deadline)).unwrap();
        assert_eq!(got, [7, 7, 7]);
    }

    #[test]
    fn truncated_frames_are_errors() {
        let mut wire = Vec::new();
        write_frame(&mut wire, &"hello").unwrap();
        for cut in 1..wire.len() {
            let err = read_frame::<String>(&mut &wire[..cut]).unwrap_err();
            assert!(
                matches!(err, FrameError::Truncated { .. }),
                "cut at {cut}: {err}"
            );
        }
    }
}
