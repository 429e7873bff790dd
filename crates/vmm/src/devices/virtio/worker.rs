//! The thread that runs a device's queues: an epoll loop over the queues'
//! eventfds (signalled by KVM through ioeventfds when the driver notifies),
//! the back end's readiness fd and a stop eventfd.
//!
//! What a wakeup costs is mostly system calls, so the loop keeps them few:
//! the queue eventfds are watched edge-triggered and never read (every
//! signal is an edge; what the counter holds does not matter), the back
//! end's fd is watched level-triggered so that the handler reads it only
//! as often as there are frames (no final read that fails with
//! `EWOULDBLOCK`), and the interrupt is signalled at most once per wakeup.

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
    /// The back end's readiness fd, watched level-triggered while
    /// [`Self::backend_wanted`] says so: [`Self::backend_ready`] is called
    /// once per wakeup while it is readable.
    fn backend_fd(&self) -> Option<RawFd>;
    /// Whether the back end's fd should be watched now: not while the
    /// handler holds work it cannot pass on (a frame and no receive
    /// buffer), nor after the back end failed.
    fn backend_wanted(&self) -> bool {
        true
    }
    /// The driver notified queue `index`. Returns whether to interrupt it.
    fn queue_notified(&mut self, index: usize) -> bool;
    /// The back end's fd is readable. Returns whether to interrupt.
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
                    EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, i as u64),
                )?;
            }
            if let Some(fd) = handler.backend_fd() {
                watch_backend(&epoll, fd, true)?;
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

/// Watches the back end's fd (level-triggered) or stops watching it.
fn watch_backend(epoll: &Epoll, fd: RawFd, on: bool) -> std::io::Result<()> {
    if on {
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, BACKEND),
        )
    } else {
        epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default())
    }
}

fn run<H: QueueHandler>(
    epoll: Epoll,
    mut handler: H,
    queue_evts: Vec<EventFd>,
    interrupt: Interrupt,
) -> H {
    let backend = handler.backend_fd();
    // Registered by spawn.
    let mut watching = backend.is_some();
    let mut notify = handler.process_all();
    let mut events = vec![EpollEvent::default(); queue_evts.len() + 2];
    loop {
        if notify {
            interrupt.signal_used();
        }
        if let Some(fd) = backend {
            let wanted = handler.backend_wanted();
            if wanted != watching {
                match watch_backend(&epoll, fd, wanted) {
                    Ok(()) => watching = wanted,
                    Err(e) => {
                        tracing::error!(
                            "virtio: a device worker cannot watch its back end, it stops: {e}"
                        );
                        return handler;
                    }
                }
            }
        }
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {
                notify = false;
                continue;
            }
            Err(e) => {
                tracing::error!("virtio: a device worker's epoll failed, it stops: {e}");
                return handler;
            }
        };
        notify = false;
        let mut stop = false;
        let mut ready = false;
        // Queue eventfds are edge-triggered: nothing to read.
        for event in &events[..n] {
            match event.data() {
                STOP => stop = true,
                BACKEND => ready = true,
                i if (i as usize) < queue_evts.len() => {
                    notify |= handler.queue_notified(i as usize);
                }
                _ => {}
            }
        }
        if ready && watching {
            notify |= handler.backend_ready();
        }
        if stop {
            if notify {
                interrupt.signal_used();
            }
            return handler;
        }
    }
}
