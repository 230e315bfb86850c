//! HTTP statuses for the VMM's errors: the one place where domain errors meet HTTP, as
//! `HttpError::status()` is for malformed requests in the API crate. Unknown things are
//! 404, invalid requests 400, conflicts with the VM's state 409, a missing or broken
//! guest agent 5xx, the VMM's own failures 500, a full pool of helper threads 503 with
//! `Retry-After`. Messages are the errors' own text.

use mempower_api::ApiError;

use crate::agent::AgentCallError;
use crate::autopilot::service::AutopilotError;
use crate::evacuation::{EvacuationError, WorkerError};
use crate::pool::PoolError;

/// What a client refused by a full pool is told to wait, seconds: pools drain as the
/// guest answers, and a retry storm only meets the same 503.
pub const RETRY_AFTER_SECS: u32 = 1;

impl From<PoolError> for ApiError {
    fn from(e: PoolError) -> Self {
        pool_error(&e)
    }
}

fn pool_error(e: &PoolError) -> ApiError {
    match e {
        PoolError::Full { .. } => {
            ApiError::new(503, e.to_string()).with_retry_after(RETRY_AFTER_SECS)
        }
        PoolError::Spawn { .. } => ApiError::new(500, e.to_string()),
    }
}

impl From<EvacuationError> for ApiError {
    fn from(e: EvacuationError) -> Self {
        use EvacuationError as E;
        let status = match &e {
            E::NoSuchNode(_) | E::NoSuchRegion { .. } | E::NoSuchJob(_) => 404,
            E::NoHotplugRegion(_)
            | E::NoRegions
            | E::TooManyRegions { .. }
            | E::Resize(_)
            | E::Worker(WorkerError::BadRegion { .. }) => 400,
            E::AlreadyQueued { .. }
            | E::Evacuating { .. }
            | E::AlreadyPlugged { .. }
            | E::Device { .. }
            | E::Geometry(_) => 409,
            E::AgentUnavailable(_) => 503,
            E::Worker(WorkerError::Spawn(_)) => 500,
            E::Pool(pool) => return pool_error(pool),
        };
        ApiError::new(status, e.to_string())
    }
}

impl From<AutopilotError> for ApiError {
    fn from(e: AutopilotError) -> Self {
        use AutopilotError as E;
        let status = match &e {
            E::NoSuchNode(_) | E::NoHotplugRegion(_) => 404,
            E::Settings(_) | E::AboveHotplug { .. } => 400,
            E::Spawn(_) => 500,
        };
        ApiError::new(status, e.to_string())
    }
}

impl From<super::balloon::BalloonApiError> for ApiError {
    fn from(e: super::balloon::BalloonApiError) -> Self {
        use super::balloon::BalloonApiError as E;
        use crate::devices::virtio::balloon::BalloonError as B;
        let status = match &e {
            E::NoBalloon => 404,
            E::Balloon(B::TargetAboveRam { .. })
            | E::Balloon(B::Device(
                virtio_balloon::Error::TargetNotPageAligned(_)
                | virtio_balloon::Error::TargetTooLarge(_),
            )) => 400,
            E::Balloon(_) => 500,
        };
        ApiError::new(status, e.to_string())
    }
}

/// Failed agent calls: the agent's refusal is the client's problem (422, with the
/// guest's errno in the message), a missing or broken link is ours.
pub(super) fn agent_call_error(e: AgentCallError) -> ApiError {
    let status = match e {
        AgentCallError::Agent(_) => 422,
        AgentCallError::Timeout(_) => 504,
        AgentCallError::NotConnected(_) | AgentCallError::Gone => 503,
        AgentCallError::Connection(_) | AgentCallError::BadAnswer { .. } => 502,
    };
    ApiError::new(status, e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mempower_api::EvacuationPhase;

    /// The statuses and messages clients see today: the JSON API must not change.
    #[test]
    fn evacuation_errors_keep_their_statuses_and_messages() {
        use EvacuationError as E;
        let io = || std::io::Error::from_raw_os_error(libc::EAGAIN);
        let cases = [
            (E::NoSuchNode(7), 404, "no such node: 7"),
            (E::NoHotplugRegion(1), 400, "node 1 has no hotplug region"),
            (
                E::NoSuchRegion {
                    node: 0,
                    region: 4,
                    regions: 4,
                },
                404,
                "no such region: 4 (node 0 has regions 0 to 3)",
            ),
            (E::NoRegions, 400, "no regions given"),
            (
                E::AgentUnavailable(0),
                503,
                "node 0 cannot be evacuated: this VM has no guest agent (vsock)",
            ),
            (
                E::AlreadyQueued { node: 1, region: 2 },
                409,
                "region 2 of node 1 is queued for evacuation",
            ),
            (
                E::Evacuating {
                    node: 1,
                    region: 2,
                    phase: EvacuationPhase::Unplugging,
                },
                409,
                "region 2 of node 1 is being evacuated (unplugging)",
            ),
            (
                E::AlreadyPlugged { node: 1, region: 0 },
                409,
                "region 0 of node 1 is already plugged",
            ),
            (
                E::Worker(WorkerError::BadRegion {
                    region: 130,
                    regions: 128,
                }),
                400,
                "region 130 is out of range (the node has 128 regions)",
            ),
            (
                E::Geometry(crate::evacuation::NodeError::RegionSmallerThanBlock {
                    region_size: 128 << 20,
                    block_size: 2 << 30,
                }),
                409,
                "region size 128 MiB is smaller than the guest's memory block size 2 GiB",
            ),
            (E::NoSuchJob(9), 404, "no such job: 9"),
            (
                E::TooManyRegions {
                    node: 0,
                    given: 10_000,
                    regions: 4,
                },
                400,
                "10000 regions given, node 0 has 4",
            ),
        ];
        for (e, status, message) in cases {
            assert_eq!(ApiError::from(e), ApiError::new(status, message));
        }
        let spawn = ApiError::from(E::Pool(PoolError::Spawn {
            what: "compactions",
            source: io(),
        }));
        assert_eq!((spawn.status, spawn.retry_after), (500, None));
        assert!(spawn
            .message
            .starts_with("cannot start a thread for the compactions: "));
        let full = ApiError::from(E::Pool(PoolError::Full {
            what: "compactions",
            workers: 4,
            queued: 16,
        }));
        assert_eq!(
            full,
            ApiError::new(
                503,
                "too many compactions are in progress (4 running, 16 waiting); try again later"
            )
            .with_retry_after(1)
        );
        let plug = ApiError::from(E::Device {
            region: 3,
            source: crate::evacuation::NodeError::Resize(
                virtio_mem::Error::RequestedSizeTooLarge {
                    requested: 1 << 30,
                    region_size: 1 << 29,
                },
            ),
        });
        assert_eq!(plug.status, 409);
        use super::super::balloon::BalloonApiError as Ba;
        use crate::devices::virtio::balloon::BalloonError as B;
        for (e, status, message) in [
            (
                Ba::NoBalloon,
                404,
                "this VM has no balloon device (start it with --balloon)",
            ),
            (
                Ba::Balloon(B::TargetAboveRam {
                    target: 1 << 30,
                    ram: 1 << 29,
                }),
                400,
                "balloon target of 1073741824 bytes is above the guest's 536870912 bytes of RAM",
            ),
            (
                Ba::Balloon(B::Device(virtio_balloon::Error::TargetNotPageAligned(5))),
                400,
                "virtio-balloon: balloon target 0x5 bytes is not a multiple of 4 KiB",
            ),
            (
                Ba::Balloon(B::Device(virtio_balloon::Error::NotActivated)),
                500,
                "virtio-balloon: device not activated",
            ),
        ] {
            assert_eq!(ApiError::from(e), ApiError::new(status, message));
        }
        assert_eq!(
            plug.message,
            "cannot plug region 3: requested size 0x40000000 exceeds the region size 0x20000000"
        );
        // A resize the device refuses: 400, in the device's own words, as before.
        let resize = ApiError::from(E::Resize(crate::evacuation::NodeError::Resize(
            virtio_mem::Error::RequestedSizeNotAligned {
                requested: 3 << 20,
                block_size: 2 << 20,
            },
        )));
        assert_eq!(
            (resize.status, resize.message.as_str()),
            (
                400,
                "requested size 0x300000 is not a multiple of the block size 0x200000"
            )
        );
    }
}
