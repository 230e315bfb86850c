//! The event-loop subscriber of a one-queue device whose work runs when the guest kicks
//! its queue (the queue's ioeventfd): virtio-mem's and virtio-blk's.

use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

/// A device that serves its request queue, on the event-loop thread.
pub trait ServeQueue: Send {
    /// Serves every pending request; a kick before activation serves nothing.
    fn serve_queue(&mut self);
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
        self.device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .serve_queue();
    }

    fn init(&mut self, ops: &mut EventOps) {
        ops.add(Events::new(&self.kick, EventSet::IN))
            .expect("a fresh eventfd can always join the epoll set");
    }
}
