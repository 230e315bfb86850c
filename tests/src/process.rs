//! Small helpers for child processes: waiting with a timeout.

use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

/// Errors of the process helpers.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// `waitpid` failed.
    #[error("waiting for process {pid} failed: {source}")]
    Wait {
        /// The child's pid.
        pid: u32,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// Waits up to `timeout` for `child` to exit. Returns `Ok(None)` if it is still running
/// then; the child is left running (kill it yourself if needed).
pub fn wait_timeout(
    child: &mut Child,
    timeout: Duration,
) -> Result<Option<ExitStatus>, ProcessError> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok(Some(status)),
            Ok(None) => {}
            Err(source) => {
                return Err(ProcessError::Wait {
                    pid: child.id(),
                    source,
                })
            }
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Kills `child` (SIGKILL) if it is still running and reaps it. Errors are ignored: this
/// is for clean-up paths.
pub(crate) fn kill_and_reap(child: &mut Child) -> Option<ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    let _ = child.kill();
    child.wait().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn wait_timeout_expires_on_a_sleeping_child() {
        let mut child = Command::new("sleep").arg("10").spawn().unwrap();
        let t0 = Instant::now();
        let status = wait_timeout(&mut child, Duration::from_millis(200)).unwrap();
        let waited = t0.elapsed();
        assert!(status.is_none());
        assert!(waited >= Duration::from_millis(200), "{waited:?}");
        assert!(waited < Duration::from_secs(5), "{waited:?}");
        let status = kill_and_reap(&mut child).unwrap();
        assert!(!status.success());
    }

    #[test]
    fn wait_timeout_returns_the_exit_status() {
        let mut child = Command::new("sh").args(["-c", "exit 3"]).spawn().unwrap();
        let status = wait_timeout(&mut child, Duration::from_secs(10))
            .unwrap()
            .unwrap();
        assert_eq!(status.code(), Some(3));
    }
}
