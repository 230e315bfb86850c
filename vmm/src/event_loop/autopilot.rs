//! The API handler's autopilot side: a node's settings and status, the events, and
//! telling the autopilot when a user takes a node over.

use std::fmt::Write;

use mempower_api::{ApiError, ApiReply, ApiResult, AutopilotSettings, AutopilotStatus};

use super::ApiHandler;

impl ApiHandler {
    fn autopilot(&self) -> Result<&crate::autopilot::service::Autopilot, ApiError> {
        self.autopilot
            .as_deref()
            .ok_or_else(|| ApiError::new(503, "this VM runs no autopilot"))
    }

    pub(super) fn get_autopilot(&self, node: u32) -> ApiResult {
        Ok(ApiReply::Autopilot(self.autopilot()?.status(node)?))
    }

    pub(super) fn set_autopilot(&self, node: u32, settings: &AutopilotSettings) -> ApiResult {
        Ok(ApiReply::Autopilot(
            self.autopilot()?.configure(node, settings)?,
        ))
    }

    pub(super) fn autopilot_events(&self, since: Option<u64>) -> ApiResult {
        Ok(ApiReply::Events(self.autopilot()?.events(since)))
    }

    /// A user resized, compacted, evacuated or plugged `node`: its autopilot holds.
    pub(super) fn user_acted(&self, node: u32, what: &str) {
        if let (Some(autopilot), Ok(target)) = (&self.autopilot, self.evacuations.target(node)) {
            autopilot.user_acted(node, what, target);
        }
    }

    /// The autopilot's series for `/metrics`.
    pub(super) fn autopilot_metrics(&self) -> String {
        self.autopilot
            .as_ref()
            .map(|a| render(&a.statuses()))
            .unwrap_or_default()
    }
}

/// Prometheus text of the nodes' autopilots: mode, bounds, decisions and regrets, and
/// the signals their last decision saw.
pub fn render(statuses: &[AutopilotStatus]) -> String {
    /// Name, type, help, and the value of a node.
    type Series = (
        &'static str,
        &'static str,
        &'static str,
        fn(&AutopilotStatus) -> f64,
    );
    let mut out = String::new();
    let series: [Series; 9] = [
        (
            "mempower_autopilot_enabled",
            "gauge",
            "1 if the node's autopilot decides (mode release or autosize, not paused by a user)",
            |s| {
                f64::from(u8::from(
                    s.mode != mempower_api::AutopilotMode::Off && !s.paused_by_user,
                ))
            },
        ),
        (
            "mempower_autopilot_min_bytes",
            "gauge",
            "The least hotplug memory the autopilot keeps plugged",
            |s| s.min_bytes as f64,
        ),
        (
            "mempower_autopilot_max_bytes",
            "gauge",
            "The most hotplug memory the autopilot plugs",
            |s| s.max_bytes as f64,
        ),
        (
            "mempower_autopilot_headroom_bytes",
            "gauge",
            "The free memory the node keeps now (host pressure tightens it)",
            |s| s.effective_headroom_bytes as f64,
        ),
        (
            "mempower_autopilot_grows_total",
            "counter",
            "Autopilot decisions that grew the node",
            |s| s.grows as f64,
        ),
        (
            "mempower_autopilot_shrinks_total",
            "counter",
            "Autopilot decisions that shrank the node",
            |s| s.shrinks as f64,
        ),
        (
            "mempower_autopilot_regrets_total",
            "counter",
            "Shrinks a grow undid within the regret window",
            |s| s.regrets as f64,
        ),
        (
            "mempower_autopilot_guest_free_bytes",
            "gauge",
            "The guest node's free memory at the last decision",
            |s| s.last.as_ref().map_or(0.0, |e| e.inputs.free_bytes as f64),
        ),
        (
            "mempower_autopilot_guest_psi_some_avg10",
            "gauge",
            "The guest's memory pressure (PSI some avg10, percent) at the last decision",
            |s| s.last.as_ref().map_or(0.0, |e| e.inputs.psi_some_avg10),
        ),
    ];
    for (name, kind, help, value) in series {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for s in statuses {
            let _ = writeln!(out, "{name}{{node=\"{}\"}} {}", s.node, value(s));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use mempower_api::AutopilotMode;

    #[test]
    fn each_node_has_each_series() {
        let status = |node| AutopilotStatus {
            node,
            mode: AutopilotMode::Autosize,
            min_bytes: 0,
            max_bytes: 1 << 30,
            headroom_bytes: 1 << 28,
            effective_headroom_bytes: 1 << 27,
            interval_ms: 1000,
            patience_ms: 30_000,
            paused_by_user: node == 1,
            grows: 3,
            shrinks: 2,
            regrets: 1,
            samples: 3,
            holding: None,
            last: None,
        };
        let text = render(&[status(0), status(1)]);
        assert!(text.contains("mempower_autopilot_enabled{node=\"0\"} 1\n"));
        assert!(text.contains("mempower_autopilot_enabled{node=\"1\"} 0\n"));
        assert!(text.contains("mempower_autopilot_headroom_bytes{node=\"0\"} 134217728\n"));
        assert!(text.contains("mempower_autopilot_regrets_total{node=\"1\"} 1\n"));
        assert_eq!(text.matches("# TYPE").count(), 9);
        assert_eq!(text.lines().filter(|l| !l.starts_with('#')).count(), 18);
    }
}
