//! Client subcommands for evacuations: `evacuate`, `compact`, `jobs`, `plug`, `metrics`.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use mempower_api::{Job, JobAccepted, JobState, RegionOutcome};

use super::{client, command_error, ClientArgs};
use crate::config;

#[derive(Debug, clap::Args)]
pub(super) struct EvacuateArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The node whose regions to evacuate.
    #[arg(long)]
    node: u32,
    /// Region numbers, e.g. 0,3 (see `mempower regions`).
    #[arg(long, value_delimiter = ',', required = true)]
    regions: Vec<u32>,
    /// Let the data go to other nodes when the node has no room for it (otherwise the
    /// job is refused before anything is evacuated).
    #[arg(long)]
    allow_other_nodes: bool,
    /// Wait for the job to end and print it; fail if a region failed.
    #[arg(long)]
    wait: bool,
}

#[derive(Debug, clap::Args)]
pub(super) struct CompactArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The node to compact.
    #[arg(long)]
    node: u32,
    /// Host memory to give back, e.g. 256M.
    #[arg(long, value_parser = config::parse_size)]
    release: u64,
    /// As for `evacuate`.
    #[arg(long)]
    allow_other_nodes: bool,
    /// Wait for the job to end and print it; fail if a region failed.
    #[arg(long)]
    wait: bool,
}

#[derive(Debug, clap::Args)]
pub(super) struct JobsArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Show this job only.
    #[arg(long)]
    job: Option<u64>,
}

#[derive(Debug, clap::Args)]
pub(super) struct PlugArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[arg(long)]
    node: u32,
    /// A released region to plug again.
    #[arg(long)]
    region: u32,
}

/// How long `--wait` follows a job.
const WAIT_LIMIT: Duration = Duration::from_secs(30 * 60);

pub(super) fn evacuate(args: EvacuateArgs) -> ExitCode {
    let body = serde_json::json!({
        "regions": args.regions,
        "allow_other_nodes": args.allow_other_nodes,
    })
    .to_string();
    let path = format!("/api/v1/nodes/{}/evacuations", args.node);
    start_job(&args.client, &path, &body, args.wait)
}

pub(super) fn compact(args: CompactArgs) -> ExitCode {
    let body = serde_json::json!({
        "release_bytes": args.release,
        "allow_other_nodes": args.allow_other_nodes,
    })
    .to_string();
    let path = format!("/api/v1/nodes/{}/compact", args.node);
    start_job(&args.client, &path, &body, args.wait)
}

pub(super) fn jobs(args: JobsArgs) -> ExitCode {
    let path = match args.job {
        Some(id) => format!("/api/v1/evacuations/{id}"),
        None => "/api/v1/evacuations".into(),
    };
    client(&args.client, "GET", &path, None)
}

pub(super) fn plug(args: PlugArgs) -> ExitCode {
    let path = format!("/api/v1/nodes/{}/regions/{}/plug", args.node, args.region);
    client(&args.client, "POST", &path, None)
}

pub(super) fn metrics(args: ClientArgs) -> ExitCode {
    client(&args, "GET", "/metrics", None)
}

fn start_job(c: &ClientArgs, path: &str, body: &str, wait: bool) -> ExitCode {
    if !wait {
        return client(c, "POST", path, Some(body));
    }
    let accepted = match mempower_api::request(&c.api_socket, "POST", path, Some(body)) {
        Ok(r) if r.status == 202 => match serde_json::from_str::<JobAccepted>(&r.body) {
            Ok(a) => a,
            Err(e) => return command_error(format!("unexpected answer {}: {e}", r.body)),
        },
        Ok(r) => return command_error(format!("API answered {}: {}", r.status, r.body)),
        Err(e) => return command_error(e),
    };
    let deadline = Instant::now() + WAIT_LIMIT;
    loop {
        let job = match mempower_api::request(&c.api_socket, "GET", &accepted.href, None) {
            Ok(r) if r.status == 200 => match serde_json::from_str::<Job>(&r.body) {
                Ok(job) => job,
                Err(e) => return command_error(format!("unexpected answer {}: {e}", r.body)),
            },
            Ok(r) => return command_error(format!("API answered {}: {}", r.status, r.body)),
            Err(e) => return command_error(e),
        };
        if job.state == JobState::Done {
            println!("{}", serde_json::to_string(&job).unwrap_or_default());
            let failed = job.error.is_some()
                || job
                    .results
                    .iter()
                    .any(|r| r.outcome == RegionOutcome::Failed);
            return if failed {
                command_error(format!("job {} did not release everything", job.id))
            } else {
                ExitCode::SUCCESS
            };
        }
        if Instant::now() > deadline {
            return command_error(format!(
                "job {} still {:?} after {WAIT_LIMIT:?}",
                job.id, job.state
            ));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
