//! The compaction policy: release N bytes of host memory from a node by evacuating
//! the regions that give back the most host memory for the least guest migration.
//!
//! A region's gain is its host-resident bytes (memfd data); its cost is the bytes the
//! guest uses in it (agent `block_usage`), which offlining must migrate. Regions are
//! taken in order of cost per byte gained, so memory that is resident on the host but
//! free in the guest (freed page cache, freed heap) goes first; untouched regions give
//! nothing back and are never chosen. The peers (lowering requested_size alone) let the
//! guest take its highest blocks instead, whatever they hold.

use std::cmp::Ordering;
use std::time::Duration;

use mempower_api::CompactionCandidate;

use super::node::{guest_in_use, AgentCall, Geometry, NodeError, NodeMemory};

/// Why a compaction could not be planned; its text is the job's `error`.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("compaction needs the guest's block usage: {0}")]
    Usage(NodeError),
    #[error(transparent)]
    Resident(NodeError),
    #[error(transparent)]
    Geometry(NodeError),
}

/// A region holding less host memory than this gives nothing worth removing guest
/// memory for (an untouched region still holds a few pages of kernel metadata).
pub const MIN_GAIN: u64 = 2 << 20;

/// Orders `candidates` best first and marks those chosen to release `release_bytes`:
/// the fewest, in ranking order, whose resident bytes add up to it (or all that give
/// back at least [`MIN_GAIN`], if together they hold less).
pub fn rank(
    mut candidates: Vec<CompactionCandidate>,
    release_bytes: u64,
) -> Vec<CompactionCandidate> {
    candidates.sort_by(better_first);
    let mut gained = 0u64;
    for c in &mut candidates {
        c.chosen = gained < release_bytes && c.resident_bytes >= MIN_GAIN;
        if c.chosen {
            gained += c.resident_bytes;
        }
    }
    candidates
}

/// Lower cost per byte gained first (`in_use / resident`, compared without division),
/// then more gained, then the lower region. Regions that give nothing come last.
fn better_first(a: &CompactionCandidate, b: &CompactionCandidate) -> Ordering {
    match (a.resident_bytes, b.resident_bytes) {
        (0, 0) => a.region.cmp(&b.region),
        (0, _) => Ordering::Greater,
        (_, 0) => Ordering::Less,
        (ra, rb) => {
            let cost_a = u128::from(a.in_use_bytes) * u128::from(rb);
            let cost_b = u128::from(b.in_use_bytes) * u128::from(ra);
            cost_a
                .cmp(&cost_b)
                .then(rb.cmp(&ra))
                .then(a.region.cmp(&b.region))
        }
    }
}

/// What a plan is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Goal {
    /// Release this much host memory (a user's compaction).
    Release(u64),
    /// Remove this many regions from the guest (the autopilot's shrink).
    Regions(usize),
}

/// Orders `candidates` for removal and marks the first `count`, by what a removal is
/// worth: the host memory it gives back less twice the guest data it migrates (moving a
/// page reads and writes it), the lower region first on a tie. Unlike [`rank`],
/// untouched regions are candidates too: the node is made smaller, whatever its regions
/// hold on the host, and an untouched region (worth 0) goes before one whose data would
/// cost more to move than its memory is worth.
pub fn rank_for_size(
    mut candidates: Vec<CompactionCandidate>,
    count: usize,
) -> Vec<CompactionCandidate> {
    let worth =
        |c: &CompactionCandidate| i128::from(c.resident_bytes) - 2 * i128::from(c.in_use_bytes);
    candidates.sort_by(|a, b| worth(b).cmp(&worth(a)).then(a.region.cmp(&b.region)));
    for (i, c) in candidates.iter_mut().enumerate() {
        c.chosen = i < count;
    }
    candidates
}

/// Measures every fully plugged region of `eligible` (regions of `g`) and ranks them
/// for `goal`.
pub fn plan(
    memory: &dyn NodeMemory,
    g: &Geometry,
    agent: &dyn AgentCall,
    eligible: &[u32],
    goal: Goal,
    timeout: Duration,
) -> Result<Vec<CompactionCandidate>, PlanError> {
    let blocks: Vec<u32> = eligible.iter().flat_map(|r| g.memory_blocks(*r)).collect();
    let in_use = guest_in_use(agent, blocks, timeout).map_err(PlanError::Usage)?;
    let mut candidates = Vec::new();
    for &region in eligible {
        // A block the agent did not report is not online: its region is no candidate.
        // The guest is untrusted: absurd counts saturate, they never overflow.
        let Some(in_use_bytes) = g.memory_blocks(region).try_fold(0u64, |sum, b| {
            in_use.get(&b).map(|u| sum.saturating_add(*u))
        }) else {
            continue;
        };
        candidates.push(CompactionCandidate {
            region,
            resident_bytes: memory.resident_bytes(region).map_err(PlanError::Resident)?,
            in_use_bytes,
            chosen: false,
        });
    }
    Ok(match goal {
        Goal::Release(bytes) => rank(candidates, bytes),
        Goal::Regions(count) => rank_for_size(candidates, count),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn c(region: u32, resident_mib: u64, in_use_mib: u64) -> CompactionCandidate {
        CompactionCandidate {
            region,
            resident_bytes: resident_mib * MIB,
            in_use_bytes: in_use_mib * MIB,
            chosen: false,
        }
    }

    fn chosen(plan: &[CompactionCandidate]) -> Vec<u32> {
        plan.iter().filter(|c| c.chosen).map(|c| c.region).collect()
    }

    #[test]
    fn a_size_goal_takes_the_least_used_regions_untouched_ones_too() {
        // Region 3 untouched, 1 free but resident, 2 a little used, 0 mostly used.
        let all = vec![c(0, 128, 100), c(1, 128, 1), c(2, 128, 20), c(3, 0, 0)];
        assert_eq!(chosen(&rank_for_size(all.clone(), 1)), [1]);
        assert_eq!(chosen(&rank_for_size(all.clone(), 2)), [1, 2]);
        assert_eq!(
            chosen(&rank_for_size(all.clone(), 3)),
            [1, 2, 3],
            "untouched before 100 MiB to move"
        );
        assert_eq!(chosen(&rank_for_size(all.clone(), 9)), [1, 2, 3, 0]);
        assert!(chosen(&rank_for_size(all, 0)).is_empty());
        // Equal worth: the lower region.
        let tie = vec![c(2, 0, 0), c(1, 0, 0), c(0, 64, 32)];
        assert_eq!(chosen(&rank_for_size(tie, 2)), [0, 1]);
    }

    #[test]
    fn resident_but_free_regions_go_first_untouched_never() {
        let plan = rank(
            vec![
                c(0, 128, 120), // full: costs a migration for its release
                c(1, 128, 0),   // written then freed: the best
                c(2, 0, 0),     // untouched: gives nothing
                c(3, 96, 10),
            ],
            200 * MIB,
        );
        assert_eq!(
            plan.iter().map(|c| c.region).collect::<Vec<_>>(),
            [1, 3, 0, 2]
        );
        assert_eq!(chosen(&plan), [1, 3]);
        assert_eq!(chosen(&rank(plan.clone(), 1)), [1], "one region is enough");
        assert_eq!(
            chosen(&rank(plan.clone(), 10_000 * MIB)),
            [1, 3, 0],
            "never region 2"
        );
    }

    #[test]
    fn ties_prefer_the_bigger_gain_then_the_lower_region() {
        let plan = rank(vec![c(5, 64, 0), c(4, 64, 0), c(6, 128, 0)], 128 * MIB);
        assert_eq!(plan.iter().map(|c| c.region).collect::<Vec<_>>(), [6, 4, 5]);
        assert_eq!(chosen(&plan), [6]);
        // Same cost per byte: 64 in use for 128 resident is 32 for 64.
        let plan = rank(vec![c(1, 64, 32), c(2, 128, 64)], 1);
        assert_eq!(chosen(&plan), [2]);
    }

    /// Free page reporting already gave back the free memory of some regions: what
    /// stays resident there is about what the guest uses, so evacuating them migrates
    /// nearly all they would give back. They rank after every region whose free memory
    /// is still resident, and a region reported down to crumbs is never chosen.
    #[test]
    fn regions_whose_free_memory_was_reported_rank_low() {
        let plan = rank(
            vec![
                c(0, 128, 120), // full
                c(1, 128, 8),   // written then freed, nothing reported: the best
                c(2, 60, 58),   // half used, the free half reported
                c(3, 10, 8),    // mostly free, reported: 10 MiB back for 8 migrated
                c(4, 1, 0),     // all free, reported: crumbs
                c(5, 96, 40),   // freed memory still resident
            ],
            160 * MIB,
        );
        // Crumbs cost nothing per byte, so they sort first, but are never chosen.
        let order: Vec<u32> = plan
            .iter()
            .filter(|c| c.resident_bytes >= MIN_GAIN)
            .map(|c| c.region)
            .collect();
        assert_eq!(order, [1, 5, 3, 0, 2]);
        assert_eq!(chosen(&plan), [1, 5], "the resident free memory suffices");
        // Asked for everything: the reported regions come last, crumbs never.
        assert_eq!(chosen(&rank(plan, 10_000 * MIB)), [1, 5, 3, 0, 2]);
    }

    #[test]
    fn ranking_8192_regions() {
        // Region r holds (r % 128) MiB and the guest uses (r % 7) MiB of it.
        let all: Vec<CompactionCandidate> = (0..8192)
            .map(|r| c(r, u64::from(r % 128), u64::from(r % 7)))
            .collect();
        let t = std::time::Instant::now();
        let plan = rank(all, 1000 * MIB);
        let took = t.elapsed();
        assert_eq!(plan.len(), 8192);
        // Free and resident first: r % 7 == 0 with the most resident (r % 128 == 127).
        assert_eq!(plan[0].in_use_bytes, 0);
        assert_eq!(plan[0].resident_bytes, 127 * MIB);
        let gained: u64 = plan
            .iter()
            .filter(|c| c.chosen)
            .map(|c| c.resident_bytes)
            .sum();
        assert!(
            (1000 * MIB..1000 * MIB + 127 * MIB).contains(&gained),
            "{gained}"
        );
        assert!(plan
            .windows(2)
            .all(|w| better_first(&w[0], &w[1]) != Ordering::Greater));
        assert!(took < std::time::Duration::from_secs(2), "{took:?}");
    }

    #[test]
    fn nothing_resident_chooses_nothing() {
        assert!(chosen(&rank(vec![c(0, 0, 0), c(1, 0, 5)], MIB)).is_empty());
        let crumbs = CompactionCandidate {
            region: 2,
            resident_bytes: 300 << 10,
            in_use_bytes: 300 << 10,
            chosen: false,
        };
        assert_eq!(
            chosen(&rank(vec![crumbs, c(3, 128, 0)], 200 * MIB)),
            [3],
            "a few hundred KiB of kernel metadata is not worth a region"
        );
        assert!(rank(vec![], MIB).is_empty());
    }
}
