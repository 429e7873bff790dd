//! A network back end that discards: for a guest that must not reach the
//! network (yet), such as a COLO secondary's before it takes over.

use std::io::ErrorKind;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use vmm_sys_util::eventfd::EventFd;

use super::NetBackend;

/// A [`NetBackend`] that drops every frame the guest sends (counting
/// them) and never has a frame for the guest: its ready fd is an eventfd
/// nothing ever signals.
///
/// Clones share the counter, so a caller can keep one to read
/// [`DiscardNet::frames_dropped`] after giving another to a device.
#[derive(Clone, Debug)]
pub struct DiscardNet {
    ready: Arc<EventFd>,
    dropped: Arc<AtomicU64>,
}

impl DiscardNet {
    /// A discarding back end with its (never signalled) eventfd.
    pub fn new() -> std::io::Result<DiscardNet> {
        Ok(DiscardNet {
            ready: Arc::new(EventFd::new(libc::EFD_NONBLOCK)?),
            dropped: Arc::default(),
        })
    }

    /// Frames the guest sent, and this back end (or a clone) dropped, so
    /// far.
    pub fn frames_dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl NetBackend for DiscardNet {
    fn send(&mut self, _frame: &[u8]) -> std::io::Result<()> {
        self.dropped.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn recv(&mut self, _buf: &mut [u8]) -> std::io::Result<usize> {
        Err(ErrorKind::WouldBlock.into())
    }

    fn ready_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the eventfd stays open as long as `self`, which holds a
        // reference to it, is borrowed.
        unsafe { BorrowedFd::borrow_raw(self.ready.as_raw_fd()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `fd` polls readable right now.
    fn readable(fd: BorrowedFd<'_>) -> bool {
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is one valid pollfd for an open fd; the timeout is
        // zero.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        assert!(n >= 0, "poll: {}", std::io::Error::last_os_error());
        n == 1 && pfd.revents & libc::POLLIN != 0
    }

    #[test]
    fn frames_are_counted_and_dropped_and_none_arrive() {
        let mut net = DiscardNet::new().unwrap();
        let kept = net.clone();
        assert_eq!(kept.frames_dropped(), 0);
        for len in [60, 1514, 0] {
            net.send(&vec![0xab; len]).unwrap();
        }
        assert_eq!(net.frames_dropped(), 3);
        assert_eq!(kept.frames_dropped(), 3);

        let mut buf = vec![0u8; super::super::net::MAX_FRAME_LEN];
        let err = net.recv(&mut buf).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::WouldBlock);
        assert!(!readable(net.ready_fd()));

        // Behind a `dyn NetBackend`, as a device holds it.
        let mut boxed: Box<dyn NetBackend> = Box::new(kept.clone());
        boxed.send(b"frame").unwrap();
        assert_eq!(kept.frames_dropped(), 4);
        assert!(!readable(boxed.ready_fd()));
    }
}
