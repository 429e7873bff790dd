//! Socket I/O shared by the page receivers of live migration and COLO:
//! reading page contents straight into their final places, and waiting
//! for a connection with a deadline.

use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::time::Duration;

use crate::frame::FrameError;
use crate::link::{Link, LinkError};

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
    let fd = link.stream().as_raw_fd();
    let mut first = 0;
    while first < iov.len() {
        let rest = &mut iov[first..];
        let count = rest.len().min(1024) as libc::c_int;
        // SAFETY: the caller guarantees each iovec (or the remainder of one,
        // after a partial read below) is writable for its length; readv
        // writes at most iov_len bytes to each.
        let n = unsafe { libc::readv(fd, rest.as_ptr(), count) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(FrameError::from_io(e).into());
        }
        if n == 0 {
            return Err(FrameError::TruncatedPayload {
                got: 0,
                expected: rest.iter().map(|v| v.iov_len).sum(),
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
