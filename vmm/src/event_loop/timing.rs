//! How long each source of the event loop keeps it. Everything the loop serves (the API,
//! the devices' queues, vsock) waits while one source runs, so a slow dispatch is what
//! a client sees as a slow `GET /api/v1/vm`: each source's dispatches are counted and
//! timed for `/metrics`, and one over [`SLOW`] is logged with its source's name.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventOps, Events, MutEventSubscriber};

use crate::evacuation::metrics::family;
use crate::sync::Locked;

/// A dispatch this long is logged: it would take an API request past its budget alone.
pub const SLOW: Duration = Duration::from_millis(20);
/// At most one log line per source this often; the others are counted in it.
const REPORT_EVERY: Duration = Duration::from_secs(10);

/// One source's figures.
#[derive(Debug, Default)]
pub struct SourceStats {
    dispatches: AtomicU64,
    total_ns: AtomicU64,
    max_ns: AtomicU64,
    slow: AtomicU64,
}

impl SourceStats {
    fn note(&self, took: Duration) -> bool {
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.dispatches.fetch_add(1, Ordering::Relaxed);
        self.total_ns.fetch_add(ns, Ordering::Relaxed);
        self.max_ns.fetch_max(ns, Ordering::Relaxed);
        let slow = took >= SLOW;
        if slow {
            self.slow.fetch_add(1, Ordering::Relaxed);
        }
        slow
    }
}

/// Every source's figures, for `/metrics`.
#[derive(Debug, Default)]
pub struct LoopStats {
    sources: Mutex<Vec<(String, Arc<SourceStats>)>>,
}

impl LoopStats {
    /// `subscriber`, timed as the source `name` (a label value: letters, digits, `-`,
    /// `/`).
    pub fn timed<S>(&self, name: impl Into<String>, subscriber: S) -> Timed<S> {
        let name = name.into();
        let stats = Arc::new(SourceStats::default());
        self.sources.locked().push((name.clone(), stats.clone()));
        Timed {
            name,
            inner: subscriber,
            stats,
            reported: None,
            unreported: 0,
        }
    }

    /// The figures as Prometheus metric families.
    pub fn render(&self) -> String {
        let sources = self.sources.locked();
        let mut families: [Vec<(String, f64)>; 4] = Default::default();
        for (name, s) in sources.iter() {
            let label = format!("source=\"{name}\"");
            let seconds = |ns: &AtomicU64| ns.load(Ordering::Relaxed) as f64 / 1e9;
            let count = |n: &AtomicU64| n.load(Ordering::Relaxed) as f64;
            families[0].push((label.clone(), count(&s.dispatches)));
            families[1].push((label.clone(), seconds(&s.total_ns)));
            families[2].push((label.clone(), seconds(&s.max_ns)));
            families[3].push((label, count(&s.slow)));
        }
        let mut out = String::new();
        let [dispatches, total, max, slow] = families;
        family(
            &mut out,
            "mempower_event_loop_dispatches_total",
            "counter",
            "Times the event loop served the source.",
            &dispatches,
        );
        family(
            &mut out,
            "mempower_event_loop_dispatch_seconds_total",
            "counter",
            "Time the event loop spent serving the source (nothing else is served meanwhile).",
            &total,
        );
        family(
            &mut out,
            "mempower_event_loop_dispatch_max_seconds",
            "gauge",
            "The longest the event loop spent serving the source at once.",
            &max,
        );
        let help = format!(
            "Dispatches of the source that took {} ms or more.",
            SLOW.as_millis()
        );
        family(
            &mut out,
            "mempower_event_loop_slow_dispatches_total",
            "counter",
            &help,
            &slow,
        );
        out
    }
}

/// An event-loop subscriber whose dispatches are timed (see [`LoopStats::timed`]).
pub struct Timed<S> {
    name: String,
    inner: S,
    stats: Arc<SourceStats>,
    reported: Option<Instant>,
    /// Slow dispatches since the last log line.
    unreported: u64,
}

impl<S> Timed<S> {
    fn note(&mut self, took: Duration) {
        if !self.stats.note(took) {
            return;
        }
        self.unreported += 1;
        let now = Instant::now();
        if self
            .reported
            .is_some_and(|t| now.saturating_duration_since(t) < REPORT_EVERY)
        {
            return;
        }
        let mut line = format!(
            "event loop: {} kept the loop for {} ms",
            self.name,
            took.as_millis()
        );
        if self.unreported > 1 {
            let _ = write!(
                line,
                " ({} such dispatches since the last report)",
                self.unreported
            );
        }
        log::warn!("{line}");
        self.reported = Some(now);
        self.unreported = 0;
    }
}

impl<S: MutEventSubscriber> MutEventSubscriber for Timed<S> {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let started = Instant::now();
        self.inner.process(events, ops);
        self.note(started.elapsed());
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.inner.init(ops);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use event_manager::{EventManager, SubscriberOps};
    use vmm_sys_util::epoll::EventSet;
    use vmm_sys_util::eventfd::EventFd;

    /// Takes `work` over each event of its eventfd.
    struct Busy {
        fd: EventFd,
        work: Duration,
    }

    impl MutEventSubscriber for Busy {
        fn process(&mut self, _: Events, _: &mut EventOps) {
            let _ = self.fd.read();
            std::thread::sleep(self.work);
        }
        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(&self.fd, EventSet::IN)).unwrap();
        }
    }

    #[test]
    fn each_source_is_timed_and_the_slow_one_is_named() {
        let stats = LoopStats::default();
        let mut events: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
            EventManager::new().unwrap();
        let mut kicks = Vec::new();
        for (name, work) in [("quick", Duration::ZERO), ("virtio-mem/0", SLOW * 2)] {
            let fd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            kicks.push(fd.try_clone().unwrap());
            let busy = stats.timed(name, Busy { fd, work });
            events.add_subscriber(Arc::new(Mutex::new(busy)));
        }
        for _ in 0..3 {
            kicks.iter().for_each(|k| k.write(1).unwrap());
            assert_eq!(events.run_with_timeout(1000).unwrap(), 2);
        }
        let text = stats.render();
        for line in [
            "mempower_event_loop_dispatches_total{source=\"quick\"} 3",
            "mempower_event_loop_dispatches_total{source=\"virtio-mem/0\"} 3",
            "mempower_event_loop_slow_dispatches_total{source=\"quick\"} 0",
            "mempower_event_loop_slow_dispatches_total{source=\"virtio-mem/0\"} 3",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
        let max = text
            .lines()
            .find_map(|l| {
                l.strip_prefix("mempower_event_loop_dispatch_max_seconds{source=\"virtio-mem/0\"} ")
            })
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap();
        assert!(max >= (SLOW * 2).as_secs_f64(), "{max}");
    }
}
