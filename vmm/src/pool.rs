//! Bounded pools of helper threads, one per kind of work the API hands off the event
//! loop (agent calls, region listings, evacuation checks, compaction plans).
//!
//! A client looping connect → request → close against a slow agent used to start a
//! thread per request, without bound. A pool runs at most `workers` jobs at once and
//! holds at most `queue` more; past that [`Pool::submit`] refuses at once
//! ([`PoolError::Full`], a 503 with `Retry-After` for the client), so the event loop
//! never waits and the VMM's thread count stays fixed. Workers start when work first
//! needs them (an idle VMM has none) and live as long as the pool.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::seccomp::ThreadKind;
use crate::sync::Locked;

type Job = Box<dyn FnOnce() + Send>;

/// Why a job was not taken.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error(
        "too many {what} are in progress ({workers} running, {queued} waiting); try again later"
    )]
    Full {
        what: &'static str,
        workers: usize,
        queued: usize,
    },
    #[error("cannot start a thread for the {what}: {source}")]
    Spawn {
        what: &'static str,
        source: std::io::Error,
    },
}

/// How big a pool is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSize {
    /// Jobs running at once (threads).
    pub workers: usize,
    /// Jobs waiting for a worker.
    pub queue: usize,
}

/// What the API's pools default to: a few jobs with the guest at once (its agent
/// answers a connection's calls in order anyway), a few more waiting.
pub const API_POOL: PoolSize = PoolSize {
    workers: 4,
    queue: 16,
};

struct State {
    jobs: VecDeque<Job>,
    /// Threads started, running a job or idle.
    started: usize,
    /// Threads not running a job (waiting, or started and not yet looking).
    idle: usize,
    /// The pool is gone: idle workers end.
    stopping: bool,
}

struct Shared {
    state: Mutex<State>,
    work: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.locked()
    }
}

/// A bounded pool; dropping it lets its idle workers end and the busy ones end after
/// their job (jobs still queued are dropped, and with them their reply senders).
pub struct Pool {
    /// Thread name, and what the error messages call the work.
    name: &'static str,
    what: &'static str,
    size: PoolSize,
    kind: ThreadKind,
    shared: Arc<Shared>,
}

impl Pool {
    /// A pool whose threads are called `name` and run under `kind`'s seccomp filter;
    /// `what` names the work in errors ("agent calls"). Starts no thread yet.
    pub fn new(name: &'static str, what: &'static str, size: PoolSize, kind: ThreadKind) -> Self {
        Pool {
            name,
            what,
            size: PoolSize {
                workers: size.workers.max(1),
                queue: size.queue,
            },
            kind,
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    jobs: VecDeque::new(),
                    started: 0,
                    idle: 0,
                    stopping: false,
                }),
                work: Condvar::new(),
            }),
        }
    }

    /// Queues `job`, starting a worker for it if every started one is busy and the pool
    /// has room for one more. Never blocks on the work itself.
    pub fn submit(&self, job: impl FnOnce() + Send + 'static) -> Result<(), PoolError> {
        let mut state = self.shared.lock();
        // Free workers take jobs at once: only the rest wait in the queue.
        let waiting = state.jobs.len().saturating_sub(state.idle);
        let can_start = state.started < self.size.workers;
        if !can_start && waiting >= self.size.queue {
            return Err(PoolError::Full {
                what: self.what,
                workers: state.started,
                queued: waiting,
            });
        }
        state.jobs.push_back(Box::new(job));
        if state.jobs.len() <= state.idle {
            self.shared.work.notify_one();
            return Ok(());
        }
        if !can_start {
            return Ok(());
        }
        match self.spawn() {
            Ok(()) => {
                // It takes the job once this lock is released.
                state.started += 1;
                state.idle += 1;
                Ok(())
            }
            Err(source) if state.started == 0 => {
                state.jobs.pop_back();
                Err(PoolError::Spawn {
                    what: self.what,
                    source,
                })
            }
            Err(e) => {
                // The job waits for a running worker instead.
                log::warn!("cannot start another {} thread: {e}", self.name);
                Ok(())
            }
        }
    }

    fn spawn(&self) -> std::io::Result<()> {
        let shared = self.shared.clone();
        let kind = self.kind;
        crate::threads::spawn(kind, self.name, None, move || work(&shared))
            .map(drop)
            .map_err(std::io::Error::other)
    }

    /// Threads started so far.
    pub fn threads(&self) -> usize {
        self.shared.lock().started
    }
}

/// A worker's life: take jobs until the pool is dropped.
fn work(shared: &Shared) {
    let mut state = shared.lock();
    loop {
        if let Some(job) = state.jobs.pop_front() {
            state.idle -= 1;
            drop(state);
            // A job that panics must not take its worker with it: the pool would count
            // a thread that no longer takes jobs.
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
                log::error!("a job of {:?} panicked", std::thread::current().name());
            }
            state = shared.lock();
            state.idle += 1;
            continue;
        }
        if state.stopping {
            state.started -= 1;
            state.idle -= 1;
            return;
        }
        state = crate::sync::wait(&shared.work, state);
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.stopping = true;
        state.jobs.clear();
        self.shared.work.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    const SIZE: PoolSize = PoolSize {
        workers: 2,
        queue: 3,
    };

    fn pool() -> Pool {
        Pool::new("mempower-pooltest", "tests", SIZE, ThreadKind::Helper)
    }

    /// Jobs that block until `release` is dropped, each saying when it started.
    fn blocking_job(
        started: &mpsc::Sender<usize>,
        release: &Arc<Mutex<()>>,
        i: usize,
    ) -> impl FnOnce() + Send + 'static {
        let (started, release) = (started.clone(), release.clone());
        move || {
            let _ = started.send(i);
            drop(release.locked());
        }
    }

    #[test]
    fn a_full_pool_refuses_at_once_and_runs_the_rest() {
        let p = pool();
        let gate = Arc::new(Mutex::new(()));
        let held = gate.lock().unwrap();
        let (tx, rx) = mpsc::channel();
        for i in 0..SIZE.workers + SIZE.queue {
            p.submit(blocking_job(&tx, &gate, i)).unwrap();
        }
        // Two run, three wait.
        let mut running = [rx.recv().unwrap(), rx.recv().unwrap()];
        running.sort();
        assert_eq!(running, [0, 1]);
        let refused = p.submit(|| {}).unwrap_err();
        assert!(
            matches!(
                refused,
                PoolError::Full {
                    workers: 2,
                    queued: 3,
                    ..
                }
            ),
            "{refused:?}"
        );
        assert_eq!(
            refused.to_string(),
            "too many tests are in progress (2 running, 3 waiting); try again later"
        );
        assert_eq!(p.threads(), SIZE.workers);
        drop(held);
        let mut rest: Vec<usize> = (0..3).map(|_| rx.recv().unwrap()).collect();
        rest.sort();
        assert_eq!(rest, [2, 3, 4], "the queued jobs ran");
        // Room again once the work is done.
        let (done_tx, done) = mpsc::channel();
        p.submit(move || done_tx.send(()).unwrap()).unwrap();
        done.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(p.threads(), SIZE.workers, "no thread beyond the bound");
    }

    #[test]
    fn workers_start_only_when_needed() {
        let p = pool();
        assert_eq!(p.threads(), 0);
        for _ in 0..20 {
            let (tx, rx) = mpsc::channel();
            p.submit(move || tx.send(()).unwrap()).unwrap();
            rx.recv_timeout(Duration::from_secs(5)).unwrap();
        }
        // One at a time: the first worker is idle for each next job (or just finishing).
        assert!(p.threads() <= SIZE.workers, "{}", p.threads());
        assert!(p.threads() >= 1);
    }

    #[test]
    fn a_panicking_job_keeps_its_worker() {
        let p = Pool::new(
            "mempower-pooltest",
            "tests",
            PoolSize {
                workers: 1,
                queue: 1,
            },
            ThreadKind::Helper,
        );
        p.submit(|| panic!("a job that panics")).unwrap();
        let (tx, rx) = mpsc::channel();
        p.submit(move || tx.send(()).unwrap()).unwrap();
        rx.recv_timeout(Duration::from_secs(5))
            .expect("the one worker runs the next job");
        assert_eq!(p.threads(), 1);
    }

    #[test]
    fn dropping_the_pool_ends_its_workers() {
        let p = pool();
        let (tx, rx) = mpsc::channel();
        p.submit(move || tx.send(()).unwrap()).unwrap();
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
        let shared = p.shared.clone();
        drop(p);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while shared.lock().started > 0 {
            assert!(std::time::Instant::now() < deadline, "a worker lingers");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
