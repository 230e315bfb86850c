//! The serial console channel: machine-readable `MEMPOWER-*` lines on stdout and a
//! line-based command loop on stdin.
//!
//! [`Command`] and [`Response`] do not depend on the channel; a request/response
//! protocol on another transport (vsock) can parse into and format from the same types.

use std::fmt::Display;
use std::io::{self, BufRead, Write};

use serde::Serialize;
use thiserror::Error;

use crate::numa::GuestView;

/// Version of the READY payload; bump it on incompatible changes.
pub const PROTOCOL_VERSION: u32 = 1;
pub const READY_PREFIX: &str = "MEMPOWER-READY ";
pub const ERROR_PREFIX: &str = "MEMPOWER-ERROR ";
/// The agent panicked; the VMM and the test harness look for this line.
pub const PANIC_PREFIX: &str = "MEMPOWER-PANIC ";

#[derive(Debug, Error)]
pub enum ConsoleError {
    #[error("unknown command: {0}")]
    UnknownCommand(String),
    #[error("bad arguments: {0} (usage: touch <node> <MiB>)")]
    BadArguments(String),
    #[error("cannot encode the READY line: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("cannot write to the console: {0}")]
    Write(#[source] io::Error),
    #[error("cannot read commands from the console: {0}")]
    Read(#[source] io::Error),
}

/// A request to the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    PowerOff,
    Reboot,
    Ready,
    /// `touch <node> <MiB>`: make memory host-resident but guest-free (see `touch.rs`).
    Touch {
        node: u32,
        mib: u64,
    },
}

impl Command {
    /// Parses one console line. Blank lines give `None`.
    pub fn parse(line: &str) -> Result<Option<Self>, ConsoleError> {
        match line.trim() {
            "" => Ok(None),
            "poweroff" => Ok(Some(Self::PowerOff)),
            "reboot" => Ok(Some(Self::Reboot)),
            "ready" => Ok(Some(Self::Ready)),
            other => match other.split_whitespace().collect::<Vec<_>>()[..] {
                ["touch", node, mib] => match (node.parse(), mib.parse()) {
                    (Ok(node), Ok(mib)) => Ok(Some(Self::Touch { node, mib })),
                    _ => Err(ConsoleError::BadArguments(other.to_owned())),
                },
                ["touch", ..] => Err(ConsoleError::BadArguments(other.to_owned())),
                _ => Err(ConsoleError::UnknownCommand(other.to_owned())),
            },
        }
    }
}

/// The agent's answer to a [`Command`]. `PowerOff` and `Reboot` have none: they do not return
/// when they succeed.
#[derive(Debug)]
pub enum Response {
    Ready(GuestView),
    /// A `touch` finished: `MEMPOWER-TOUCHED <node> <MiB>`.
    Touched {
        node: u32,
        mib: u64,
    },
}

#[derive(Serialize)]
struct ReadyMessage<'a> {
    version: u32,
    #[serde(flatten)]
    view: &'a GuestView,
}

/// `MEMPOWER-READY {"version":1,"kernel":...,"uptime_ms":...,"nodes":[...]}`
pub fn ready_line(view: &GuestView) -> Result<String, ConsoleError> {
    let json = serde_json::to_string(&ReadyMessage {
        version: PROTOCOL_VERSION,
        view,
    })?;
    Ok(format!("{READY_PREFIX}{json}"))
}

/// `MEMPOWER-ERROR <message>`, with line breaks in the message flattened to spaces.
pub fn error_line(message: &str) -> String {
    format!("{ERROR_PREFIX}{}", flatten(message))
}

/// `MEMPOWER-PANIC <message>`, flattened to one line like [`error_line`].
pub fn panic_line(message: &str) -> String {
    format!("{PANIC_PREFIX}{}", flatten(message))
}

/// `message` with control characters (line breaks) turned into spaces.
fn flatten(message: &str) -> String {
    message
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// Writes `\n<line>\n` with one `write_all`, which on [`Stdout`] is a single write(2)
/// unless the console accepts only part of it.
pub fn emit(out: &mut impl Write, line: &str) -> Result<(), ConsoleError> {
    let mut buf = String::with_capacity(line.len() + 2);
    buf.push('\n');
    buf.push_str(line);
    buf.push('\n');
    out.write_all(buf.as_bytes())
        .and_then(|()| out.flush())
        .map_err(ConsoleError::Write)
}

/// Reports an error on stdout; used where nothing better can be done with a failure.
pub fn report(message: &str) {
    // Nowhere left to report a broken console to.
    let _ = emit(&mut Stdout, &error_line(message));
}

/// Reads commands from `input` until EOF, runs them with `execute` and writes one line per
/// answer to `out`: the READY line, or `MEMPOWER-ERROR ...`.
pub fn serve<E: Display>(
    mut input: impl BufRead,
    out: &mut impl Write,
    mut execute: impl FnMut(Command) -> Result<Response, E>,
) -> Result<(), ConsoleError> {
    let mut raw = Vec::new();
    loop {
        raw.clear();
        if input
            .read_until(b'\n', &mut raw)
            .map_err(ConsoleError::Read)?
            == 0
        {
            return Ok(());
        }
        let line = match Command::parse(&String::from_utf8_lossy(&raw)) {
            Ok(None) => continue,
            Ok(Some(command)) => match execute(command) {
                Ok(Response::Ready(view)) => {
                    ready_line(&view).unwrap_or_else(|e| error_line(&e.to_string()))
                }
                Ok(Response::Touched { node, mib }) => format!("MEMPOWER-TOUCHED {node} {mib}"),
                Err(e) => error_line(&e.to_string()),
            },
            Err(e) => error_line(&e.to_string()),
        };
        emit(out, &line)?;
    }
}

/// Unbuffered standard output: each `write` is exactly one write(2) on fd 1.
pub struct Stdout;

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for reads of `buf.len()` bytes during the call, and fd 1
        // is only written to, never closed, by this process.
        let n = unsafe { libc::write(libc::STDOUT_FILENO, buf.as_ptr().cast(), buf.len()) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::numa::Node;

    fn view() -> GuestView {
        GuestView {
            kernel: "6.1.192".to_owned(),
            uptime_ms: 12345,
            nodes: vec![
                Node {
                    id: 0,
                    cpus: vec![0],
                    mem_total_kib: 123_456,
                },
                Node {
                    id: 1,
                    cpus: vec![1],
                    mem_total_kib: 234_567,
                },
            ],
        }
    }

    /// Records every write call separately.
    #[derive(Default)]
    struct Writes(Vec<Vec<u8>>);

    impl Write for Writes {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn ready_line_exact_format() {
        assert_eq!(
            ready_line(&view()).unwrap(),
            r#"MEMPOWER-READY {"version":1,"kernel":"6.1.192","uptime_ms":12345,"nodes":[{"id":0,"cpus":[0],"mem_total_kib":123456},{"id":1,"cpus":[1],"mem_total_kib":234567}]}"#
        );
    }

    #[test]
    fn ready_line_is_one_line_of_valid_json() {
        let mut v = view();
        v.kernel = "6.1.0\n\"odd\"".to_owned(); // must be escaped, not break the line
        let line = ready_line(&v).unwrap();
        assert!(!line.contains('\n') && !line.contains('\r'));
        let json: serde_json::Value =
            serde_json::from_str(line.strip_prefix(READY_PREFIX).unwrap()).unwrap();
        assert_eq!(json["version"], 1);
        assert_eq!(json["kernel"], "6.1.0\n\"odd\"");
        assert_eq!(json["nodes"][1]["mem_total_kib"], 234_567);
    }

    #[test]
    fn emit_is_one_write_starting_a_new_line() {
        let mut out = Writes::default();
        emit(&mut out, &ready_line(&view()).unwrap()).unwrap();
        assert_eq!(out.0.len(), 1);
        let text = String::from_utf8(out.0.remove(0)).unwrap();
        assert!(text.starts_with("\nMEMPOWER-READY {"), "{text}");
        assert!(text.ends_with("}\n") && text.matches('\n').count() == 2);
    }

    #[test]
    fn error_line_stays_on_one_line() {
        assert_eq!(error_line("a\nb\r\tc"), "MEMPOWER-ERROR a b  c");
    }

    #[test]
    fn command_parsing() {
        assert_eq!(
            Command::parse("poweroff\n").unwrap(),
            Some(Command::PowerOff)
        );
        assert_eq!(
            Command::parse("  reboot \r\n").unwrap(),
            Some(Command::Reboot)
        );
        assert_eq!(Command::parse("ready").unwrap(), Some(Command::Ready));
        assert_eq!(Command::parse(" \r\n").unwrap(), None);
        for bad in ["POWEROFF", "power off", "shutdown", "ready now"] {
            let err = Command::parse(bad).unwrap_err();
            assert_eq!(err.to_string(), format!("unknown command: {bad}"));
        }
        assert_eq!(
            Command::parse("touch 1 256\n").unwrap(),
            Some(Command::Touch { node: 1, mib: 256 })
        );
        for bad in ["touch", "touch 1", "touch x 5", "touch 1 -5", "touch 1 2 3"] {
            let err = Command::parse(bad).unwrap_err();
            assert!(matches!(err, ConsoleError::BadArguments(_)), "{bad}: {err}");
        }
    }

    #[test]
    fn serve_answers_each_command_until_eof() {
        let input: &[u8] = b"ready\nfrobnicate\n\n\xffbad\npoweroff\r\nreboot";
        let mut seen = Vec::new();
        let mut out = Vec::new();
        serve(input, &mut out, |cmd| {
            seen.push(cmd);
            match cmd {
                Command::Ready => Ok(Response::Ready(view())),
                _ => Err("reboot(2) failed: EPERM"),
            }
        })
        .unwrap();
        assert_eq!(seen, [Command::Ready, Command::PowerOff, Command::Reboot]);
        let out = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = out.lines().filter(|l| !l.is_empty()).collect();
        assert_eq!(lines.len(), 5, "{out}");
        assert!(lines[0].starts_with(READY_PREFIX));
        assert_eq!(lines[1], "MEMPOWER-ERROR unknown command: frobnicate");
        assert_eq!(lines[2], "MEMPOWER-ERROR unknown command: \u{fffd}bad");
        assert_eq!(lines[3], "MEMPOWER-ERROR reboot(2) failed: EPERM");
    }
}
