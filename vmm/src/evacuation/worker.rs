//! `EvacuationWorker`: one thread per NUMA node (`mempowerd/N`), the kmempowerd loop.
//!
//! Requests add regions to a mutex-protected [`RegionSet`] and wake the thread through
//! a condvar. The thread copies the set, evacuates the copy in one pass, then removes
//! exactly those regions, and goes round again if new ones arrived meanwhile; then it
//! sleeps. A region asked for twice before its turn is evacuated once, and a region
//! asked for again while its own pass runs is not repeated: the set is idempotent, as
//! the seed's mask was. The set is sized from the node's region count, so there is no
//! limit below what the node has.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use super::region_set::RegionSet;
use crate::seccomp::ThreadKind;
use crate::sync::Locked;

/// What the worker does with each pass; the VMM's implementation talks to the agent and
/// the virtio-mem device.
pub trait Evacuate: Send + 'static {
    /// Evacuates every region of `batch`, in one pass.
    fn evacuate(&mut self, batch: &RegionSet);

    /// Called once the pass's regions are removed from the set: from here on, a new
    /// request for one of them starts a new pass, so results may be handed out.
    fn pass_done(&mut self, _batch: &RegionSet) {}

    /// `evacuate` panicked (a bug): the regions of `batch` that have no result yet must
    /// get one, so that no job waits for them for ever. The worker goes on.
    fn pass_panicked(&mut self, _batch: &RegionSet, _why: &str) {}
}

struct Work {
    mask: RegionSet,
    stop: bool,
}

struct Shared {
    work: Mutex<Work>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Work> {
        self.work.locked()
    }
}

/// The handle: request evacuations, stop the thread.
pub struct EvacuationWorker {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WorkerError {
    #[error("region {region} is out of range (the node has {regions} regions)")]
    BadRegion { region: u32, regions: u32 },
    #[error("cannot start the worker thread: {0}")]
    Spawn(String),
}

impl EvacuationWorker {
    /// Starts `mempowerd/<node>` for a node of `regions` regions.
    pub fn start(node: u32, regions: u32, evacuator: impl Evacuate) -> Result<Self, WorkerError> {
        Self::start_on(node, regions, evacuator, None)
    }

    /// As [`Self::start`], the thread running on `cpus` (its node's `host-node=`), as
    /// kmempowerd's threads are created on their node.
    pub fn start_on(
        node: u32,
        regions: u32,
        evacuator: impl Evacuate,
        cpus: Option<Vec<usize>>,
    ) -> Result<Self, WorkerError> {
        let shared = Arc::new(Shared {
            work: Mutex::new(Work {
                mask: RegionSet::new(regions),
                stop: false,
            }),
            wake: Condvar::new(),
        });
        let thread_shared = shared.clone();
        let name = format!("mempowerd/{node}");
        let thread = crate::threads::spawn(ThreadKind::Evacuation, name, cpus, move || {
            run(&thread_shared, evacuator)
        })
        .map_err(|e| WorkerError::Spawn(e.to_string()))?;
        Ok(EvacuationWorker {
            shared,
            thread: Some(thread),
        })
    }

    /// Adds `regions` to the set and wakes the worker. Regions already there stay; a
    /// region out of range refuses the whole request, which then changes nothing.
    pub fn request(&self, regions: &[u32]) -> Result<(), WorkerError> {
        let mut work = self.shared.lock();
        let count = work.mask.regions();
        let wanted = RegionSet::of(count, regions).map_err(|region| WorkerError::BadRegion {
            region,
            regions: count,
        })?;
        work.mask.or(&wanted);
        drop(work);
        self.shared.wake.notify_one();
        Ok(())
    }

    /// Regions requested and not yet finished.
    pub fn pending(&self) -> RegionSet {
        self.shared.lock().mask.clone()
    }

    /// Whether `region` is requested and not yet finished.
    pub fn is_pending(&self, region: u32) -> bool {
        self.shared.lock().mask.contains(region)
    }
}

impl Drop for EvacuationWorker {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_one();
        // Not joined: a pass may be waiting minutes for the guest, and the VMM must not
        // wait for it to exit. The thread stops after its pass.
        self.thread.take();
    }
}

/// The loop itself, as in kmempowerd.
fn run(shared: &Shared, mut evacuator: impl Evacuate) {
    let mut work = shared.lock();
    loop {
        while work.mask.is_empty() && !work.stop {
            work = crate::sync::wait(&shared.wake, work);
        }
        if work.stop {
            return;
        }
        // Copy the mask, evacuate without the lock, clear what was done, recheck.
        let batch = work.mask.clone();
        drop(work);
        evacuate_or_report(&mut evacuator, &batch);
        work = shared.lock();
        work.mask.and_not(&batch);
        drop(work);
        evacuator.pass_done(&batch);
        work = shared.lock();
    }
}

/// One pass; a panic in it fails the pass's regions instead of killing the worker
/// (its jobs would wait for ever).
fn evacuate_or_report(evacuator: &mut impl Evacuate, batch: &RegionSet) {
    if let Err(panic) = catch_unwind(AssertUnwindSafe(|| evacuator.evacuate(batch))) {
        let why = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        log::error!("evacuation pass of regions {batch:?} panicked: {why}");
        evacuator.pass_panicked(batch, &why);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    /// Records each pass; optionally blocks inside the pass holding one region until
    /// told to go on, or panics in it.
    struct Recorder {
        done: mpsc::Sender<Vec<u32>>,
        gate: Option<(u32, mpsc::Receiver<()>)>,
        panic_on: Option<u32>,
        panicked: Arc<Mutex<Vec<Vec<u32>>>>,
    }

    impl Recorder {
        fn new(done: mpsc::Sender<Vec<u32>>) -> Self {
            Recorder {
                done,
                gate: None,
                panic_on: None,
                panicked: Arc::default(),
            }
        }
    }

    impl Evacuate for Recorder {
        fn evacuate(&mut self, batch: &RegionSet) {
            if let Some((blocked, go)) = &self.gate {
                if batch.contains(*blocked) {
                    let _ = go.recv();
                }
            }
            if self.panic_on.is_some_and(|r| batch.contains(r)) {
                panic!("a bug");
            }
            let _ = self.done.send(batch.iter_ones().collect());
        }

        fn pass_panicked(&mut self, batch: &RegionSet, why: &str) {
            assert_eq!(why, "a bug");
            self.panicked
                .lock()
                .unwrap()
                .push(batch.iter_ones().collect());
        }
    }

    fn next(rx: &mpsc::Receiver<Vec<u32>>) -> Vec<u32> {
        rx.recv_timeout(Duration::from_secs(5))
            .expect("the worker evacuated nothing")
    }

    #[test]
    fn regions_arriving_during_a_pass_are_handled_in_the_next_pass() {
        let (done, rx) = mpsc::channel();
        let (go, gate) = mpsc::channel();
        let worker = EvacuationWorker::start(
            0,
            4,
            Recorder {
                gate: Some((1, gate)),
                ..Recorder::new(done)
            },
        )
        .unwrap();
        worker.request(&[1, 2]).unwrap();
        // The worker is inside the first pass; 3 and 1 arrive now.
        std::thread::sleep(Duration::from_millis(50));
        worker.request(&[3, 1]).unwrap();
        go.send(()).unwrap();
        assert_eq!(next(&rx), [1, 2], "first pass: its copy of the mask");
        // Clearing the copied regions drops the repeat of 1 (it was just evacuated, as
        // in kmempowerd); 3 is new, so the worker goes round again for it.
        assert_eq!(next(&rx), [3], "second pass: what arrived meanwhile");
        std::thread::sleep(Duration::from_millis(50));
        assert!(rx.try_recv().is_err(), "then it sleeps");
        assert!(worker.pending().is_empty());
    }

    #[test]
    fn concurrent_requests_merge_into_one_pass() {
        let (done, rx) = mpsc::channel();
        let (go, gate) = mpsc::channel();
        let worker = Arc::new(
            EvacuationWorker::start(
                1,
                8,
                Recorder {
                    gate: Some((0, gate)),
                    ..Recorder::new(done)
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
        assert_eq!(worker.pending().iter_ones().collect::<Vec<_>>(), [0, 5, 7]);
        assert!(worker.is_pending(5) && !worker.is_pending(6));
        go.send(()).unwrap();
        assert_eq!(next(&rx), [0]);
        assert_eq!(
            next(&rx),
            [5, 7],
            "eight requests, one pass, each region once"
        );
        std::thread::sleep(Duration::from_millis(50));
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn a_node_of_8192_regions_takes_them_all_in_one_pass() {
        let (done, rx) = mpsc::channel();
        let (go, gate) = mpsc::channel();
        let worker = EvacuationWorker::start(
            0,
            8192,
            Recorder {
                gate: Some((8191, gate)),
                ..Recorder::new(done)
            },
        )
        .unwrap();
        let all: Vec<u32> = (0..8192).rev().collect();
        worker.request(&all[..8]).unwrap(); // 8191..8184: the gate holds this pass
        std::thread::sleep(Duration::from_millis(50));
        worker.request(&all).unwrap();
        go.send(()).unwrap();
        assert_eq!(next(&rx), (8184..8192).collect::<Vec<_>>());
        let second = next(&rx);
        assert_eq!(second.len(), 8184, "the rest, in one pass");
        assert_eq!((second[0], second[8183]), (0, 8183));
        assert_eq!(
            worker.request(&[8192]),
            Err(WorkerError::BadRegion {
                region: 8192,
                regions: 8192
            })
        );
    }

    #[test]
    fn bad_regions_are_refused_and_the_thread_is_named() {
        let (done, _rx) = mpsc::channel();
        let worker = EvacuationWorker::start(3, 128, Recorder::new(done)).unwrap();
        assert_eq!(
            worker.request(&[2, 128]),
            Err(WorkerError::BadRegion {
                region: 128,
                regions: 128
            })
        );
        assert!(
            worker.pending().is_empty(),
            "a refused request sets nothing"
        );
        let name = worker
            .thread
            .as_ref()
            .unwrap()
            .thread()
            .name()
            .map(str::to_owned);
        assert_eq!(name.as_deref(), Some("mempowerd/3"));
    }

    /// `Cpus_allowed_list` of this process's thread named `name`, from /proc.
    fn cpus_of_thread(name: &str) -> Option<String> {
        std::fs::read_dir("/proc/self/task").ok()?.find_map(|task| {
            let dir = task.ok()?.path();
            let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
            (comm.trim() == name).then_some(())?;
            let status = std::fs::read_to_string(dir.join("status")).ok()?;
            status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .map(|l| l.trim().to_string())
        })
    }

    #[test]
    fn a_placed_worker_runs_on_its_host_nodes_cpus() {
        let allowed = crate::host_numa::current_affinity().unwrap();
        let last = *allowed.last().unwrap();
        let (done, _rx) = mpsc::channel();
        let worker = EvacuationWorker::start_on(7, 4, Recorder::new(done), Some(vec![last]));
        let _worker = worker.unwrap();
        assert_eq!(cpus_of_thread("mempowerd/7"), Some(last.to_string()));
        let (done, _rx) = mpsc::channel();
        let err = EvacuationWorker::start_on(8, 4, Recorder::new(done), Some(vec![1000]));
        assert!(
            matches!(&err, Err(WorkerError::Spawn(e)) if e.contains("cannot run on CPUs 1000")),
            "{:?}",
            err.err()
        );
    }

    #[test]
    fn a_pass_that_panics_is_reported_and_the_worker_goes_on() {
        let (done, rx) = mpsc::channel();
        let recorder = Recorder {
            panic_on: Some(2),
            ..Recorder::new(done)
        };
        let panicked = recorder.panicked.clone();
        let worker = EvacuationWorker::start(0, 4, recorder).unwrap();
        worker.request(&[2, 3]).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while panicked.lock().unwrap().is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "no report of the panic"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(*panicked.lock().unwrap(), [vec![2, 3]]);
        worker.request(&[1]).unwrap();
        assert_eq!(next(&rx), [1], "the worker still runs");
    }
}
