//! The `autopilot` and `events` client subcommands.

use std::process::ExitCode;

use mempower_api::{AutopilotMode, AutopilotSettings};

use super::{client, ClientArgs};
use crate::config;

#[derive(Debug, clap::Args)]
pub(super) struct AutopilotArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The node whose autopilot to show or set.
    #[arg(long)]
    node: u32,
    /// off, release (only give back) or autosize (grow and shrink).
    #[arg(long, value_parser = parse_mode)]
    mode: Option<AutopilotMode>,
    /// The least hotplug memory kept plugged (whole regions), e.g. 256M.
    #[arg(long, value_parser = config::parse_size)]
    min: Option<u64>,
    /// The most hotplug memory the autopilot plugs (whole regions).
    #[arg(long, value_parser = config::parse_size)]
    max: Option<u64>,
    /// The free memory the node keeps beyond what its guest uses.
    #[arg(long, value_parser = config::parse_size)]
    headroom: Option<u64>,
    /// How often it samples, in milliseconds.
    #[arg(long, value_name = "MS")]
    interval_ms: Option<u64>,
    /// How long the node stays calm before it gives back, in milliseconds.
    #[arg(long, value_name = "MS")]
    patience_ms: Option<u64>,
}

fn parse_mode(value: &str) -> Result<AutopilotMode, String> {
    match value {
        "off" => Ok(AutopilotMode::Off),
        "release" => Ok(AutopilotMode::Release),
        "autosize" => Ok(AutopilotMode::Autosize),
        _ => Err("expected off, release or autosize".into()),
    }
}

impl AutopilotArgs {
    /// The body of a PUT, if any setting is given (a GET otherwise).
    pub(super) fn settings(&self) -> Option<AutopilotSettings> {
        let s = AutopilotSettings {
            mode: self.mode,
            min_bytes: self.min,
            max_bytes: self.max,
            headroom_bytes: self.headroom,
            interval_ms: self.interval_ms,
            patience_ms: self.patience_ms,
        };
        (s != AutopilotSettings::default()).then_some(s)
    }
}

pub(super) fn autopilot(args: AutopilotArgs) -> ExitCode {
    let path = format!("/api/v1/nodes/{}/autopilot", args.node);
    match args.settings() {
        None => client(&args.client, "GET", &path, None),
        Some(settings) => {
            let body = serde_json::to_string(&settings).expect("plain data serializes");
            client(&args.client, "PUT", &path, Some(&body))
        }
    }
}

#[derive(Debug, clap::Args)]
pub(super) struct EventsArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Only the events after this sequence number.
    #[arg(long)]
    since: Option<u64>,
}

pub(super) fn events(args: EventsArgs) -> ExitCode {
    let path = match args.since {
        Some(n) => format!("/api/v1/events?since={n}"),
        None => "/api/v1/events".to_string(),
    };
    client(&args.client, "GET", &path, None)
}
