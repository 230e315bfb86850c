//! Fuzzes what the VMM does with bytes from the guest agent: reading one response frame
//! (`agent_protocol::read_frame::<ResponseFrame>`), whatever the guest sends, including
//! the answers to `track` and `settle` whose figures the VMM's locality checks use.
//!
//! Invariants:
//! - no panic, and nothing allocated beyond the frame limit (the length is checked
//!   before the payload is read);
//! - a frame that decodes re-encodes to a frame that decodes to the same value;
//! - the figures of `tracked` and `settled` answers are read as they were sent (no
//!   saturation or truncation happens in parsing: the VMM saturates when it sums).

#![no_main]

use agent_protocol::{read_frame, write_frame, FrameError, Response, ResponseFrame, MAX_FRAME};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut input = data;
    match read_frame::<ResponseFrame>(&mut input) {
        Ok(frame) => {
            let mut wire = Vec::new();
            write_frame(&mut wire, &frame).expect("a decoded frame encodes");
            let again = read_frame::<ResponseFrame>(&mut wire.as_slice()).expect("and decodes");
            assert_eq!(again, frame);
            if let Ok(Response::Tracked { blocks, rooms, .. }) = frame.into_result() {
                let json = serde_json::to_value(&blocks).expect("blocks encode");
                assert_eq!(json.as_array().map(Vec::len), Some(blocks.len()));
                assert!(rooms.len() <= MAX_FRAME as usize);
            }
        }
        Err(FrameError::TooLarge(n)) => assert!(n > u64::from(MAX_FRAME)),
        Err(_) => {}
    }
});
