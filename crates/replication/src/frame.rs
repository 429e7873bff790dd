//! Frames of the replication link: a fixed 24-byte header followed by a payload.
//!
//! ```text
//! offset size field
//!  0      4   magic        b"TWRL"
//!  4      2   version      u16 LE, protocol version of the sender
//!  6      2   msg_type     u16 LE, see [`MsgType`]
//!  8      2   flags        u16 LE, bit 0 = OPTIONAL, bits 1..15 must be zero
//! 10      2   reserved     must be zero
//! 12      4   payload_len  u32 LE, checked against the receiver's limit before allocation
//! 16      8   sequence     u64 LE, 0 for the first frame a side sends on a link, +1 per frame
//! 24      -   payload
//! ```
//!
//! The decoder never allocates more than the configured maximum payload length and
//! never panics on any input: every malformed stream maps to a [`FrameError`].

use std::io::{self, Read, Write};

/// Magic bytes at the start of every frame.
pub const MAGIC: [u8; 4] = *b"TWRL";
/// Size of the fixed frame header in bytes.
pub const HEADER_LEN: usize = 24;
/// Default maximum payload length a receiver accepts (64 MiB).
pub const DEFAULT_MAX_PAYLOAD: u32 = 64 << 20;

/// Frame flag: a receiver that does not know the message type may skip the frame.
/// Without it, an unknown message type is a protocol error.
pub const FLAG_OPTIONAL: u16 = 1 << 0;
/// All flag bits this version defines.
pub const KNOWN_FLAGS: u16 = FLAG_OPTIONAL;

/// Message types. Open for extension: a type this build does not know decodes as
/// [`MsgType::Unknown`] and is passed up; the link skips it if the frame is flagged
/// [`FLAG_OPTIONAL`] and refuses it otherwise.
///
/// Number ranges: `0x0001..=0x00ff` link control (handshake, heartbeat),
/// `0x0100..=0x01ff` live migration, `0x0200..=0x02ff` COLO checkpoints,
/// `0x8000..=0xffff` experimental / private.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MsgType {
    /// Handshake greeting (see `handshake`).
    Hello,
    /// Handshake: HMAC proof of the shared secret.
    AuthProof,
    /// Handshake: the sender accepts the peer.
    Accept,
    /// Handshake or later: the sender refuses the peer / the operation, with a reason.
    Refuse,
    /// Liveness probe; payload is opaque and echoed by nobody (yet).
    Heartbeat,
    /// Orderly end of the link.
    Goodbye,
    /// Migration: the source's request (session, channels, VM shape, flags).
    MigBegin,
    /// Migration: the destination is ready for pages.
    MigReady,
    /// Migration: first message on an extra page channel (session, index).
    MigJoin,
    /// Migration: a batch of pages (addresses, zero flags, contents).
    MigPages,
    /// Migration: a pre-copy round ended (progress only).
    MigRoundEnd,
    /// Migration: no more pages on this channel.
    MigChannelEnd,
    /// Migration: the VM state (and the source's digest in verify mode).
    MigState,
    /// Migration: the destination loaded the state.
    MigLoaded,
    /// Migration: the source released its taps and disks.
    MigHandover,
    /// Migration: the guest runs on the destination.
    MigResumed,
    /// Migration: the sender gives up; payload is the reason (UTF-8).
    MigAbort,
    /// Migration: the source's report of the completed migration.
    MigSummary,
    /// Migration: the destination has applied every page of a round.
    MigRoundAck,
    /// COLO: the primary's request to protect (session, channels, VM shape, flags).
    ColoBegin,
    /// COLO: the secondary is ready for pages.
    ColoReady,
    /// COLO: first message on an extra page channel (session, index).
    ColoJoin,
    /// COLO: a batch of pages (the `MigPages` format).
    ColoPages,
    /// COLO: a round of pages ended (round, epoch).
    ColoRoundEnd,
    /// COLO: the secondary has every page of a round; the pages its guest
    /// dirtied that are not staged.
    ColoRoundAck,
    /// COLO: the primary pauses for a checkpoint.
    ColoPause,
    /// COLO: the secondary paused; the pages its guest dirtied since its
    /// last report that are not staged.
    ColoSvmDirty,
    /// COLO: the VM state of a checkpoint (and the digest in verify mode).
    ColoState,
    /// COLO: the secondary has received the whole checkpoint.
    ColoReceived,
    /// COLO: the secondary has applied and loaded the checkpoint and runs.
    ColoLoaded,
    /// COLO: the sender gives up; payload is the reason (UTF-8).
    ColoAbort,
    /// A type this build does not know.
    Unknown(u16),
}

impl MsgType {
    /// The wire value.
    pub fn to_u16(self) -> u16 {
        match self {
            MsgType::Hello => 0x0001,
            MsgType::AuthProof => 0x0002,
            MsgType::Accept => 0x0003,
            MsgType::Refuse => 0x0004,
            MsgType::Heartbeat => 0x0005,
            MsgType::Goodbye => 0x0006,
            MsgType::MigBegin => 0x0101,
            MsgType::MigReady => 0x0102,
            MsgType::MigJoin => 0x0103,
            MsgType::MigPages => 0x0104,
            MsgType::MigRoundEnd => 0x0105,
            MsgType::MigChannelEnd => 0x0106,
            MsgType::MigState => 0x0107,
            MsgType::MigLoaded => 0x0108,
            MsgType::MigHandover => 0x0109,
            MsgType::MigResumed => 0x010a,
            MsgType::MigAbort => 0x010b,
            MsgType::MigSummary => 0x010c,
            MsgType::MigRoundAck => 0x010d,
            MsgType::ColoBegin => 0x0201,
            MsgType::ColoReady => 0x0202,
            MsgType::ColoJoin => 0x0203,
            MsgType::ColoPages => 0x0204,
            MsgType::ColoRoundEnd => 0x0205,
            MsgType::ColoRoundAck => 0x0206,
            MsgType::ColoPause => 0x0207,
            MsgType::ColoSvmDirty => 0x0208,
            MsgType::ColoState => 0x0209,
            MsgType::ColoReceived => 0x020a,
            MsgType::ColoLoaded => 0x020b,
            MsgType::ColoAbort => 0x020c,
            MsgType::Unknown(v) => v,
        }
    }

    /// The type for a wire value; never fails.
    pub fn from_u16(v: u16) -> MsgType {
        match v {
            0x0001 => MsgType::Hello,
            0x0002 => MsgType::AuthProof,
            0x0003 => MsgType::Accept,
            0x0004 => MsgType::Refuse,
            0x0005 => MsgType::Heartbeat,
            0x0006 => MsgType::Goodbye,
            0x0101 => MsgType::MigBegin,
            0x0102 => MsgType::MigReady,
            0x0103 => MsgType::MigJoin,
            0x0104 => MsgType::MigPages,
            0x0105 => MsgType::MigRoundEnd,
            0x0106 => MsgType::MigChannelEnd,
            0x0107 => MsgType::MigState,
            0x0108 => MsgType::MigLoaded,
            0x0109 => MsgType::MigHandover,
            0x010a => MsgType::MigResumed,
            0x010b => MsgType::MigAbort,
            0x010c => MsgType::MigSummary,
            0x010d => MsgType::MigRoundAck,
            0x0201 => MsgType::ColoBegin,
            0x0202 => MsgType::ColoReady,
            0x0203 => MsgType::ColoJoin,
            0x0204 => MsgType::ColoPages,
            0x0205 => MsgType::ColoRoundEnd,
            0x0206 => MsgType::ColoRoundAck,
            0x0207 => MsgType::ColoPause,
            0x0208 => MsgType::ColoSvmDirty,
            0x0209 => MsgType::ColoState,
            0x020a => MsgType::ColoReceived,
            0x020b => MsgType::ColoLoaded,
            0x020c => MsgType::ColoAbort,
            other => MsgType::Unknown(other),
        }
    }
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub version: u16,
    pub msg_type: MsgType,
    pub flags: u16,
    pub payload_len: u32,
    pub sequence: u64,
}

impl Header {
    /// Whether the frame may be skipped by a receiver that does not know its type.
    pub fn is_optional(&self) -> bool {
        self.flags & FLAG_OPTIONAL != 0
    }

    /// Encodes the header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..6].copy_from_slice(&self.version.to_le_bytes());
        b[6..8].copy_from_slice(&self.msg_type.to_u16().to_le_bytes());
        b[8..10].copy_from_slice(&self.flags.to_le_bytes());
        // b[10..12]: reserved, zero.
        b[12..16].copy_from_slice(&self.payload_len.to_le_bytes());
        b[16..24].copy_from_slice(&self.sequence.to_le_bytes());
        b
    }

    /// Decodes and validates a header (magic, flags, reserved, length limit).
    /// The protocol version is reported, not checked: that is the link's job.
    pub fn decode(b: &[u8; HEADER_LEN], max_payload: u32) -> Result<Header, FrameError> {
        if b[0..4] != MAGIC {
            return Err(FrameError::BadMagic([b[0], b[1], b[2], b[3]]));
        }
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let version = u16_at(4);
        let msg_type = MsgType::from_u16(u16_at(6));
        let flags = u16_at(8);
        if flags & !KNOWN_FLAGS != 0 {
            return Err(FrameError::UnknownFlags(flags));
        }
        let reserved = u16_at(10);
        if reserved != 0 {
            return Err(FrameError::ReservedNonZero(reserved));
        }
        let payload_len = u32::from_le_bytes([b[12], b[13], b[14], b[15]]);
        if payload_len > max_payload {
            return Err(FrameError::PayloadTooLarge {
                len: payload_len,
                max: max_payload,
            });
        }
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&b[16..24]);
        Ok(Header {
            version,
            msg_type,
            flags,
            payload_len,
            sequence: u64::from_le_bytes(seq),
        })
    }
}

/// A complete frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub header: Header,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn msg_type(&self) -> MsgType {
        self.header.msg_type
    }
}

/// Errors of frame encoding and decoding.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("peer closed the link (end of stream between frames)")]
    Closed,
    #[error("truncated frame header: got {got} of {HEADER_LEN} bytes")]
    TruncatedHeader { got: usize },
    #[error("truncated frame payload: got {got} of {expected} bytes")]
    TruncatedPayload { got: usize, expected: usize },
    #[error("bad frame magic {0:02x?} (not a twinvm replication stream)")]
    BadMagic([u8; 4]),
    #[error("unknown frame flags {0:#06x}")]
    UnknownFlags(u16),
    #[error("reserved header field is {0:#06x}, must be zero")]
    ReservedNonZero(u16),
    #[error("frame payload of {len} bytes exceeds the limit of {max} bytes")]
    PayloadTooLarge { len: u32, max: u32 },
    #[error("timed out waiting for the peer")]
    Timeout,
    #[error("I/O error on the replication link: {0}")]
    Io(#[source] io::Error),
}

impl FrameError {
    /// The error for a failed read or write on the link's stream.
    pub fn from_io(e: io::Error) -> FrameError {
        map_io(e)
    }
}

fn map_io(e: io::Error) -> FrameError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => FrameError::Timeout,
        _ => FrameError::Io(e),
    }
}

/// Reads until `buf` is full or end of stream; returns the number of bytes read.
fn read_full<R: Read + ?Sized>(r: &mut R, buf: &mut [u8]) -> Result<usize, FrameError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(map_io(e)),
        }
    }
    Ok(got)
}

/// Reads and checks one frame header. End of stream before its first byte
/// is [`FrameError::Closed`].
pub fn read_header<R: Read + ?Sized>(r: &mut R, max_payload: u32) -> Result<Header, FrameError> {
    let mut hb = [0u8; HEADER_LEN];
    let got = read_full(r, &mut hb)?;
    if got == 0 {
        return Err(FrameError::Closed);
    }
    if got < HEADER_LEN {
        return Err(FrameError::TruncatedHeader { got });
    }
    Header::decode(&hb, max_payload)
}

/// Fills `buf` with payload bytes; end of stream first is
/// [`FrameError::TruncatedPayload`].
pub fn read_payload<R: Read + ?Sized>(r: &mut R, buf: &mut [u8]) -> Result<(), FrameError> {
    let got = read_full(r, buf)?;
    if got < buf.len() {
        return Err(FrameError::TruncatedPayload {
            got,
            expected: buf.len(),
        });
    }
    Ok(())
}

/// Reads one frame. End of stream before the first header byte is [`FrameError::Closed`].
pub fn read_frame<R: Read + ?Sized>(r: &mut R, max_payload: u32) -> Result<Frame, FrameError> {
    let header = read_header(r, max_payload)?;
    let mut payload = vec![0u8; header.payload_len as usize];
    read_payload(r, &mut payload)?;
    Ok(Frame { header, payload })
}

/// Decodes one frame from the start of `buf`; returns it and the bytes consumed.
pub fn decode_frame(buf: &[u8], max_payload: u32) -> Result<(Frame, usize), FrameError> {
    let mut r = buf;
    let f = read_frame(&mut r, max_payload)?;
    Ok((f, buf.len() - r.len()))
}

/// Writes one frame (header and payload) and flushes.
pub fn write_frame<W: Write + ?Sized>(
    w: &mut W,
    header: &Header,
    payload: &[u8],
) -> Result<(), FrameError> {
    if payload.len() != header.payload_len as usize {
        return Err(FrameError::Io(io::Error::new(
            io::ErrorKind::InvalidInput,
            "payload length does not match the header",
        )));
    }
    // One buffer for small frames so a frame is one write where possible.
    if payload.len() <= 4096 {
        let mut buf = Vec::with_capacity(HEADER_LEN + payload.len());
        buf.extend_from_slice(&header.encode());
        buf.extend_from_slice(payload);
        w.write_all(&buf).map_err(map_io)?;
    } else {
        w.write_all(&header.encode()).map_err(map_io)?;
        w.write_all(payload).map_err(map_io)?;
    }
    w.flush().map_err(map_io)
}

/// Encodes one frame into a byte vector. Fails if the payload exceeds `u32::MAX` bytes.
pub fn encode_frame(
    version: u16,
    msg_type: MsgType,
    flags: u16,
    sequence: u64,
    payload: &[u8],
) -> Result<Vec<u8>, FrameError> {
    let payload_len = u32::try_from(payload.len()).map_err(|_| FrameError::PayloadTooLarge {
        len: u32::MAX,
        max: u32::MAX,
    })?;
    let header = Header {
        version,
        msg_type,
        flags,
        payload_len,
        sequence,
    };
    let mut v = Vec::with_capacity(HEADER_LEN + payload.len());
    v.extend_from_slice(&header.encode());
    v.extend_from_slice(payload);
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        encode_frame(1, MsgType::Heartbeat, 0, 7, b"hello world").unwrap()
    }

    #[test]
    fn header_layout_is_exact() {
        let b = encode_frame(
            0x0102,
            MsgType::Unknown(0x0304),
            FLAG_OPTIONAL,
            0x1122334455667788,
            b"xy",
        )
        .unwrap();
        assert_eq!(
            b,
            [
                b'T', b'W', b'R', b'L', 0x02, 0x01, 0x04, 0x03, 0x01, 0x00, 0, 0, 2, 0, 0, 0, 0x88,
                0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, b'x', b'y'
            ]
        );
    }

    #[test]
    fn documented_example() {
        // docs/replication-link.md: a version-1 Heartbeat, sequence 7, payload "hi".
        let b = encode_frame(1, MsgType::Heartbeat, 0, 7, b"hi").unwrap();
        let hex: Vec<String> = b.iter().map(|x| format!("{x:02x}")).collect();
        assert_eq!(
            hex.join(" "),
            "54 57 52 4c 01 00 05 00 00 00 00 00 02 00 00 00 07 00 00 00 00 00 00 00 68 69"
        );
    }

    #[test]
    fn round_trip() {
        for (t, flags, payload) in [
            (MsgType::Hello, 0, &b""[..]),
            (MsgType::Refuse, 0, &b"reason"[..]),
            (MsgType::Unknown(0x0200), FLAG_OPTIONAL, &[0xffu8; 5000][..]),
        ] {
            let b = encode_frame(1, t, flags, 42, payload).unwrap();
            let (f, used) = decode_frame(&b, DEFAULT_MAX_PAYLOAD).unwrap();
            assert_eq!(used, b.len());
            assert_eq!(f.header.msg_type, t);
            assert_eq!(f.header.flags, flags);
            assert_eq!(f.header.sequence, 42);
            assert_eq!(f.header.version, 1);
            assert_eq!(f.payload, payload);
            // Through write_frame as well.
            let mut out = Vec::new();
            write_frame(&mut out, &f.header, &f.payload).unwrap();
            assert_eq!(out, b);
        }
    }

    #[test]
    fn msg_type_values_round_trip() {
        for v in 0..=u16::MAX {
            assert_eq!(MsgType::from_u16(v).to_u16(), v);
        }
    }

    #[test]
    fn two_frames_back_to_back() {
        let mut b = sample();
        b.extend(encode_frame(1, MsgType::Goodbye, 0, 8, b"").unwrap());
        let mut r = &b[..];
        assert_eq!(read_frame(&mut r, 100).unwrap().header.sequence, 7);
        assert_eq!(
            read_frame(&mut r, 100).unwrap().header.msg_type,
            MsgType::Goodbye
        );
        assert!(matches!(read_frame(&mut r, 100), Err(FrameError::Closed)));
    }

    #[test]
    fn empty_stream_is_closed() {
        assert!(matches!(decode_frame(&[], 100), Err(FrameError::Closed)));
    }

    #[test]
    fn truncated_header() {
        let b = sample();
        for n in 1..HEADER_LEN {
            match decode_frame(&b[..n], 100) {
                Err(FrameError::TruncatedHeader { got }) => assert_eq!(got, n),
                other => panic!("{n}: {other:?}"),
            }
        }
    }

    #[test]
    fn truncated_payload() {
        let b = sample();
        for n in HEADER_LEN..b.len() {
            match decode_frame(&b[..n], 100) {
                Err(FrameError::TruncatedPayload { got, expected }) => {
                    assert_eq!(got, n - HEADER_LEN);
                    assert_eq!(expected, 11);
                }
                other => panic!("{n}: {other:?}"),
            }
        }
    }

    #[test]
    fn bad_magic() {
        let mut b = sample();
        b[0] = b'X';
        assert!(matches!(decode_frame(&b, 100), Err(FrameError::BadMagic(m)) if m == *b"XWRL"));
        let http = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        assert!(matches!(
            decode_frame(http, 100),
            Err(FrameError::BadMagic(_))
        ));
    }

    #[test]
    fn oversized_length_refused_before_allocation() {
        let mut b = sample();
        b[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        match decode_frame(&b, DEFAULT_MAX_PAYLOAD) {
            Err(FrameError::PayloadTooLarge { len, max }) => {
                assert_eq!(len, u32::MAX);
                assert_eq!(max, DEFAULT_MAX_PAYLOAD);
            }
            other => panic!("{other:?}"),
        }
        // Exactly at the limit is fine.
        assert!(decode_frame(&sample(), 11).is_ok());
        assert!(matches!(
            decode_frame(&sample(), 10),
            Err(FrameError::PayloadTooLarge { len: 11, max: 10 })
        ));
    }

    #[test]
    fn unknown_type_is_passed_up() {
        let b = encode_frame(1, MsgType::Unknown(0x7777), 0, 0, b"").unwrap();
        let (f, _) = decode_frame(&b, 100).unwrap();
        assert_eq!(f.msg_type(), MsgType::Unknown(0x7777));
        assert!(!f.header.is_optional());
    }

    #[test]
    fn unknown_flags_and_reserved_refused() {
        let mut b = sample();
        b[8] = 0x02;
        assert!(matches!(
            decode_frame(&b, 100),
            Err(FrameError::UnknownFlags(2))
        ));
        let mut b = sample();
        b[11] = 0x01;
        assert!(matches!(
            decode_frame(&b, 100),
            Err(FrameError::ReservedNonZero(0x0100))
        ));
    }

    /// A small deterministic PRNG (xorshift64*), so the test needs no extra crate.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn random_and_mutated_inputs_never_panic() {
        let mut rng = Rng(0x7769_6e76_6d00_0001);
        let valid = {
            let mut v = sample();
            v.extend(
                encode_frame(1, MsgType::Unknown(0x0201), FLAG_OPTIONAL, 8, &[3u8; 300]).unwrap(),
            );
            v
        };
        let max = 1024;
        let mut ok = 0;
        for i in 0..10_000 {
            let buf: Vec<u8> = if i % 2 == 0 {
                let len = rng.below(80);
                (0..len).map(|_| rng.next() as u8).collect()
            } else {
                let mut v = valid.clone();
                for _ in 0..1 + rng.below(4) {
                    match rng.below(3) {
                        0 if !v.is_empty() => {
                            let p = rng.below(v.len());
                            v[p] = rng.next() as u8;
                        }
                        1 => v.truncate(rng.below(v.len() + 1)),
                        _ => {
                            let p = rng.below(v.len() + 1);
                            v.insert(p, rng.next() as u8);
                        }
                    }
                }
                v
            };
            // Decode frames until an error; every result must be well formed.
            let mut rest = &buf[..];
            loop {
                match decode_frame(rest, max) {
                    Ok((f, used)) => {
                        assert!(f.payload.len() <= max as usize);
                        assert_eq!(used, HEADER_LEN + f.payload.len());
                        rest = &rest[used..];
                        ok += 1;
                    }
                    Err(e) => {
                        let _ = e.to_string();
                        break;
                    }
                }
            }
        }
        assert!(ok > 0, "mutations should leave some frames valid");
    }
}
