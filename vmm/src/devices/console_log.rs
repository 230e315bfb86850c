//! The console log file of `--console-log FILE`, capped: the guest decides how much it
//! prints, so once the file holds [`MAX_BYTES`], its contents move to `FILE.1`
//! (replacing what was there) and `FILE` starts again empty. At most twice the cap is
//! on disk, and the last [`MAX_BYTES`] at least are kept.
//!
//! The vCPU threads write the console under seccomp filters that allow no path-based
//! system calls, so both files are opened at start and the rotation copies with
//! descriptors only: read the log, truncate and append to `FILE.1`, truncate the log.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The size at which the log rotates.
pub const MAX_BYTES: u64 = 64 << 20;
/// The copy's buffer.
const CHUNK: usize = 64 << 10;

/// A console log file that rotates past its cap.
#[derive(Debug)]
pub struct ConsoleLog {
    path: PathBuf,
    /// `FILE`, for appending and reading back.
    file: File,
    /// `FILE.1`, appended to once truncated.
    previous: File,
    size: u64,
    max: u64,
}

/// `FILE.1` beside `FILE`.
pub fn previous_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

impl ConsoleLog {
    /// Opens (or creates) `path` for appending, and `path.1` beside it; rotates past
    /// `max` bytes. A log already over the cap rotates at the first write.
    pub fn open(path: &Path, max: u64) -> io::Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(path)?;
        let previous = OpenOptions::new()
            .create(true)
            .append(true)
            .open(previous_path(path))?;
        let size = file.metadata()?.len();
        Ok(ConsoleLog {
            path: path.to_path_buf(),
            file,
            previous,
            size,
            max,
        })
    }

    /// The descriptors of `FILE` and `FILE.1`, for the vCPUs' filter
    /// ([`crate::seccomp::restrict_to_files`]).
    pub fn fds(&self) -> [RawFd; 2] {
        [self.file.as_raw_fd(), self.previous.as_raw_fd()]
    }

    /// Moves the log's contents to `FILE.1`.
    fn rotate(&mut self) -> io::Result<()> {
        self.previous.set_len(0)?;
        let mut buf = vec![0u8; CHUNK];
        let mut offset = 0u64;
        loop {
            let n = self.file.read_at(&mut buf, offset)?;
            if n == 0 {
                break;
            }
            self.previous.write_all(&buf[..n])?;
            offset += n as u64;
        }
        self.file.set_len(0)?;
        self.size = 0;
        Ok(())
    }
}

impl Write for ConsoleLog {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.size > 0 && self.size.saturating_add(buf.len() as u64) > self.max {
            match self.rotate() {
                Ok(()) => log::info!(
                    "console log {} reached {} bytes: moved to {}",
                    self.path.display(),
                    self.max,
                    previous_path(&self.path).display()
                ),
                // Keep the cap at the cost of the old lines (a full disk, say).
                Err(e) => {
                    log::warn!(
                        "console log {}: cannot move it to {}: {e}; truncating it",
                        self.path.display(),
                        previous_path(&self.path).display()
                    );
                    self.file.set_len(0)?;
                    self.size = 0;
                }
            }
        }
        let n = self.file.write(buf)?;
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mempower-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn the_log_moves_to_dot_one_past_its_cap_and_keeps_the_recent_lines() {
        let dir = dir("console-rotate");
        let path = dir.join("console.log");
        let mut log = ConsoleLog::open(&path, 100).unwrap();
        for i in 0..25 {
            log.write_all(format!("line {i:02}\n").as_bytes()).unwrap();
        }
        // 8 bytes a line: lines 0-11 (96 bytes) filled the log, then 12-23 did again,
        // and line 24 rotated it a second time.
        let current = std::fs::read_to_string(&path).unwrap();
        let previous = std::fs::read_to_string(dir.join("console.log.1")).unwrap();
        assert_eq!(current, "line 24\n");
        let expected: String = (12..24).map(|i| format!("line {i:02}\n")).collect();
        assert_eq!(previous, expected);
        assert!(current.len() as u64 <= 100 && previous.len() as u64 <= 100);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_log_already_over_its_cap_rotates_at_the_first_write() {
        let dir = dir("console-reopen");
        let path = dir.join("c.log");
        std::fs::write(&path, vec![b'x'; 300]).unwrap();
        std::fs::write(dir.join("c.log.1"), b"stale").unwrap();
        let mut log = ConsoleLog::open(&path, 100).unwrap();
        assert_eq!(
            std::fs::read(dir.join("c.log.1")).unwrap(),
            b"stale",
            "nothing moves before a write"
        );
        log.write_all(b"new\n").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new\n");
        assert_eq!(std::fs::read(dir.join("c.log.1")).unwrap(), vec![b'x'; 300]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_single_write_larger_than_the_cap_still_lands() {
        let dir = dir("console-big");
        let path = dir.join("c.log");
        let mut log = ConsoleLog::open(&path, 10).unwrap();
        log.write_all(&[b'a'; 50]).unwrap();
        log.write_all(b"b").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"b");
        assert_eq!(std::fs::read(dir.join("c.log.1")).unwrap(), vec![b'a'; 50]);
        assert_eq!(
            previous_path(Path::new("/x/y.log")),
            PathBuf::from("/x/y.log.1")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
