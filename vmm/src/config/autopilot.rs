//! `--autopilot`: which nodes the autopilot sizes, and within which bounds.

use std::time::Duration;

use mempower_api::{AutopilotMode, AutopilotSettings};

use super::{parse_size, split_top_level, ConfigError};

/// One `--autopilot` value: `node=N|all,mode=off|release|autosize[,min=SIZE][,max=SIZE]
/// [,headroom=SIZE][,interval=DURATION][,patience=DURATION]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AutopilotSpec {
    /// `None`: every node with hotplug memory.
    pub node: Option<u32>,
    pub settings: AutopilotSettings,
}

/// A duration such as `500ms`, `5s` or `2m`, more than 0 and at most an hour.
fn parse_duration(key: &str, value: &str) -> Result<Duration, String> {
    super::parse_duration(value, Duration::from_secs(3600), "an hour")
        .map_err(|why| format!("{key}='{value}': {why} (e.g. 500ms, 5s or 2m)"))
}

impl std::str::FromStr for AutopilotSpec {
    type Err = ConfigError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let bad = |why: String| ConfigError::BadAutopilot(why);
        let mut node = None;
        let mut s = AutopilotSettings::default();
        for part in split_top_level(spec) {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| bad(format!("'{part}' is not key=value")))?;
            let size = || parse_size(value).map_err(|e| bad(format!("{key}: {e}")));
            let ms = || {
                parse_duration(key, value)
                    .map(|d| d.as_millis() as u64)
                    .map_err(bad)
            };
            let duplicate = match key {
                "node" if value == "all" => node.replace(None).is_some(),
                "node" => {
                    let id = value
                        .parse()
                        .map_err(|_| bad(format!("node '{value}' is not a number or all")))?;
                    node.replace(Some(id)).is_some()
                }
                "mode" => {
                    let mode = match value {
                        "off" => AutopilotMode::Off,
                        "release" => AutopilotMode::Release,
                        "autosize" => AutopilotMode::Autosize,
                        _ => {
                            return Err(bad(format!(
                                "mode '{value}' is not off, release or autosize"
                            )))
                        }
                    };
                    s.mode.replace(mode).is_some()
                }
                "min" => s.min_bytes.replace(size()?).is_some(),
                "max" => s.max_bytes.replace(size()?).is_some(),
                "headroom" => s.headroom_bytes.replace(size()?).is_some(),
                "interval" => s.interval_ms.replace(ms()?).is_some(),
                "patience" => s.patience_ms.replace(ms()?).is_some(),
                other => {
                    return Err(bad(format!(
                        "unknown key '{other}' (expected node, mode, min, max, headroom, \
                         interval, patience)"
                    )))
                }
            };
            if duplicate {
                return Err(bad(format!("'{key}' is given twice")));
            }
        }
        let node = node.ok_or_else(|| bad("missing node=N or node=all".into()))?;
        if s.mode.is_none() {
            s.mode = Some(AutopilotMode::Autosize);
        }
        Ok(AutopilotSpec { node, settings: s })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_bad_ones_are_one_line_each() {
        let s: AutopilotSpec = "node=0,min=256M,max=768M,headroom=256M,interval=500ms,patience=10s"
            .parse()
            .unwrap();
        assert_eq!(s.node, Some(0));
        assert_eq!(
            s.settings.mode,
            Some(AutopilotMode::Autosize),
            "the default"
        );
        assert_eq!(
            (
                s.settings.min_bytes,
                s.settings.max_bytes,
                s.settings.headroom_bytes
            ),
            (Some(256 << 20), Some(768 << 20), Some(256 << 20))
        );
        assert_eq!(
            (s.settings.interval_ms, s.settings.patience_ms),
            (Some(500), Some(10_000))
        );
        let all: AutopilotSpec = "node=all,mode=release".parse().unwrap();
        assert_eq!(
            (all.node, all.settings.mode),
            (None, Some(AutopilotMode::Release))
        );
        for (text, expected) in [
            ("mode=autosize", "missing node=N or node=all"),
            ("node=x", "node 'x' is not a number or all"),
            (
                "node=0,mode=on",
                "mode 'on' is not off, release or autosize",
            ),
            ("node=0,min=1Q", "min: "),
            ("node=0,interval=0s", "interval='0s': must be more than 0"),
            ("node=0,interval=5", "the unit is missing"),
            ("node=0,patience=61m", "longer than an hour"),
            ("node=0,node=1", "'node' is given twice"),
            ("node=0,speed=9", "unknown key 'speed'"),
            ("node", "'node' is not key=value"),
        ] {
            let e = text.parse::<AutopilotSpec>().unwrap_err().to_string();
            assert!(e.contains(expected), "{text}: {e}");
            assert!(!e.contains('\n'), "{text}: {e}");
        }
    }
}
