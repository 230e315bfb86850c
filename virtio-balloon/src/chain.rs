//! Parsing of untrusted descriptor chains on the balloon's queues.
//!
//! - inflateq, deflateq: device-readable arrays of little-endian 32-bit page
//!   frame numbers (4 KiB units). Linux sends one descriptor of at most 256.
//! - statsq: device-readable packed `virtio_balloon_stat` entries.
//! - reporting_vq: device-writable descriptors whose address and length are
//!   the reported guest-physical ranges themselves (Linux:
//!   `virtqueue_add_inbuf` of up to 32 free pages of order >= 9); the device
//!   writes nothing into them.
//!
//! Any arrangement of descriptors is accepted, within bounds: at most
//! [`MAX_CHAIN_DESCRIPTORS`] descriptors and a fixed number of bytes per
//! queue, so the work per chain is bounded whatever the guest sends. Whatever
//! the guest sends, parsing returns an error, never panics.

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestMemory};

use crate::stats::STAT_SIZE;

/// Longest chain accepted (Linux: 1 descriptor, 32 for a page report).
pub const MAX_CHAIN_DESCRIPTORS: usize = 64;
/// Most page frame numbers accepted in one inflate or deflate chain (Linux: 256).
pub const MAX_PFNS_PER_CHAIN: usize = 4096;
/// Largest stats buffer accepted (Linux 6.12: 16 entries).
pub const MAX_STATS_BYTES: usize = 64 * STAT_SIZE;

/// Why a chain is refused as a whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// More than [`MAX_CHAIN_DESCRIPTORS`] descriptors.
    #[error("descriptor chain longer than {MAX_CHAIN_DESCRIPTORS} descriptors")]
    TooManyDescriptors,
    /// A device-writable descriptor where the device only reads.
    #[error("device-writable descriptor in a buffer the device only reads")]
    UnexpectedWritable,
    /// A device-readable descriptor in a free page report.
    #[error("device-readable descriptor in a free page report")]
    UnexpectedReadable,
    /// More bytes than the queue accepts.
    #[error("buffer of {bytes} bytes exceeds the {max} bytes accepted")]
    TooLarge {
        /// Bytes announced so far.
        bytes: u64,
        /// Bytes accepted.
        max: usize,
    },
    /// The byte count is not a whole number of entries.
    #[error("buffer of {len} bytes is not a whole number of {entry}-byte entries")]
    PartialEntry {
        /// Buffer length.
        len: usize,
        /// Entry size.
        entry: usize,
    },
    /// A descriptor points outside guest memory.
    #[error("cannot read {len} bytes of guest memory at {addr:#x}")]
    Read {
        /// Descriptor address.
        addr: u64,
        /// Descriptor length.
        len: u32,
    },
}

/// Concatenates the bytes of a chain whose descriptors must all be
/// device-readable, refusing it past `max` bytes.
fn read_all<M>(chain: DescriptorChain<M>, max: usize, entry: usize) -> Result<Vec<u8>, ChainError>
where
    M: Deref + Clone,
    M::Target: GuestMemory,
{
    let mem = chain.memory();
    let mut out = Vec::new();
    let mut total = 0u64;
    for (i, desc) in chain.clone().enumerate() {
        if i >= MAX_CHAIN_DESCRIPTORS {
            return Err(ChainError::TooManyDescriptors);
        }
        if desc.is_write_only() {
            return Err(ChainError::UnexpectedWritable);
        }
        total += u64::from(desc.len());
        if total > max as u64 {
            return Err(ChainError::TooLarge { bytes: total, max });
        }
        let start = out.len();
        // `total <= max`, so the buffer stays small.
        out.resize(start + desc.len() as usize, 0);
        mem.read_slice(&mut out[start..], desc.addr())
            .map_err(|_| ChainError::Read {
                addr: desc.addr().0,
                len: desc.len(),
            })?;
    }
    if out.len() % entry != 0 {
        return Err(ChainError::PartialEntry {
            len: out.len(),
            entry,
        });
    }
    Ok(out)
}

/// The page frame numbers of an inflate or deflate chain, in the guest's order.
pub fn read_pfns<M>(chain: DescriptorChain<M>) -> Result<Vec<u64>, ChainError>
where
    M: Deref + Clone,
    M::Target: GuestMemory,
{
    let bytes = read_all(chain, MAX_PFNS_PER_CHAIN * 4, 4)?;
    Ok(bytes
        .chunks_exact(4)
        .map(|b| u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])))
        .collect())
}

/// The raw bytes of a stats buffer (a whole number of entries).
pub fn read_stats<M>(chain: DescriptorChain<M>) -> Result<Vec<u8>, ChainError>
where
    M: Deref + Clone,
    M::Target: GuestMemory,
{
    read_all(chain, MAX_STATS_BYTES, STAT_SIZE)
}

/// The `(address, length)` pairs of a free page report, unvalidated: the
/// device checks each against guest RAM and the guard.
pub fn reported_ranges<M>(chain: DescriptorChain<M>) -> Result<Vec<(u64, u32)>, ChainError>
where
    M: Deref + Clone,
    M::Target: GuestMemory,
{
    let mut out = Vec::new();
    for (i, desc) in chain.enumerate() {
        if i >= MAX_CHAIN_DESCRIPTORS {
            return Err(ChainError::TooManyDescriptors);
        }
        if !desc.is_write_only() {
            return Err(ChainError::UnexpectedReadable);
        }
        out.push((desc.addr().0, desc.len()));
    }
    Ok(out)
}
