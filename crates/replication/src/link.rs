//! A replication link: framed messages over one TCP connection.
//!
//! The link numbers the frames it sends (0, 1, 2, …) and checks the numbers it
//! receives; it checks the protocol version of every frame; it skips frames of an
//! unknown type that are flagged optional and refuses unknown mandatory ones.

use std::io::{self, Read};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::frame::{self, FLAG_OPTIONAL, Frame, FrameError, Header, MsgType};

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;

/// Settings of a link.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// Maximum payload accepted from the peer (after the handshake).
    pub max_payload: u32,
    /// Timeout of one receive (`None`: wait forever).
    pub read_timeout: Option<Duration>,
    /// Timeout of one send (`None`: wait forever).
    pub write_timeout: Option<Duration>,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            max_payload: frame::DEFAULT_MAX_PAYLOAD,
            read_timeout: Some(Duration::from_secs(30)),
            write_timeout: Some(Duration::from_secs(30)),
        }
    }
}

/// Errors of the link.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("socket setup failed: {0}")]
    Socket(#[source] io::Error),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("peer sent protocol version {got}, this link speaks version {expected}")]
    Version { got: u16, expected: u16 },
    #[error(
        "frame sequence number {got}, expected {expected} (lost, duplicated or reordered frame)"
    )]
    Sequence { got: u64, expected: u64 },
    #[error("peer sent unknown mandatory message type {0:#06x}")]
    UnknownMandatory(u16),
    #[error("payload of {0} bytes is too large to send")]
    PayloadTooLarge(usize),
    #[error("this link's sending half was split off")]
    SendSplit,
}

/// A framed, sequenced connection to the peer.
#[derive(Debug)]
pub struct Link {
    stream: TcpStream,
    config: LinkConfig,
    version: u16,
    tx_seq: u64,
    rx_seq: u64,
    /// If set, every read is bounded by this instant (used by the handshake).
    deadline: Option<Instant>,
    /// Set by [`Link::split`]: sending belongs to the [`LinkSender`].
    tx_split: bool,
}

/// The sending half of a [`Link`] ([`Link::split`]), for a thread that
/// sends while another receives.
#[derive(Debug)]
pub struct LinkSender {
    stream: TcpStream,
    version: u16,
    tx_seq: u64,
}

impl LinkSender {
    /// Sends a mandatory message.
    pub fn send(&mut self, msg_type: MsgType, payload: &[u8]) -> Result<(), LinkError> {
        let header = header_for(self.version, msg_type, 0, payload, self.tx_seq)?;
        frame::write_frame(&mut self.stream, &header, payload)?;
        self.tx_seq += 1;
        Ok(())
    }

    /// The underlying stream.
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }
}

fn header_for(
    version: u16,
    msg_type: MsgType,
    flags: u16,
    payload: &[u8],
    sequence: u64,
) -> Result<Header, LinkError> {
    let payload_len =
        u32::try_from(payload.len()).map_err(|_| LinkError::PayloadTooLarge(payload.len()))?;
    Ok(Header {
        version,
        msg_type,
        flags,
        payload_len,
        sequence,
    })
}

impl Link {
    /// Connects to `addr` within `timeout` (each resolved address is tried in turn).
    pub fn connect(
        addr: impl ToSocketAddrs,
        timeout: Duration,
        config: LinkConfig,
    ) -> Result<Link, LinkError> {
        let addrs: Vec<SocketAddr> = addr
            .to_socket_addrs()
            .map_err(|e| LinkError::Connect {
                addr: "<unresolved>".into(),
                source: e,
            })?
            .collect();
        let mut last = io::Error::new(io::ErrorKind::InvalidInput, "no address to connect to");
        for a in &addrs {
            match TcpStream::connect_timeout(a, timeout) {
                Ok(s) => return Link::from_stream(s, config),
                Err(e) => last = e,
            }
        }
        Err(LinkError::Connect {
            addr: addrs
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            source: last,
        })
    }

    /// Accepts one connection from `listener`.
    pub fn accept(
        listener: &TcpListener,
        config: LinkConfig,
    ) -> Result<(Link, SocketAddr), LinkError> {
        let (s, peer) = listener.accept().map_err(LinkError::Socket)?;
        Ok((Link::from_stream(s, config)?, peer))
    }

    /// Wraps a connected stream.
    pub fn from_stream(stream: TcpStream, config: LinkConfig) -> Result<Link, LinkError> {
        stream.set_nodelay(true).map_err(LinkError::Socket)?;
        let link = Link {
            stream,
            config,
            version: PROTOCOL_VERSION,
            tx_seq: 0,
            rx_seq: 0,
            deadline: None,
            tx_split: false,
        };
        link.apply_timeouts()?;
        Ok(link)
    }

    fn apply_timeouts(&self) -> Result<(), LinkError> {
        // A zero duration is an error for set_*_timeout; treat it as "1 ms".
        let fix = |d: Option<Duration>| d.map(|d| d.max(Duration::from_millis(1)));
        self.stream
            .set_read_timeout(fix(self.config.read_timeout))
            .map_err(LinkError::Socket)?;
        self.stream
            .set_write_timeout(fix(self.config.write_timeout))
            .map_err(LinkError::Socket)?;
        Ok(())
    }

    /// Changes the read and write timeouts.
    pub fn set_timeouts(
        &mut self,
        read: Option<Duration>,
        write: Option<Duration>,
    ) -> Result<(), LinkError> {
        self.config.read_timeout = read;
        self.config.write_timeout = write;
        self.apply_timeouts()
    }

    /// Changes the maximum payload accepted from the peer.
    pub fn set_max_payload(&mut self, max: u32) {
        self.config.max_payload = max;
    }

    pub fn config(&self) -> &LinkConfig {
        &self.config
    }

    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.stream.peer_addr()
    }

    /// Bounds every read and write by `deadline` (until cleared with `None`).
    pub(crate) fn set_deadline(&mut self, deadline: Option<Instant>) -> Result<(), LinkError> {
        self.deadline = deadline;
        match deadline {
            Some(d) => {
                let left = d
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1));
                self.stream
                    .set_write_timeout(Some(left))
                    .map_err(LinkError::Socket)
            }
            None => self.apply_timeouts(),
        }
    }

    /// Sends a mandatory message.
    pub fn send(&mut self, msg_type: MsgType, payload: &[u8]) -> Result<(), LinkError> {
        self.send_flags(msg_type, 0, payload)
    }

    /// Sends a message a peer that does not know its type may skip.
    pub fn send_optional(&mut self, msg_type: MsgType, payload: &[u8]) -> Result<(), LinkError> {
        self.send_flags(msg_type, FLAG_OPTIONAL, payload)
    }

    fn send_flags(
        &mut self,
        msg_type: MsgType,
        flags: u16,
        payload: &[u8],
    ) -> Result<(), LinkError> {
        if self.tx_split {
            return Err(LinkError::SendSplit);
        }
        let header = header_for(self.version, msg_type, flags, payload, self.tx_seq)?;
        frame::write_frame(&mut self.stream, &header, payload)?;
        self.tx_seq += 1;
        Ok(())
    }

    /// Splits off the sending half: from now on this link only receives
    /// (its sends fail with [`LinkError::SendSplit`]) and the returned
    /// [`LinkSender`] sends, continuing the sequence numbers.
    pub fn split(&mut self) -> Result<LinkSender, LinkError> {
        if self.tx_split {
            return Err(LinkError::SendSplit);
        }
        let stream = self.stream.try_clone().map_err(LinkError::Socket)?;
        self.tx_split = true;
        Ok(LinkSender {
            stream,
            version: self.version,
            tx_seq: self.tx_seq,
        })
    }

    /// Receives one frame without version or type policy (sequence is still checked).
    pub fn recv_raw(&mut self) -> Result<Frame, LinkError> {
        let max = self.config.max_payload;
        let f = match self.deadline {
            Some(deadline) => {
                let mut r = DeadlineReader {
                    stream: &self.stream,
                    deadline,
                };
                frame::read_frame(&mut r, max)?
            }
            None => frame::read_frame(&mut self.stream, max)?,
        };
        if f.header.sequence != self.rx_seq {
            return Err(LinkError::Sequence {
                got: f.header.sequence,
                expected: self.rx_seq,
            });
        }
        self.rx_seq += 1;
        Ok(f)
    }

    /// Receives the next frame: checks the version, skips unknown optional frames,
    /// refuses unknown mandatory ones.
    pub fn recv(&mut self) -> Result<Frame, LinkError> {
        loop {
            let f = self.recv_raw()?;
            if f.header.version != self.version {
                return Err(LinkError::Version {
                    got: f.header.version,
                    expected: self.version,
                });
            }
            match f.header.msg_type {
                MsgType::Unknown(_) if f.header.is_optional() => continue,
                MsgType::Unknown(t) => return Err(LinkError::UnknownMandatory(t)),
                _ => return Ok(f),
            }
        }
    }

    /// Receives the next frame's header only, with the checks of
    /// [`Link::recv`] (sequence, version, unknown types; unknown optional
    /// frames are skipped). The caller must then consume exactly
    /// `payload_len` bytes — [`Link::read_payload`], or reads of its own on
    /// [`Link::stream`] — before anything else is received. This lets a
    /// receiver put a large payload straight where it belongs.
    pub fn recv_header(&mut self) -> Result<Header, LinkError> {
        loop {
            let h = frame::read_header(&mut self.stream, self.config.max_payload)?;
            if h.sequence != self.rx_seq {
                return Err(LinkError::Sequence {
                    got: h.sequence,
                    expected: self.rx_seq,
                });
            }
            self.rx_seq += 1;
            if h.version != self.version {
                return Err(LinkError::Version {
                    got: h.version,
                    expected: self.version,
                });
            }
            match h.msg_type {
                MsgType::Unknown(_) if h.is_optional() => {
                    let mut skip = vec![0u8; h.payload_len as usize];
                    self.read_payload(&mut skip)?;
                }
                MsgType::Unknown(t) => return Err(LinkError::UnknownMandatory(t)),
                _ => return Ok(h),
            }
        }
    }

    /// Reads payload bytes of the frame whose header
    /// [`Link::recv_header`] returned.
    pub fn read_payload(&mut self, buf: &mut [u8]) -> Result<(), LinkError> {
        Ok(frame::read_payload(&mut self.stream, buf)?)
    }

    /// Test hook: sends a frame whose header announces all of `payload`
    /// but only its first `keep` bytes, then shuts the connection down, as
    /// a sender dying mid-frame would.
    #[doc(hidden)]
    pub fn send_truncated_for_tests(
        &mut self,
        msg_type: MsgType,
        payload: &[u8],
        keep: usize,
    ) -> Result<(), LinkError> {
        use std::io::Write;
        let header = header_for(self.version, msg_type, 0, payload, self.tx_seq)?;
        self.tx_seq += 1;
        let keep = keep.min(payload.len());
        let mut s = &self.stream;
        s.write_all(&header.encode())
            .and_then(|_| s.write_all(&payload[..keep]))
            .map_err(|e| LinkError::Frame(FrameError::from_io(e)))?;
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        Ok(())
    }

    /// Test hook: the version this link writes into its frames.
    #[doc(hidden)]
    pub fn set_wire_version_for_tests(&mut self, version: u16) {
        self.version = version;
    }

    /// The underlying stream.
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }
}

/// A reader that re-arms the socket timeout before every read so that the whole
/// operation ends by `deadline`, however slowly the peer trickles bytes.
struct DeadlineReader<'a> {
    stream: &'a TcpStream,
    deadline: Instant,
}

impl Read for DeadlineReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"));
        }
        self.stream.set_read_timeout(Some(left))?;
        let mut s = self.stream;
        s.read(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::thread;

    fn pair(config: LinkConfig) -> (Link, Link) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let c = config.clone();
        let t = thread::spawn(move || Link::connect(addr, Duration::from_secs(5), c).unwrap());
        let (s, _) = Link::accept(&l, config).unwrap();
        (t.join().unwrap(), s)
    }

    #[test]
    fn send_recv_and_sequence() {
        let (mut a, mut b) = pair(LinkConfig::default());
        a.send(MsgType::Heartbeat, b"1").unwrap();
        a.send_optional(MsgType::Unknown(0x0299), b"skip me")
            .unwrap();
        a.send(MsgType::Goodbye, b"").unwrap();
        let f = b.recv().unwrap();
        assert_eq!(
            (f.msg_type(), f.header.sequence, &f.payload[..]),
            (MsgType::Heartbeat, 0, &b"1"[..])
        );
        let f = b.recv().unwrap();
        assert_eq!((f.msg_type(), f.header.sequence), (MsgType::Goodbye, 2));
        drop(a);
        assert!(matches!(
            b.recv(),
            Err(LinkError::Frame(FrameError::Closed))
        ));
    }

    #[test]
    fn unknown_mandatory_refused() {
        let (mut a, mut b) = pair(LinkConfig::default());
        a.send(MsgType::Unknown(0x0299), b"").unwrap();
        let e = b.recv().unwrap_err();
        assert!(matches!(e, LinkError::UnknownMandatory(0x0299)), "{e}");
    }

    #[test]
    fn wrong_version_refused() {
        let (mut a, mut b) = pair(LinkConfig::default());
        a.set_wire_version_for_tests(9);
        a.send(MsgType::Heartbeat, b"").unwrap();
        assert!(matches!(
            b.recv(),
            Err(LinkError::Version {
                got: 9,
                expected: 1
            })
        ));
    }

    #[test]
    fn sequence_gap_detected() {
        let (a, mut b) = pair(LinkConfig::default());
        let bytes = frame::encode_frame(1, MsgType::Heartbeat, 0, 5, b"").unwrap();
        (&a.stream).write_all(&bytes).unwrap();
        assert!(matches!(
            b.recv(),
            Err(LinkError::Sequence {
                got: 5,
                expected: 0
            })
        ));
    }

    #[test]
    fn oversized_frame_refused() {
        let cfg = LinkConfig {
            max_payload: 16,
            ..LinkConfig::default()
        };
        let (mut a, mut b) = pair(cfg);
        a.send(MsgType::Heartbeat, &[0u8; 17]).unwrap();
        assert!(matches!(
            b.recv(),
            Err(LinkError::Frame(FrameError::PayloadTooLarge {
                len: 17,
                max: 16
            }))
        ));
    }

    #[test]
    fn read_timeout() {
        let cfg = LinkConfig {
            read_timeout: Some(Duration::from_millis(100)),
            ..LinkConfig::default()
        };
        let (_a, mut b) = pair(cfg);
        let t = Instant::now();
        assert!(matches!(
            b.recv(),
            Err(LinkError::Frame(FrameError::Timeout))
        ));
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn peer_closes_mid_frame() {
        let (a, mut b) = pair(LinkConfig::default());
        let bytes = frame::encode_frame(1, MsgType::Heartbeat, 0, 0, &[1u8; 100]).unwrap();
        (&a.stream).write_all(&bytes[..60]).unwrap();
        drop(a);
        let e = b.recv().unwrap_err();
        assert!(
            matches!(
                e,
                LinkError::Frame(FrameError::TruncatedPayload {
                    got: 36,
                    expected: 100
                })
            ),
            "{e}"
        );
    }

    #[test]
    fn connect_refused_is_clear() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let e = Link::connect(addr, Duration::from_secs(2), LinkConfig::default()).unwrap_err();
        assert!(e.to_string().contains(&addr.to_string()), "{e}");
    }
}
