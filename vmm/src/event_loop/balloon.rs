//! The API handler's balloon side: its status and its target.

use std::collections::BTreeMap;

use mempower_api::{ApiReply, ApiResult, BalloonStats, BalloonStatus};

use super::ApiHandler;
use crate::devices::virtio::balloon::{BalloonDevice, BalloonError};
use crate::sync::Locked;

#[derive(Debug, thiserror::Error)]
pub enum BalloonApiError {
    #[error("this VM has no balloon device (start it with --balloon)")]
    NoBalloon,
    #[error(transparent)]
    Balloon(#[from] BalloonError),
}

/// A serialisable value as name → number, for what the device keeps as typed structs
/// (statistics and counters); absent values are left out.
fn numbers(value: &impl serde::Serialize) -> BTreeMap<String, u64> {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::Object(map)) => map
            .into_iter()
            .filter_map(|(k, v)| Some((k, v.as_u64()?)))
            .collect(),
        _ => BTreeMap::new(),
    }
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// What `GET /api/v1/balloon` reports of `device`.
pub(super) fn status(device: &mut BalloonDevice) -> BalloonStatus {
    let inflated_bytes = device.inflated_bytes();
    let model = device.model();
    let counters = model.metrics().snapshot();
    let features = model.avail_features();
    let offered = |bit: u32| features & (1 << bit) != 0;
    BalloonStatus {
        target_bytes: model.target_bytes(),
        actual_bytes: model.actual_bytes(),
        inflated_bytes,
        reported_bytes: counters.reported_bytes,
        discarded_bytes: counters.discarded_bytes,
        driver_ready: device.driver_ready(),
        free_page_reporting: offered(virtio_balloon::VIRTIO_BALLOON_F_REPORTING),
        deflate_on_oom: offered(virtio_balloon::VIRTIO_BALLOON_F_DEFLATE_ON_OOM),
        stats_interval_ms: model.stats_interval().map(millis),
        stats: model.last_stats().map(|s| BalloonStats {
            age_ms: millis(s.received.elapsed()),
            values: numbers(&s.stats),
        }),
        counters: numbers(&counters),
    }
}

impl ApiHandler {
    /// Attaches the VM's balloon, for `/api/v1/balloon` and the metrics.
    pub fn with_balloon(
        mut self,
        balloon: std::sync::Arc<std::sync::Mutex<BalloonDevice>>,
    ) -> Self {
        self.balloon = Some(balloon);
        self
    }

    fn lock_balloon(&self) -> Result<std::sync::MutexGuard<'_, BalloonDevice>, BalloonApiError> {
        let balloon = self.balloon.as_ref().ok_or(BalloonApiError::NoBalloon)?;
        Ok(balloon.locked())
    }

    /// The balloon's status, if the VM has one.
    pub(super) fn balloon_status(&self) -> Option<BalloonStatus> {
        self.lock_balloon().ok().map(|mut b| status(&mut b))
    }

    pub(super) fn get_balloon(&self) -> ApiResult {
        let mut balloon = self.lock_balloon()?;
        Ok(ApiReply::Balloon(status(&mut balloon)))
    }

    /// The guest's RAM now: boot memory and plugged hotplug memory.
    fn guest_ram_bytes(&self) -> u64 {
        let boot: u64 = self.info.nodes.iter().map(|n| n.boot_memory_bytes).sum();
        let plugged: u64 = self
            .devices
            .iter()
            .flatten()
            .map(|d| d.locked().model().plugged_size())
            .sum();
        boot + plugged
    }

    pub(super) fn set_balloon_target(&self, bytes: u64) -> ApiResult {
        // The mem devices are read (and released) before the balloon is locked.
        let ram = self.guest_ram_bytes();
        let mut balloon = self.lock_balloon()?;
        balloon
            .set_target_bytes(bytes, ram)
            .map_err(BalloonApiError::from)?;
        Ok(ApiReply::Balloon(status(&mut balloon)))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use mempower_api::{ApiAction, ApiRequest};
    use virtio_balloon::BalloonParams;

    use super::super::tests::handler;
    use super::*;
    use crate::devices::virtio::balloon::PluggedRam;
    use crate::layout::MemoryLayout;

    const MIB: u64 = 1 << 20;

    fn ask(h: &mut ApiHandler, action: ApiAction) -> ApiResult {
        let (request, rx) = ApiRequest::new(action, None);
        h.handle(request);
        rx.recv().unwrap()
    }

    #[test]
    fn the_balloon_answers_and_checks_its_target() {
        let (mut h, ram) = handler();
        let none = ask(&mut h, ApiAction::GetBalloon).unwrap_err();
        assert_eq!(none.status, 404, "{none:?}");
        assert!(h.balloon_status().is_none());

        // The handler's VM: two nodes of 64 MiB, node 0 with a 128 MiB region, none plugged.
        let layout = MemoryLayout::with_hotplug(&[64 * MIB, 64 * MIB], &[128 * MIB, 0]).unwrap();
        let guard = PluggedRam::new(&layout, &h.devices);
        let params = BalloonParams {
            free_page_reporting: true,
            ..Default::default()
        };
        let device = BalloonDevice::new(params, &ram.memory, guard, 16 * MIB).unwrap();
        let mut h = h.with_balloon(Arc::new(Mutex::new(device)));
        let Ok(ApiReply::Balloon(b)) = ask(&mut h, ApiAction::GetBalloon) else {
            panic!("no balloon status");
        };
        assert_eq!(
            (
                b.target_bytes,
                b.free_page_reporting,
                b.driver_ready,
                b.stats
            ),
            (16 * MIB, true, false, None)
        );
        assert_eq!(b.counters.get("malformed_chains"), Some(&0));

        let Ok(ApiReply::Balloon(b)) =
            ask(&mut h, ApiAction::SetBalloonTarget { bytes: 100 * MIB })
        else {
            panic!("target refused");
        };
        assert_eq!(b.target_bytes, 100 * MIB);
        // 128 MiB of boot memory, nothing plugged: 128 MiB is the most.
        let above = ask(&mut h, ApiAction::SetBalloonTarget { bytes: 130 * MIB }).unwrap_err();
        assert_eq!(above.status, 400);
        assert!(
            above.message.contains("above the guest's 134217728 bytes"),
            "{above:?}"
        );
        let odd = ask(&mut h, ApiAction::SetBalloonTarget { bytes: 5 }).unwrap_err();
        assert_eq!(odd.status, 400);
        assert_eq!(h.balloon_status().unwrap().target_bytes, 100 * MIB);
        assert!(h
            .metrics()
            .contains("\nmempower_balloon_target_bytes 104857600\n"));
    }
}
