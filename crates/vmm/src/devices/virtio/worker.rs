//! The thread that runs a device's queues: an epoll loop over the queues'
//! eventfds (signalled by KVM through ioeventfds when the driver notifies),
//! the back end's readiness fd and a stop eventfd.

use std::os::fd::{AsRawFd, RawFd};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::{ActivateError, Interrupt};

/// epoll token of the stop eventfd.
const STOP: u64 = u64::MAX;
/// epoll token of the back end's fd.
const BACKEND: u64 = u64::MAX - 1;

/// The part of a device that runs on its worker thread.
pub(crate) trait QueueHandler: Send + 'static {
    /// The back end's readiness fd, watched edge-triggered: after it fires,
    /// the handler must consume until the back end reports `WouldBlock`
    /// (or it has nowhere to put more).
    fn backend_fd(&self) -> Option<RawFd>;
    /// The driver notified queue `index`. Returns whether to interrupt it.
    fn queue_notified(&mut self, index: usize) -> bool;
    /// The back end's fd became ready. Returns whether to interrupt.
    fn backend_ready(&mut self) -> bool;
    /// Processes everything pending (at start, when notifications may have
    /// been missed). Returns whether to interrupt.
    fn process_all(&mut self) -> bool;
}

/// A running worker thread.
pub(crate) struct Worker<H: QueueHandler> {
    stop: EventFd,
    thread: Option<JoinHandle<Option<H>>>,
}

impl<H: QueueHandler> Worker<H> {
    /// Starts a thread named `name` running `handler`, woken by
    /// `queue_evts` and the back end's fd, interrupting through
    /// `interrupt`.
    pub(crate) fn spawn(
        name: String,
        handler: H,
        queue_evts: Vec<EventFd>,
        interrupt: Interrupt,
    ) -> Result<Self, (ActivateError, H)> {
        let setup = || -> std::io::Result<(Epoll, EventFd, EventFd)> {
            let epoll = Epoll::new()?;
            let stop = EventFd::new(libc::EFD_NONBLOCK)?;
            let stop_for_thread = stop.try_clone()?;
            epoll.ctl(
                ControlOperation::Add,
                stop.as_raw_fd(),
                EpollEvent::new(EventSet::IN, STOP),
            )?;
            for (i, evt) in queue_evts.iter().enumerate() {
                epoll.ctl(
                    ControlOperation::Add,
                    evt.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, i as u64),
                )?;
            }
            if let Some(fd) = handler.backend_fd() {
                epoll.ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, BACKEND),
                )?;
            }
            Ok((epoll, stop, stop_for_thread))
        };
        let (epoll, stop, stop_for_thread) = match setup() {
            Ok(v) => v,
            Err(e) => return Err((ActivateError::Worker(e), handler)),
        };
        // The handler goes to the thread once it exists, so that it comes
        // back to the caller if the thread cannot be started.
        let (tx, rx) = std::sync::mpsc::channel::<H>();
        let spawned = std::thread::Builder::new().name(name).spawn(move || {
            // Keep the thread's stop eventfd open as long as epoll uses it.
            let _stop = stop_for_thread;
            let handler = rx.recv().ok()?;
            Some(run(epoll, handler, queue_evts, interrupt))
        });
        match spawned {
            Ok(thread) => match tx.send(handler) {
                Ok(()) => Ok(Worker {
                    stop,
                    thread: Some(thread),
                }),
                Err(std::sync::mpsc::SendError(handler)) => Err((
                    ActivateError::Worker(std::io::Error::other("the worker thread ended")),
                    handler,
                )),
            },
            Err(e) => Err((ActivateError::Worker(e), handler)),
        }
    }

    /// Stops the thread and returns its handler (`None` if it panicked).
    pub(crate) fn stop(mut self) -> Option<H> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> Option<H> {
        let thread = self.thread.take()?;
        if let Err(e) = self.stop.write(1) {
            tracing::error!("virtio: cannot stop a device worker thread: {e}");
        }
        thread.join().ok().flatten()
    }
}

impl<H: QueueHandler> Drop for Worker<H> {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

fn run<H: QueueHandler>(
    epoll: Epoll,
    mut handler: H,
    queue_evts: Vec<EventFd>,
    interrupt: Interrupt,
) -> H {
    if handler.process_all() {
        interrupt.signal_used();
    }
    let mut events = vec![EpollEvent::default(); queue_evts.len() + 2];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!("virtio: a device worker's epoll failed, it stops: {e}");
                return handler;
            }
        };
        let mut notify = false;
        let mut stop = false;
        for event in &events[..n] {
            match event.data() {
                STOP => stop = true,
                BACKEND => notify |= handler.backend_ready(),
                i => {
                    let i = i as usize;
                    if let Some(evt) = queue_evts.get(i) {
                        // Non-blocking: a spurious wakeup reads nothing.
                        let _ = evt.read();
                        notify |= handler.queue_notified(i);
                    }
                }
            }
        }
        if notify {
            interrupt.signal_used();
        }
        if stop {
            return handler;
        }
    }
}
