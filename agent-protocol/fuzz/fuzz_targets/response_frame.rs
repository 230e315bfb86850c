//! Fuzzes what the VMM does with bytes from the guest agent: reading one response frame
//! (`agent_protocol::read_frame::<ResponseFrame>`), whatever the guest sends, including
//! the answers to `track` and `settle` whose figures the VMM's locality checks use.
//!
//! Invariants:
//! - no panic, and nothing allocated beyond the frame limit (the length is checked
//!   before the payload is read);
//! - a frame that decodes re-encodes to a frame that decodes to the same value;
//! - the figures of `tracked` and `settled` answers are read as they were sent (no
//!   saturation or truncation happens in parsing: the VMM saturates when it sums);
//! - a `signals` answer's pressure figures are percentages from 0 to 100, whatever was
//!   sent, and its check passes exactly the answers of at most MAX_NODES nodes named in
//!   increasing order.

#![no_main]

use agent_protocol::psi::Stall;
use agent_protocol::{
    read_frame, write_frame, FrameError, Response, ResponseFrame, MAX_FRAME, MAX_NODES,
};
use libfuzzer_sys::fuzz_target;

fn assert_percentages(stall: &Stall) {
    for avg in [stall.avg10, stall.avg60] {
        assert!((0.0..=100.0).contains(&avg), "{avg}");
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = data;
    match read_frame::<ResponseFrame>(&mut input) {
        Ok(frame) => {
            let mut wire = Vec::new();
            write_frame(&mut wire, &frame).expect("a decoded frame encodes");
            let again = read_frame::<ResponseFrame>(&mut wire.as_slice()).expect("and decodes");
            assert_eq!(again, frame);
            match frame.into_result() {
                Ok(Response::Tracked { blocks, rooms, .. }) => {
                    let json = serde_json::to_value(&blocks).expect("blocks encode");
                    assert_eq!(json.as_array().map(Vec::len), Some(blocks.len()));
                    assert!(rooms.len() <= MAX_FRAME as usize);
                }
                Ok(Response::Signals(signals)) => {
                    if let Some(pressure) = &signals.pressure {
                        assert_percentages(&pressure.some);
                        assert_percentages(&pressure.full);
                    }
                    let sound = signals.nodes.len() <= MAX_NODES
                        && signals.nodes.windows(2).all(|w| w[0].node < w[1].node);
                    assert_eq!(signals.check().is_ok(), sound);
                }
                _ => {}
            }
        }
        Err(FrameError::TooLarge(n)) => assert!(n > u64::from(MAX_FRAME)),
        Err(_) => {}
    }
});
