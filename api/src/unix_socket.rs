//! Listening Unix sockets that only their owner can reach from the moment
//! they appear: the API socket and the VMM's hybrid vsock socket.
//!
//! `bind(2)` creates the socket file with the process umask; a `chmod`
//! afterwards leaves a window in which anyone the umask lets in may connect.
//! Changing the umask around `bind` would be process-wide, and so racy with
//! other threads creating files. Instead [`bind_owner_only`] binds inside a
//! fresh 0700 directory next to the target (nobody else may even look up a
//! name in it), sets the socket to 0600 there, and renames it into place
//! without replacing anything. Only the final, 0600 socket is ever reachable.

use std::io::{self, ErrorKind};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// The mode of every socket bound here.
pub const SOCKET_MODE: u32 = 0o600;

/// Why [`bind_owner_only`] failed.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// Another process listens on the path already.
    #[error("{0} is in use by a live listener")]
    InUse(PathBuf),
    /// The path exists and is not a socket; it is left alone.
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// A step failed; `what` names it.
    #[error("cannot {what} {path}: {source}")]
    Io {
        /// The step: "inspect", "bind"...
        what: &'static str,
        /// The socket path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
}

/// A socket file this process created; dropping it removes the file, but
/// only while it is still the same file (not one another process put there
/// since).
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    /// Device and inode of the socket.
    id: (u64, u64),
}

impl SocketFile {
    /// Where the socket is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.id {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// Binds a listening socket at `path`, mode 0600 from its first moment.
///
/// A stale socket at `path` (one nobody accepts on) is replaced; a live one
/// or a non-socket is refused. The listener is blocking, as `bind` leaves it.
pub fn bind_owner_only(path: &Path) -> Result<(UnixListener, SocketFile), BindError> {
    bind_staged(path, |_| {})
}

/// [`bind_owner_only`], calling `just_bound` with the staged socket's path
/// right after `bind`, when its mode is still the umask's.
fn bind_staged(
    path: &Path,
    just_bound: impl FnOnce(&Path),
) -> Result<(UnixListener, SocketFile), BindError> {
    let io_err = |what| {
        move |source| BindError::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    };
    remove_stale_socket(path)?;
    let private = PrivateDir::create(path).map_err(io_err("create a private directory for"))?;
    let staged = private.0.join("s");
    let listener = UnixListener::bind(&staged).map_err(io_err("bind"))?;
    just_bound(&staged);
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(SOCKET_MODE))
        .map_err(io_err("set mode 0600 on"))?;
    let meta = std::fs::symlink_metadata(&staged).map_err(io_err("inspect"))?;
    match rename_noreplace(&staged, path) {
        Ok(()) => {}
        // Someone bound the path since the stale check.
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {
            return Err(BindError::InUse(path.to_path_buf()))
        }
        Err(e) => return Err(io_err("move the socket into place at")(e)),
    }
    let file = SocketFile {
        path: path.to_path_buf(),
        id: (meta.dev(), meta.ino()),
    };
    Ok((listener, file))
}

/// Makes `path` free for a socket: absent, or a socket nobody accepts on.
fn remove_stale_socket(path: &Path) -> Result<(), BindError> {
    let io_err = |what| {
        move |source| BindError::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    };
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("inspect")(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(BindError::NotASocket(path.to_path_buf()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(BindError::InUse(path.to_path_buf())),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
            std::fs::remove_file(path).map_err(io_err("remove the stale socket"))
        }
        Err(e) => Err(io_err("inspect")(e)),
    }
}

/// A fresh 0700 directory beside a target path, removed with what is left in
/// it when dropped.
struct PrivateDir(PathBuf);

impl PrivateDir {
    fn create(target: &Path) -> io::Result<PrivateDir> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        // Short, so that the staged path fits `sun_path` about when the
        // target does.
        loop {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let dir = parent.join(format!(".mp{:x}-{n:x}", std::process::id()));
            match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => {
                    let dir = PrivateDir(dir);
                    // The umask can only have taken bits away; make sure the
                    // owner can use it.
                    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o700))?;
                    return Ok(dir);
                }
                // Left by a process that had our pid and died mid-bind.
                Err(e) if e.kind() == ErrorKind::AlreadyExists && n < 64 => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.0.join("s"));
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// `rename(2)` that fails with `AlreadyExists` instead of replacing `to`.
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(ErrorKind::InvalidInput, "path contains a NUL byte"))
    };
    let (from_c, to_c) = (c(from)?, c(to)?);
    // SAFETY: both are valid NUL-terminated strings that outlive the call;
    // renameat2 only reads them.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from_c.as_ptr(),
            libc::AT_FDCWD,
            to_c.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        // A filesystem without RENAME_NOREPLACE: link(2) never replaces
        // either, and a socket may be hard-linked like any file.
        Some(libc::EINVAL | libc::ENOSYS) => {
            std::fs::hard_link(from, to)?;
            std::fs::remove_file(from)
        }
        _ => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::tempdir;

    fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path)
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    }

    #[test]
    fn the_socket_is_0600_and_nothing_is_left_beside_it() {
        let dir = tempdir();
        let path = dir.as_path().join("a.sock");
        let (listener, file) = bind_owner_only(&path).unwrap();
        assert_eq!(file.path(), path);
        assert_eq!(mode(&path), SOCKET_MODE);
        let names: Vec<_> = std::fs::read_dir(dir.as_path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["a.sock"], "the private directory is gone");
        // It is the listener's socket.
        let _client = UnixStream::connect(&path).unwrap();
        assert!(listener.accept().is_ok());
        drop(file);
        assert!(!path.exists());
    }

    /// Between `bind` and `chmod` the socket has the umask's mode; then it
    /// must be out of reach: not at the target path, and in a directory
    /// only the owner may enter.
    #[test]
    fn between_bind_and_chmod_nobody_else_can_reach_the_socket() {
        let dir = tempdir();
        let path = dir.as_path().join("b.sock");
        let mut checked = false;
        let (_listener, _file) = bind_staged(&path, |staged| {
            assert!(!path.exists(), "visible at the target before its chmod");
            let parent = staged.parent().unwrap();
            assert_eq!(parent.parent(), Some(dir.as_path()), "beside the target");
            assert_eq!(mode(parent), 0o700);
            checked = true;
        })
        .unwrap();
        assert!(checked);
        assert_eq!(mode(&path), SOCKET_MODE);
    }

    #[test]
    fn stale_live_and_foreign_paths() {
        let dir = tempdir();
        let path = dir.as_path().join("c.sock");
        drop(UnixListener::bind(&path).unwrap());
        let (_live, file) = bind_owner_only(&path).unwrap();
        assert!(matches!(bind_owner_only(&path), Err(BindError::InUse(_))));
        // A socket another process put there since is left alone on drop.
        std::fs::remove_file(&path).unwrap();
        let _other = UnixListener::bind(&path).unwrap();
        drop(file);
        assert!(path.exists());

        let plain = dir.as_path().join("plain");
        std::fs::write(&plain, b"precious").unwrap();
        assert!(matches!(
            bind_owner_only(&plain),
            Err(BindError::NotASocket(_))
        ));
        assert_eq!(std::fs::read(&plain).unwrap(), b"precious");
        let missing = dir.as_path().join("no/such/dir/s");
        let e = bind_owner_only(&missing).unwrap_err();
        assert!(e.to_string().contains("no/such/dir/s"), "{e}");
    }

    #[test]
    fn a_path_bound_since_the_stale_check_is_not_replaced() {
        let dir = tempdir();
        let from = dir.as_path().join("from");
        let to = dir.as_path().join("to");
        std::fs::write(&from, b"new").unwrap();
        std::fs::write(&to, b"old").unwrap();
        let e = rename_noreplace(&from, &to).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&to).unwrap(), b"old");
    }
}
