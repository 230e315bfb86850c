//! errno helpers that several modules share: the number to answer with, and its text.

use std::ffi::CStr;
use std::io;

/// The errno of an I/O error; EIO for one that did not come from the kernel.
pub fn errno_of(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// The C library's text for `errno`, e.g. "Device or resource busy".
pub fn strerror(errno: i32) -> String {
    let mut buf = [0 as libc::c_char; 256];
    // SAFETY: strerror_r (the XSI variant) writes a NUL-terminated string of at most
    // `buf.len()` bytes into `buf`, which is valid for writes of that length.
    let rc = unsafe { libc::strerror_r(errno, buf.as_mut_ptr(), buf.len()) };
    if rc != 0 {
        return format!("Unknown error {errno}");
    }
    // SAFETY: on success `buf` holds a NUL-terminated string (it was zeroed, too).
    unsafe { CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strerror_texts() {
        assert_eq!(strerror(libc::EBUSY), "Device or resource busy");
        assert_eq!(strerror(libc::EINVAL), "Invalid argument");
        assert!(strerror(100_000).contains("100000"));
    }

    #[test]
    fn errno_of_kernel_and_other_errors() {
        assert_eq!(
            errno_of(&io::Error::from_raw_os_error(libc::EBUSY)),
            libc::EBUSY
        );
        assert_eq!(errno_of(&io::Error::other("not the kernel's")), libc::EIO);
    }
}
