//! How long the VMM's API takes to answer while something else runs: a thread sends
//! `GET /api/v1/vm` over the socket itself (no client process, whose start would
//! dominate under emulation) every few milliseconds, and keeps each answer's time.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mempower_api::client::request_with_timeout;

/// How long one request may take before it counts as failed.
const TIMEOUT: Duration = Duration::from_secs(10);

/// A running probe; [`LatencyProbe::stop`] gives what it measured.
pub struct LatencyProbe {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Latencies>,
}

/// Answer times, and the requests that got no `200` answer.
#[derive(Debug, Default, Clone)]
pub struct Latencies {
    pub times: Vec<Duration>,
    pub failures: Vec<String>,
}

impl Latencies {
    /// The `q` quantile (0 to 1) of the answer times.
    pub fn quantile(&self, q: f64) -> Duration {
        let mut sorted = self.times.clone();
        sorted.sort();
        let at = ((sorted.len() as f64 - 1.0) * q).round() as usize;
        sorted.get(at).copied().unwrap_or_default()
    }

    pub fn summary(&self) -> String {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        format!(
            "{} requests: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; {} failed",
            self.times.len(),
            ms(self.quantile(0.5)),
            ms(self.quantile(0.99)),
            ms(self.quantile(1.0)),
            self.failures.len()
        )
    }
}

/// One request on a fresh connection: the time to the whole answer.
fn get(socket: &Path) -> Result<Duration, String> {
    let t = Instant::now();
    let answer = request_with_timeout(socket, "GET", "/api/v1/vm", None, TIMEOUT)
        .map_err(|e| e.to_string())?;
    match answer.status {
        200 => Ok(t.elapsed()),
        status => Err(format!("{status} {}", answer.body)),
    }
}

impl LatencyProbe {
    /// Starts asking `socket` every `every`.
    pub fn start(socket: impl Into<PathBuf>, every: Duration) -> Self {
        let socket = socket.into();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut seen = Latencies::default();
            while !stopped.load(Ordering::Relaxed) {
                match get(&socket) {
                    Ok(took) => seen.times.push(took),
                    Err(e) => seen.failures.push(e),
                }
                std::thread::sleep(every);
            }
            seen
        });
        LatencyProbe { stop, thread }
    }

    pub fn stop(self) -> Latencies {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_of_answer_times() {
        let l = Latencies {
            times: (1..=100).map(Duration::from_millis).collect(),
            failures: vec![],
        };
        assert_eq!(l.quantile(0.5), Duration::from_millis(51));
        assert_eq!(l.quantile(0.99), Duration::from_millis(99));
        assert_eq!(l.quantile(1.0), Duration::from_millis(100));
        assert_eq!(Latencies::default().quantile(0.99), Duration::ZERO);
    }

    use std::io::{Read, Write};

    #[test]
    fn a_probe_of_a_server_that_answers_times_it() {
        let dir = std::env::temp_dir().join(format!("latency-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("api.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let server = std::thread::spawn(move || {
            for (n, stream) in listener.incoming().take(3).enumerate() {
                let mut stream = stream.unwrap();
                let mut head = [0u8; 256];
                let _ = stream.read(&mut head).unwrap();
                let status = if n == 1 { "503 Busy" } else { "200 OK" };
                let answer = format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
                stream.write_all(answer.as_bytes()).unwrap();
            }
        });
        let probe = LatencyProbe::start(&socket, Duration::from_millis(1));
        server.join().unwrap();
        std::fs::remove_file(&socket).unwrap();
        let seen = probe.stop();
        assert_eq!(seen.times.len(), 2, "{seen:?}");
        assert!(seen.failures[0].starts_with("503"), "{seen:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
