//! The device configuration space (`struct virtio_mem_config`, virtio 1.2
//! section 5.15.4) and the region geometry it describes.
//!
//! The layout is little-endian with no implicit padding:
//!
//! | offset | size | field                |
//! |--------|------|----------------------|
//! | 0      | 8    | `block_size`         |
//! | 8      | 2    | `node_id`            |
//! | 10     | 6    | `padding`            |
//! | 16     | 8    | `addr`               |
//! | 24     | 8    | `region_size`        |
//! | 32     | 8    | `usable_region_size` |
//! | 40     | 8    | `plugged_size`       |
//! | 48     | 8    | `requested_size`     |

use serde::Serialize;

/// Size in bytes of the configuration space.
pub const CONFIG_SPACE_SIZE: usize = 56;
/// Offset of `block_size`.
pub const OFFSET_BLOCK_SIZE: usize = 0;
/// Offset of `node_id`.
pub const OFFSET_NODE_ID: usize = 8;
/// Offset of the 6 padding bytes.
pub const OFFSET_PADDING: usize = 10;
/// Offset of `addr`.
pub const OFFSET_ADDR: usize = 16;
/// Offset of `region_size`.
pub const OFFSET_REGION_SIZE: usize = 24;
/// Offset of `usable_region_size`.
pub const OFFSET_USABLE_REGION_SIZE: usize = 32;
/// Offset of `plugged_size`.
pub const OFFSET_PLUGGED_SIZE: usize = 40;
/// Offset of `requested_size`.
pub const OFFSET_REQUESTED_SIZE: usize = 48;

/// Default block size: 2 MiB, the x86-64 pageblock size, which lets Linux
/// run its Sub Block Mode with one device block per sub-block.
pub const DEFAULT_BLOCK_SIZE: u64 = 2 << 20;
/// Smallest accepted block size (one 4 KiB page).
pub const MIN_BLOCK_SIZE: u64 = 4 << 10;

/// Invalid region geometry.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// The block size is not a power of two.
    #[error("block size {0:#x} is not a power of two")]
    BlockSizeNotPowerOfTwo(u64),
    /// The block size is below [`MIN_BLOCK_SIZE`].
    #[error("block size {0:#x} is smaller than {MIN_BLOCK_SIZE:#x}")]
    BlockSizeTooSmall(u64),
    /// The region start is not aligned to the block size.
    #[error("region address {addr:#x} is not aligned to the block size {block_size:#x}")]
    AddrNotAligned {
        /// Region start.
        addr: u64,
        /// Block size.
        block_size: u64,
    },
    /// The region size is not a multiple of the block size.
    #[error("region size {size:#x} is not a multiple of the block size {block_size:#x}")]
    SizeNotAligned {
        /// Region size.
        size: u64,
        /// Block size.
        block_size: u64,
    },
    /// `addr + region_size` overflows, or the block count does not fit `usize`.
    #[error("region {addr:#x}+{size:#x} overflows the address space")]
    Overflow {
        /// Region start.
        addr: u64,
        /// Region size.
        size: u64,
    },
}

/// The fixed geometry of a device-managed region: where it is and how it is
/// cut into blocks. It cannot change while the device exists (the spec only
/// allows it to change on a system reset).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Geometry {
    addr: u64,
    region_size: u64,
    block_size: u64,
    block_count: usize,
}

impl Geometry {
    /// Validates and builds a geometry: `block_size` a power of two of at least
    /// 4 KiB, `addr` and `region_size` multiples of it, no overflow.
    pub fn new(addr: u64, region_size: u64, block_size: u64) -> Result<Self, ConfigError> {
        if !block_size.is_power_of_two() {
            return Err(ConfigError::BlockSizeNotPowerOfTwo(block_size));
        }
        if block_size < MIN_BLOCK_SIZE {
            return Err(ConfigError::BlockSizeTooSmall(block_size));
        }
        if addr % block_size != 0 {
            return Err(ConfigError::AddrNotAligned { addr, block_size });
        }
        if region_size % block_size != 0 {
            return Err(ConfigError::SizeNotAligned {
                size: region_size,
                block_size,
            });
        }
        let overflow = ConfigError::Overflow {
            addr,
            size: region_size,
        };
        addr.checked_add(region_size).ok_or(overflow.clone())?;
        let block_count = usize::try_from(region_size / block_size).map_err(|_| overflow)?;
        Ok(Self {
            addr,
            region_size,
            block_size,
            block_count,
        })
    }

    /// Guest-physical start of the region.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// Size of the region in bytes.
    pub fn region_size(&self) -> u64 {
        self.region_size
    }

    /// Block size in bytes.
    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// Number of blocks in the region.
    pub fn block_count(&self) -> usize {
        self.block_count
    }

    /// Byte length of `blocks` blocks (cannot overflow for `blocks <= block_count`).
    pub fn blocks_to_bytes(&self, blocks: usize) -> u64 {
        (blocks as u64).saturating_mul(self.block_size)
    }

    /// Guest-physical address of block `index`.
    pub fn block_addr(&self, index: usize) -> u64 {
        self.addr + self.blocks_to_bytes(index)
    }
}

/// A snapshot of `struct virtio_mem_config`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct VirtioMemConfig {
    /// Size and alignment of a memory block, in bytes.
    pub block_size: u64,
    /// ACPI proximity domain; meaningful only with `VIRTIO_MEM_F_ACPI_PXM`.
    pub node_id: u16,
    /// Guest-physical start of the device-managed region.
    pub addr: u64,
    /// Size of the device-managed region.
    pub region_size: u64,
    /// Part of the region the driver may (un)plug in.
    pub usable_region_size: u64,
    /// Bytes currently plugged.
    pub plugged_size: u64,
    /// Bytes the device asks the driver to have plugged.
    pub requested_size: u64,
}

impl VirtioMemConfig {
    /// Serializes to the exact little-endian spec layout.
    pub fn to_bytes(&self) -> [u8; CONFIG_SPACE_SIZE] {
        let mut b = [0u8; CONFIG_SPACE_SIZE];
        put(&mut b, OFFSET_BLOCK_SIZE, &self.block_size.to_le_bytes());
        put(&mut b, OFFSET_NODE_ID, &self.node_id.to_le_bytes());
        put(&mut b, OFFSET_ADDR, &self.addr.to_le_bytes());
        put(&mut b, OFFSET_REGION_SIZE, &self.region_size.to_le_bytes());
        put(
            &mut b,
            OFFSET_USABLE_REGION_SIZE,
            &self.usable_region_size.to_le_bytes(),
        );
        put(
            &mut b,
            OFFSET_PLUGGED_SIZE,
            &self.plugged_size.to_le_bytes(),
        );
        put(
            &mut b,
            OFFSET_REQUESTED_SIZE,
            &self.requested_size.to_le_bytes(),
        );
        b
    }

    /// Parses the spec layout (the padding is ignored).
    pub fn from_bytes(b: &[u8; CONFIG_SPACE_SIZE]) -> Self {
        let u64_at = |o: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(w)
        };
        Self {
            block_size: u64_at(OFFSET_BLOCK_SIZE),
            node_id: u16::from_le_bytes([b[OFFSET_NODE_ID], b[OFFSET_NODE_ID + 1]]),
            addr: u64_at(OFFSET_ADDR),
            region_size: u64_at(OFFSET_REGION_SIZE),
            usable_region_size: u64_at(OFFSET_USABLE_REGION_SIZE),
            plugged_size: u64_at(OFFSET_PLUGGED_SIZE),
            requested_size: u64_at(OFFSET_REQUESTED_SIZE),
        }
    }

    /// Reads `data.len()` bytes of the configuration space starting at
    /// `offset`, as a transport would on a driver access. Any offset and length
    /// is accepted: bytes beyond the configuration space read as zero.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let bytes = self.to_bytes();
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        if start >= CONFIG_SPACE_SIZE {
            return;
        }
        let n = data.len().min(CONFIG_SPACE_SIZE - start);
        data[..n].copy_from_slice(&bytes[start..start + n]);
    }
}

fn put(buf: &mut [u8], offset: usize, bytes: &[u8]) {
    buf[offset..offset + bytes.len()].copy_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VirtioMemConfig {
        VirtioMemConfig {
            block_size: 0x0102_0304_0506_0708,
            node_id: 0x1122,
            addr: 0x1112_1314_1516_1718,
            region_size: 0x2122_2324_2526_2728,
            usable_region_size: 0x3132_3334_3536_3738,
            plugged_size: 0x4142_4344_4546_4748,
            requested_size: 0x5152_5354_5556_5758,
        }
    }

    #[test]
    fn layout_bytes_at_each_offset() {
        let b = sample().to_bytes();
        assert_eq!(&b[0..8], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(&b[8..10], &[0x22, 0x11]);
        assert_eq!(&b[10..16], &[0u8; 6]);
        assert_eq!(&b[16..24], &0x1112_1314_1516_1718u64.to_le_bytes());
        assert_eq!(&b[24..32], &0x2122_2324_2526_2728u64.to_le_bytes());
        assert_eq!(&b[32..40], &0x3132_3334_3536_3738u64.to_le_bytes());
        assert_eq!(&b[40..48], &0x4142_4344_4546_4748u64.to_le_bytes());
        assert_eq!(&b[48..56], &0x5152_5354_5556_5758u64.to_le_bytes());
        assert_eq!(VirtioMemConfig::from_bytes(&b), sample());
    }

    #[test]
    fn read_every_offset_and_width() {
        let c = sample();
        let full = c.to_bytes();
        for width in [1usize, 2, 4, 8] {
            for off in 0..CONFIG_SPACE_SIZE + 8 {
                let mut d = vec![0xffu8; width];
                c.read(off as u64, &mut d);
                for (i, byte) in d.iter().enumerate() {
                    let want = full.get(off + i).copied().unwrap_or(0);
                    assert_eq!(*byte, want, "offset {off} width {width} byte {i}");
                }
            }
        }
    }

    #[test]
    fn read_out_of_range_is_zero_and_never_panics() {
        let c = sample();
        for off in [56u64, 1000, u64::from(u32::MAX), u64::MAX - 1, u64::MAX] {
            let mut d = [0xaau8; 16];
            c.read(off, &mut d);
            assert_eq!(d, [0u8; 16]);
        }
        let mut big = vec![0xaau8; 4096];
        c.read(50, &mut big);
        assert_eq!(&big[..6], &c.to_bytes()[50..]);
        assert!(big[6..].iter().all(|&b| b == 0));
        let mut empty = [0u8; 0];
        c.read(u64::MAX, &mut empty);
    }

    #[test]
    fn geometry_validation() {
        let mib = 1u64 << 20;
        assert!(Geometry::new(4 << 30, 1 << 30, 2 * mib).is_ok());
        assert!(Geometry::new(0, 0, 2 * mib).is_ok());
        assert_eq!(
            Geometry::new(0, 6 * mib, 3 * mib),
            Err(ConfigError::BlockSizeNotPowerOfTwo(3 * mib))
        );
        assert_eq!(
            Geometry::new(0, 8192, 2048),
            Err(ConfigError::BlockSizeTooSmall(2048))
        );
        assert_eq!(
            Geometry::new(0, 8192, 0),
            Err(ConfigError::BlockSizeNotPowerOfTwo(0))
        );
        assert!(matches!(
            Geometry::new(mib, 4 * mib, 2 * mib),
            Err(ConfigError::AddrNotAligned { .. })
        ));
        assert!(matches!(
            Geometry::new(0, 3 * mib, 2 * mib),
            Err(ConfigError::SizeNotAligned { .. })
        ));
        assert!(matches!(
            Geometry::new(u64::MAX - 2 * mib + 1, 4 * mib, 2 * mib),
            Err(ConfigError::AddrNotAligned { .. }) | Err(ConfigError::Overflow { .. })
        ));
        assert!(matches!(
            Geometry::new(1 << 63, 1 << 63, 2 * mib),
            Err(ConfigError::Overflow { .. })
        ));
        let g = Geometry::new(4 << 30, 64 * mib, 2 * mib).unwrap();
        assert_eq!(g.block_count(), 32);
        assert_eq!(g.block_addr(3), (4 << 30) + 6 * mib);
    }
}
