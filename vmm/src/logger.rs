//! The VMM's logger: one line per record on stderr, for the `log` facade that the VMM and
//! the rust-vmm crates (virtio-queue...) write to.
//!
//! A line reads `2025-01-02T03:04:05.678Z WARN  [vcpu0] vmm::devices::virtio::mmio: text`:
//! UTC time to the millisecond, level, thread name, module path.
//!
//! Which records pass: `--log-level` sets the level of every module; `RUST_LOG` refines
//! it per module path, as in `RUST_LOG=vmm::evacuation=debug,virtio_queue=warn`. The
//! directives of `RUST_LOG`, separated by commas:
//! - `path=level`: the records of `path` and the modules below it (`path::...`) pass
//!   at `level` and above, whatever the default; the longest matching path wins, and
//!   `-` in a path counts as `_` (crate names);
//! - `path`: all records of `path` pass (`path=trace`);
//! - `level`: the default level, unless `--log-level` was given, which wins.
//!
//! Without either the default is `info`. Levels are off, error, warn, info, debug, trace.

use std::fmt;
use std::io::{self, Write};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::sync::Locked;
use log::{Level, LevelFilter, Log, Metadata, Record};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LoggerError {
    #[error(
        "RUST_LOG: unknown level '{level}' in '{directive}' \
         (use off, error, warn, info, debug or trace)"
    )]
    BadLevel { directive: String, level: String },
    #[error("RUST_LOG: '{0}' is not a module path (letters, digits, '_', '-' and '::')")]
    BadPath(String),
    #[error("RUST_LOG is not valid UTF-8")]
    NotUtf8,
    #[error("a logger is already installed")]
    AlreadySet,
}

/// Which records pass: a default level and levels per module path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    default: LevelFilter,
    /// Longest path first, so that the first match is the most specific one.
    modules: Vec<(String, LevelFilter)>,
}

impl Filter {
    /// The filter of `--log-level` (`flag`, if given) and `RUST_LOG` (`spec`, if set).
    pub fn new(flag: Option<LevelFilter>, spec: Option<&str>) -> Result<Self, LoggerError> {
        let mut bare = None;
        let mut modules: Vec<(String, LevelFilter)> = Vec::new();
        let directives = spec.unwrap_or("").split(',').map(str::trim);
        for directive in directives.filter(|d| !d.is_empty()) {
            let (path, level) = match directive.split_once('=') {
                Some((path, level)) => (path.trim(), parse_level(directive, level.trim())?),
                None => match directive.parse::<LevelFilter>() {
                    Ok(level) => {
                        bare = Some(level);
                        continue;
                    }
                    Err(_) => (directive, LevelFilter::Trace),
                },
            };
            let path = check_path(path)?;
            // A later directive for the same path replaces the earlier one.
            modules.retain(|(p, _)| *p != path);
            modules.push((path, level));
        }
        modules.sort_by_key(|(path, _)| std::cmp::Reverse(path.len()));
        Ok(Filter {
            default: flag.or(bare).unwrap_or(LevelFilter::Info),
            modules,
        })
    }

    /// Whether a record of `target` (a module path) at `level` passes.
    pub fn enabled(&self, target: &str, level: Level) -> bool {
        let below = |path: &str| {
            target
                .strip_prefix(path)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
        };
        let max = self
            .modules
            .iter()
            .find(|(path, _)| below(path))
            .map_or(self.default, |(_, level)| *level);
        level <= max
    }

    /// The most verbose level any module may log at.
    pub fn max_level(&self) -> LevelFilter {
        let modules = self.modules.iter().map(|(_, level)| *level);
        modules.fold(self.default, Ord::max)
    }
}

fn parse_level(directive: &str, level: &str) -> Result<LevelFilter, LoggerError> {
    level.parse().map_err(|_| LoggerError::BadLevel {
        directive: directive.into(),
        level: level.into(),
    })
}

fn check_path(path: &str) -> Result<String, LoggerError> {
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | ':');
    if path.is_empty() || !path.chars().all(ok) {
        return Err(LoggerError::BadPath(path.into()));
    }
    Ok(path.replace('-', "_"))
}

/// Writes the records `filter` lets pass to `out`, a whole line per write so that the
/// lines of threads do not interleave.
pub struct LineLogger<W> {
    filter: Filter,
    out: Mutex<W>,
}

impl<W: Write + Send> LineLogger<W> {
    pub fn new(filter: Filter, out: W) -> Self {
        LineLogger {
            filter,
            out: Mutex::new(out),
        }
    }
}

impl<W: Write + Send> Log for LineLogger<W> {
    fn enabled(&self, metadata: &Metadata) -> bool {
        self.filter.enabled(metadata.target(), metadata.level())
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let thread = std::thread::current();
        let id;
        let name = match thread.name() {
            Some(name) => name,
            None => {
                id = format!("{:?}", thread.id());
                &id
            }
        };
        let line = format_line(SystemTime::now(), name, record);
        let mut out = self.out.locked();
        // Nowhere to report a failed write to stderr.
        let _ = out.write_all(line.as_bytes());
    }

    fn flush(&self) {
        let _ = self.out.locked().flush();
    }
}

/// Installs the stderr logger with the filter of `--log-level` and `RUST_LOG`.
pub fn init(flag: Option<LevelFilter>, spec: Option<&str>) -> Result<(), LoggerError> {
    let filter = Filter::new(flag, spec)?;
    let max = filter.max_level();
    let logger = Box::leak(Box::new(LineLogger::new(filter, io::stderr())));
    log::set_logger(logger).map_err(|_| LoggerError::AlreadySet)?;
    log::set_max_level(max);
    Ok(())
}

/// A line as the logger writes it, now, from this thread: for a thread that must not
/// wait for the logger's lock (the teardown watchdog).
pub fn line_now(level: Level, target: &str, text: &str) -> String {
    let thread = std::thread::current();
    format_line(
        SystemTime::now(),
        thread.name().unwrap_or("?"),
        &Record::builder()
            .level(level)
            .target(target)
            .args(format_args!("{text}"))
            .build(),
    )
}

/// `RUST_LOG`, if set.
pub fn rust_log_env() -> Result<Option<String>, LoggerError> {
    match std::env::var("RUST_LOG") {
        Ok(spec) => Ok(Some(spec)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(LoggerError::NotUtf8),
    }
}

fn format_line(now: SystemTime, thread: &str, record: &Record) -> String {
    format!(
        "{} {:<5} [{thread}] {}: {}\n",
        Utc(now),
        record.level(),
        record.target(),
        record.args()
    )
}

/// A time as `YYYY-MM-DDTHH:MM:SS.mmmZ`; times before 1970 show as 1970.
struct Utc(SystemTime);

impl fmt::Display for Utc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let since = self.0.duration_since(UNIX_EPOCH).unwrap_or_default();
        let secs = since.as_secs();
        let (year, month, day) = civil_from_days(secs / 86_400);
        let (hour, min, sec) = (secs / 3600 % 24, secs / 60 % 60, secs % 60);
        write!(
            f,
            "{year:04}-{month:02}-{day:02}T{hour:02}:{min:02}:{sec:02}.{:03}Z",
            since.subsec_millis()
        )
    }
}

/// The Gregorian date `days` after 1970-01-01 (Howard Hinnant's `civil_from_days`,
/// shifted so that years start in March and leap days come last).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    fn filter(flag: Option<LevelFilter>, spec: &str) -> Filter {
        Filter::new(flag, Some(spec)).unwrap()
    }

    #[test]
    fn the_flag_sets_the_default_and_modules_refine_it() {
        let f = filter(
            Some(LevelFilter::Warn),
            "vmm::evacuation=debug,virtio-queue=error",
        );
        assert!(f.enabled("vmm::vm", Level::Warn));
        assert!(!f.enabled("vmm::vm", Level::Info));
        assert!(f.enabled("vmm::evacuation", Level::Debug));
        assert!(f.enabled("vmm::evacuation::worker", Level::Debug));
        assert!(!f.enabled("vmm::evacuation::worker", Level::Trace));
        // A path matches whole components only.
        assert!(!f.enabled("vmm::evacuation_x", Level::Info));
        // `-` in a crate name is `_` in its module paths.
        assert!(!f.enabled("virtio_queue::chain", Level::Warn));
        assert!(f.enabled("virtio_queue", Level::Error));
        assert_eq!(f.max_level(), LevelFilter::Debug);
    }

    #[test]
    fn the_longest_path_wins_and_the_last_directive_for_a_path() {
        let f = filter(None, "vmm=error,vmm::devices::virtio=trace,vmm=warn");
        assert!(f.enabled("vmm::devices::virtio::mmio", Level::Trace));
        assert!(f.enabled("vmm::cli", Level::Warn));
        assert!(!f.enabled("vmm::cli", Level::Info));
        assert!(f.enabled("other", Level::Info));
        assert!(!f.enabled("other", Level::Debug));
    }

    #[test]
    fn a_bare_level_is_the_default_unless_the_flag_is_given() {
        assert_eq!(filter(None, "").default, LevelFilter::Info);
        assert_eq!(filter(None, " debug , ").default, LevelFilter::Debug);
        let f = filter(Some(LevelFilter::Error), "trace,vmm::vm=info");
        assert_eq!(f.default, LevelFilter::Error);
        assert!(f.enabled("vmm::vm", Level::Info));
        assert_eq!(f.max_level(), LevelFilter::Info);
        let f = Filter::new(Some(LevelFilter::Off), None).unwrap();
        assert!(!f.enabled("vmm::vm", Level::Error));
        assert_eq!(f.max_level(), LevelFilter::Off);
        // A bare path lets everything of it pass.
        let f = filter(None, "vmm::agent");
        assert!(f.enabled("vmm::agent", Level::Trace));
        assert!(!f.enabled("vmm::vm", Level::Debug));
    }

    #[test]
    fn bad_directives_are_errors_naming_them() {
        assert_eq!(
            Filter::new(None, Some("vmm=loud")),
            Err(LoggerError::BadLevel {
                directive: "vmm=loud".into(),
                level: "loud".into()
            })
        );
        for bad in ["=info", "vmm/evac", "a b"] {
            let err = Filter::new(None, Some(bad)).unwrap_err();
            assert!(matches!(err, LoggerError::BadPath(_)), "{bad}: {err}");
        }
        let err = Filter::new(None, Some("x=")).unwrap_err().to_string();
        assert_eq!(
            err,
            "RUST_LOG: unknown level '' in 'x=' (use off, error, warn, info, debug or trace)"
        );
    }

    #[test]
    fn times_print_as_utc_dates() {
        let at = |secs: u64, millis: u64| {
            Utc(UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(millis)).to_string()
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(at(1_709_251_199, 999), "2024-02-29T23:59:59.999Z");
        assert_eq!(at(4_102_444_800, 120), "2100-01-01T00:00:00.120Z");
        let before = UNIX_EPOCH - Duration::from_secs(10);
        assert_eq!(Utc(before).to_string(), "1970-01-01T00:00:00.000Z");
    }

    /// A writer the test can read back.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn log_to(logger: &LineLogger<Sink>, target: &str, level: Level, text: &str) {
        logger.log(
            &Record::builder()
                .target(target)
                .level(level)
                .args(format_args!("{text}"))
                .build(),
        );
    }

    #[test]
    fn lines_carry_time_level_thread_and_module() {
        let sink = Sink::default();
        let logger = Arc::new(LineLogger::new(
            filter(Some(LevelFilter::Info), "vmm::quiet=off"),
            sink.clone(),
        ));
        let l = logger.clone();
        std::thread::Builder::new()
            .name("vcpu3".into())
            .spawn(move || {
                log_to(&l, "vmm::vm", Level::Info, "VM started in 12 ms");
                log_to(&l, "vmm::vm", Level::Debug, "dropped: below the level");
                log_to(&l, "vmm::quiet", Level::Error, "dropped: module off");
                log_to(&l, "virtio_queue::chain", Level::Warn, "bad chain");
            })
            .unwrap()
            .join()
            .unwrap();
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        // 2025-01-02T03:04:05.678Z: 24 characters, then a space.
        let (time, rest) = lines[0].split_at(24);
        assert!(time.starts_with("20") && time.ends_with('Z'), "{time}");
        assert_eq!(rest, " INFO  [vcpu3] vmm::vm: VM started in 12 ms");
        assert_eq!(
            &lines[1][24..],
            " WARN  [vcpu3] virtio_queue::chain: bad chain"
        );
        assert!(text.ends_with('\n'));

        let record = Record::builder()
            .target("vmm::cli")
            .level(Level::Error)
            .args(format_args!("x"))
            .build();
        assert_eq!(
            format_line(UNIX_EPOCH + Duration::from_millis(1500), "main", &record),
            "1970-01-01T00:00:01.500Z ERROR [main] vmm::cli: x\n"
        );
    }
}
