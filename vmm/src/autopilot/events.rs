//! The autopilot's recent decisions: a bounded ring that `GET /api/v1/events` reads.

use std::collections::VecDeque;

use mempower_api::{AutopilotEvent, MAX_EVENTS};

/// The last [`MAX_EVENTS`] events, oldest first; sequence numbers start at 1 and never
/// repeat, so a reader that missed some can tell.
#[derive(Debug, Default)]
pub struct EventRing {
    events: VecDeque<AutopilotEvent>,
    last_seq: u64,
}

impl EventRing {
    /// Adds `event` with the next sequence number, forgetting the oldest beyond the
    /// bound; answers it as stored.
    pub fn push(&mut self, mut event: AutopilotEvent) -> AutopilotEvent {
        self.last_seq += 1;
        event.seq = self.last_seq;
        if self.events.len() == MAX_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(event.clone());
        event
    }

    /// The events after `since` (every event kept without it), oldest first.
    pub fn after(&self, since: Option<u64>) -> Vec<AutopilotEvent> {
        let since = since.unwrap_or(0);
        self.events
            .iter()
            .filter(|e| e.seq > since)
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mempower_api::{AutopilotAction, AutopilotInputs};

    fn event(node: u32) -> AutopilotEvent {
        AutopilotEvent {
            seq: 0,
            at_ms: 0,
            node,
            action: AutopilotAction::Grow,
            from_bytes: 0,
            to_bytes: 1,
            reason: "test".into(),
            job: None,
            inputs: AutopilotInputs::default(),
        }
    }

    #[test]
    fn the_ring_keeps_the_last_events_in_order_with_fresh_numbers() {
        let mut ring = EventRing::default();
        for i in 0..(MAX_EVENTS as u32 + 10) {
            assert_eq!(ring.push(event(i)).seq, u64::from(i) + 1);
        }
        let all = ring.after(None);
        assert_eq!(all.len(), MAX_EVENTS);
        assert_eq!(all[0].seq, 11, "the ten oldest went");
        assert!(all.windows(2).all(|w| w[0].seq + 1 == w[1].seq));
        let newest = ring.after(Some(MAX_EVENTS as u64 + 8));
        assert_eq!(newest.iter().map(|e| e.seq).collect::<Vec<_>>(), [521, 522]);
        assert!(ring.after(Some(u64::MAX)).is_empty());
    }
}
