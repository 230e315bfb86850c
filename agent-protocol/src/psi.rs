//! Pressure stall information: the text of `/proc/pressure/memory`, which the agent reads
//! in the guest and the VMM on the host, and its figures as the protocol carries them.
//!
//! ```text
//! some avg10=0.31 avg60=0.12 avg300=0.03 total=5214310
//! full avg10=0.00 avg60=0.00 avg300=0.00 total=1432765
//! ```

use serde::{Deserialize, Deserializer, Serialize};

/// One line of a pressure file: the share of wall time in which some task (`some`), or
/// every non-idle task (`full`), stalled on memory.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Stall {
    /// Percent (0 to 100) over the last 10 s, to the kernel's hundredths.
    #[serde(deserialize_with = "percent")]
    pub avg10: f32,
    /// Percent over the last 60 s.
    #[serde(deserialize_with = "percent")]
    pub avg60: f32,
    /// Microseconds stalled since boot.
    pub total_us: u64,
}

/// Both lines of a pressure file.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Pressure {
    pub some: Stall,
    pub full: Stall,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PsiError {
    #[error("no `{0}` line")]
    Missing(&'static str),
    /// The line, cut to [`QUOTED`] characters: the text may be anyone's.
    #[error("malformed {kind} line {line:?}: {reason}")]
    Malformed {
        kind: &'static str,
        line: String,
        reason: &'static str,
    },
}

/// How much of a bad line an error quotes.
const QUOTED: usize = 120;

/// The kernel prints averages as `%lu.%02lu`; longer fractions are cut to hundredths.
const MAX_HUNDREDTHS: u32 = 100 * 100;

/// Parses a pressure file. Lines other than `some` and `full` (and any after the first
/// of each) are ignored, as are keys other than `avg10`, `avg60` and `total` (`avg300`).
pub fn parse(text: &str) -> Result<Pressure, PsiError> {
    let (mut some, mut full) = (None, None);
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let (slot, kind) = match words.next() {
            Some("some") => (&mut some, "some"),
            Some("full") => (&mut full, "full"),
            _ => continue,
        };
        if slot.is_some() {
            continue;
        }
        let bad = |reason| PsiError::Malformed {
            kind,
            line: line.chars().take(QUOTED).collect(),
            reason,
        };
        let (mut avg10, mut avg60, mut total_us) = (None, None, None);
        for word in words {
            let (key, value) = word
                .split_once('=')
                .filter(|(key, _)| !key.is_empty())
                .ok_or_else(|| bad("expected key=value"))?;
            match key {
                "avg10" => avg10 = Some(parse_percent(value).ok_or_else(|| bad("bad avg10"))?),
                "avg60" => avg60 = Some(parse_percent(value).ok_or_else(|| bad("bad avg60"))?),
                "total" => total_us = Some(parse_u64(value).ok_or_else(|| bad("bad total"))?),
                _ => {}
            }
        }
        *slot = Some(Stall {
            avg10: avg10.ok_or_else(|| bad("no avg10"))?,
            avg60: avg60.ok_or_else(|| bad("no avg60"))?,
            total_us: total_us.ok_or_else(|| bad("no total"))?,
        });
    }
    Ok(Pressure {
        some: some.ok_or(PsiError::Missing("some"))?,
        full: full.ok_or(PsiError::Missing("full"))?,
    })
}

fn is_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

fn parse_u64(s: &str) -> Option<u64> {
    is_digits(s).then(|| s.parse().ok()).flatten()
}

/// `12.34` → 12.34; at most 100, hundredths (further digits are cut, as the kernel never
/// prints them).
fn parse_percent(s: &str) -> Option<f32> {
    let (whole, fraction) = s.split_once('.').unwrap_or((s, "0"));
    if !is_digits(whole) || whole.len() > 3 || !is_digits(fraction) {
        return None;
    }
    let hundredths = fraction
        .bytes()
        .chain(std::iter::repeat(b'0'))
        .take(2)
        .fold(whole.parse::<u32>().ok()?, |acc, digit| {
            acc * 10 + u32::from(digit - b'0')
        });
    (hundredths <= MAX_HUNDREDTHS).then(|| from_hundredths(hundredths))
}

/// The f32 nearest to `hundredths / 100`: every figure carried is one of these, so that a
/// decoded figure encodes to the same text and back to the same value.
fn from_hundredths(hundredths: u32) -> f32 {
    hundredths as f32 / 100.0
}

/// Decodes a percent: a finite number from 0 to 100, rounded to hundredths. Anything else
/// (e.g. 1e39, which would be an infinite f32) is refused.
fn percent<'de, D: Deserializer<'de>>(d: D) -> Result<f32, D::Error> {
    let value = f64::deserialize(d)?;
    if !(0.0..=100.0).contains(&value) {
        return Err(serde::de::Error::custom(format!(
            "{value} is not a percentage from 0 to 100"
        )));
    }
    Ok(from_hundredths((value * 100.0).round() as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "some avg10=0.31 avg60=12.05 avg300=0.03 total=5214310\n\
                          full avg10=100.00 avg60=0.00 avg300=0.00 total=1432765\n";

    #[test]
    fn parses_the_kernels_text() {
        let p = parse(SAMPLE).unwrap();
        assert_eq!(
            p.some,
            Stall {
                avg10: 0.31,
                avg60: 12.05,
                total_us: 5_214_310
            }
        );
        assert_eq!(
            p.full,
            Stall {
                avg10: 100.0,
                avg60: 0.0,
                total_us: 1_432_765
            }
        );
        // Lines in another order, without avg300, with keys and lines a later kernel
        // might add.
        let p = parse(
            "full avg10=1 avg60=2.5 total=7 new=x\nsome total=9 avg60=0.00 avg10=0.01\nmore x\n",
        )
        .unwrap();
        assert_eq!((p.full.avg10, p.full.avg60, p.full.total_us), (1.0, 2.5, 7));
        assert_eq!((p.some.avg10, p.some.total_us), (0.01, 9));
        assert_eq!(parse_percent("1.23456"), Some(1.23), "cut to hundredths");
    }

    #[test]
    fn malformed_text_is_an_error_never_a_panic() {
        for (text, want) in [
            ("", PsiError::Missing("some")),
            (
                "some avg10=0.00 avg60=0.00 total=0\n",
                PsiError::Missing("full"),
            ),
            (
                "full avg10=0.00 avg60=0.00 total=0\n",
                PsiError::Missing("some"),
            ),
        ] {
            assert_eq!(parse(text), Err(want), "{text:?}");
        }
        let full = "\nfull avg10=0.00 avg60=0.00 total=0\n";
        for some in [
            "some",
            "some avg10",
            "some avg10=0.00 avg60=0.00",
            "some avg60=0.00 total=0",
            "some avg10=0.00 total=0",
            "some avg10=-1.00 avg60=0.00 total=0",
            "some avg10=100.01 avg60=0.00 total=0",
            "some avg10=1000 avg60=0.00 total=0",
            "some avg10=1e2 avg60=0.00 total=0",
            "some avg10=.5 avg60=0.00 total=0",
            "some avg10=5. avg60=0.00 total=0",
            "some avg10=nan avg60=0.00 total=0",
            "some avg10=inf avg60=0.00 total=0",
            "some avg10=+1 avg60=0.00 total=0",
            "some avg10=0.00 avg60=0.00 total=-1",
            "some avg10=0.00 avg60=0.00 total=18446744073709551616",
            "some avg10=0.00 avg60=0.00 total=",
            "some avg10=0.00 avg60=0.00 total=1 =",
            "some avg10=٣ avg60=0.00 total=0",
        ] {
            let text = format!("{some}{full}");
            assert!(
                matches!(parse(&text), Err(PsiError::Malformed { kind: "some", .. })),
                "{some:?}: {:?}",
                parse(&text)
            );
        }
        // The error quotes a bounded part of the line.
        let long = format!("some avg10=x{}\n{full}", "y".repeat(10_000));
        let PsiError::Malformed { line, .. } = parse(&long).unwrap_err() else {
            panic!("a bad avg10 is malformed");
        };
        assert_eq!(line.chars().count(), QUOTED);
        // The extremes the kernel can print are fine.
        let p = parse(
            "some avg10=0.00 avg60=100.00 total=18446744073709551615\nfull avg10=0 avg60=0 total=0",
        )
        .unwrap();
        assert_eq!((p.some.avg60, p.some.total_us), (100.0, u64::MAX));
    }

    #[test]
    fn every_hundredth_survives_json_both_ways() {
        for hundredths in 0..=MAX_HUNDREDTHS {
            let stall = Stall {
                avg10: from_hundredths(hundredths),
                avg60: from_hundredths(MAX_HUNDREDTHS - hundredths),
                total_us: u64::from(hundredths),
            };
            let json = serde_json::to_string(&stall).unwrap();
            assert_eq!(
                serde_json::from_str::<Stall>(&json).unwrap(),
                stall,
                "{json}"
            );
            let text = format!("{}.{:02}", hundredths / 100, hundredths % 100);
            assert_eq!(parse_percent(&text), Some(stall.avg10), "{text}");
        }
    }

    #[test]
    fn decoding_refuses_what_is_no_percentage_and_rounds_the_rest() {
        for bad in ["-0.5", "100.5", "1e39", "null", "\"1\""] {
            let json = format!(r#"{{"avg10":{bad},"avg60":0,"total_us":0}}"#);
            assert!(serde_json::from_str::<Stall>(&json).is_err(), "{json}");
        }
        let json = r#"{"avg10":12.3456789,"avg60":0.004,"total_us":1}"#;
        let stall: Stall = serde_json::from_str(json).unwrap();
        assert_eq!((stall.avg10, stall.avg60), (12.35, 0.0));
    }
}
