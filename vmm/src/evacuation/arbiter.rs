//! The one owner of a node's `requested_size`. User resizes (`PUT
//! /nodes/{id}/requested-size`), `plug` and evacuations (named or chosen by compaction)
//! all go through the node's [`Arbiter`]; nothing else writes the device's requested
//! size, so no read-modify-write can lose another's change.
//!
//! # Semantics
//! * The **user's target** `T` is one number: the size the user asked for. A resize
//!   sets it; `plug` raises it by what the region lacks.
//! * An evacuation in flight holds a **claim**: the plugged bytes `b` of the regions it
//!   removes, and a **ceiling**, `min(R, P) - b` when it was taken (`R` the requested
//!   size then, `P` the plugged size), below which the guest must go for the regions to
//!   be unplugged.
//! * The device's requested size is `R = min(T - sum of claims, every ceiling)`, at
//!   least 0. While a claim is held, a user raise waits (the ceiling holds), a user
//!   lowering takes effect at once.
//! * An evacuation removes its regions' bytes from whatever `T` is *now*: when it
//!   succeeds, the claim becomes a lowered target, `T -= released` (so a later user
//!   resize is not silently undone, and a released region stays released).
//! * A failure restores only what the evacuation itself took: its claim goes, `T` stays
//!   as the user last set it, and so a newer user value is never overwritten.
//! * A claim dropped without being settled (a panic) is a failure that released nothing.

use std::sync::{Arc, Mutex, MutexGuard};

use super::node::{NodeError, NodeMemory};
use crate::sync::Locked;

#[derive(Clone)]
struct Held {
    id: u64,
    bytes: u64,
    ceiling: u64,
}

struct State {
    target: u64,
    claims: Vec<Held>,
    next_id: u64,
}

impl State {
    fn requested(&self) -> u64 {
        let claimed: u64 = self.claims.iter().map(|c| c.bytes).sum();
        self.claims
            .iter()
            .map(|c| c.ceiling)
            .fold(self.target.saturating_sub(claimed), u64::min)
    }
}

/// A node's requested size, as the user's target and the evacuations' claims make it.
pub struct Arbiter {
    memory: Arc<dyn NodeMemory>,
    state: Mutex<State>,
}

/// An evacuation's hold on bytes it removes: [`Claim::settle`] it, or dropping it
/// gives them back.
pub struct Claim<'a> {
    arbiter: &'a Arbiter,
    id: u64,
    bytes: u64,
    settled: bool,
}

impl Arbiter {
    /// Takes the device's requested size now as the user's target.
    pub fn new(memory: Arc<dyn NodeMemory>) -> Self {
        let target = memory.snapshot().requested_bytes;
        Arbiter {
            memory,
            state: Mutex::new(State {
                target,
                claims: Vec::new(),
                next_id: 1,
            }),
        }
    }

    pub fn memory(&self) -> &Arc<dyn NodeMemory> {
        &self.memory
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.locked()
    }

    /// The user's target.
    pub fn target(&self) -> u64 {
        self.lock().target
    }

    /// Applies `change` to the state and the result to the device, or neither.
    fn change(&self, change: impl FnOnce(&mut State)) -> Result<u64, NodeError> {
        let mut state = self.lock();
        let mut next = State {
            target: state.target,
            claims: state.claims.clone(),
            next_id: state.next_id,
        };
        change(&mut next);
        let requested = next.requested();
        self.memory.set_requested_size(requested)?;
        *state = next;
        Ok(requested)
    }

    /// Checks a size the user asks for as the device would: the same errors.
    fn check(&self, bytes: u64) -> Result<(), NodeError> {
        let g = self.memory.geometry().device;
        if bytes % g.block_size() != 0 {
            return Err(virtio_mem::Error::RequestedSizeNotAligned {
                requested: bytes,
                block_size: g.block_size(),
            }
            .into());
        }
        if bytes > g.region_size() {
            return Err(virtio_mem::Error::RequestedSizeTooLarge {
                requested: bytes,
                region_size: g.region_size(),
            }
            .into());
        }
        Ok(())
    }

    /// The user's resize: `bytes` is the new target. Answers the requested size.
    pub fn set_target(&self, bytes: u64) -> Result<u64, NodeError> {
        self.check(bytes)?;
        self.change(|s| s.target = bytes)
    }

    /// `plug`: the target rises by `bytes`.
    pub fn raise_target(&self, bytes: u64) -> Result<u64, NodeError> {
        let target = self.target().saturating_add(bytes);
        self.check(target)?;
        self.change(|s| s.target = s.target.saturating_add(bytes))
    }

    /// An evacuation takes `bytes` (plugged bytes of its regions): the requested size
    /// goes below the plugged size by that much, so that the guest unplugs them.
    pub fn claim(&self, bytes: u64) -> Result<Claim<'_>, NodeError> {
        let mut id = 0;
        let plugged = self.memory.snapshot().plugged_bytes;
        self.change(|s| {
            id = s.next_id;
            s.next_id += 1;
            let ceiling = s.requested().min(plugged).saturating_sub(bytes);
            s.claims.push(Held { id, bytes, ceiling });
        })?;
        Ok(Claim {
            arbiter: self,
            id,
            bytes,
            settled: false,
        })
    }

    /// Ends a claim. The state changes even if the device refuses the new size (it
    /// cannot: the size only rises to a valid target), so that no claim outlives its
    /// evacuation; the next change applies it.
    fn end_claim(&self, id: u64, released: u64) -> Result<u64, NodeError> {
        let mut state = self.lock();
        state.claims.retain(|c| c.id != id);
        state.target = state.target.saturating_sub(released);
        let requested = state.requested();
        self.memory.set_requested_size(requested)?;
        Ok(requested)
    }
}

impl Claim<'_> {
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Ends the claim: `released` bytes (at most the claim's) are gone for good and
    /// lower the user's target; the rest goes back. Answers the requested size now.
    pub fn settle(mut self, released: u64) -> Result<u64, NodeError> {
        self.settled = true;
        self.arbiter.end_claim(self.id, released.min(self.bytes))
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if !self.settled {
            if let Err(e) = self.arbiter.end_claim(self.id, 0) {
                log::error!("cannot give back an abandoned claim: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evacuation::test_guest::{SimGuest, MIB};

    fn arbiter(guest: &SimGuest) -> Arbiter {
        Arbiter::new(Arc::new(guest.clone()))
    }

    #[test]
    fn a_claim_lowers_the_size_and_success_lowers_the_target() {
        let guest = SimGuest::new(); // 512 MiB plugged and requested
        let a = arbiter(&guest);
        let claim = a.claim(128 * MIB).unwrap();
        assert_eq!(guest.snapshot().requested_bytes, 384 * MIB);
        assert_eq!(a.target(), 512 * MIB, "the user's number is untouched");
        assert_eq!(claim.settle(128 * MIB).unwrap(), 384 * MIB);
        assert_eq!(a.target(), 384 * MIB, "a released region stays released");
    }

    #[test]
    fn a_failure_gives_back_only_its_claim() {
        let guest = SimGuest::new();
        let a = arbiter(&guest);
        let claim = a.claim(256 * MIB).unwrap();
        assert_eq!(claim.settle(0).unwrap(), 512 * MIB);
        let dropped = a.claim(128 * MIB).unwrap();
        drop(dropped);
        assert_eq!(guest.snapshot().requested_bytes, 512 * MIB);
        assert_eq!(a.target(), 512 * MIB);
    }

    #[test]
    fn a_resize_during_the_unplug_wait_is_kept() {
        // Lowered during the wait: it applies at once, and the evacuation's bytes come
        // off the new value when it succeeds.
        let guest = SimGuest::new();
        let a = arbiter(&guest);
        let claim = a.claim(128 * MIB).unwrap();
        assert_eq!(a.set_target(256 * MIB).unwrap(), 128 * MIB);
        assert_eq!(claim.settle(128 * MIB).unwrap(), 128 * MIB);
        assert_eq!(a.target(), 128 * MIB);
        // Raised during the wait: the ceiling holds until the claim ends, so that the
        // guest still has to unplug; then the raise applies, minus what went.
        let guest = SimGuest::new();
        let a = arbiter(&guest);
        a.set_target(384 * MIB).unwrap();
        assert_eq!(guest.snapshot().plugged_bytes, 384 * MIB);
        let claim = a.claim(128 * MIB).unwrap();
        assert_eq!(guest.snapshot().requested_bytes, 256 * MIB);
        assert_eq!(
            a.set_target(512 * MIB).unwrap(),
            256 * MIB,
            "held at the ceiling"
        );
        assert_eq!(claim.settle(128 * MIB).unwrap(), 384 * MIB);
        assert_eq!(a.target(), 384 * MIB);
    }

    #[test]
    fn an_evacuation_failing_after_a_user_resize_never_overwrites_it() {
        let guest = SimGuest::new();
        let a = arbiter(&guest);
        let claim = a.claim(128 * MIB).unwrap();
        a.set_target(256 * MIB).unwrap();
        assert_eq!(
            claim.settle(0).unwrap(),
            256 * MIB,
            "the user's value, not 512"
        );
        assert_eq!(a.target(), 256 * MIB);
    }

    #[test]
    fn a_plug_raises_the_target_and_waits_for_a_claim_to_end() {
        let guest = SimGuest::new();
        let a = arbiter(&guest);
        a.set_target(256 * MIB).unwrap();
        let claim = a.claim(128 * MIB).unwrap(); // ceiling 128 MiB
        assert_eq!(a.raise_target(128 * MIB).unwrap(), 128 * MIB);
        assert_eq!(a.target(), 384 * MIB);
        assert_eq!(claim.settle(128 * MIB).unwrap(), 256 * MIB);
        let too_much = a.raise_target(512 * MIB).unwrap_err();
        assert!(
            too_much.to_string().contains("exceeds the region size"),
            "{too_much}"
        );
        assert_eq!(a.target(), 256 * MIB, "a refused plug changes nothing");
    }

    #[test]
    fn user_sizes_are_checked_as_the_device_checks_them() {
        let guest = SimGuest::new();
        let a = arbiter(&guest);
        for bad in [3 * MIB, 1024 * MIB] {
            assert!(a.set_target(bad).is_err(), "{bad}");
        }
        assert_eq!(
            a.set_target(3 * MIB).unwrap_err().to_string(),
            "requested size 0x300000 is not a multiple of the block size 0x200000"
        );
        assert_eq!(a.target(), 512 * MIB);
    }

    #[test]
    fn the_target_above_what_is_plugged_does_not_stop_an_unplug() {
        // The guest plugged 256 MiB of the 512 MiB asked for: the ceiling is taken from
        // what is plugged, so the guest must still unplug the region.
        let guest = SimGuest::new();
        guest.st().driver_stuck = true;
        let a = arbiter(&guest);
        a.set_target(256 * MIB).unwrap();
        guest.st().driver_stuck = false;
        guest.drive();
        guest.st().driver_stuck = true;
        a.set_target(512 * MIB).unwrap(); // the driver does not follow
        assert_eq!(guest.snapshot().plugged_bytes, 256 * MIB);
        let claim = a.claim(128 * MIB).unwrap();
        assert_eq!(guest.snapshot().requested_bytes, 128 * MIB);
        claim.settle(128 * MIB).unwrap();
        assert_eq!(a.target(), 384 * MIB, "the user's 512 MiB less the region");
    }
}
