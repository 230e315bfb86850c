//! Fuzzes `read_frame` on arbitrary bytes, as the VMM reads the agent's
//! answers and the agent reads the VMM's (or a hybrid-socket client's)
//! requests, delivered in arbitrary pieces.
//!
//! Invariants:
//! - no panic, whatever the bytes and however they are split;
//! - a frame is read only whole: the bytes it used are exactly its 4-byte
//!   length plus that many payload bytes, never above MAX_FRAME;
//! - after a malformed payload the stream stays in step (the next frame
//!   starts right after it), and any error other than that ends reading;
//! - a decoded frame encodes again, and decodes back to the same value.

#![no_main]

use std::io::{self, Read};

use agent_protocol::{read_frame, write_frame, FrameError, RequestFrame, ResponseFrame, MAX_FRAME};
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Hands out the input in pieces whose sizes the input's first bytes choose,
/// and counts what was taken.
struct Pieces<'a> {
    data: &'a [u8],
    sizes: &'a [u8],
    next: usize,
    taken: usize,
}

impl Read for Pieces<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let size = match self.sizes.get(self.next % self.sizes.len().max(1)) {
            Some(&s) => usize::from(s).max(1),
            None => buf.len(),
        };
        self.next += 1;
        let n = size.min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        self.taken += n;
        Ok(n)
    }
}

fn frames<T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug>(
    data: &[u8],
    sizes: &[u8],
) {
    let mut input = Pieces {
        data,
        sizes,
        next: 0,
        taken: 0,
    };
    // Every frame takes at least its 4-byte length.
    for _ in 0..=data.len() / 4 {
        let before = input.taken;
        let declared = data
            .get(before..before + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        match read_frame::<T>(&mut input) {
            Ok(value) => {
                let used = input.taken - before;
                let len = declared.expect("a whole frame had a length");
                assert!(len <= MAX_FRAME);
                assert_eq!(used, 4 + len as usize, "read exactly one frame");
                let mut wire = Vec::new();
                if write_frame(&mut wire, &value).is_ok() {
                    let again: T = read_frame(&mut wire.as_slice()).expect("re-read");
                    assert_eq!(again, value);
                }
            }
            Err(FrameError::Malformed(_)) => {
                let used = input.taken - before;
                let len = declared.expect("a malformed payload was read whole");
                assert_eq!(used, 4 + len as usize, "still in step");
            }
            Err(FrameError::TooLarge(n)) => {
                assert!(n > u64::from(MAX_FRAME));
                return;
            }
            Err(_) => return,
        }
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&n_sizes, rest)) = input.split_first() else {
        return;
    };
    let (sizes, data) = rest.split_at(usize::from(n_sizes % 8).min(rest.len()));
    frames::<RequestFrame>(data, sizes);
    frames::<ResponseFrame>(data, sizes);
});
