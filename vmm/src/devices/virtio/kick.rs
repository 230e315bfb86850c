//! The event-loop subscriber of a one-queue device whose work runs when the guest kicks
//! its queue (the queue's ioeventfd): virtio-mem's and virtio-blk's.

use std::sync::{Arc, Mutex};

use crate::sync::Locked;
use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

/// How a round of a queue ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Round {
    /// Nothing pending: the next round starts when the guest kicks.
    Done,
    /// The round's budget ran out with requests pending, and the guest will not kick
    /// for them: the handler comes back once the loop has served its other sources.
    More,
}

/// A device that serves its request queue, on the event-loop thread.
pub trait ServeQueue: Send {
    /// Serves every pending request; a kick before activation serves nothing.
    fn serve_queue(&mut self);

    /// Serves one round: what a round may do is the device's to bound.
    fn serve_round(&mut self) -> Round {
        self.serve_queue();
        Round::Done
    }
}

/// Serves `device`'s queue each time `kick` fires.
pub struct KickHandler<D> {
    device: Arc<Mutex<D>>,
    kick: EventFd,
}

impl<D: ServeQueue> KickHandler<D> {
    pub fn new(device: Arc<Mutex<D>>, kick: EventFd) -> Self {
        KickHandler { device, kick }
    }
}

impl<D: ServeQueue> MutEventSubscriber for KickHandler<D> {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.kick.read();
        let round = self.device.locked().serve_round();
        if round == Round::More {
            // Kicks itself: epoll reports the eventfd again on the loop's next turn,
            // after the sources ready now (the API among them) were served.
            if let Err(e) = self.kick.write(1) {
                // Cannot happen short of 2^64 - 2 pending kicks; the guest's next kick
                // resumes the queue anyway.
                log::warn!("queue kick: cannot come back for pending requests: {e}");
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        ops.add(Events::new(&self.kick, EventSet::IN))
            .expect("a fresh eventfd can always join the epoll set");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use event_manager::{EventManager, SubscriberOps};

    /// Serves `pending` requests, at most `per_round` a round.
    struct Backlog {
        pending: u32,
        per_round: u32,
        rounds: u32,
    }

    impl ServeQueue for Backlog {
        fn serve_queue(&mut self) {
            self.pending = 0;
        }

        fn serve_round(&mut self) -> Round {
            self.rounds += 1;
            self.pending = self.pending.saturating_sub(self.per_round);
            if self.pending > 0 {
                Round::More
            } else {
                Round::Done
            }
        }
    }

    /// A busy queue is served a round per loop turn, and other sources between rounds.
    #[test]
    fn a_round_that_ran_out_of_budget_comes_back_after_other_sources() {
        let device = Arc::new(Mutex::new(Backlog {
            pending: 10,
            per_round: 4,
            rounds: 0,
        }));
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let guest_kick = kick.try_clone().unwrap();
        let mut events: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
            EventManager::new().unwrap();
        events.add_subscriber(Arc::new(Mutex::new(KickHandler::new(device.clone(), kick))));
        guest_kick.write(1).unwrap();
        let rounds = |d: &Arc<Mutex<Backlog>>| d.lock().unwrap().rounds;
        // One turn, one round: the loop gets back to its other sources in between.
        assert_eq!(events.run_with_timeout(1000).unwrap(), 1);
        assert_eq!(rounds(&device), 1);
        assert_eq!(
            events.run_with_timeout(1000).unwrap(),
            1,
            "it kicked itself"
        );
        assert_eq!(events.run_with_timeout(1000).unwrap(), 1);
        assert_eq!((rounds(&device), device.lock().unwrap().pending), (3, 0));
        // Done: nothing more until the guest kicks.
        assert_eq!(events.run_with_timeout(0).unwrap(), 0);
    }
}
