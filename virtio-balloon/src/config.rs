//! The device configuration space (`struct virtio_balloon_config`, virtio 1.2
//! section 5.5.4).
//!
//! Only the two fields every balloon has are exposed, little-endian:
//!
//! | offset | size | field       | written by |
//! |--------|------|-------------|------------|
//! | 0      | 4    | `num_pages` | device     |
//! | 4      | 4    | `actual`    | driver     |
//!
//! `free_page_hint_cmd_id` and `poison_val` follow in the spec's struct, but
//! are valid only with `VIRTIO_BALLOON_F_FREE_PAGE_HINT` and
//! `VIRTIO_BALLOON_F_PAGE_POISON`, which this device does not offer: they read
//! as zero and writes to them are refused.

use serde::Serialize;

/// Size in bytes of the configuration space the device serves.
pub const CONFIG_SPACE_SIZE: usize = 8;
/// Offset of `num_pages`.
pub const OFFSET_NUM_PAGES: usize = 0;
/// Offset of `actual`.
pub const OFFSET_ACTUAL: usize = 4;

/// A driver write the device refuses.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// Some written byte lies outside `actual`, the only driver-writable field.
    #[error("config write of {len} bytes at {offset:#x} is not inside `actual` (bytes 4..8)")]
    NotWritable {
        /// Offset of the write.
        offset: u64,
        /// Length of the write.
        len: usize,
    },
}

/// A snapshot of `struct virtio_balloon_config`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct BalloonConfig {
    /// Balloon size the device asks for, in 4 KiB pages.
    pub num_pages: u32,
    /// Balloon size the driver reports, in 4 KiB pages (untrusted).
    pub actual: u32,
}

impl BalloonConfig {
    /// Serializes to the little-endian spec layout.
    pub fn to_bytes(&self) -> [u8; CONFIG_SPACE_SIZE] {
        let mut b = [0u8; CONFIG_SPACE_SIZE];
        b[OFFSET_NUM_PAGES..OFFSET_NUM_PAGES + 4].copy_from_slice(&self.num_pages.to_le_bytes());
        b[OFFSET_ACTUAL..OFFSET_ACTUAL + 4].copy_from_slice(&self.actual.to_le_bytes());
        b
    }

    /// Reads `data.len()` bytes at `offset`, as a transport would on a driver
    /// access. Any offset and length is accepted: bytes past the fields read as
    /// zero.
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

    /// Applies a driver write: any part of `actual`, at any width. A write
    /// touching another byte is refused whole, so `num_pages` stays the
    /// device's.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), ConfigError> {
        let refused = ConfigError::NotWritable {
            offset,
            len: data.len(),
        };
        let start = usize::try_from(offset).map_err(|_| refused.clone())?;
        let end = start.checked_add(data.len()).ok_or(refused.clone())?;
        if start < OFFSET_ACTUAL || end > OFFSET_ACTUAL + 4 {
            return Err(refused);
        }
        let mut actual = self.actual.to_le_bytes();
        actual[start - OFFSET_ACTUAL..end - OFFSET_ACTUAL].copy_from_slice(data);
        self.actual = u32::from_le_bytes(actual);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: BalloonConfig = BalloonConfig {
        num_pages: 0x0102_0304,
        actual: 0x1112_1314,
    };

    #[test]
    fn layout_and_reads_at_every_offset_and_width() {
        let full = SAMPLE.to_bytes();
        assert_eq!(full, [4, 3, 2, 1, 0x14, 0x13, 0x12, 0x11]);
        for width in [1usize, 2, 4, 8] {
            for off in 0..CONFIG_SPACE_SIZE + 16 {
                let mut d = vec![0xffu8; width];
                SAMPLE.read(off as u64, &mut d);
                for (i, byte) in d.iter().enumerate() {
                    assert_eq!(*byte, full.get(off + i).copied().unwrap_or(0));
                }
            }
        }
        let mut d = [0xaau8; 8];
        SAMPLE.read(u64::MAX, &mut d);
        assert_eq!(d, [0; 8]);
    }

    #[test]
    fn only_actual_is_writable() {
        let mut c = SAMPLE;
        c.write(4, &7u32.to_le_bytes()).unwrap();
        assert_eq!(c.actual, 7);
        // Byte-wise writes merge, whatever their order.
        c.write(7, &[0xab]).unwrap();
        c.write(5, &[0x01, 0x02]).unwrap();
        assert_eq!(c.actual, 0xab02_0107);
        for (off, len) in [
            (0u64, 4usize),
            (3, 2),
            (6, 4),
            (8, 4),
            (1000, 1),
            (u64::MAX, 2),
        ] {
            assert_eq!(
                c.write(off, &vec![0xee; len]),
                Err(ConfigError::NotWritable { offset: off, len })
            );
        }
        assert_eq!(c.num_pages, SAMPLE.num_pages);
        assert_eq!(c.actual, 0xab02_0107);
        // An empty write inside `actual` changes nothing and is harmless.
        c.write(4, &[]).unwrap();
        assert_eq!(c.actual, 0xab02_0107);
    }
}
