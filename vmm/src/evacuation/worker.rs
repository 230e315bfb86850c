//! `EvacuationWorker`: one thread per NUMA node (`mempowerd/N`), the kmempowerd loop.
//!
//! Requests OR region bits into a mutex-protected mask and wake the thread through a
//! condvar. The thread copies the mask, evacuates each region in the copy, then clears
//! exactly those bits, and goes round again if new bits arrived meanwhile; then it
//! sleeps. A region asked for twice before its turn is evacuated once, and a region
//! asked for again while its own pass runs is not repeated: the mask is idempotent, as
//! in the seed.

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// Region numbers fit a u128: a node has at most 128 regions of 128 MiB (16 GiB).
pub const MAX_REGIONS: u32 = 128;

/// What the worker does for one region; the VMM's implementation talks to the agent and
/// the virtio-mem device.
pub trait Evacuate: Send + 'static {
    fn evacuate(&mut self, region: u32);

    /// Called once the pass's bits are cleared: from here on, a new request for one of
    /// those regions starts a new pass, so results may be handed out.
    fn pass_done(&mut self, _batch: u128) {}
}

#[derive(Default)]
struct Work {
    mask: u128,
    stop: bool,
}

struct Shared {
    work: Mutex<Work>,
    wake: Condvar,
}

/// The handle: request evacuations, stop the thread.
pub struct EvacuationWorker {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WorkerError {
    #[error("region {0} is out of range (at most {MAX_REGIONS} regions per node)")]
    BadRegion(u32),
    #[error("cannot start the worker thread: {0}")]
    Spawn(String),
}

impl EvacuationWorker {
    /// Starts `mempowerd/<node>`.
    pub fn start(node: u32, evacuator: impl Evacuate) -> Result<Self, WorkerError> {
        let shared = Arc::new(Shared {
            work: Mutex::new(Work::default()),
            wake: Condvar::new(),
        });
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("mempowerd/{node}"))
            .spawn(move || {
                crate::seccomp::enter(crate::seccomp::ThreadKind::Evacuation);
                run(&thread_shared, evacuator)
            })
            .map_err(|e| WorkerError::Spawn(e.to_string()))?;
        Ok(EvacuationWorker {
            shared,
            thread: Some(thread),
        })
    }

    /// ORs `regions` into the mask and wakes the worker. Bits already set stay set.
    pub fn request(&self, regions: &[u32]) -> Result<(), WorkerError> {
        let mut bits = 0u128;
        for &r in regions {
            if r >= MAX_REGIONS {
                return Err(WorkerError::BadRegion(r));
            }
            bits |= 1 << r;
        }
        self.shared
            .work
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .mask |= bits;
        self.shared.wake.notify_one();
        Ok(())
    }

    /// Regions requested and not yet finished.
    pub fn pending(&self) -> u128 {
        self.shared
            .work
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .mask
    }
}

impl Drop for EvacuationWorker {
    fn drop(&mut self) {
        self.shared
            .work
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .stop = true;
        self.shared.wake.notify_one();
        // Not joined: a pass may be waiting minutes for the guest, and the VMM must not
        // wait for it to exit. The thread stops after its pass.
        self.thread.take();
    }
}

/// The loop itself, as in kmempowerd.
fn run(shared: &Shared, mut evacuator: impl Evacuate) {
    let mut work = shared.work.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        while work.mask == 0 && !work.stop {
            work = shared.wake.wait(work).unwrap_or_else(|e| e.into_inner());
        }
        if work.stop {
            return;
        }
        // Copy the mask, evacuate without the lock, clear what was done, recheck.
        let batch = work.mask;
        drop(work);
        for region in (0..MAX_REGIONS).filter(|r| batch & (1 << r) != 0) {
            evacuator.evacuate(region);
        }
        work = shared.work.lock().unwrap_or_else(|e| e.into_inner());
        work.mask &= !batch;
        drop(work);
        evacuator.pass_done(batch);
        work = shared.work.lock().unwrap_or_else(|e| e.into_inner());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    /// Records each evacuation; optionally blocks inside one until told to go on.
    struct Recorder {
        done: mpsc::Sender<u32>,
        gate: Option<(u32, mpsc::Receiver<()>)>,
    }

    impl Evacuate for Recorder {
        fn evacuate(&mut self, region: u32) {
            if let Some((blocked, go)) = &self.gate {
                if *blocked == region {
                    let _ = go.recv();
                }
            }
            let _ = self.done.send(region);
        }
    }

    fn next(rx: &mpsc::Receiver<u32>) -> u32 {
        rx.recv_timeout(Duration::from_secs(5))
            .expect("the worker evacuated nothing")
    }

    #[test]
    fn bits_arriving_during_a_pass_are_handled_in_the_next_pass() {
        let (done, rx) = mpsc::channel();
        let (go, gate) = mpsc::channel();
        let worker = EvacuationWorker::start(
            0,
            Recorder {
                done,
                gate: Some((1, gate)),
            },
        )
        .unwrap();
        worker.request(&[1, 2]).unwrap();
        // The worker is inside region 1 of the first pass; 3 and 1 arrive now.
        std::thread::sleep(Duration::from_millis(50));
        worker.request(&[3, 1]).unwrap();
        go.send(()).unwrap();
        assert_eq!(
            [next(&rx), next(&rx)],
            [1, 2],
            "first pass: its copy of the mask"
        );
        // Clearing the copied bits drops the repeat of 1 (it was just evacuated, as in
        // kmempowerd); 3 is new, so the worker goes round again for it.
        assert_eq!(next(&rx), 3, "second pass: what arrived meanwhile");
        std::thread::sleep(Duration::from_millis(50));
        assert!(rx.try_recv().is_err(), "then it sleeps");
        assert_eq!(worker.pending(), 0);
    }

    #[test]
    fn concurrent_requests_merge() {
        let (done, rx) = mpsc::channel();
        let (go, gate) = mpsc::channel();
        let worker = Arc::new(
            EvacuationWorker::start(
                1,
                Recorder {
                    done,
                    gate: Some((0, gate)),
                },
            )
            .unwrap(),
        );
        worker.request(&[0]).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        // While region 0 is being evacuated, many threads ask for regions 5 and 7.
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let w = worker.clone();
                std::thread::spawn(move || w.request(&[5 + 2 * (i % 2)]).unwrap())
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(worker.pending(), (1 << 0) | (1 << 5) | (1 << 7));
        go.send(()).unwrap();
        assert_eq!([next(&rx), next(&rx), next(&rx)], [0, 5, 7]);
        std::thread::sleep(Duration::from_millis(50));
        assert!(rx.try_recv().is_err(), "eight requests, each region once");
    }

    #[test]
    fn bad_regions_are_refused_and_the_thread_is_named() {
        let (done, _rx) = mpsc::channel();
        let worker = EvacuationWorker::start(3, Recorder { done, gate: None }).unwrap();
        assert_eq!(
            worker.request(&[MAX_REGIONS]),
            Err(WorkerError::BadRegion(MAX_REGIONS))
        );
        assert_eq!(worker.pending(), 0, "a refused request sets no bit");
        let name = worker
            .thread
            .as_ref()
            .unwrap()
            .thread()
            .name()
            .map(str::to_owned);
        assert_eq!(name.as_deref(), Some("mempowerd/3"));
    }
}
