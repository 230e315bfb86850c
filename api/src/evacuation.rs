//! The JSON documents of evacuations: request bodies, jobs and their results.

use serde::{Deserialize, Serialize};

use crate::types::RegionState;

/// Which regions `GET /api/v1/nodes/{id}/regions` lists, from its query:
/// `state=<state>` keeps the regions in that state, then `offset=N` skips N of them
/// and `limit=N` keeps at most N. Without a query, every region.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionQuery {
    pub state: Option<RegionState>,
    pub offset: u32,
    pub limit: Option<u32>,
}

impl RegionQuery {
    /// Parses a query such as `state=plugged&offset=100&limit=50`. Unknown or repeated
    /// parameters and bad values are refused, with the reason.
    pub fn parse(query: &str) -> Result<Self, String> {
        let mut q = RegionQuery::default();
        let mut seen = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            if seen.contains(&key) {
                return Err(format!("'{key}' is given twice"));
            }
            let number = || {
                value
                    .parse::<u32>()
                    .map_err(|_| format!("{key} must be a number, not '{value}'"))
            };
            match key {
                "state" => q.state = Some(value.parse().map_err(|e| format!("state {e}"))?),
                "offset" => q.offset = number()?,
                "limit" => q.limit = Some(number()?),
                other => {
                    return Err(format!(
                        "unknown parameter '{other}' (expected state, offset, limit)"
                    ))
                }
            }
            seen.push(key);
        }
        Ok(q)
    }

    /// The query that [`RegionQuery::parse`] reads back as `self` (empty for all).
    pub fn to_query_string(&self) -> String {
        let mut parts = Vec::new();
        if let Some(state) = self.state {
            parts.push(format!("state={state}"));
        }
        if self.offset != 0 {
            parts.push(format!("offset={}", self.offset));
        }
        if let Some(limit) = self.limit {
            parts.push(format!("limit={limit}"));
        }
        parts.join("&")
    }
}

/// The most regions an evacuation may name: a node has at most 1 TiB of hotplug memory
/// in regions of at least 128 MiB. The VMM refuses a list longer than its node has.
pub const MAX_EVACUATION_REGIONS: usize = 8192;

/// The body of `POST /api/v1/nodes/{id}/evacuations`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvacuationRequest {
    /// Region numbers (`index` in the region list), at least one, at most
    /// [`MAX_EVACUATION_REGIONS`].
    #[serde(deserialize_with = "bounded_regions")]
    pub regions: Vec<u32>,
    /// Let the regions' data go to other nodes when their node has no room for it;
    /// otherwise such a job is refused before anything is evacuated.
    #[serde(default)]
    pub allow_other_nodes: bool,
}

/// A region list that stops at [`MAX_EVACUATION_REGIONS`]: a client's list grows no
/// further than that, whatever it sends.
fn bounded_regions<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u32>, D::Error> {
    struct Bounded;
    impl<'de> serde::de::Visitor<'de> for Bounded {
        type Value = Vec<u32>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(
                f,
                "a list of at most {MAX_EVACUATION_REGIONS} region numbers"
            )
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u32>, A::Error> {
            let mut regions = Vec::new();
            while let Some(region) = seq.next_element()? {
                if regions.len() == MAX_EVACUATION_REGIONS {
                    return Err(serde::de::Error::custom(format_args!(
                        "more than {MAX_EVACUATION_REGIONS} regions"
                    )));
                }
                regions.push(region);
            }
            Ok(regions)
        }
    }
    d.deserialize_seq(Bounded)
}

/// The body of `POST /api/v1/nodes/{id}/compact`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompactRequest {
    /// Host memory to give back, bytes (more than 0).
    pub release_bytes: u64,
    /// As in [`EvacuationRequest`].
    #[serde(default)]
    pub allow_other_nodes: bool,
}

/// The 202 answer to a request that started a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobAccepted {
    pub job: u64,
    /// Where to follow it: `/api/v1/evacuations/{job}`.
    pub href: String,
}

impl JobAccepted {
    pub fn new(job: u64) -> Self {
        JobAccepted {
            job,
            href: format!("/api/v1/evacuations/{job}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// Regions named by the client.
    Evacuate,
    /// Regions chosen by the compaction policy.
    Compact,
    /// A number of regions chosen by the compaction policy to make the node smaller:
    /// the autopilot's, untouched regions included.
    Shrink,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Checking that the node has room for what its regions hold (and, for a
    /// compaction, ranking the node's regions first).
    Planning,
    /// Waiting for the node's worker.
    Queued,
    /// The worker is evacuating one of its regions.
    Running,
    /// Every region has a result (or planning failed: see `error`).
    Done,
}

/// One evacuation job, as `GET /api/v1/evacuations/{job}` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub id: u64,
    pub node: u32,
    pub kind: JobKind,
    pub state: JobState,
    /// The regions to evacuate, in the order they were asked for or ranked.
    pub regions: Vec<u32>,
    /// One result per region that finished.
    pub results: Vec<RegionResult>,
    /// For a compaction: the bytes asked for, and the ranking it used.
    pub release_bytes: Option<u64>,
    pub plan: Vec<CompactionCandidate>,
    /// Why the job could not run at all (e.g. a compaction with nothing to release, or
    /// a node without room for what its regions hold).
    pub error: Option<String>,
    /// Whether the regions' data may go to other nodes when the node has no room.
    #[serde(default)]
    pub allow_other_nodes: bool,
    /// Sums over `results`.
    pub released_bytes: u64,
    pub unplugged_bytes: u64,
    pub migrated_bytes: u64,
    #[serde(default)]
    pub migrated_on_node_bytes: u64,
    #[serde(default)]
    pub migrated_off_node_bytes: u64,
    #[serde(default)]
    pub moved_back_bytes: u64,
    /// From creation to the last result (or until now), milliseconds.
    pub elapsed_ms: u64,
    /// Sums of the results' phase times.
    #[serde(default)]
    pub phases: PhaseTimes,
}

/// Where an evacuation's time went, milliseconds. The guest unplugs a pass's regions
/// together, so a pass's unplug wait and host release are shared equally by the regions
/// it unplugged: summed over a job's results, the phases are the job's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseTimes {
    /// Offlining the region's memory blocks: the guest kernel migrates their pages.
    pub offline_ms: u64,
    /// From lowering the requested size until the guest's driver had unplugged the
    /// blocks, less the host's release work meanwhile.
    pub unplug_ms: u64,
    /// Host work giving the memory back: the memfd hole punch and memory-slot removal
    /// as the guest unplugs, then the check that the region holds nothing.
    pub release_ms: u64,
}

impl PhaseTimes {
    /// All three.
    pub fn total_ms(&self) -> u64 {
        self.offline_ms + self.unplug_ms + self.release_ms
    }

    /// Phase by phase sum.
    pub fn add(&mut self, other: &PhaseTimes) {
        self.offline_ms += other.offline_ms;
        self.unplug_ms += other.unplug_ms;
        self.release_ms += other.release_ms;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RegionOutcome {
    /// Unplugged by the guest, host memory discarded.
    Released,
    /// Still plugged and online in the guest; nothing was discarded.
    Failed,
}

/// What evacuating one region did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionResult {
    pub region: u32,
    /// The guest's memory block (`memoryN`).
    pub memory_block: u32,
    pub outcome: RegionOutcome,
    /// Why it failed, in the guest kernel's or the VMM's words.
    pub reason: Option<String>,
    /// Something the client should know about a success (e.g. the guest unplugged
    /// other blocks too).
    pub warning: Option<String>,
    /// Guest memory removed from the region (device bitmap).
    pub unplugged_bytes: u64,
    /// Host memory the region held before, minus what it holds after (memfd).
    pub released_bytes: u64,
    /// Bytes the guest had in use in the region and migrated out of it to offline it
    /// (the region's own, measured by the agent before offlining), if known.
    pub migrated_bytes: Option<u64>,
    /// Of those, bytes now on the region's node, and on other nodes: pages some process
    /// maps, which the agent follows. The rest (page cache no process maps, movable
    /// kernel pages) cannot be followed and is counted in neither.
    #[serde(default)]
    pub migrated_on_node_bytes: Option<u64>,
    #[serde(default)]
    pub migrated_off_node_bytes: Option<u64>,
    /// Bytes migrated a second time, back to the node, after a guest kernel without the
    /// node-local offlining patch had moved them to other nodes.
    #[serde(default)]
    pub moved_back_bytes: Option<u64>,
    pub duration_ms: u64,
    #[serde(default)]
    pub phases: PhaseTimes,
    /// Memory blocks of the region that a failed evacuation may have left offline: the
    /// agent did not confirm them online again (e.g. it did not reconnect in time). The
    /// guest may not use them until the node's next pass puts them back. Empty otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub offline_blocks: Vec<u32>,
}

impl RegionResult {
    /// The result of a region not evacuated yet: failed, nothing done, nothing known.
    pub fn new(region: u32, memory_block: u32) -> Self {
        RegionResult {
            region,
            memory_block,
            outcome: RegionOutcome::Failed,
            reason: None,
            warning: None,
            unplugged_bytes: 0,
            released_bytes: 0,
            migrated_bytes: None,
            migrated_on_node_bytes: None,
            migrated_off_node_bytes: None,
            moved_back_bytes: None,
            duration_ms: 0,
            phases: PhaseTimes::default(),
            offline_blocks: Vec::new(),
        }
    }
}

/// A region as the compaction policy saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompactionCandidate {
    pub region: u32,
    /// What evacuating it gives back: host-resident bytes.
    pub resident_bytes: u64,
    /// What it costs: bytes the guest uses there, to be migrated.
    pub in_use_bytes: u64,
    /// Whether the policy picked it.
    pub chosen: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_strict() {
        let ok: EvacuationRequest = serde_json::from_str(r#"{"regions":[1,2]}"#).unwrap();
        assert_eq!(
            (ok.regions.as_slice(), ok.allow_other_nodes),
            (&[1, 2][..], false)
        );
        let ok: EvacuationRequest =
            serde_json::from_str(r#"{"regions":[1],"allow_other_nodes":true}"#).unwrap();
        assert!(ok.allow_other_nodes);
        let most = format!("{:?}", vec![0; MAX_EVACUATION_REGIONS]);
        let ok: EvacuationRequest =
            serde_json::from_str(&format!(r#"{{"regions":{most}}}"#)).unwrap();
        assert_eq!(ok.regions.len(), MAX_EVACUATION_REGIONS);
        let too_many = format!("{:?}", vec![0; 10_000]);
        let e = serde_json::from_str::<EvacuationRequest>(&format!(r#"{{"regions":{too_many}}}"#))
            .unwrap_err();
        assert!(e.to_string().starts_with("more than 8192 regions"), "{e}");
        for bad in [r#"{"regions":[-1]}"#, r#"{"regions":[1],"x":1}"#, r#"{}"#] {
            assert!(
                serde_json::from_str::<EvacuationRequest>(bad).is_err(),
                "{bad}"
            );
        }
        let c: CompactRequest = serde_json::from_str(r#"{"release_bytes":5}"#).unwrap();
        assert_eq!((c.release_bytes, c.allow_other_nodes), (5, false));
        let c: CompactRequest =
            serde_json::from_str(r#"{"release_bytes":5,"allow_other_nodes":true}"#).unwrap();
        assert!(c.allow_other_nodes);
        for bad in [
            r#"{"release_bytes":"5G"}"#,
            r#"{"release_bytes":5,"allow_other_nodes":1}"#,
        ] {
            assert!(
                serde_json::from_str::<CompactRequest>(bad).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn region_queries() {
        assert_eq!(RegionQuery::parse(""), Ok(RegionQuery::default()));
        let q = RegionQuery::parse("state=plugged&offset=10&limit=5").unwrap();
        assert_eq!(
            q,
            RegionQuery {
                state: Some(RegionState::Plugged),
                offset: 10,
                limit: Some(5)
            }
        );
        assert_eq!(RegionQuery::parse(&q.to_query_string()), Ok(q));
        assert_eq!(RegionQuery::default().to_query_string(), "");
        for (bad, why) in [
            (
                "state=gone",
                "state must be one of plugged, partial, evacuating, released, failed",
            ),
            ("limit=-1", "limit must be a number, not '-1'"),
            ("offset", "offset must be a number, not ''"),
            ("limit=1&limit=2", "'limit' is given twice"),
            (
                "page=2",
                "unknown parameter 'page' (expected state, offset, limit)",
            ),
        ] {
            let e = RegionQuery::parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn states_are_snake_case() {
        assert_eq!(
            serde_json::to_string(&JobState::Planning).unwrap(),
            "\"planning\""
        );
        assert_eq!(
            serde_json::to_string(&RegionOutcome::Released).unwrap(),
            "\"released\""
        );
        assert_eq!(JobAccepted::new(4).href, "/api/v1/evacuations/4");
    }
}
