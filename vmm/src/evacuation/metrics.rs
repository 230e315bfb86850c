//! `GET /metrics`: Prometheus text exposition (format 0.0.4) of the nodes, their
//! regions and what evacuations did.

use std::fmt::Write;

use mempower_api::{BalloonStatus, NodeStatus, RegionState, RegionStatus};

use super::ledger::NodeCounters;

/// Writes one metric family: its HELP and TYPE lines, then its samples.
pub(crate) fn family(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    samples: &[(String, f64)],
) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{{{labels}}} {value}");
    }
}

/// The guest's console output dropped because the console did not keep up.
pub fn render_console(dropped_bytes: u64) -> String {
    let name = "mempower_console_dropped_bytes_total";
    format!(
        "# HELP {name} Console output dropped rather than block a vCPU: the console \
         (stdout or the console log) did not keep up.\n# TYPE {name} counter\n\
         {name} {dropped_bytes}\n"
    )
}

/// The age of each node's resident figures (`None`: never measured, no sample).
pub fn render_resident_age(ages: &[(u32, Option<std::time::Duration>)]) -> String {
    let mut out = String::new();
    let samples: Vec<(String, f64)> = ages
        .iter()
        .filter_map(|(node, age)| Some((format!("node=\"{node}\""), (*age)?.as_secs_f64())))
        .collect();
    family(
        &mut out,
        "mempower_node_resident_age_seconds",
        "gauge",
        "How long ago the node's resident bytes were measured.",
        &samples,
    );
    out
}

pub fn render(
    nodes: &[NodeStatus],
    regions: &[(u32, Vec<RegionStatus>)],
    counters: &[(u32, NodeCounters)],
    agent_connected: bool,
) -> String {
    let mut out = String::new();
    let per_node = |f: &dyn Fn(&NodeStatus) -> u64| -> Vec<(String, f64)> {
        nodes
            .iter()
            .map(|n| (format!("node=\"{}\"", n.id), f(n) as f64))
            .collect()
    };
    family(
        &mut out,
        "mempower_node_plugged_bytes",
        "gauge",
        "Hotplug memory the guest has plugged (device bitmap).",
        &per_node(&|n| n.plugged_bytes),
    );
    family(
        &mut out,
        "mempower_node_requested_bytes",
        "gauge",
        "Hotplug memory the host asks the guest to plug.",
        &per_node(&|n| n.requested_bytes),
    );
    family(
        &mut out,
        "mempower_node_resident_bytes",
        "gauge",
        "Host memory the node's hotplug region occupies (memfd data), as last measured: \
         after each evacuation pass, else by a refresh that a read finding the figures \
         over 1 s old starts (so about one scrape interval old; see \
         mempower_node_resident_age_seconds).",
        &per_node(&|n| n.resident_bytes),
    );
    family(
        &mut out,
        "mempower_node_boot_memory_bytes",
        "gauge",
        "The node's boot memory.",
        &per_node(&|n| n.boot_memory_bytes),
    );

    let mut states = Vec::new();
    let mut resident = Vec::new();
    let mut counts = Vec::new();
    for (node, list) in regions {
        for s in RegionState::ALL {
            let n = list.iter().filter(|r| r.state == s).count();
            counts.push((format!("node=\"{node}\",state=\"{s}\""), n as f64));
        }
        for r in list {
            let labels = format!("node=\"{node}\",region=\"{}\"", r.index);
            // Every state a region can be in gets a 0 or 1 series.
            for s in RegionState::ALL {
                let value = if r.state == s { 1.0 } else { 0.0 };
                states.push((format!("{labels},state=\"{s}\""), value));
            }
            resident.push((labels, r.resident_bytes as f64));
        }
    }
    family(
        &mut out,
        "mempower_node_regions",
        "gauge",
        "Regions of the node in each state.",
        &counts,
    );
    family(
        &mut out,
        "mempower_region_state",
        "gauge",
        "1 for the region's current state, 0 for the others.",
        &states,
    );
    family(
        &mut out,
        "mempower_region_resident_bytes",
        "gauge",
        "Host memory the region occupies, measured with the node's resident bytes.",
        &resident,
    );

    let mut evacuations = Vec::new();
    let mut sums: [Vec<(String, f64)>; 5] = Default::default();
    for (node, c) in counters {
        let n = format!("node=\"{node}\"");
        evacuations.push((
            format!("{n},result=\"released\""),
            c.released_regions as f64,
        ));
        evacuations.push((format!("{n},result=\"failed\""), c.failed_regions as f64));
        sums[0].push((n.clone(), c.released_bytes as f64));
        sums[1].push((n.clone(), c.unplugged_bytes as f64));
        sums[2].push((n.clone(), c.migrated_bytes as f64));
        sums[3].push((n.clone(), c.job_seconds));
        sums[4].push((n, c.jobs_done as f64));
    }
    family(
        &mut out,
        "mempower_evacuations_total",
        "counter",
        "Region evacuations by result.",
        &evacuations,
    );
    family(
        &mut out,
        "mempower_released_bytes_total",
        "counter",
        "Host memory released by evacuations.",
        &sums[0],
    );
    family(
        &mut out,
        "mempower_unplugged_bytes_total",
        "counter",
        "Guest memory unplugged by evacuations.",
        &sums[1],
    );
    family(
        &mut out,
        "mempower_guest_migrated_bytes_total",
        "counter",
        "Guest memory migrated out of evacuated regions (what each held in use).",
        &sums[2],
    );
    let _ = writeln!(out, "# HELP mempower_evacuation_job_duration_seconds Time from a job's creation to its last result.");
    let _ = writeln!(
        out,
        "# TYPE mempower_evacuation_job_duration_seconds summary"
    );
    for ((labels, seconds), (_, count)) in sums[3].iter().zip(&sums[4]) {
        let _ = writeln!(
            out,
            "mempower_evacuation_job_duration_seconds_sum{{{labels}}} {seconds}"
        );
        let _ = writeln!(
            out,
            "mempower_evacuation_job_duration_seconds_count{{{labels}}} {count}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP mempower_agent_connected 1 if the guest agent is connected."
    );
    let _ = writeln!(out, "# TYPE mempower_agent_connected gauge");
    let _ = writeln!(
        out,
        "mempower_agent_connected {}",
        u8::from(agent_connected)
    );
    out
}

/// The balloon's families, appended to [`render`]'s when the VM has one.
pub fn render_balloon(b: &BalloonStatus) -> String {
    let mut out = String::new();
    let counter = |name: &str| b.counters.get(name).copied().unwrap_or(0);
    for (name, kind, help, value) in [
        (
            "mempower_balloon_target_bytes",
            "gauge",
            "Memory the host asks the guest to give up through the balloon.",
            b.target_bytes,
        ),
        (
            "mempower_balloon_actual_bytes",
            "gauge",
            "Memory the guest's balloon driver says it gave up.",
            b.actual_bytes,
        ),
        (
            "mempower_balloon_inflated_bytes",
            "gauge",
            "Memory in the balloon as the device saw it inflated.",
            b.inflated_bytes,
        ),
        (
            "mempower_balloon_inflated_bytes_total",
            "counter",
            "Pages put in the balloon (inflation).",
            counter("inflated_bytes"),
        ),
        (
            "mempower_balloon_reported_bytes_total",
            "counter",
            "Free memory the guest reported (free page reporting).",
            b.reported_bytes,
        ),
        (
            "mempower_balloon_discarded_bytes_total",
            "counter",
            "Host memory the balloon gave back (inflation and reports).",
            b.discarded_bytes,
        ),
        (
            "mempower_balloon_rejected_bytes_total",
            "counter",
            "Memory the guest named that was not discarded (outside RAM or unplugged).",
            counter("rejected_bytes"),
        ),
    ] {
        // One series each, without labels.
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        let _ = writeln!(out, "{name} {value}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two nodes of 8192 regions: every series is there, rendered in well under a
    /// second (the API thread waits for it).
    #[test]
    fn two_nodes_of_8192_regions() {
        let region = |index| RegionStatus {
            index,
            memory_block: 32 + index,
            base: (1 << 32) + u64::from(index) * (128 << 20),
            size: 128 << 20,
            state: if index % 2 == 0 {
                RegionState::Plugged
            } else {
                RegionState::Released
            },
            phase: None,
            reason: None,
            plugged_bytes: 0,
            resident_bytes: 4096,
            in_use_bytes: None,
        };
        let list: Vec<RegionStatus> = (0..8192).map(region).collect();
        let regions = [(0, list.clone()), (1, list)];
        let t = std::time::Instant::now();
        let text = render(&[], &regions, &[], true);
        let took = t.elapsed();
        let series = text.lines().filter(|l| !l.starts_with('#')).count();
        let states = RegionState::ALL.len();
        assert_eq!(series, 2 * 8192 * (states + 1) + 2 * states + 1);
        assert!(text.contains("mempower_node_regions{node=\"1\",state=\"plugged\"} 4096\n"));
        assert!(text
            .contains("mempower_region_state{node=\"0\",region=\"8191\",state=\"released\"} 1\n"));
        assert!(took < std::time::Duration::from_secs(2), "{took:?}");
    }

    #[test]
    fn every_sample_has_a_family_and_a_number() {
        let node = NodeStatus {
            id: 1,
            boot_memory_bytes: 1 << 28,
            region_base: 1 << 32,
            region_size: 1 << 28,
            block_size: 1 << 21,
            plugged_bytes: 1 << 27,
            requested_bytes: 1 << 27,
            resident_bytes: 4096,
        };
        let region = RegionStatus {
            index: 0,
            memory_block: 40,
            base: 5 << 30,
            size: 1 << 27,
            state: RegionState::Failed,
            phase: None,
            reason: Some("busy".into()),
            plugged_bytes: 1 << 27,
            resident_bytes: 4096,
            in_use_bytes: None,
        };
        let counters = NodeCounters {
            released_regions: 2,
            failed_regions: 1,
            released_bytes: 100,
            jobs_done: 3,
            job_seconds: 1.5,
            ..Default::default()
        };
        let text = render(&[node], &[(1, vec![region])], &[(1, counters)], true);
        assert!(text.contains("mempower_node_plugged_bytes{node=\"1\"} 134217728\n"));
        assert!(
            text.contains("mempower_region_state{node=\"1\",region=\"0\",state=\"failed\"} 1\n")
        );
        assert!(
            text.contains("mempower_region_state{node=\"1\",region=\"0\",state=\"plugged\"} 0\n")
        );
        assert!(text.contains("mempower_evacuations_total{node=\"1\",result=\"failed\"} 1\n"));
        assert!(text.contains("mempower_evacuation_job_duration_seconds_sum{node=\"1\"} 1.5\n"));
        assert!(text.contains("mempower_agent_connected 1\n"));
        assert!(text.contains("mempower_node_regions{node=\"1\",state=\"failed\"} 1\n"));
        assert!(text.contains("mempower_node_regions{node=\"1\",state=\"plugged\"} 0\n"));
        let mut families = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                families.insert(rest.split(' ').next().unwrap().to_string());
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
            let name = series.split('{').next().unwrap();
            let base = name.trim_end_matches("_sum").trim_end_matches("_count");
            assert!(families.contains(name) || families.contains(base), "{line}");
        }
    }

    #[test]
    fn balloon_families() {
        let status = BalloonStatus {
            target_bytes: 1 << 27,
            actual_bytes: 1 << 26,
            inflated_bytes: 1 << 26,
            reported_bytes: 3 << 21,
            discarded_bytes: (1 << 26) + (3 << 21),
            driver_ready: true,
            free_page_reporting: true,
            deflate_on_oom: false,
            stats_interval_ms: None,
            stats: None,
            counters: [("inflated_bytes", 1 << 27), ("rejected_bytes", 4096)]
                .map(|(k, v)| (k.to_string(), v))
                .into(),
        };
        let text = render_balloon(&status);
        for line in [
            "# TYPE mempower_balloon_target_bytes gauge",
            "mempower_balloon_target_bytes 134217728",
            "mempower_balloon_actual_bytes 67108864",
            "mempower_balloon_inflated_bytes_total 134217728",
            "# TYPE mempower_balloon_reported_bytes_total counter",
            "mempower_balloon_reported_bytes_total 6291456",
            "mempower_balloon_discarded_bytes_total 73400320",
            "mempower_balloon_rejected_bytes_total 4096",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
    }
}
