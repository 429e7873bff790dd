//! twinvm's state format: a fixed binary header, a serde body and
//! checksums, used for snapshot files and (later) migration and checkpoint
//! streams; and snapshots to a directory ([`dir`]).
//!
//! ## Layout
//!
//! All integers are little-endian. `n` is the number of virtio devices,
//! `L` the body length.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `TWINVMSN` |
//! | 8 | 4 | format version (u32), [`FORMAT_VERSION`] |
//! | 12 | 4 | payload kind (u32): 1 snapshot file, 2 VM state |
//! | 16 | 16 | VM identity (128 bits) |
//! | 32 | 8 | guest memory in bytes (u64) |
//! | 40 | 4 | vCPUs (u32) |
//! | 44 | 4 | `n`, virtio devices (u32, at most 11) |
//! | 48 | 4·n | each virtio device's type (u32: 1 net, 2 block), in guest order |
//! | 48+4n | 8 | `L`, body length (u64) |
//! | 56+4n | 4 | CRC32 of bytes 0 .. 56+4n (the header) |
//! | 60+4n | L | body: the payload encoded with postcard 1.x |
//! | 60+4n+L | 4 | CRC32 of bytes 0 .. 60+4n+L (header and body) |
//!
//! CRC32 is the IEEE polynomial (as zlib's `crc32`), computed by crc32fast.
//!
//! The header is plain bytes rather than serde so that its first fields
//! keep their place whatever the body's encoding becomes: a reader of
//! another version recognises the file and says which version it is.
//!
//! ## Decoding
//!
//! [`decode`] checks, in this order, and stops at the first problem with a
//! [`FormatError`] saying what it is: magic, version, the header's length
//! and checksum, the total length (truncated, or trailing bytes), the
//! checksum over everything, the payload kind, the VM identity (when the
//! caller expects one), the configuration fingerprint (when the caller
//! gives one), and finally the body, which must decode completely. Nothing
//! panics, and no length in the input makes the decoder allocate more than
//! the input holds: the header's lengths are only compared with the
//! input's, postcard checks every byte string's length against the bytes
//! left, and the vectors in the state preallocate at most what their
//! length prefix could cover of the remaining input ([`codec`]).
//!
//! ## The codec
//!
//! The body is encoded with postcard 1.x: its wire format is specified and
//! stable across 1.x releases, it is compact (varints, no field names), it
//! is maintained, and it decodes from a slice with bounds checks on every
//! length. bincode, the other common choice, is no longer maintained (its
//! last release on crates.io is a stub that refuses to compile).

pub mod codec;
pub mod dir;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::devices::virtio::MAX_DEVICES;

/// The first eight bytes of every state file and stream.
pub const MAGIC: [u8; 8] = *b"TWINVMSN";
/// The format version this twinvm writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Bytes of the header before the device list.
const FIXED_LEN: usize = 48;

/// What a body holds, as recorded in the header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum PayloadKind {
    /// A snapshot directory's `state.bin`: the VM state and a description
    /// of `memory.bin`.
    Snapshot = 1,
    /// The VM state alone (migration, checkpoints).
    VmState = 2,
}

impl PayloadKind {
    /// A name for messages.
    pub fn name(kind: u32) -> String {
        match kind {
            1 => "a snapshot file".into(),
            2 => "a VM state".into(),
            other => format!("unknown content (kind {other})"),
        }
    }
}

/// A type that can be the body of the format.
pub trait Payload: Serialize + DeserializeOwned {
    /// The kind recorded in the header.
    const KIND: PayloadKind;
}

impl Payload for crate::vm::VmState {
    const KIND: PayloadKind = PayloadKind::VmState;
}

/// A VM's identity: 128 random bits chosen when the VM is built. State
/// carries it; a VM restored or migrated from a source adopts the source's.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VmId(pub [u8; 16]);

impl VmId {
    /// A new random identity (from the kernel's random source).
    pub fn random() -> std::io::Result<VmId> {
        let mut id = [0u8; 16];
        getrandom::fill(&mut id).map_err(std::io::Error::from)?;
        Ok(VmId(id))
    }
}

impl std::fmt::Display for VmId {
    /// UUID-style: 8-4-4-4-12 hex digits.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for VmId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VmId({self})")
    }
}

/// What state is only valid for: a VM of this shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigFingerprint {
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// The virtio device types in guest order (1 net, 2 block).
    pub devices: Vec<u32>,
}

impl ConfigFingerprint {
    fn devices_text(devices: &[u32]) -> String {
        if devices.is_empty() {
            return "no virtio devices".into();
        }
        let names: Vec<String> = devices
            .iter()
            .map(|&t| match t {
                crate::devices::virtio::TYPE_NET => "net".to_string(),
                crate::devices::virtio::TYPE_BLOCK => "disk".to_string(),
                other => format!("type {other}"),
            })
            .collect();
        format!("virtio devices [{}]", names.join(", "))
    }
}

/// The decoded header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Format version.
    pub version: u32,
    /// Payload kind.
    pub kind: u32,
    /// The VM the state belongs to.
    pub identity: VmId,
    /// The shape of that VM.
    pub fingerprint: ConfigFingerprint,
    /// Body length in bytes.
    pub body_len: u64,
}

/// What a decoder expects of the input beyond a sound format.
#[derive(Clone, Copy, Debug, Default)]
pub struct Expected<'a> {
    /// The state must belong to this VM.
    pub identity: Option<VmId>,
    /// The state must be of a VM of this shape.
    pub fingerprint: Option<&'a ConfigFingerprint>,
}

/// Why state could not be encoded or decoded. Every bad input gets one of
/// these; none panics.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// Shorter than its header says.
    #[error("the state is truncated: {got} bytes where at least {needed} are needed")]
    Truncated {
        /// Bytes needed.
        needed: u64,
        /// Bytes there.
        got: u64,
    },
    /// Does not start with the magic.
    #[error("not twinvm state: it starts with {found}, not TWINVMSN")]
    BadMagic {
        /// The first bytes, in hex.
        found: String,
    },
    /// Another format version.
    #[error(
        "the state is in format version {found}, this twinvm reads version {FORMAT_VERSION} only"
    )]
    UnsupportedVersion {
        /// The version in the header.
        found: u32,
    },
    /// The header's device count is impossible.
    #[error("the state's header is corrupt: it lists {0} virtio devices (at most {MAX_DEVICES})")]
    BadDeviceCount(u32),
    /// The header does not match its checksum.
    #[error(
        "the state's header is corrupt (CRC32 {stored:#010x} stored, {computed:#010x} computed)"
    )]
    HeaderChecksum {
        /// Stored checksum.
        stored: u32,
        /// Checksum of the bytes.
        computed: u32,
    },
    /// More bytes than the header says.
    #[error("the state has {extra} bytes of trailing garbage after its end")]
    TrailingBytes {
        /// Bytes past the end.
        extra: u64,
    },
    /// The whole does not match its checksum.
    #[error("the state is corrupt (CRC32 {stored:#010x} stored, {computed:#010x} computed)")]
    Checksum {
        /// Stored checksum.
        stored: u32,
        /// Checksum of the bytes.
        computed: u32,
    },
    /// Another kind of content.
    #[error("the input holds {}, not {}", PayloadKind::name(*.found), PayloadKind::name(*.expected as u32))]
    WrongKind {
        /// Kind in the header.
        found: u32,
        /// Kind asked for.
        expected: PayloadKind,
    },
    /// State of another VM.
    #[error("the state belongs to VM {found}, not to VM {expected}")]
    OtherVm {
        /// Identity in the header.
        found: VmId,
        /// Identity expected.
        expected: VmId,
    },
    /// Another memory size.
    #[error("the state is of a VM with {saved} bytes of memory, this VM has {here}")]
    MemoryMismatch {
        /// Memory in the header.
        saved: u64,
        /// Memory here.
        here: u64,
    },
    /// Another vCPU count.
    #[error("the state is of a VM with {saved} vCPUs, this VM has {here}")]
    VcpuMismatch {
        /// vCPUs in the header.
        saved: u32,
        /// vCPUs here.
        here: u32,
    },
    /// Other devices.
    #[error("the state is of a VM with {}, this VM has {}", ConfigFingerprint::devices_text(.saved), ConfigFingerprint::devices_text(.here))]
    DeviceMismatch {
        /// Device types in the header.
        saved: Vec<u32>,
        /// Device types here.
        here: Vec<u32>,
    },
    /// The body is not a valid encoding of the state.
    #[error("the state's body does not decode")]
    Body(#[source] postcard::Error),
    /// The body decodes but leaves bytes over.
    #[error("the state's body has {0} undecoded bytes at its end")]
    BodyTrailing(usize),
    /// The state could not be encoded.
    #[error("cannot encode the state")]
    Encode(#[source] postcard::Error),
}

fn crc(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// Header bytes (without the header checksum) for `devices` devices.
fn header_len(devices: usize) -> usize {
    FIXED_LEN + 4 * devices + 8
}

/// Frames an already encoded body: header, `body`, checksums. [`encode`]
/// uses it; so can a stream that encodes its body itself, and tests and
/// fuzzing of the decoder (a body of any bytes, with valid checksums).
pub fn encode_body(
    kind: PayloadKind,
    identity: VmId,
    fp: &ConfigFingerprint,
    body: &[u8],
) -> Vec<u8> {
    let kind = kind as u32;
    let mut out = Vec::with_capacity(header_len(fp.devices.len()) + 8 + body.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(&identity.0);
    out.extend_from_slice(&fp.memory_bytes.to_le_bytes());
    out.extend_from_slice(&fp.vcpus.to_le_bytes());
    out.extend_from_slice(&(fp.devices.len() as u32).to_le_bytes());
    for t in &fp.devices {
        out.extend_from_slice(&t.to_le_bytes());
    }
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    let header_crc = crc(&out);
    out.extend_from_slice(&header_crc.to_le_bytes());
    out.extend_from_slice(body);
    let all_crc = crc(&out);
    out.extend_from_slice(&all_crc.to_le_bytes());
    out
}

/// Encodes `body` with a header naming `identity` and `fingerprint`.
pub fn encode<T: Payload>(
    identity: VmId,
    fingerprint: &ConfigFingerprint,
    body: &T,
) -> Result<Vec<u8>, FormatError> {
    let bytes = postcard::to_stdvec(body).map_err(FormatError::Encode)?;
    Ok(encode_body(T::KIND, identity, fingerprint, &bytes))
}

fn truncated(needed: usize, got: usize) -> FormatError {
    FormatError::Truncated {
        needed: needed as u64,
        got: got as u64,
    }
}

/// Reads and checks the header: magic, version, device count, header
/// checksum. Returns it and the offset of the body.
pub fn read_header(bytes: &[u8]) -> Result<(Header, usize), FormatError> {
    let magic_len = bytes.len().min(MAGIC.len());
    if bytes[..magic_len] != MAGIC[..magic_len] {
        let found: Vec<String> = bytes[..magic_len]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        return Err(FormatError::BadMagic {
            found: format!("bytes {}", found.join(" ")),
        });
    }
    if bytes.len() < 12 {
        return Err(truncated(12, bytes.len()));
    }
    let version = u32_at(bytes, 8);
    if version != FORMAT_VERSION {
        return Err(FormatError::UnsupportedVersion { found: version });
    }
    if bytes.len() < FIXED_LEN {
        return Err(truncated(FIXED_LEN, bytes.len()));
    }
    let count = u32_at(bytes, 44);
    if count as usize > MAX_DEVICES {
        return Err(FormatError::BadDeviceCount(count));
    }
    let count = count as usize;
    let len = header_len(count);
    if bytes.len() < len + 4 {
        return Err(truncated(len + 4, bytes.len()));
    }
    let stored = u32_at(bytes, len);
    let computed = crc(&bytes[..len]);
    if stored != computed {
        return Err(FormatError::HeaderChecksum { stored, computed });
    }
    let mut identity = [0u8; 16];
    identity.copy_from_slice(&bytes[16..32]);
    let header = Header {
        version,
        kind: u32_at(bytes, 12),
        identity: VmId(identity),
        fingerprint: ConfigFingerprint {
            memory_bytes: u64_at(bytes, 32),
            vcpus: u32_at(bytes, 40),
            devices: (0..count)
                .map(|i| u32_at(bytes, FIXED_LEN + 4 * i))
                .collect(),
        },
        body_len: u64_at(bytes, FIXED_LEN + 4 * count),
    };
    Ok((header, len + 4))
}

/// Checks that a fingerprint from a header fits `here`.
pub fn check_fingerprint(
    saved: &ConfigFingerprint,
    here: &ConfigFingerprint,
) -> Result<(), FormatError> {
    if saved.memory_bytes != here.memory_bytes {
        return Err(FormatError::MemoryMismatch {
            saved: saved.memory_bytes,
            here: here.memory_bytes,
        });
    }
    if saved.vcpus != here.vcpus {
        return Err(FormatError::VcpuMismatch {
            saved: saved.vcpus,
            here: here.vcpus,
        });
    }
    if saved.devices != here.devices {
        return Err(FormatError::DeviceMismatch {
            saved: saved.devices.clone(),
            here: here.devices.clone(),
        });
    }
    Ok(())
}

/// Decodes a whole input (`bytes` holds exactly one state, nothing more),
/// checking it as the module documentation describes.
pub fn decode<T: Payload>(
    bytes: &[u8],
    expected: &Expected<'_>,
) -> Result<(Header, T), FormatError> {
    let (header, body_start) = read_header(bytes)?;
    let left = (bytes.len() - body_start) as u64;
    // Compare in u64: a huge body length cannot overflow anything.
    if header.body_len.saturating_add(4) > left {
        return Err(FormatError::Truncated {
            needed: (body_start as u64)
                .saturating_add(header.body_len)
                .saturating_add(4),
            got: bytes.len() as u64,
        });
    }
    let body_end = body_start + header.body_len as usize;
    let end = body_end + 4;
    if bytes.len() > end {
        return Err(FormatError::TrailingBytes {
            extra: (bytes.len() - end) as u64,
        });
    }
    let stored = u32_at(bytes, body_end);
    let computed = crc(&bytes[..body_end]);
    if stored != computed {
        return Err(FormatError::Checksum { stored, computed });
    }
    if header.kind != T::KIND as u32 {
        return Err(FormatError::WrongKind {
            found: header.kind,
            expected: T::KIND,
        });
    }
    if let Some(expected) = expected.identity
        && header.identity != expected
    {
        return Err(FormatError::OtherVm {
            found: header.identity,
            expected,
        });
    }
    if let Some(here) = expected.fingerprint {
        check_fingerprint(&header.fingerprint, here)?;
    }
    let (body, rest) =
        postcard::take_from_bytes::<T>(&bytes[body_start..body_end]).map_err(FormatError::Body)?;
    if !rest.is_empty() {
        return Err(FormatError::BodyTrailing(rest.len()));
    }
    Ok((header, body))
}

#[cfg(test)]
mod tests;
