//! Creating memfds: the one place that does, for the VMM's guest RAM (one memfd per
//! node) and for the tests, benches and fuzz targets of [`MemfdBackend`].
//!
//! [`MemfdBackend`]: crate::MemfdBackend

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;

/// A hugetlb page of [`Pages::Huge2M`].
pub const HUGE_2M: u64 = 2 << 20;

/// The host pages behind a memfd.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Pages {
    /// Base pages (shmem): allocated on first touch, swappable.
    #[default]
    Small,
    /// 2 MiB pages from the host's hugetlb pool (`/proc/sys/vm/nr_hugepages`). The
    /// file's size and every discarded range must be multiples of 2 MiB.
    Huge2M,
}

impl Pages {
    fn flags(self) -> libc::c_uint {
        match self {
            Pages::Small => libc::MFD_CLOEXEC,
            Pages::Huge2M => libc::MFD_CLOEXEC | libc::MFD_HUGETLB | libc::MFD_HUGE_2MB,
        }
    }
}

/// Creating a memfd failed.
#[derive(Debug, thiserror::Error)]
pub enum MemfdError {
    /// `memfd_create` failed (or the name holds a NUL byte).
    #[error("cannot create memfd {name:?}: {source}")]
    Create {
        /// The memfd's name.
        name: String,
        /// The OS error.
        source: io::Error,
    },
    /// The size is not a multiple of the huge page size.
    #[error("memfd {name:?}: {size} bytes is not a multiple of 2 MiB huge pages")]
    Unaligned {
        /// The memfd's name.
        name: String,
        /// The size asked for.
        size: u64,
    },
    /// `ftruncate` failed.
    #[error("cannot size memfd {name:?} to {size} bytes: {source}")]
    Resize {
        /// The memfd's name.
        name: String,
        /// The size asked for.
        size: u64,
        /// The OS error.
        source: io::Error,
    },
}

/// A new close-on-exec memfd of `size` bytes (a hole: no page is allocated yet), named
/// `name` in `/proc/<pid>/fd` and `/proc/<pid>/maps`.
pub fn create(name: &str, size: u64, pages: Pages) -> Result<File, MemfdError> {
    if pages == Pages::Huge2M && size % HUGE_2M != 0 {
        return Err(MemfdError::Unaligned {
            name: name.to_owned(),
            size,
        });
    }
    let create_err = |source| MemfdError::Create {
        name: name.to_owned(),
        source,
    };
    let c_name = CString::new(name)
        .map_err(|e| create_err(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    // SAFETY: `c_name` is a NUL-terminated string that outlives the call, which only
    // reads it; the flags are valid memfd_create flags.
    let fd = unsafe { libc::memfd_create(c_name.as_ptr(), pages.flags()) };
    if fd < 0 {
        return Err(create_err(io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create, is open, and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(|source| MemfdError::Resize {
        name: name.to_owned(),
        size,
        source,
    })?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileExt, MetadataExt};

    #[test]
    fn small_pages_give_a_sized_hole() {
        let file = create("memfd-test", 3 << 20, Pages::Small).unwrap();
        let meta = file.metadata().unwrap();
        assert_eq!((meta.len(), meta.blocks()), (3 << 20, 0));
        file.write_at(b"x", 4096).unwrap();
        assert_eq!(file.metadata().unwrap().blocks(), 4096 / 512);
        let link = std::fs::read_link(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&file)
        ))
        .unwrap();
        assert_eq!(link.to_str(), Some("/memfd:memfd-test (deleted)"));
    }

    #[test]
    fn huge_pages_are_2_mib() {
        let err = create("memfd-huge", HUGE_2M + 4096, Pages::Huge2M).unwrap_err();
        assert!(matches!(err, MemfdError::Unaligned { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            "memfd \"memfd-huge\": 2101248 bytes is not a multiple of 2 MiB huge pages"
        );
    }

    /// Ignored by default, as a kernel without hugetlbfs refuses the flag (EINVAL); CI
    /// runs it (`.ci/run`).
    #[test]
    #[ignore = "needs a kernel with hugetlbfs; run with --ignored hugetlbfs"]
    fn hugetlbfs_files_have_2_mib_blocks() {
        let file = create("memfd-huge", 2 * HUGE_2M, Pages::Huge2M).expect("needs hugetlbfs");
        // hugetlbfs reports its page size as the file's block size.
        assert_eq!(file.metadata().unwrap().blksize(), HUGE_2M);
    }

    #[test]
    fn bad_names_are_errors() {
        let err = create("a\0b", 4096, Pages::Small).unwrap_err();
        assert!(matches!(err, MemfdError::Create { .. }), "{err}");
        // The kernel limits names to 249 bytes.
        let err = create(&"n".repeat(300), 4096, Pages::Small).unwrap_err();
        assert!(err.to_string().starts_with("cannot create memfd"), "{err}");
    }
}
