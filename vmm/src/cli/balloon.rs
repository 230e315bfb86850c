//! The `balloon` client subcommand.

use std::process::ExitCode;

use super::{client, ClientArgs};
use crate::config;

#[derive(Debug, clap::Args)]
pub(super) struct BalloonArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Ask the guest to inflate or deflate the balloon to this size (e.g. 128M, whole
    /// 4 KiB pages); without it, show the balloon.
    #[arg(long, value_parser = config::parse_size)]
    size: Option<u64>,
}

pub(super) fn balloon(args: BalloonArgs) -> ExitCode {
    match args.size {
        None => client(&args.client, "GET", "/api/v1/balloon", None),
        Some(bytes) => {
            let body = serde_json::json!({ "target_bytes": bytes }).to_string();
            client(&args.client, "PUT", "/api/v1/balloon", Some(&body))
        }
    }
}
