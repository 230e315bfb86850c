//! Requests on the request queue (virtio 1.2 section 5.2.6) and parsing of an
//! untrusted descriptor chain.
//!
//! A request is `struct virtio_blk_req`: a 16-byte header the device reads
//! (`type`, `reserved`, `sector`), then the data (read by the device for OUT,
//! written for IN and GET_ID), then one status byte the device writes last.
//! Linux puts the header, each data segment and the status in descriptors of
//! their own, but the device must not rely on any framing (virtio 1.2 section
//! 2.7.4), so the parser treats the chain as a device-readable byte stream
//! followed by a device-writable one: the header is the first 16 readable
//! bytes, the status the last writable byte, the data what lies between.
//! Whatever the guest sends, parsing returns an error, never panics.

use std::ops::Deref;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryError, Permissions};

use crate::backend::BackendError;

/// Size of the request header (`type`, `reserved`, `sector`).
pub const HEADER_SIZE: usize = 16;

/// Why a request fails. Every variant but [`RequestError::Unsupported`] is
/// answered `VIRTIO_BLK_S_IOERR` when the chain has a status byte.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The chain does not end with a device-writable byte for the status.
    #[error("chain does not end with a device-writable status byte")]
    StatusMissing,
    /// The status byte is not writable guest memory.
    #[error("status byte at {0:#x} is not writable guest memory")]
    StatusNotInMemory(u64),
    /// More descriptors than the device allows.
    #[error("chain has {0} descriptors, more than the device allows")]
    TooManyDescriptors(usize),
    /// A device-readable descriptor follows a device-writable one.
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    /// The device-readable part is shorter than the header.
    #[error("request header needs {HEADER_SIZE} device-readable bytes, chain has {0}")]
    HeaderTooShort(u64),
    /// The header is not in guest memory.
    #[error("cannot read the request header: {0}")]
    HeaderRead(GuestMemoryError),
    /// Data the device must write is device-readable, or the reverse.
    #[error("{0} request carries data in the wrong direction")]
    DataWrongDirection(RequestType),
    /// More data segments than `seg_max`.
    #[error("request has {0} data segments, more than seg_max")]
    TooManySegments(usize),
    /// More data than `seg_max * size_max`.
    #[error("request carries {0} data bytes, more than the device allows")]
    DataTooLong(u64),
    /// The data length is not a multiple of 512.
    #[error("data length {0} is not a multiple of 512")]
    Unaligned(u64),
    /// The sector range goes past the end of the disk (or overflows).
    #[error("sectors {sector}+{len} bytes go past the disk's {capacity} sectors")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Data length in bytes.
        len: u64,
        /// Disk capacity in sectors.
        capacity: u64,
    },
    /// A write to a read-only disk.
    #[error("write to a read-only disk")]
    ReadOnly,
    /// GET_ID data shorter than the 20-byte serial (never truncated).
    #[error("GET_ID buffer of {0} bytes cannot hold the 20-byte id")]
    GetIdBufferTooSmall(u64),
    /// A data buffer is not guest memory (with the access it needs).
    #[error("data buffer is not guest memory: {0}")]
    DataNotInMemory(GuestMemoryError),
    /// The disk failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// A request type the device does not implement.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
}

impl RequestError {
    /// The status the driver gets for this error.
    pub fn status(&self) -> Status {
        match self {
            Self::Unsupported(_) => Status::Unsupp,
            _ => Status::IoErr,
        }
    }
}

/// The request type (`VIRTIO_BLK_T_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    /// Read sectors into the data buffers.
    In,
    /// Write the data buffers to sectors.
    Out,
    /// Make completed writes durable.
    Flush,
    /// Read the 20-byte device id.
    GetId,
    /// Anything else (discard, write zeroes, zoned, SCSI...): answered UNSUPP.
    Unsupported(u32),
}

impl RequestType {
    /// Decodes `type`.
    pub fn from_raw(raw: u32) -> Self {
        match raw {
            VIRTIO_BLK_T_IN => Self::In,
            VIRTIO_BLK_T_OUT => Self::Out,
            VIRTIO_BLK_T_FLUSH => Self::Flush,
            VIRTIO_BLK_T_GET_ID => Self::GetId,
            other => Self::Unsupported(other),
        }
    }

    /// Encodes `type`.
    pub fn raw(self) -> u32 {
        match self {
            Self::In => VIRTIO_BLK_T_IN,
            Self::Out => VIRTIO_BLK_T_OUT,
            Self::Flush => VIRTIO_BLK_T_FLUSH,
            Self::GetId => VIRTIO_BLK_T_GET_ID,
            Self::Unsupported(raw) => raw,
        }
    }
}

impl std::fmt::Display for RequestType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::In => f.write_str("IN"),
            Self::Out => f.write_str("OUT"),
            Self::Flush => f.write_str("FLUSH"),
            Self::GetId => f.write_str("GET_ID"),
            Self::Unsupported(raw) => write!(f, "type {raw}"),
        }
    }
}

/// The request header. `reserved` (formerly `ioprio`) is ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Request type.
    pub request_type: RequestType,
    /// First 512-byte sector, for IN and OUT.
    pub sector: u64,
}

impl RequestHeader {
    /// Decodes the little-endian header.
    pub fn parse(b: &[u8; HEADER_SIZE]) -> Self {
        let (ty, rest) = b.split_first_chunk::<4>().expect("16 > 4");
        let sector = rest.last_chunk::<8>().expect("12 > 8");
        Self {
            request_type: RequestType::from_raw(u32::from_le_bytes(*ty)),
            sector: u64::from_le_bytes(*sector),
        }
    }

    /// Encodes the header as a driver would (tests, fuzzing, benches).
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..4].copy_from_slice(&self.request_type.raw().to_le_bytes());
        b[8..16].copy_from_slice(&self.sector.to_le_bytes());
        b
    }
}

/// The status byte (`VIRTIO_BLK_S_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    /// Success.
    Ok = VIRTIO_BLK_S_OK as u8,
    /// Device or driver error.
    IoErr = VIRTIO_BLK_S_IOERR as u8,
    /// Request type not supported.
    Unsupp = VIRTIO_BLK_S_UNSUPP as u8,
}

/// A piece of guest memory holding request data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical address.
    pub addr: GuestAddress,
    /// Length in bytes (never 0).
    pub len: u32,
}

/// A request whose chain has the right shape. Its sectors are not yet
/// checked against the disk (the device does that).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The decoded header.
    pub header: RequestHeader,
    /// Data buffers, in order: device-writable ones for IN and GET_ID,
    /// device-readable ones for OUT, none for other types.
    pub data: Vec<Segment>,
    /// Total length of `data`.
    pub data_len: u64,
}

/// Bounds the parser enforces on a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainLimits {
    /// Most descriptors in one chain (header and status included).
    pub max_descriptors: usize,
    /// Most data segments (`seg_max`).
    pub max_segments: usize,
    /// Most data bytes in one request.
    pub max_data_len: u64,
}

/// A descriptor chain taken apart.
#[derive(Debug)]
pub struct ParsedChain {
    /// Head index, for the used ring.
    pub head_index: u16,
    /// The request, or why the chain does not carry a well-formed one.
    pub request: Result<Request, RequestError>,
    /// Where the status byte goes, already checked to be writable guest
    /// memory, or why there is nowhere to answer. The device executes a
    /// request only when it can report the outcome.
    pub status: Result<GuestAddress, RequestError>,
}

/// Walks an untrusted chain within `limits`. virtio-queue already bounds the
/// walk (queue size, or indirect table size) and the chain's total length
/// (below 4 GiB), so the descriptors past `max_descriptors` are only looked
/// at to find the status byte.
pub fn parse_chain<M>(chain: DescriptorChain<M>, limits: &ChainLimits) -> ParsedChain
where
    M: Deref + Clone,
    M::Target: GuestMemory,
{
    let head_index = chain.head_index();
    let mem = chain.memory();
    let mut readable = Vec::new();
    let mut writable = Vec::new();
    let mut count = 0usize;
    let mut last = None;
    let mut order_error = false;
    for desc in chain.clone() {
        count += 1;
        last = Some((desc.addr(), desc.len(), desc.is_write_only()));
        if count > limits.max_descriptors {
            continue;
        }
        let seg = Segment {
            addr: desc.addr(),
            len: desc.len(),
        };
        if desc.is_write_only() {
            writable.push(seg);
        } else if writable.is_empty() {
            readable.push(seg);
        } else {
            order_error = true;
        }
    }

    let status = match last {
        Some((addr, len, true)) if len > 0 => match addr.checked_add(u64::from(len) - 1) {
            Some(a) if mem.check_range(a, 1, Permissions::Write) => Ok(a),
            _ => Err(RequestError::StatusNotInMemory(
                addr.raw_value().wrapping_add(u64::from(len) - 1),
            )),
        },
        _ => Err(RequestError::StatusMissing),
    };
    let request = if count > limits.max_descriptors {
        Err(RequestError::TooManyDescriptors(count))
    } else if order_error {
        Err(RequestError::ReadableAfterWritable)
    } else if status.is_err() {
        // Without a status byte the data cannot be told apart from it.
        Err(RequestError::StatusMissing)
    } else {
        // The status byte is the last writable one; the rest is data.
        trim_back(&mut writable, 1);
        build_request(mem, readable, writable, limits)
    };
    ParsedChain {
        head_index,
        request,
        status,
    }
}

fn build_request<M: GuestMemory + ?Sized>(
    mem: &M,
    mut readable: Vec<Segment>,
    writable: Vec<Segment>,
    limits: &ChainLimits,
) -> Result<Request, RequestError> {
    let readable_len: u64 = readable.iter().map(|s| u64::from(s.len)).sum();
    if readable_len < HEADER_SIZE as u64 {
        return Err(RequestError::HeaderTooShort(readable_len));
    }
    let mut raw = [0u8; HEADER_SIZE];
    let mut done = 0;
    for s in &readable {
        let take = (s.len as usize).min(HEADER_SIZE - done);
        if take == 0 {
            continue;
        }
        mem.read_slice(&mut raw[done..done + take], s.addr)
            .map_err(RequestError::HeaderRead)?;
        done += take;
        if done == HEADER_SIZE {
            break;
        }
    }
    let header = RequestHeader::parse(&raw);
    trim_front(&mut readable, HEADER_SIZE as u64);
    let data = match header.request_type {
        RequestType::In | RequestType::GetId if readable.is_empty() => writable,
        RequestType::Out if writable.is_empty() => readable,
        // FLUSH "SHOULD NOT" carry data: whatever is there is ignored, as
        // for types the device does not implement.
        RequestType::Flush | RequestType::Unsupported(_) => Vec::new(),
        t => return Err(RequestError::DataWrongDirection(t)),
    };
    if data.len() > limits.max_segments {
        return Err(RequestError::TooManySegments(data.len()));
    }
    let data_len = data.iter().map(|s| u64::from(s.len)).sum();
    if data_len > limits.max_data_len {
        return Err(RequestError::DataTooLong(data_len));
    }
    Ok(Request {
        header,
        data,
        data_len,
    })
}

/// Drops the first `n` bytes of `segs` (and any empty segment).
fn trim_front(segs: &mut Vec<Segment>, mut n: u64) {
    segs.retain_mut(|s| {
        let cut = n.min(u64::from(s.len));
        n -= cut;
        // Cannot wrap for bytes the header was read from; if it did, the
        // address would fail the guest-memory check anyway.
        s.addr = GuestAddress(s.addr.raw_value().wrapping_add(cut));
        s.len -= cut as u32;
        s.len > 0
    });
}

/// Drops the last `n` bytes of `segs` (and any empty segment).
fn trim_back(segs: &mut Vec<Segment>, mut n: u64) {
    for s in segs.iter_mut().rev() {
        let cut = n.min(u64::from(s.len));
        n -= cut;
        s.len -= cut as u32;
    }
    segs.retain(|s| s.len > 0);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(addr: u64, len: u32) -> Segment {
        Segment {
            addr: GuestAddress(addr),
            len,
        }
    }

    #[test]
    fn header_round_trip_ignores_reserved() {
        let h = RequestHeader {
            request_type: RequestType::Out,
            sector: 0x0102_0304_0506_0708,
        };
        let mut b = h.to_bytes();
        assert_eq!(&b[0..4], &[1, 0, 0, 0]);
        assert_eq!(&b[8..16], &0x0102_0304_0506_0708u64.to_le_bytes());
        b[4..8].fill(0xff);
        assert_eq!(RequestHeader::parse(&b), h);
        for (raw, t) in [
            (0, RequestType::In),
            (1, RequestType::Out),
            (4, RequestType::Flush),
            (8, RequestType::GetId),
            (11, RequestType::Unsupported(11)),
            (u32::MAX, RequestType::Unsupported(u32::MAX)),
        ] {
            assert_eq!(RequestType::from_raw(raw), t);
            assert_eq!(t.raw(), raw);
        }
        assert_eq!(
            (Status::Ok as u8, Status::IoErr as u8, Status::Unsupp as u8),
            (0, 1, 2)
        );
        assert_eq!(RequestError::Unsupported(11).status(), Status::Unsupp);
        assert_eq!(RequestError::ReadOnly.status(), Status::IoErr);
    }

    #[test]
    fn trimming_splits_and_drops_segments() {
        let mut v = vec![seg(0x100, 10), seg(0x200, 0), seg(0x300, 8)];
        trim_front(&mut v, 12);
        assert_eq!(v, [seg(0x302, 6)]);
        let mut v = vec![seg(0x100, 16)];
        trim_front(&mut v, 16);
        assert!(v.is_empty());
        let mut v = vec![seg(0x100, 10), seg(0x300, 1)];
        trim_back(&mut v, 1);
        assert_eq!(v, [seg(0x100, 10)]);
        let mut v = vec![seg(0x100, 10), seg(0x300, 3)];
        trim_back(&mut v, 5);
        assert_eq!(v, [seg(0x100, 8)]);
    }
}
