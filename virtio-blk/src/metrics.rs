//! Device counters: lock-free atomics the device bumps, and a serializable
//! snapshot for export (e.g. Prometheus text format by the VMM).

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use crate::request::{RequestError, RequestType};

/// Counters of one virtio-blk device. Shared with the VMM through an `Arc`,
/// readable at any time without locking the device.
#[derive(Debug, Default)]
pub struct VirtioBlkMetrics {
    /// Successful IN requests.
    pub read_ops: AtomicU64,
    /// Bytes read by successful IN requests.
    pub read_bytes: AtomicU64,
    /// Successful OUT requests.
    pub write_ops: AtomicU64,
    /// Bytes written by successful OUT requests.
    pub write_bytes: AtomicU64,
    /// Successful FLUSH requests.
    pub flush_ops: AtomicU64,
    /// Successful GET_ID requests.
    pub get_id_ops: AtomicU64,
    /// Requests of a type the device does not implement (answered UNSUPP).
    pub unsupported_requests: AtomicU64,
    /// Chains returned without a status (none, or not writable memory): the
    /// request was not executed.
    pub unanswered_chains: AtomicU64,
    /// Chains whose buffers are in the wrong order or direction, or too
    /// short for the header or the GET_ID serial.
    pub bad_layout: AtomicU64,
    /// Chains with more descriptors or data segments than allowed.
    pub too_many_segments: AtomicU64,
    /// Requests with more data than `seg_max * size_max`.
    pub data_too_long: AtomicU64,
    /// IN/OUT data lengths that are not a multiple of 512.
    pub unaligned: AtomicU64,
    /// IN/OUT sector ranges past the end of the disk (or overflowing).
    pub out_of_range: AtomicU64,
    /// OUT requests to a read-only disk.
    pub readonly_writes: AtomicU64,
    /// Header or data buffers outside guest memory.
    pub bad_guest_memory: AtomicU64,
    /// Reads, writes or flushes the image file failed.
    pub io_errors: AtomicU64,
    /// Driver writes to the read-only configuration space (ignored).
    pub config_writes_ignored: AtomicU64,
}

/// A point-in-time copy of [`VirtioBlkMetrics`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MetricsSnapshot {
    /// Successful IN requests.
    pub read_ops: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Successful OUT requests.
    pub write_ops: u64,
    /// Bytes written.
    pub write_bytes: u64,
    /// Successful FLUSH requests.
    pub flush_ops: u64,
    /// Successful GET_ID requests.
    pub get_id_ops: u64,
    /// Unsupported request types.
    pub unsupported_requests: u64,
    /// Chains returned without a status.
    pub unanswered_chains: u64,
    /// Badly laid out chains.
    pub bad_layout: u64,
    /// Chains with too many descriptors or segments.
    pub too_many_segments: u64,
    /// Requests with too much data.
    pub data_too_long: u64,
    /// Unaligned IN/OUT lengths.
    pub unaligned: u64,
    /// Sector ranges past the end of the disk.
    pub out_of_range: u64,
    /// Writes to a read-only disk.
    pub readonly_writes: u64,
    /// Buffers outside guest memory.
    pub bad_guest_memory: u64,
    /// Failed file operations.
    pub io_errors: u64,
    /// Ignored configuration writes.
    pub config_writes_ignored: u64,
}

impl MetricsSnapshot {
    /// Every request answered IOERR or dropped, whatever the reason.
    pub fn errors(&self) -> u64 {
        self.unanswered_chains
            + self.bad_layout
            + self.too_many_segments
            + self.data_too_long
            + self.unaligned
            + self.out_of_range
            + self.readonly_writes
            + self.bad_guest_memory
            + self.io_errors
    }
}

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl VirtioBlkMetrics {
    /// Copies every counter.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        MetricsSnapshot {
            read_ops: get(&self.read_ops),
            read_bytes: get(&self.read_bytes),
            write_ops: get(&self.write_ops),
            write_bytes: get(&self.write_bytes),
            flush_ops: get(&self.flush_ops),
            get_id_ops: get(&self.get_id_ops),
            unsupported_requests: get(&self.unsupported_requests),
            unanswered_chains: get(&self.unanswered_chains),
            bad_layout: get(&self.bad_layout),
            too_many_segments: get(&self.too_many_segments),
            data_too_long: get(&self.data_too_long),
            unaligned: get(&self.unaligned),
            out_of_range: get(&self.out_of_range),
            readonly_writes: get(&self.readonly_writes),
            bad_guest_memory: get(&self.bad_guest_memory),
            io_errors: get(&self.io_errors),
            config_writes_ignored: get(&self.config_writes_ignored),
        }
    }

    /// Counts a request that completed with `VIRTIO_BLK_S_OK`.
    pub(crate) fn success(&self, kind: RequestType, bytes: u64) {
        match kind {
            RequestType::In => {
                add(&self.read_ops, 1);
                add(&self.read_bytes, bytes);
            }
            RequestType::Out => {
                add(&self.write_ops, 1);
                add(&self.write_bytes, bytes);
            }
            RequestType::Flush => add(&self.flush_ops, 1),
            RequestType::GetId => add(&self.get_id_ops, 1),
            // Never succeeds: counted by `failure`.
            RequestType::Unsupported(_) => {}
        }
    }

    /// Counts a failed request under its kind of error.
    pub(crate) fn failure(&self, e: &RequestError) {
        use RequestError as E;
        let counter = match e {
            E::StatusMissing | E::StatusNotInMemory(_) => &self.unanswered_chains,
            E::ReadableAfterWritable
            | E::HeaderTooShort(_)
            | E::DataWrongDirection(_)
            | E::GetIdBufferTooSmall(_) => &self.bad_layout,
            E::TooManyDescriptors(_) | E::TooManySegments(_) => &self.too_many_segments,
            E::DataTooLong(_) => &self.data_too_long,
            E::Unaligned(_) => &self.unaligned,
            E::OutOfRange { .. } => &self.out_of_range,
            E::ReadOnly => &self.readonly_writes,
            E::HeaderRead(_) | E::DataNotInMemory(_) => &self.bad_guest_memory,
            E::Backend(_) => &self.io_errors,
            E::Unsupported(_) => &self.unsupported_requests,
        };
        add(counter, 1);
    }

    pub(crate) fn config_write(&self) {
        add(&self.config_writes_ignored, 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::BackendError;
    use vm_memory::{GuestAddress, GuestMemoryError};

    #[test]
    fn every_outcome_reaches_its_counter() {
        let m = VirtioBlkMetrics::default();
        m.success(RequestType::In, 4096);
        m.success(RequestType::In, 512);
        m.success(RequestType::Out, 1024);
        m.success(RequestType::Flush, 0);
        m.success(RequestType::GetId, 20);
        let gm = || GuestMemoryError::InvalidGuestAddress(GuestAddress(0));
        let errors = [
            RequestError::StatusMissing,
            RequestError::StatusNotInMemory(0),
            RequestError::TooManyDescriptors(300),
            RequestError::ReadableAfterWritable,
            RequestError::HeaderTooShort(3),
            RequestError::HeaderRead(gm()),
            RequestError::DataWrongDirection(RequestType::In),
            RequestError::TooManySegments(200),
            RequestError::DataTooLong(1 << 40),
            RequestError::Unaligned(100),
            RequestError::OutOfRange {
                sector: 1,
                len: 512,
                capacity: 1,
            },
            RequestError::ReadOnly,
            RequestError::GetIdBufferTooSmall(19),
            RequestError::DataNotInMemory(gm()),
            RequestError::Backend(BackendError::ReadOnly),
            RequestError::Unsupported(11),
        ];
        for e in &errors {
            m.failure(e);
        }
        m.config_write();
        let s = m.snapshot();
        assert_eq!((s.read_ops, s.read_bytes), (2, 4608));
        assert_eq!((s.write_ops, s.write_bytes), (1, 1024));
        assert_eq!((s.flush_ops, s.get_id_ops), (1, 1));
        assert_eq!(s.unanswered_chains, 2);
        assert_eq!(s.bad_layout, 4);
        assert_eq!(s.too_many_segments, 2);
        assert_eq!((s.data_too_long, s.unaligned, s.out_of_range), (1, 1, 1));
        assert_eq!((s.readonly_writes, s.bad_guest_memory), (1, 2));
        assert_eq!((s.io_errors, s.unsupported_requests), (1, 1));
        assert_eq!(s.config_writes_ignored, 1);
        assert_eq!(s.errors(), errors.len() as u64 - 1, "UNSUPP is no error");
    }
}
