//! The event-loop subscriber of the vsock device: queue kicks, the muxer's control
//! eventfd (connector requests, resets, activation), its timer, the hybrid listener, and
//! every host stream, which it adds to and removes from the epoll set as the muxer asks.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::device::VsockDevice;
use super::muxer::FdUpdate;
use super::TX_QUEUE;
use crate::sync::Locked;

/// Serves a [`VsockDevice`] on the VMM's event loop.
pub struct VsockEventHandler {
    device: Arc<Mutex<VsockDevice>>,
    queue_events: Vec<EventFd>,
    control: Arc<EventFd>,
    timer_fd: RawFd,
    listener_fd: Option<RawFd>,
    /// A failing epoll operation is reported once.
    reported_error: bool,
}

impl VsockEventHandler {
    /// `queue_events`: the transport's per-queue notification eventfds
    /// ([`MmioTransport::queue_events`](crate::devices::virtio::mmio::MmioTransport::queue_events)).
    pub fn new(device: Arc<Mutex<VsockDevice>>, queue_events: Vec<EventFd>) -> Self {
        let (control, timer_fd, listener_fd) = {
            let mut dev = device.locked();
            let muxer = dev.muxer();
            (muxer.control_event(), muxer.timer_fd(), muxer.listener_fd())
        };
        VsockEventHandler {
            device,
            queue_events,
            control,
            timer_fd,
            listener_fd,
            reported_error: false,
        }
    }

    fn report(&mut self, what: &str, e: event_manager::Error) {
        if !std::mem::replace(&mut self.reported_error, true) {
            log::error!("virtio-vsock: {what}: {e:?}");
        } else {
            log::debug!("virtio-vsock: {what}: {e:?}");
        }
    }

    fn apply(&mut self, ops: &mut EventOps, updates: Vec<FdUpdate>) {
        for update in updates {
            match update {
                FdUpdate::Add(fd, set) => {
                    if let Err(e) = ops.add(Events::new_raw(fd, set)) {
                        self.report("cannot watch a host stream", e);
                    }
                }
                FdUpdate::Modify(fd, set) => {
                    if let Err(e) = ops.modify(Events::new_raw(fd, set)) {
                        self.report("cannot change what is watched on a host stream", e);
                    }
                }
                // The fd may be out of the set already (detached): nothing to report.
                FdUpdate::Remove(stream) => {
                    let _ = ops.remove(Events::empty(&stream));
                    drop(stream);
                }
                FdUpdate::Detach(fd) => {
                    let _ = ops.remove(Events::empty_raw(fd));
                }
            }
        }
    }
}

impl MutEventSubscriber for VsockEventHandler {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        let now = Instant::now();
        let updates = {
            let mut dev = self.device.locked();
            if let Some(q) = self.queue_events.iter().position(|e| e.as_raw_fd() == fd) {
                let _ = self.queue_events[q].read();
                if q == TX_QUEUE {
                    dev.process_tx(now);
                }
                // rx: fresh buffers, served below; event queue: never used.
            } else if fd == self.control.as_raw_fd() {
                let _ = self.control.read();
                dev.muxer().accept_host_connects(now);
            } else if fd == self.timer_fd {
                dev.muxer().handle_timer(now);
            } else if Some(fd) == self.listener_fd {
                dev.muxer().accept_hybrid(now);
            } else {
                dev.muxer().handle_fd(fd, events.event_set(), now);
            }
            dev.process_rx(now);
            dev.muxer().sweep(now);
            dev.muxer().take_updates()
        };
        self.apply(ops, updates);
    }

    fn init(&mut self, ops: &mut EventOps) {
        let mut fds: Vec<RawFd> = self.queue_events.iter().map(|e| e.as_raw_fd()).collect();
        fds.push(self.control.as_raw_fd());
        fds.push(self.timer_fd);
        fds.extend(self.listener_fd);
        for fd in fds {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                self.report("cannot join the event loop", e);
            }
        }
        // Updates queued before the loop ran (a reset, or host connections).
        let updates = self.device.locked().muxer().take_updates();
        self.apply(ops, updates);
    }
}
