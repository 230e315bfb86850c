//! What `--autopilot` asks of each node: its law's settings, checked against the node.

use super::service::{apply, fits};
use super::{Mode, Settings};
use crate::config::{AutopilotSpec, ConfigError, NodeConfig};

/// Each node's law settings (by node id; `None` for a node without hotplug memory):
/// the defaults for its size, off, then the `node=all` specs, then the node's own.
pub fn settings(
    nodes: &[NodeConfig],
    specs: &[AutopilotSpec],
) -> Result<Vec<Option<Settings>>, ConfigError> {
    for spec in specs {
        if let Some(id) = spec.node {
            match nodes.get(id as usize) {
                None => return Err(ConfigError::AutopilotNode(id, "there is no such node")),
                Some(n) if n.hotplug == 0 => {
                    return Err(ConfigError::AutopilotNode(id, "it has no hotplug memory"))
                }
                Some(_) => {}
            }
        }
    }
    let all = specs.iter().filter(|s| s.node.is_none());
    nodes
        .iter()
        .map(|n| {
            if n.hotplug == 0 {
                return Ok(None);
            }
            let mut s = Settings::default_for(n.hotplug, n.region_size);
            s.mode = Mode::Off;
            let own = specs.iter().filter(|s| s.node == Some(n.id));
            for spec in all.clone().chain(own) {
                apply(&mut s, &spec.settings);
            }
            let bad = |e: &dyn std::fmt::Display| {
                ConfigError::BadAutopilot(format!("node {}: {e}", n.id))
            };
            fits(n.id, &s, n.hotplug).map_err(|e| bad(&e))?;
            s.validate().map_err(|e| bad(&e))?;
            Ok(Some(s))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const MIB: u64 = 1 << 20;

    fn nodes() -> Vec<NodeConfig> {
        vec![
            NodeConfig {
                id: 0,
                cpus: vec![0],
                memory: 256 * MIB,
                hotplug: 1024 * MIB,
                ..Default::default()
            },
            NodeConfig {
                id: 1,
                cpus: vec![1],
                memory: 256 * MIB,
                ..Default::default()
            },
        ]
    }

    fn spec(text: &str) -> AutopilotSpec {
        text.parse().unwrap()
    }

    #[test]
    fn specs_set_the_fields_given_over_the_defaults() {
        let s = spec("node=0,min=256M,max=768M,headroom=256M,interval=500ms,patience=10s");
        let all = settings(&nodes(), &[s]).unwrap();
        let n0 = all[0].as_ref().unwrap();
        assert_eq!(n0.mode, Mode::Autosize);
        assert_eq!((n0.bounds.min, n0.bounds.max), (256 * MIB, 768 * MIB));
        assert_eq!(
            (n0.bounds.headroom, n0.bounds.low_mark),
            (256 * MIB, 64 * MIB)
        );
        assert_eq!(n0.interval, Duration::from_millis(500));
        assert_eq!(n0.patience, Duration::from_secs(10));
        assert!(all[1].is_none(), "no hotplug memory");
        // Without --autopilot every node is off, with its defaults.
        let off = settings(&nodes(), &[]).unwrap();
        assert_eq!(off[0].as_ref().unwrap().mode, Mode::Off);
        // node=all, then a node's own.
        let both = settings(
            &nodes(),
            &[spec("node=0,mode=off"), spec("node=all,mode=release")],
        )
        .unwrap();
        assert_eq!(both[0].as_ref().unwrap().mode, Mode::Off);
    }

    #[test]
    fn settings_that_do_not_fit_the_node_are_one_line_each() {
        for (text, expected) in [
            ("node=2", "--autopilot node=2: there is no such node"),
            ("node=1", "--autopilot node=1: it has no hotplug memory"),
            (
                "node=0,min=512M,max=256M",
                "node 0: autopilot: min 512 MiB is above max 256 MiB",
            ),
            (
                "node=0,max=2G",
                "node 0: autopilot: max 2048 MiB is above node 0's hotplug",
            ),
            ("node=0,min=100M", "is not a whole number of"),
        ] {
            let e = settings(&nodes(), &[spec(text)]).unwrap_err().to_string();
            assert!(e.contains(expected), "{text}: {e}");
            assert!(!e.contains('\n'), "{text}: {e}");
        }
    }
}
