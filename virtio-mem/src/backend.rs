//! Host memory behind the device-managed region: what happens to host pages
//! when the guest plugs or unplugs blocks.
//!
//! Offsets and lengths are relative to the start of the device-managed region
//! (offset 0 is the region's first byte, whatever its guest-physical address).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

/// A backend operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The range is not inside the backend.
    #[error("range {offset:#x}+{len:#x} is outside the backend ({size:#x} bytes)")]
    OutOfRange {
        /// Offset of the range.
        offset: u64,
        /// Length of the range.
        len: u64,
        /// Backend size.
        size: u64,
    },
    /// The file is smaller than `base + size`.
    #[error("file has {file_size:#x} bytes, backend needs {needed:#x}")]
    FileTooSmall {
        /// Current file size.
        file_size: u64,
        /// `base + size`.
        needed: u64,
    },
    /// `fstat` failed.
    #[error("cannot stat the memory file: {0}")]
    Stat(io::Error),
    /// `fallocate(PUNCH_HOLE)` failed.
    #[error("cannot discard {offset:#x}+{len:#x}: {source}")]
    Discard {
        /// Offset of the range.
        offset: u64,
        /// Length of the range.
        len: u64,
        /// The OS error.
        source: io::Error,
    },
    /// `fallocate` (populate) failed.
    #[error("cannot populate {offset:#x}+{len:#x}: {source}")]
    Populate {
        /// Offset of the range.
        offset: u64,
        /// Length of the range.
        len: u64,
        /// The OS error.
        source: io::Error,
    },
    /// `lseek(SEEK_DATA/SEEK_HOLE)` failed.
    #[error("cannot query resident pages: {0}")]
    Seek(io::Error),
}

/// What the device does to host memory on plug and unplug.
pub trait MemBackend {
    /// Called before a PLUG is acknowledged. May do nothing (pages are then
    /// allocated on first guest touch) or allocate them up front. An error makes
    /// the device answer BUSY and leave the blocks unplugged.
    fn populate(&self, offset: u64, len: u64) -> Result<(), BackendError>;

    /// Gives the host memory of `[offset, offset + len)` back. Called only for
    /// blocks the guest validly unplugged. An error makes the device answer
    /// BUSY and keep the blocks plugged, so it never loses track of memory.
    fn discard(&self, offset: u64, len: u64) -> Result<(), BackendError>;

    /// Host-resident bytes in `[offset, offset + len)` (for a memfd: pages
    /// holding data, found with `SEEK_DATA`/`SEEK_HOLE`).
    fn resident_bytes(&self, offset: u64, len: u64) -> Result<u64, BackendError>;
}

impl<T: MemBackend + ?Sized> MemBackend for Box<T> {
    fn populate(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        (**self).populate(offset, len)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        (**self).discard(offset, len)
    }
    fn resident_bytes(&self, offset: u64, len: u64) -> Result<u64, BackendError> {
        (**self).resident_bytes(offset, len)
    }
}

impl<T: MemBackend + ?Sized> MemBackend for Arc<T> {
    fn populate(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        (**self).populate(offset, len)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        (**self).discard(offset, len)
    }
    fn resident_bytes(&self, offset: u64, len: u64) -> Result<u64, BackendError> {
        (**self).resident_bytes(offset, len)
    }
}

/// What [`MemfdBackend::populate`] does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Populate {
    /// Nothing: pages are allocated when the guest first touches them.
    #[default]
    Lazy,
    /// `fallocate(mode 0)`: allocate every page at plug time, so a plug fails
    /// (BUSY) rather than the guest faulting later when the host is short.
    Fallocate,
}

/// A region backed by a slice of a memfd (or any shmem/tmpfs/hugetlbfs file):
/// `[base, base + size)` of the file holds the region.
///
/// `resident_bytes` uses `lseek(SEEK_DATA/SEEK_HOLE)`, which moves the file
/// offset shared by every duplicate of the descriptor; positional I/O
/// (`pread`/`pwrite`, mappings) is unaffected. On hugetlbfs, which has no
/// SEEK_DATA, the whole range reads as resident.
#[derive(Debug)]
pub struct MemfdBackend {
    file: File,
    base: u64,
    size: u64,
    populate: Populate,
}

impl MemfdBackend {
    /// Serves the region from `[base, base + size)` of `file`, which must
    /// already be that large.
    pub fn new(file: File, base: u64, size: u64) -> Result<Self, BackendError> {
        let needed = base.checked_add(size).ok_or(BackendError::OutOfRange {
            offset: base,
            len: size,
            size: u64::MAX,
        })?;
        let file_size = file.metadata().map_err(BackendError::Stat)?.len();
        if file_size < needed || i64::try_from(needed).is_err() {
            return Err(BackendError::FileTooSmall { file_size, needed });
        }
        Ok(Self {
            file,
            base,
            size,
            populate: Populate::Lazy,
        })
    }

    /// Chooses what a plug does to host memory.
    pub fn with_populate(mut self, populate: Populate) -> Self {
        self.populate = populate;
        self
    }

    /// The backing file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Offset of the region in the file.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Size of the region.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes allocated to the whole file (`st_blocks * 512`), other regions
    /// of it included. Unlike [`MemBackend::resident_bytes`] this also counts
    /// pages allocated by `fallocate` but never written, which shmem reports as
    /// holes to `SEEK_DATA`.
    pub fn allocated_file_bytes(&self) -> Result<u64, BackendError> {
        use std::os::unix::fs::MetadataExt;
        let meta = self.file.metadata().map_err(BackendError::Stat)?;
        Ok(meta.blocks().saturating_mul(512))
    }

    /// The file range `(start, len)` of a region range, both fitting `off_t`.
    fn file_range(&self, offset: u64, len: u64) -> Result<(i64, i64), BackendError> {
        let out = BackendError::OutOfRange {
            offset,
            len,
            size: self.size,
        };
        match offset.checked_add(len) {
            Some(end) if end <= self.size => {}
            _ => return Err(out),
        }
        // `new` checked that base + size fits i64, so neither conversion fails.
        let start = i64::try_from(self.base + offset).map_err(|_| out)?;
        let len = i64::try_from(len).unwrap_or(i64::MAX);
        Ok((start, len))
    }

    fn fallocate(&self, mode: libc::c_int, start: i64, len: i64) -> io::Result<()> {
        // SAFETY: fallocate only reads its integer arguments and acts on the
        // file behind a descriptor this backend owns; no memory is passed.
        let ret = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, start, len) };
        if ret == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn lseek(&self, pos: i64, whence: libc::c_int) -> io::Result<Option<i64>> {
        // SAFETY: lseek only reads its integer arguments and acts on a
        // descriptor this backend owns; no memory is passed.
        let ret = unsafe { libc::lseek(self.file.as_raw_fd(), pos, whence) };
        if ret >= 0 {
            return Ok(Some(ret));
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(err)
        }
    }
}

impl MemBackend for MemfdBackend {
    fn populate(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        let (start, flen) = self.file_range(offset, len)?;
        if self.populate == Populate::Lazy || len == 0 {
            return Ok(());
        }
        self.fallocate(0, start, flen)
            .map_err(|source| BackendError::Populate {
                offset,
                len,
                source,
            })
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        let (start, flen) = self.file_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            start,
            flen,
        )
        .map_err(|source| BackendError::Discard {
            offset,
            len,
            source,
        })
    }

    fn resident_bytes(&self, offset: u64, len: u64) -> Result<u64, BackendError> {
        let (start, flen) = self.file_range(offset, len)?;
        let end = start + flen;
        let mut pos = start;
        let mut total = 0u64;
        while pos < end {
            let Some(data) = self
                .lseek(pos, libc::SEEK_DATA)
                .map_err(BackendError::Seek)?
            else {
                break;
            };
            if data >= end {
                break;
            }
            let hole = self
                .lseek(data, libc::SEEK_HOLE)
                .map_err(BackendError::Seek)?
                .unwrap_or(end)
                .min(end);
            if hole <= data {
                break;
            }
            total += (hole - data) as u64;
            pos = hole;
        }
        Ok(total)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// A fresh memfd of `size` bytes.
    pub(crate) fn memfd(size: u64) -> File {
        crate::memfd::create("virtio-mem-test", size, crate::memfd::Pages::Small).unwrap()
    }

    const PAGE: u64 = 4096;

    #[test]
    fn discard_releases_pages_and_reads_back_zero() {
        let file = memfd(64 * PAGE);
        file.write_at(&[0xab; 16 * PAGE as usize], 8 * PAGE)
            .unwrap();
        let backend = MemfdBackend::new(file, 8 * PAGE, 32 * PAGE).unwrap();
        assert_eq!(backend.resident_bytes(0, 32 * PAGE).unwrap(), 16 * PAGE);
        assert_eq!(
            backend.resident_bytes(4 * PAGE, 8 * PAGE).unwrap(),
            8 * PAGE
        );
        backend.discard(4 * PAGE, 4 * PAGE).unwrap();
        assert_eq!(backend.resident_bytes(0, 32 * PAGE).unwrap(), 12 * PAGE);
        let mut buf = vec![0xffu8; 4 * PAGE as usize];
        backend.file().read_at(&mut buf, 12 * PAGE).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        backend.file().read_at(&mut buf, 8 * PAGE).unwrap();
        assert!(buf.iter().all(|&b| b == 0xab));
        // KEEP_SIZE: the file keeps its length.
        assert_eq!(backend.file().metadata().unwrap().len(), 64 * PAGE);
    }

    #[test]
    fn populate_fallocate_allocates() {
        let backend = MemfdBackend::new(memfd(16 * PAGE), 0, 16 * PAGE).unwrap();
        backend.populate(0, 4 * PAGE).unwrap();
        assert_eq!(backend.resident_bytes(0, 16 * PAGE).unwrap(), 0);
        assert_eq!(backend.allocated_file_bytes().unwrap(), 0);
        let backend = backend.with_populate(Populate::Fallocate);
        backend.populate(0, 4 * PAGE).unwrap();
        // shmem reports fallocated, never written pages as holes to SEEK_DATA.
        assert!(backend.resident_bytes(0, 16 * PAGE).unwrap() <= 4 * PAGE);
        assert_eq!(backend.allocated_file_bytes().unwrap(), 4 * PAGE);
        backend.discard(0, 16 * PAGE).unwrap();
        assert_eq!(backend.allocated_file_bytes().unwrap(), 0);
    }

    #[test]
    fn ranges_are_checked() {
        assert!(matches!(
            MemfdBackend::new(memfd(PAGE), 0, 2 * PAGE),
            Err(BackendError::FileTooSmall { .. })
        ));
        assert!(MemfdBackend::new(memfd(PAGE), u64::MAX, 2).is_err());
        let b = MemfdBackend::new(memfd(4 * PAGE), PAGE, 2 * PAGE).unwrap();
        assert!(matches!(
            b.discard(PAGE, 2 * PAGE),
            Err(BackendError::OutOfRange { .. })
        ));
        assert!(b.discard(u64::MAX, 2).is_err());
        assert!(b.resident_bytes(0, u64::MAX).is_err());
        assert!(b.populate(3 * PAGE, 0).is_err());
        assert_eq!(b.resident_bytes(2 * PAGE, 0).unwrap(), 0);
        b.discard(0, 0).unwrap();
    }
}
