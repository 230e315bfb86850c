//! Where the disk's bytes live: the [`DiskBackend`] trait the device does its
//! I/O through, and [`RawFile`], a raw image file or block device.
//!
//! Data moves between the file and guest memory directly: `preadv`/`pwritev`
//! on the guest's pages, with no bounce buffer. Offsets are bytes from the
//! start of the disk; the device checks every range against [`DiskBackend::size`]
//! before it calls the backend.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

/// Most iovecs one `preadv`/`pwritev` call takes (Linux's `UIO_MAXIOV`).
const IOV_MAX: usize = 1024;

/// A backend operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The image cannot be opened.
    #[error("cannot open disk image {path}: {source}")]
    Open {
        /// The image path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Another process holds a conflicting lock on the image.
    #[error("disk image {path} is in use by another process (locked)")]
    Locked {
        /// The image path.
        path: PathBuf,
    },
    /// The image size cannot be found.
    #[error("cannot find the size of the disk image: {0}")]
    Size(io::Error),
    /// Reading the disk failed.
    #[error("cannot read {len} bytes at {offset:#x}: {source}")]
    Read {
        /// Disk offset.
        offset: u64,
        /// Bytes requested.
        len: u64,
        /// The OS error (`UnexpectedEof` if the file shrank under the device).
        source: io::Error,
    },
    /// Writing the disk failed.
    #[error("cannot write {len} bytes at {offset:#x}: {source}")]
    Write {
        /// Disk offset.
        offset: u64,
        /// Bytes requested.
        len: u64,
        /// The OS error.
        source: io::Error,
    },
    /// `fdatasync` failed.
    #[error("cannot flush the disk image: {0}")]
    Flush(io::Error),
    /// A write reached a read-only backend.
    #[error("the disk is read-only")]
    ReadOnly,
}

/// The disk behind a virtio-blk device.
pub trait DiskBackend {
    /// Disk size in bytes; fixed for the device's lifetime.
    fn size(&self) -> u64;

    /// Whether the disk refuses writes (the device then offers `VIRTIO_BLK_F_RO`).
    fn read_only(&self) -> bool;

    /// Fills `bufs`, in order, with the disk bytes starting at `offset`.
    /// All of them or an error: a short read is an error.
    fn read_vectored_at<B: BitmapSlice>(
        &self,
        offset: u64,
        bufs: &[VolatileSlice<'_, B>],
    ) -> Result<(), BackendError>;

    /// Writes `bufs`, in order, to the disk starting at `offset`.
    fn write_vectored_at<B: BitmapSlice>(
        &self,
        offset: u64,
        bufs: &[VolatileSlice<'_, B>],
    ) -> Result<(), BackendError>;

    /// Makes every completed write durable.
    fn flush(&self) -> Result<(), BackendError>;
}

/// A raw disk image: the file's bytes are the disk's bytes.
#[derive(Debug)]
pub struct RawFile {
    file: File,
    size: u64,
    read_only: bool,
}

impl RawFile {
    /// Opens `path` read-write (or read-only) and locks it against other
    /// writers: an exclusive `flock` for read-write, a shared one for
    /// read-only, so two VMs never write the same image.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, BackendError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| BackendError::Open {
                path: path.into(),
                source,
            })?;
        let op = if read_only {
            libc::LOCK_SH
        } else {
            libc::LOCK_EX
        };
        // SAFETY: flock only reads the descriptor number, owned by `file`.
        if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } != 0 {
            let source = io::Error::last_os_error();
            return Err(if source.kind() == io::ErrorKind::WouldBlock {
                BackendError::Locked { path: path.into() }
            } else {
                BackendError::Open {
                    path: path.into(),
                    source,
                }
            });
        }
        Self::from_file(file, read_only)
    }

    /// Wraps an open file, without locking it (the caller owns that). Its
    /// size is taken now (seeking to the end works for block devices too,
    /// where the metadata length is 0).
    pub fn from_file(mut file: File, read_only: bool) -> Result<Self, BackendError> {
        let size = file.seek(SeekFrom::End(0)).map_err(BackendError::Size)?;
        Ok(Self {
            file,
            size,
            read_only,
        })
    }

    /// The image file.
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl DiskBackend for RawFile {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_vectored_at<B: BitmapSlice>(
        &self,
        offset: u64,
        bufs: &[VolatileSlice<'_, B>],
    ) -> Result<(), BackendError> {
        let fd = self.file.as_raw_fd();
        // The guards keep the guest pages accessible until the syscalls are done.
        let guards: Vec<_> = bufs.iter().map(|b| b.ptr_guard_mut()).collect();
        let mut iovs: Vec<libc::iovec> = guards
            .iter()
            .map(|g| libc::iovec {
                iov_base: g.as_ptr().cast(),
                iov_len: g.len(),
            })
            .collect();
        let result = transfer(&mut iovs, offset, |iov, count, off| {
            // SAFETY: `fd` is owned by `self.file`; `iov` points at `count`
            // iovecs, each describing guest memory that is valid for writes of
            // its length while `guards` live.
            unsafe { libc::preadv(fd, iov, count, off) }
        });
        // The kernel wrote guest memory behind vm-memory's back: record it in
        // the dirty bitmap (all of it, since an error may follow a partial read).
        for b in bufs {
            b.bitmap().mark_dirty(0, b.len());
        }
        result.map_err(|source| BackendError::Read {
            offset,
            len: total_len(bufs),
            source,
        })
    }

    fn write_vectored_at<B: BitmapSlice>(
        &self,
        offset: u64,
        bufs: &[VolatileSlice<'_, B>],
    ) -> Result<(), BackendError> {
        if self.read_only {
            return Err(BackendError::ReadOnly);
        }
        let fd = self.file.as_raw_fd();
        let guards: Vec<_> = bufs.iter().map(|b| b.ptr_guard()).collect();
        let mut iovs: Vec<libc::iovec> = guards
            .iter()
            .map(|g| libc::iovec {
                iov_base: g.as_ptr().cast_mut().cast(),
                iov_len: g.len(),
            })
            .collect();
        transfer(&mut iovs, offset, |iov, count, off| {
            // SAFETY: `fd` is owned by `self.file`; `iov` points at `count`
            // iovecs, each describing guest memory that is valid for reads of
            // its length while `guards` live. pwritev only reads them.
            unsafe { libc::pwritev(fd, iov, count, off) }
        })
        .map_err(|source| BackendError::Write {
            offset,
            len: total_len(bufs),
            source,
        })
    }

    fn flush(&self) -> Result<(), BackendError> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data().map_err(BackendError::Flush)
    }
}

fn total_len<B: BitmapSlice>(bufs: &[VolatileSlice<'_, B>]) -> u64 {
    bufs.iter().map(|b| b.len() as u64).sum()
}

/// Runs `op` (a `preadv` or `pwritev`) until every iovec is transferred,
/// resuming after short transfers and `EINTR`. A transfer of 0 bytes with
/// data left means the file ended: `UnexpectedEof`.
fn transfer(
    iovs: &mut [libc::iovec],
    mut offset: u64,
    mut op: impl FnMut(*const libc::iovec, libc::c_int, libc::off_t) -> isize,
) -> io::Result<()> {
    let mut start = 0;
    loop {
        while iovs.get(start).is_some_and(|v| v.iov_len == 0) {
            start += 1;
        }
        if start == iovs.len() {
            return Ok(());
        }
        let pending = &mut iovs[start..];
        let count = pending.len().min(IOV_MAX) as libc::c_int;
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset beyond off_t"))?;
        let done = op(pending.as_ptr(), count, off);
        if done < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if done == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let mut left = done as usize;
        offset += left as u64;
        for v in pending.iter_mut() {
            let step = left.min(v.iov_len);
            v.iov_base = v.iov_base.cast::<u8>().wrapping_add(step).cast();
            v.iov_len -= step;
            left -= step;
            if left == 0 {
                break;
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

    use crate::test_utils::TempImage;

    fn slices<'m>(mem: &'m GuestMemoryMmap, parts: &[(u64, usize)]) -> Vec<VolatileSlice<'m, ()>> {
        parts
            .iter()
            .map(|&(a, l)| mem.get_slice(GuestAddress(a), l).unwrap())
            .collect()
    }

    #[test]
    fn vectored_io_round_trip_through_guest_memory() {
        let img = TempImage::new(1 << 20);
        let disk = RawFile::open(img.path(), false).unwrap();
        assert_eq!((disk.size(), disk.read_only()), (1 << 20, false));
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        mem.write_slice(&[0xa1; 512], GuestAddress(0x1000)).unwrap();
        mem.write_slice(&[0xb2; 1536], GuestAddress(0x8000))
            .unwrap();
        let bufs = slices(&mem, &[(0x1000, 512), (0x8000, 1536)]);
        disk.write_vectored_at(4096, &bufs).unwrap();
        let mut back = vec![0u8; 2048];
        disk.file().read_exact_at(&mut back, 4096).unwrap();
        assert!(back[..512].iter().all(|&b| b == 0xa1));
        assert!(back[512..].iter().all(|&b| b == 0xb2));
        // And back into other guest pages, split differently.
        let dst = slices(&mem, &[(0x20000, 1000), (0x30000, 0), (0x40000, 1048)]);
        disk.read_vectored_at(4096, &dst).unwrap();
        let mut got = vec![0u8; 2048];
        mem.read_slice(&mut got[..1000], GuestAddress(0x20000))
            .unwrap();
        mem.read_slice(&mut got[1000..], GuestAddress(0x40000))
            .unwrap();
        assert_eq!(got, back);
        disk.flush().unwrap();
    }

    #[test]
    fn reads_past_the_end_fail_and_read_only_refuses_writes() {
        let img = TempImage::new(4096);
        let disk = RawFile::open(img.path(), true).unwrap();
        assert!(disk.read_only());
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let bufs = slices(&mem, &[(0, 1024)]);
        let err = disk.read_vectored_at(3584, &bufs).unwrap_err();
        assert!(
            matches!(&err, BackendError::Read { source, .. } if source.kind() == io::ErrorKind::UnexpectedEof),
            "{err}"
        );
        assert!(matches!(
            disk.write_vectored_at(0, &bufs),
            Err(BackendError::ReadOnly)
        ));
        disk.flush().unwrap();
        assert_eq!(img.len(), 4096);
    }

    #[test]
    fn open_errors_and_locks() {
        let missing = Path::new("/nonexistent/virtio-blk/none.img");
        assert!(matches!(
            RawFile::open(missing, true),
            Err(BackendError::Open { .. })
        ));
        let img = TempImage::new(4096);
        let rw = RawFile::open(img.path(), false).unwrap();
        // A second writer, or a reader, is refused while the image is written.
        assert!(matches!(
            RawFile::open(img.path(), false),
            Err(BackendError::Locked { .. })
        ));
        assert!(matches!(
            RawFile::open(img.path(), true),
            Err(BackendError::Locked { .. })
        ));
        drop(rw);
        // Readers share.
        let r1 = RawFile::open(img.path(), true).unwrap();
        let _r2 = RawFile::open(img.path(), true).unwrap();
        assert!(matches!(
            RawFile::open(img.path(), false),
            Err(BackendError::Locked { .. })
        ));
        drop(r1);
    }

    #[test]
    fn transfer_resumes_after_short_transfers() {
        let mut a = [0u8; 10];
        let mut b = [0u8; 7];
        let mut iovs = [
            libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: a.len(),
            },
            libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            },
            libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            },
        ];
        let mut calls = Vec::new();
        // Transfers at most 4 bytes a call, with one EINTR.
        let mut eintr = true;
        transfer(&mut iovs, 100, |iov, count, off| {
            if eintr {
                eintr = false;
                // SAFETY: sets this thread's errno, as a failing syscall would.
                unsafe { *libc::__errno_location() = libc::EINTR };
                return -1;
            }
            // SAFETY: `transfer` passes `count` valid iovecs.
            let first = unsafe { *iov };
            calls.push((first.iov_len, count, off));
            first.iov_len.min(4) as isize
        })
        .unwrap();
        assert_eq!(
            calls,
            [
                (10, 3, 100),
                (6, 3, 104),
                (2, 3, 108),
                (7, 1, 110),
                (3, 1, 114)
            ]
        );
        assert!(iovs.iter().all(|v| v.iov_len == 0));
        let err = transfer(
            &mut [libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: 1,
            }],
            0,
            |_, _, _| 0,
        )
        .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        // Nothing to move: no call at all.
        transfer(&mut [], 0, |_, _, _| panic!("called")).unwrap();
    }
}
