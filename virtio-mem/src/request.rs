//! Guest requests and device responses on the guest-request virtqueue
//! (virtio 1.2 section 5.15.6), and parsing of an untrusted descriptor chain.
//!
//! A request is the 24-byte `virtio_mem_req` in the device-readable part of a
//! chain; the device answers with the 10-byte `virtio_mem_resp` in its
//! device-writable part. Linux puts each in one descriptor, but the spec forbids
//! assuming any particular arrangement, so both may be split across several
//! descriptors. Whatever the guest sends, parsing returns an error, never panics.

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError, Permissions};

/// `VIRTIO_MEM_REQ_PLUG`.
pub const VIRTIO_MEM_REQ_PLUG: u16 = 0;
/// `VIRTIO_MEM_REQ_UNPLUG`.
pub const VIRTIO_MEM_REQ_UNPLUG: u16 = 1;
/// `VIRTIO_MEM_REQ_UNPLUG_ALL`.
pub const VIRTIO_MEM_REQ_UNPLUG_ALL: u16 = 2;
/// `VIRTIO_MEM_REQ_STATE`.
pub const VIRTIO_MEM_REQ_STATE: u16 = 3;

/// Size of `struct virtio_mem_req`.
pub const REQUEST_SIZE: usize = 24;
/// Size of `struct virtio_mem_resp`.
pub const RESPONSE_SIZE: usize = 10;
/// Longest chain accepted. Linux uses 2 descriptors; the spec lets a device
/// set "a reasonable limit".
pub const MAX_CHAIN_DESCRIPTORS: usize = 16;

/// Why a chain cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// More than [`MAX_CHAIN_DESCRIPTORS`] descriptors.
    #[error("descriptor chain longer than {MAX_CHAIN_DESCRIPTORS} descriptors")]
    ChainTooLong,
    /// A device-readable descriptor follows a device-writable one.
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    /// The device-readable part is shorter than a request.
    #[error("request needs {REQUEST_SIZE} device-readable bytes, chain has {0}")]
    HeaderTooShort(u64),
    /// The request bytes are not in guest memory.
    #[error("cannot read the request: {0}")]
    HeaderRead(GuestMemoryError),
    /// No device-writable descriptor.
    #[error("chain has no device-writable descriptor for the response")]
    MissingResponse,
    /// The device-writable part is shorter than a response.
    #[error("response needs {RESPONSE_SIZE} device-writable bytes, chain has {0}")]
    ResponseTooSmall(u64),
    /// The response buffer is not writable guest memory.
    #[error("response buffer at {0:#x} is not writable guest memory")]
    ResponseNotInMemory(u64),
    /// Writing the response failed.
    #[error("cannot write the response: {0}")]
    ResponseWrite(GuestMemoryError),
    /// The request type is not one of the four defined ones.
    #[error("unknown request type {0}")]
    UnknownType(u16),
}

/// The block range of a PLUG, UNPLUG or STATE request, as sent by the guest
/// (not validated against the device).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockRange {
    /// Guest-physical address of the first block.
    pub addr: u64,
    /// Number of consecutive blocks.
    pub nb_blocks: u16,
}

/// A decoded request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Plug the blocks of the range.
    Plug(BlockRange),
    /// Unplug the blocks of the range.
    Unplug(BlockRange),
    /// Unplug every block.
    UnplugAll,
    /// Report whether the range is plugged, unplugged or mixed.
    State(BlockRange),
}

impl Request {
    /// Decodes `virtio_mem_req`; padding is ignored as the spec requires.
    pub fn parse(b: &[u8; REQUEST_SIZE]) -> Result<Self, RequestError> {
        let ty = u16::from_le_bytes([b[0], b[1]]);
        let mut addr = [0u8; 8];
        addr.copy_from_slice(&b[8..16]);
        let range = BlockRange {
            addr: u64::from_le_bytes(addr),
            nb_blocks: u16::from_le_bytes([b[16], b[17]]),
        };
        match ty {
            VIRTIO_MEM_REQ_PLUG => Ok(Self::Plug(range)),
            VIRTIO_MEM_REQ_UNPLUG => Ok(Self::Unplug(range)),
            VIRTIO_MEM_REQ_UNPLUG_ALL => Ok(Self::UnplugAll),
            VIRTIO_MEM_REQ_STATE => Ok(Self::State(range)),
            other => Err(RequestError::UnknownType(other)),
        }
    }

    /// Encodes `virtio_mem_req` as a driver would (for tests, fuzzing, benches).
    pub fn to_bytes(&self) -> [u8; REQUEST_SIZE] {
        let (ty, range) = match *self {
            Self::Plug(r) => (VIRTIO_MEM_REQ_PLUG, r),
            Self::Unplug(r) => (VIRTIO_MEM_REQ_UNPLUG, r),
            Self::UnplugAll => (
                VIRTIO_MEM_REQ_UNPLUG_ALL,
                BlockRange {
                    addr: 0,
                    nb_blocks: 0,
                },
            ),
            Self::State(r) => (VIRTIO_MEM_REQ_STATE, r),
        };
        let mut b = [0u8; REQUEST_SIZE];
        b[0..2].copy_from_slice(&ty.to_le_bytes());
        b[8..16].copy_from_slice(&range.addr.to_le_bytes());
        b[16..18].copy_from_slice(&range.nb_blocks.to_le_bytes());
        b
    }
}

/// Response type (`VIRTIO_MEM_RESP_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ResponseType {
    /// Request processed successfully.
    Ack = 0,
    /// Request denied (a plug beyond `requested_size`).
    Nack = 1,
    /// Request cannot be processed now; the driver retries later.
    Busy = 2,
    /// Invalid request (range, alignment, block state).
    Error = 3,
}

/// State of a block range (`VIRTIO_MEM_STATE_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum BlockState {
    /// Every block is plugged.
    Plugged = 0,
    /// Every block is unplugged.
    Unplugged = 1,
    /// Some blocks are plugged, some are not.
    Mixed = 2,
}

/// A response; `state` is only sent for an acknowledged STATE request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Response {
    /// Response type.
    pub kind: ResponseType,
    /// State of the range, for STATE requests.
    pub state: Option<BlockState>,
}

impl Response {
    /// A response without request-specific data.
    pub fn new(kind: ResponseType) -> Self {
        Self { kind, state: None }
    }

    /// An acknowledged STATE response.
    pub fn state(state: BlockState) -> Self {
        Self {
            kind: ResponseType::Ack,
            state: Some(state),
        }
    }

    /// Encodes `virtio_mem_resp`.
    pub fn to_bytes(&self) -> [u8; RESPONSE_SIZE] {
        let mut b = [0u8; RESPONSE_SIZE];
        b[0..2].copy_from_slice(&(self.kind as u16).to_le_bytes());
        if let Some(state) = self.state {
            b[8..10].copy_from_slice(&(state as u16).to_le_bytes());
        }
        b
    }

    /// Raw `(type, state)` fields of an encoded response, as a driver reads them.
    pub fn raw_fields(b: &[u8; RESPONSE_SIZE]) -> (u16, u16) {
        (
            u16::from_le_bytes([b[0], b[1]]),
            u16::from_le_bytes([b[8], b[9]]),
        )
    }
}

/// Where the response of a chain goes: the first [`RESPONSE_SIZE`] bytes of
/// its device-writable descriptors, already checked to be guest memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseBuffer {
    segments: Vec<(GuestAddress, usize)>,
}

impl ResponseBuffer {
    /// Writes `resp`; returns the byte count for the used ring.
    pub fn write<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        resp: &Response,
    ) -> Result<u32, RequestError> {
        let bytes = resp.to_bytes();
        let mut done = 0;
        for &(addr, len) in &self.segments {
            mem.write_slice(&bytes[done..done + len], addr)
                .map_err(RequestError::ResponseWrite)?;
            done += len;
        }
        Ok(RESPONSE_SIZE as u32)
    }
}

/// A descriptor chain taken apart.
#[derive(Debug)]
pub struct ParsedChain {
    /// Head index, for the used ring.
    pub head_index: u16,
    /// The request, or why the chain does not carry a valid one.
    pub request: Result<Request, RequestError>,
    /// Where to answer, or why the device cannot answer. The device executes a
    /// request only when it can answer it, so the driver never misses a state
    /// change.
    pub response: Result<ResponseBuffer, RequestError>,
}

/// Walks an untrusted chain: at most [`MAX_CHAIN_DESCRIPTORS`] descriptors,
/// device-readable ones first, at least [`REQUEST_SIZE`] readable and
/// [`RESPONSE_SIZE`] writable bytes, all of them in guest memory.
pub fn parse_chain<M>(chain: DescriptorChain<M>) -> ParsedChain
where
    M: Deref + Clone,
    M::Target: GuestMemory,
{
    let head_index = chain.head_index();
    let mem = chain.memory();
    let mut header = [0u8; REQUEST_SIZE];
    let mut header_len = 0usize;
    let mut readable_total = 0u64;
    let mut writable_total = 0u64;
    let mut segments = Vec::new();
    let mut seg_len = 0usize;
    let mut seen_writable = false;
    let mut chain_error = None;
    let mut header_error = None;
    let mut response_error = None;
    let mut count = 0usize;

    for desc in chain.clone() {
        count += 1;
        if count > MAX_CHAIN_DESCRIPTORS {
            chain_error = Some(RequestError::ChainTooLong);
            break;
        }
        let len = desc.len() as usize;
        if desc.is_write_only() {
            seen_writable = true;
            writable_total += len as u64;
            let take = len.min(RESPONSE_SIZE - seg_len);
            if take > 0 && response_error.is_none() {
                if mem.check_range(desc.addr(), take, Permissions::Write) {
                    segments.push((desc.addr(), take));
                    seg_len += take;
                } else {
                    response_error = Some(RequestError::ResponseNotInMemory(desc.addr().0));
                }
            }
        } else {
            if seen_writable {
                chain_error.get_or_insert(RequestError::ReadableAfterWritable);
                continue;
            }
            readable_total += len as u64;
            let take = len.min(REQUEST_SIZE - header_len);
            if take > 0 && header_error.is_none() {
                match mem.read_slice(&mut header[header_len..header_len + take], desc.addr()) {
                    Ok(()) => header_len += take,
                    Err(e) => header_error = Some(RequestError::HeaderRead(e)),
                }
            }
        }
    }

    let response = match response_error {
        Some(e) => Err(e),
        None if !seen_writable => Err(RequestError::MissingResponse),
        None if seg_len < RESPONSE_SIZE => Err(RequestError::ResponseTooSmall(writable_total)),
        None => Ok(ResponseBuffer { segments }),
    };
    let request = if let Some(e) = chain_error {
        Err(e)
    } else if let Some(e) = header_error {
        Err(e)
    } else if header_len < REQUEST_SIZE {
        Err(RequestError::HeaderTooShort(readable_total))
    } else {
        Request::parse(&header)
    };
    ParsedChain {
        head_index,
        request,
        response,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip_and_padding_ignored() {
        let r = Request::Plug(BlockRange {
            addr: 0x1_0000_0000,
            nb_blocks: 7,
        });
        let mut b = r.to_bytes();
        assert_eq!(Request::parse(&b).unwrap(), r);
        // Padding after the type and after nb_blocks must be ignored.
        b[2..8].fill(0xff);
        b[18..24].fill(0xff);
        assert_eq!(Request::parse(&b).unwrap(), r);
        for (ty, want) in [
            (
                1u16,
                Request::Unplug(BlockRange {
                    addr: 0x1_0000_0000,
                    nb_blocks: 7,
                }),
            ),
            (2, Request::UnplugAll),
            (
                3,
                Request::State(BlockRange {
                    addr: 0x1_0000_0000,
                    nb_blocks: 7,
                }),
            ),
        ] {
            b[0..2].copy_from_slice(&ty.to_le_bytes());
            assert_eq!(Request::parse(&b).unwrap(), want);
        }
        b[0..2].copy_from_slice(&4u16.to_le_bytes());
        assert!(matches!(
            Request::parse(&b),
            Err(RequestError::UnknownType(4))
        ));
        b[0..2].copy_from_slice(&0xffffu16.to_le_bytes());
        assert!(matches!(
            Request::parse(&b),
            Err(RequestError::UnknownType(0xffff))
        ));
    }

    #[test]
    fn response_layout() {
        assert_eq!(Response::new(ResponseType::Ack).to_bytes(), [0; 10]);
        assert_eq!(
            Response::new(ResponseType::Error).to_bytes(),
            [3, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        let b = Response::state(BlockState::Mixed).to_bytes();
        assert_eq!(b, [0, 0, 0, 0, 0, 0, 0, 0, 2, 0]);
        assert_eq!(Response::raw_fields(&b), (0, 2));
        assert_eq!(ResponseType::Nack as u16, 1);
        assert_eq!(ResponseType::Busy as u16, 2);
        assert_eq!(BlockState::Plugged as u16, 0);
        assert_eq!(BlockState::Unplugged as u16, 1);
    }
}
