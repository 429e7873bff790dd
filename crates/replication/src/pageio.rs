//! Socket I/O shared by the page receivers of live migration and COLO:
//! reading page contents straight into their final places, and waiting
//! for a connection with a deadline.

use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::time::Duration;

use crate::frame::{FrameError, MsgType};
use crate::handshake::{self, HandshakeConfig};
use crate::link::{Link, LinkConfig, LinkError};
use crate::migration::wire::{Begin, Join};

/// Fills the memory `iov` describes from the link's stream, with as few
/// `readv` calls as the data's arrival allows (at most 1024 buffers per
/// call). The bytes are the next ones on the stream: part of the payload
/// of the frame whose header was read last ([`Link::recv_header`]), or page
/// data a migration source sends right after its frame; the caller has
/// checked how many there are.
///
/// # Safety
///
/// Every iovec must describe memory that is valid for writes of `iov_len`
/// bytes for the whole call, that nothing else reads or writes meanwhile,
/// and that no two iovecs overlap.
pub(crate) unsafe fn read_into_iovecs(
    link: &Link,
    iov: &mut [libc::iovec],
) -> Result<(), LinkError> {
    // SAFETY: the caller's guarantees are the ones `transfer` needs for
    // reading into the buffers.
    unsafe { transfer(link, iov, Way::Read) }
}

/// Writes all the memory `iov` describes to the link's stream, with as
/// few `writev` calls as the socket takes it in (at most 1024 buffers per
/// call). The bytes follow the frame sent last, which announces them.
///
/// # Safety
///
/// Every iovec must describe memory that is valid for reads of `iov_len`
/// bytes for the whole call.
pub(crate) unsafe fn write_from_iovecs(
    link: &Link,
    iov: &mut [libc::iovec],
) -> Result<(), LinkError> {
    // SAFETY: the caller's guarantees are the ones `transfer` needs for
    // writing from the buffers.
    unsafe { transfer(link, iov, Way::Write) }
}

/// Which way [`transfer`] moves bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Way {
    /// From the socket into the buffers.
    Read,
    /// From the buffers into the socket.
    Write,
}

/// Moves every byte `iov` describes between the buffers and the link's
/// stream, resuming after partial transfers.
///
/// # Safety
///
/// Every iovec must describe memory valid for `iov_len` bytes for the
/// whole call: writable and not otherwise accessed for [`Way::Read`],
/// readable for [`Way::Write`].
unsafe fn transfer(link: &Link, iov: &mut [libc::iovec], way: Way) -> Result<(), LinkError> {
    let fd = link.stream().as_raw_fd();
    let mut first = 0;
    while first < iov.len() {
        let rest = &mut iov[first..];
        let count = rest.len().min(1024) as libc::c_int;
        // SAFETY: the caller guarantees each iovec (or the remainder of one,
        // after a partial transfer below) is valid for its length in the
        // direction used; the call touches at most iov_len bytes of each.
        let n = unsafe {
            match way {
                Way::Read => libc::readv(fd, rest.as_ptr(), count),
                Way::Write => libc::writev(fd, rest.as_ptr(), count),
            }
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(FrameError::from_io(e).into());
        }
        if n == 0 {
            let expected = rest.iter().map(|v| v.iov_len).sum();
            return Err(match way {
                Way::Read => FrameError::TruncatedPayload { got: 0, expected },
                Way::Write => FrameError::from_io(std::io::ErrorKind::WriteZero.into()),
            }
            .into());
        }
        let mut n = n as usize;
        while n > 0 && first < iov.len() {
            let v = &mut iov[first];
            if n >= v.iov_len {
                n -= v.iov_len;
                first += 1;
            } else {
                // SAFETY: advancing within the same buffer, n < iov_len.
                v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n).cast() };
                v.iov_len -= n;
                n = 0;
            }
        }
    }
    Ok(())
}

/// Waits until `listener` has a connection to accept, for at most `limit`.
pub(crate) fn wait_readable(listener: &TcpListener, limit: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let timeout = i32::try_from(limit.as_millis()).unwrap_or(i32::MAX).max(1);
    // SAFETY: one valid pollfd, count 1; poll writes only its revents.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout) };
    n > 0
}

/// Accepts the extra channels `begin` asks for (`channels - 1`, of its
/// session) on `listener` within `timeout`: each new connection runs the handshake (`hs`) and
/// must then send `join_type` (session, index). A connection that fails
/// that, or names another session, is refused (logged as `what`, e.g. "a
/// migration channel") and does not count. Channel indexes run from 1; the
/// links come back in index order.
pub(crate) fn accept_channels(
    listener: &TcpListener,
    begin: &Begin,
    timeout: Duration,
    what: &str,
    config: &LinkConfig,
    hs: &HandshakeConfig,
    join_type: MsgType,
) -> Result<Vec<Link>, String> {
    let join = |stream: std::net::TcpStream| -> Result<(Link, Join), String> {
        let mut link =
            Link::from_stream(stream, config.clone()).map_err(|e| crate::error_text(&e))?;
        handshake::server(&mut link, hs).map_err(|e| crate::error_text(&e))?;
        let f = link.recv().map_err(|e| crate::error_text(&e))?;
        if f.msg_type() != join_type {
            return Err(format!("expected {join_type:?}, got {:?}", f.msg_type()));
        }
        let j = Join::decode(&f.payload).map_err(|e| crate::error_text(&e))?;
        Ok((link, j))
    };
    let want = usize::from(begin.channels).saturating_sub(1);
    let mut links: Vec<Option<Link>> = (0..want).map(|_| None).collect();
    let deadline = std::time::Instant::now() + timeout;
    let mut joined = 0;
    while joined < want {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() || !wait_readable(listener, left) {
            return Err(format!(
                "only {joined} of {want} extra channels connected within {timeout:?}"
            ));
        }
        let (stream, addr) = match listener.accept() {
            Ok(v) => v,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("cannot accept a channel: {e}")),
        };
        match join(stream) {
            Ok((link, j)) if j.session == begin.session => {
                match usize::from(j.index)
                    .checked_sub(1)
                    .and_then(|i| links.get_mut(i))
                    .filter(|s| s.is_none())
                {
                    Some(slot) => {
                        *slot = Some(link);
                        joined += 1;
                    }
                    None => {
                        return Err(format!(
                            "channel index {} is invalid or joined twice",
                            j.index
                        ));
                    }
                }
            }
            Ok(_) => tracing::warn!("refused {what} from {addr}: another session"),
            Err(e) => tracing::warn!("refused {what} from {addr}: {e}"),
        }
    }
    Ok(links.into_iter().flatten().collect())
}

/// Runs `send(index, link)` for every channel at once: on the calling
/// thread if there is one channel, else on one scoped thread per channel
/// (named `{name}{index}`). Returns the first channel's error in index
/// order. A thread that cannot be started sets `abort`, so that the
/// others stop early; it and a thread that panicked are reported through
/// `thread_failed` (with the start error, if any).
pub(crate) fn on_every_channel<E: Send>(
    links: &mut [Link],
    name: &str,
    abort: &std::sync::atomic::AtomicBool,
    thread_failed: impl Fn(Option<std::io::Error>) -> E,
    send: impl Fn(usize, &mut Link) -> Result<(), E> + Sync,
) -> Result<(), E> {
    if let [link] = links {
        return send(0, link);
    }
    let send = &send;
    std::thread::scope(|s| {
        let handles: Vec<_> = links
            .iter_mut()
            .enumerate()
            .map(|(i, link)| {
                std::thread::Builder::new()
                    .name(format!("{name}{i}"))
                    .spawn_scoped(s, move || send(i, link))
            })
            .collect();
        let mut first = Ok(());
        for h in handles {
            let r = match h {
                Ok(h) => h.join().unwrap_or_else(|_| Err(thread_failed(None))),
                Err(e) => {
                    abort.store(true, std::sync::atomic::Ordering::SeqCst);
                    Err(thread_failed(Some(e)))
                }
            };
            if first.is_ok() {
                first = r;
            }
        }
        first
    })
}
