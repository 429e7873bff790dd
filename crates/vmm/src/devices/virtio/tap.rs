//! A host tap device as a network card's back end.
//!
//! twinvm attaches to an existing tap (it never creates one) with
//! `IFF_TAP | IFF_NO_PI` and without `IFF_VNET_HDR`: each read returns one
//! Ethernet frame and each write sends one, with no header. The fd is
//! non-blocking.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;

use super::Error;
use super::net::NetBackend;

/// Longest interface name Linux accepts (IFNAMSIZ - 1).
const MAX_NAME_LEN: usize = libc::IFNAMSIZ - 1;

/// An open tap device.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

/// Checks that `name` can be a Linux interface name: the checks
/// [`Tap::open`] makes before it opens anything.
pub(crate) fn check_name(name: &str) -> Result<(), Error> {
    let why = if name.is_empty() {
        "it is empty"
    } else if name.len() > MAX_NAME_LEN {
        "it is longer than 15 bytes"
    } else if name == "." || name == ".." {
        "it is not a name"
    } else if name
        .bytes()
        .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
    {
        "it contains '/', ':', a NUL or white space"
    } else {
        return Ok(());
    };
    Err(Error::TapName {
        name: name.to_string(),
        why,
    })
}

impl Tap {
    /// Attaches to the existing tap device `name`.
    pub fn open(name: &str) -> Result<Tap, Error> {
        check_name(name)?;
        let tap = || name.to_string();
        let cname = CString::new(name).map_err(|_| Error::TapName {
            name: tap(),
            why: "it contains a NUL",
        })?;
        // SAFETY: `cname` is a valid NUL-terminated string.
        if unsafe { libc::if_nametoindex(cname.as_ptr()) } == 0 {
            // TUNSETIFF would create a new tap; twinvm only uses existing ones.
            return Err(Error::TapMissing { tap: tap() });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|source| Error::TunOpen { tap: tap(), source })?;

        // SAFETY: ifreq is plain data; all zeros is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes the ifreq we pass, which lives
        // through the call; the fd is an open /dev/net/tun.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
        if ret < 0 {
            let source = std::io::Error::last_os_error();
            return Err(match source.raw_os_error() {
                Some(libc::EPERM | libc::EACCES) => Error::TapPermission { tap: tap() },
                Some(libc::EBUSY) => Error::TapBusy { tap: tap() },
                Some(libc::EINVAL) => Error::NotATap { tap: tap() },
                _ => Error::TapAttach { tap: tap(), source },
            });
        }
        Ok(Tap {
            file,
            name: name.to_string(),
        })
    }

    /// The tap's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl NetBackend for Tap {
    fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        // A tap takes a frame whole or not at all.
        self.file.write(frame).map(|_| ())
    }

    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }

    fn ready_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::fd::FromRawFd;

    #[test]
    fn bad_names_are_refused_with_the_name() {
        for name in ["", "a/b", "sixteen-chars-xx", "a b", ".."] {
            let err = Tap::open(name).unwrap_err().to_string();
            assert!(
                err.contains("tap") && err.contains(&format!("{name:?}")),
                "{err}"
            );
        }
    }

    #[test]
    fn a_missing_tap_is_a_clear_error() {
        let err = Tap::open("tvnosuchtap9").unwrap_err().to_string();
        assert!(
            err.contains("tap device tvnosuchtap9 does not exist"),
            "{err}"
        );
    }

    /// Creates (`persist` true) or deletes a persistent tap named `name` in
    /// this thread's network namespace.
    pub(crate) fn set_persistent_tap(name: &str, persist: bool) -> std::io::Result<()> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")?;
        // SAFETY: ifreq is plain data; all zeros is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
        // SAFETY: TUNSETIFF with a valid ifreq on an open /dev/net/tun.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: TUNSETPERSIST takes an integer argument.
        if unsafe {
            libc::ioctl(
                file.as_raw_fd(),
                libc::TUNSETPERSIST,
                libc::c_ulong::from(persist),
            )
        } < 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Moves the calling thread into a new, empty network namespace and
    /// creates tap `name` there, up. `Err` says why a test must be skipped
    /// (no CAP_SYS_ADMIN / CAP_NET_ADMIN).
    pub(crate) fn private_netns_with_tap(name: &str) -> Result<(), String> {
        // SAFETY: unshare(CLONE_NEWNET) only moves this thread into a new,
        // empty network namespace.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(format!(
                "cannot create a network namespace: {}",
                std::io::Error::last_os_error()
            ));
        }
        set_persistent_tap(name, true).map_err(|e| format!("cannot create a tap: {e}"))?;
        set_up(name).unwrap();
        Ok(())
    }

    /// Sets interface `name` up.
    pub(crate) fn set_up(name: &str) -> std::io::Result<()> {
        // SAFETY: plain socket creation.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a socket we just opened and now own.
        let sock = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        // SAFETY: ifreq is plain data; all zeros is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the ifreq we own.
        unsafe {
            if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &mut ifr) < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// A raw packet socket on interface `index`.
    fn packet_socket(index: u32) -> std::io::Result<std::os::fd::OwnedFd> {
        let all = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket creation.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                i32::from(all),
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a socket we just opened and now own.
        let sock = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_ll is plain data; all zeros is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = all;
        addr.sll_ifindex = index as i32;
        // SAFETY: bind reads `size_of::<sockaddr_ll>()` bytes of `addr`.
        let r = unsafe {
            libc::bind(
                sock.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(sock)
    }

    /// Waits up to 2 s for `fd` to be readable.
    fn wait_readable(fd: std::os::fd::RawFd) -> bool {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one pollfd we own.
        unsafe { libc::poll(&mut p, 1, 2000) > 0 }
    }

    /// A test frame: broadcast, EtherType 0x88b5 (local experimental).
    fn test_frame(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&[0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        f.extend_from_slice(&[0x88, 0xb5]);
        f.extend_from_slice(payload);
        f.resize(60.max(f.len()), 0);
        f
    }

    /// Runs in a network namespace of its own, so nothing it sends can
    /// leave this machine's test: creates a tap there, attaches to it with
    /// [`Tap`], and passes frames both ways through an AF_PACKET socket on
    /// the tap's host side. Needs CAP_SYS_ADMIN and CAP_NET_ADMIN (root);
    /// skipped without them.
    #[test]
    fn frames_pass_through_a_real_tap_in_a_private_netns() {
        let outcome = std::thread::spawn(|| -> Result<(), String> {
            private_netns_with_tap("tvtest0")?;
            let tap = Tap::open("tvtest0").unwrap();
            assert_eq!(tap.name(), "tvtest0");
            assert!(matches!(Tap::open("tvtest0"), Err(Error::TapBusy { .. })));
            assert!(matches!(Tap::open("lo"), Err(Error::NotATap { .. })));
            assert!(matches!(
                Tap::open("tvtest1"),
                Err(Error::TapMissing { .. })
            ));
            let mut tap: Box<dyn NetBackend> = Box::new(tap);

            let cname = CString::new("tvtest0").unwrap();
            // SAFETY: `cname` is a valid NUL-terminated string.
            let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
            let sock = packet_socket(index).unwrap();

            // Guest to host: what the device sends appears on the interface.
            let out = test_frame(b"from the guest");
            tap.send(&out).unwrap();
            let mut buf = vec![0u8; 2048];
            let mut seen = false;
            while !seen && wait_readable(sock.as_raw_fd()) {
                // SAFETY: recv writes at most `buf.len()` bytes into `buf`.
                let n =
                    unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                seen = n > 0 && buf[..n as usize] == out[..];
            }
            assert!(seen, "the frame sent through the tap did not arrive");

            // Host to guest: a frame sent on the interface is received.
            let inbound = test_frame(b"for the guest");
            // SAFETY: send reads `inbound.len()` bytes of `inbound`.
            let n =
                unsafe { libc::send(sock.as_raw_fd(), inbound.as_ptr().cast(), inbound.len(), 0) };
            assert_eq!(n, inbound.len() as isize);
            let mut got = None;
            while got.is_none() && wait_readable(tap.ready_fd().as_raw_fd()) {
                loop {
                    match tap.recv(&mut buf) {
                        // Skip what the kernel itself sends (IPv6 neighbour
                        // discovery and the like).
                        Ok(n) if buf[12..14] == [0x88, 0xb5] => got = Some(buf[..n].to_vec()),
                        Ok(_) => {}
                        Err(e) => {
                            assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
                            break;
                        }
                    }
                }
            }
            assert_eq!(got.as_deref(), Some(&inbound[..]));
            // Nothing waiting: a non-blocking read says so (after what the
            // kernel may have sent on its own meanwhile).
            let empty = loop {
                match tap.recv(&mut buf) {
                    Ok(_) if buf[12..14] != [0x88, 0xb5] => {}
                    other => break other.map_err(|e| e.kind()),
                }
            };
            assert_eq!(empty.err(), Some(std::io::ErrorKind::WouldBlock));
            drop(tap);
            set_persistent_tap("tvtest0", false).unwrap();
            Ok(())
        })
        .join()
        .unwrap();
        if let Err(why) = outcome {
            eprintln!("SKIPPED: {why}");
        }
    }

    #[test]
    fn an_interface_that_is_no_tap_is_refused() {
        // The loopback interface exists in every network namespace.
        match Tap::open("lo") {
            Err(Error::NotATap { tap }) => assert_eq!(tap, "lo"),
            // Without CAP_NET_ADMIN or /dev/net/tun the kernel says so first.
            Err(Error::TapPermission { .. } | Error::TunOpen { .. }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}
