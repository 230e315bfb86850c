//! Device counters: lock-free atomics the device bumps, and a serializable
//! snapshot for export (e.g. Prometheus text format by the VMM).

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use crate::request::{Request, ResponseType};

/// Counters of one virtio-mem device. Shared with the VMM through an `Arc`,
/// readable at any time without locking the device.
#[derive(Debug, Default)]
pub struct VirtioMemMetrics {
    /// PLUG requests received.
    pub plug_requests: AtomicU64,
    /// UNPLUG requests received.
    pub unplug_requests: AtomicU64,
    /// UNPLUG_ALL requests received.
    pub unplug_all_requests: AtomicU64,
    /// STATE requests received.
    pub state_requests: AtomicU64,
    /// Chains that carried no valid request (malformed chain, unknown type).
    pub invalid_requests: AtomicU64,
    /// Chains returned without a response (no usable response buffer).
    pub unanswered_chains: AtomicU64,
    /// ACK responses.
    pub resp_ack: AtomicU64,
    /// NACK responses.
    pub resp_nack: AtomicU64,
    /// BUSY responses.
    pub resp_busy: AtomicU64,
    /// ERROR responses.
    pub resp_error: AtomicU64,
    /// Bytes plugged by acknowledged requests.
    pub bytes_plugged: AtomicU64,
    /// Bytes unplugged by acknowledged (or partially done UNPLUG_ALL) requests.
    pub bytes_unplugged: AtomicU64,
    /// Bytes whose host memory was discarded.
    pub bytes_discarded: AtomicU64,
    /// Failed discards (the blocks stayed plugged).
    pub discard_failures: AtomicU64,
    /// Failed populates (the blocks stayed unplugged).
    pub populate_failures: AtomicU64,
    /// Host changes of `requested_size`.
    pub requested_size_changes: AtomicU64,
    /// Driver writes to the read-only configuration space (ignored).
    pub config_writes_ignored: AtomicU64,
}

/// A point-in-time copy of [`VirtioMemMetrics`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MetricsSnapshot {
    /// PLUG requests received.
    pub plug_requests: u64,
    /// UNPLUG requests received.
    pub unplug_requests: u64,
    /// UNPLUG_ALL requests received.
    pub unplug_all_requests: u64,
    /// STATE requests received.
    pub state_requests: u64,
    /// Chains that carried no valid request.
    pub invalid_requests: u64,
    /// Chains returned without a response.
    pub unanswered_chains: u64,
    /// ACK responses.
    pub resp_ack: u64,
    /// NACK responses.
    pub resp_nack: u64,
    /// BUSY responses.
    pub resp_busy: u64,
    /// ERROR responses.
    pub resp_error: u64,
    /// Bytes plugged.
    pub bytes_plugged: u64,
    /// Bytes unplugged.
    pub bytes_unplugged: u64,
    /// Bytes discarded.
    pub bytes_discarded: u64,
    /// Failed discards.
    pub discard_failures: u64,
    /// Failed populates.
    pub populate_failures: u64,
    /// Host changes of `requested_size`.
    pub requested_size_changes: u64,
    /// Ignored configuration writes.
    pub config_writes_ignored: u64,
}

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl VirtioMemMetrics {
    /// Copies every counter.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        MetricsSnapshot {
            plug_requests: get(&self.plug_requests),
            unplug_requests: get(&self.unplug_requests),
            unplug_all_requests: get(&self.unplug_all_requests),
            state_requests: get(&self.state_requests),
            invalid_requests: get(&self.invalid_requests),
            unanswered_chains: get(&self.unanswered_chains),
            resp_ack: get(&self.resp_ack),
            resp_nack: get(&self.resp_nack),
            resp_busy: get(&self.resp_busy),
            resp_error: get(&self.resp_error),
            bytes_plugged: get(&self.bytes_plugged),
            bytes_unplugged: get(&self.bytes_unplugged),
            bytes_discarded: get(&self.bytes_discarded),
            discard_failures: get(&self.discard_failures),
            populate_failures: get(&self.populate_failures),
            requested_size_changes: get(&self.requested_size_changes),
            config_writes_ignored: get(&self.config_writes_ignored),
        }
    }

    pub(crate) fn request(&self, req: &Request) {
        add(
            match req {
                Request::Plug(_) => &self.plug_requests,
                Request::Unplug(_) => &self.unplug_requests,
                Request::UnplugAll => &self.unplug_all_requests,
                Request::State(_) => &self.state_requests,
            },
            1,
        );
    }

    pub(crate) fn response(&self, kind: ResponseType) {
        add(
            match kind {
                ResponseType::Ack => &self.resp_ack,
                ResponseType::Nack => &self.resp_nack,
                ResponseType::Busy => &self.resp_busy,
                ResponseType::Error => &self.resp_error,
            },
            1,
        );
    }

    pub(crate) fn inc(counter: &AtomicU64) {
        add(counter, 1);
    }

    pub(crate) fn add_bytes(counter: &AtomicU64, n: u64) {
        add(counter, n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::BlockRange;

    #[test]
    fn counters_reach_the_snapshot() {
        let m = VirtioMemMetrics::default();
        let r = BlockRange {
            addr: 0,
            nb_blocks: 1,
        };
        m.request(&Request::Plug(r));
        m.request(&Request::Unplug(r));
        m.request(&Request::UnplugAll);
        m.request(&Request::State(r));
        m.request(&Request::State(r));
        for k in [
            ResponseType::Ack,
            ResponseType::Nack,
            ResponseType::Busy,
            ResponseType::Error,
            ResponseType::Error,
        ] {
            m.response(k);
        }
        VirtioMemMetrics::add_bytes(&m.bytes_discarded, 4096);
        VirtioMemMetrics::inc(&m.discard_failures);
        let s = m.snapshot();
        assert_eq!(
            (
                s.plug_requests,
                s.unplug_requests,
                s.unplug_all_requests,
                s.state_requests
            ),
            (1, 1, 1, 2)
        );
        assert_eq!(
            (s.resp_ack, s.resp_nack, s.resp_busy, s.resp_error),
            (1, 1, 1, 2)
        );
        assert_eq!((s.bytes_discarded, s.discard_failures), (4096, 1));
    }
}
