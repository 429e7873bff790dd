//! The handshake of the replication link: version, roles, VM identity and
//! (optionally) mutual authentication with a shared secret.
//!
//! The connecting side is the *client*, the accepting side the *server*; this is
//! independent of the roles (source/destination, primary/secondary).
//!
//! ```text
//! client                                    server
//!   Hello_C  ───────────────────────────────▶  check version, auth mode
//!            ◀─────────────────────────────── Hello_S        (or Refuse)
//! check version, auth mode
//!   [AuthProof_C = HMAC(key, "…client…", T)] ▶ verify         (or Refuse AuthFailed)
//!            ◀──────────── [AuthProof_S = HMAC(key, "…server…", T)]
//! verify (or Refuse AuthFailed)
//!            ◀─────────────────────────────── Accept | Refuse  (role, VM identity of client)
//!   Accept | Refuse  ───────────────────────▶                 (role, VM identity of server)
//! ```
//!
//! `T` is the transcript: both Hello payloads, each preceded by its length, so both
//! random nonces and everything each side claimed are bound into both proofs.
//! Nothing but these messages is exchanged before both sides have accepted.

use std::time::{Duration, Instant};

use crate::auth::AuthKey;
use crate::frame::{Frame, FrameError, MsgType};
use crate::link::{Link, LinkError, PROTOCOL_VERSION};

/// Largest payload accepted while the handshake runs (an unauthenticated peer
/// cannot make us allocate more than this).
pub const HANDSHAKE_MAX_PAYLOAD: u32 = 64 * 1024;
/// Largest config fingerprint in a Hello.
pub const MAX_FINGERPRINT: usize = 4096;
/// Largest Refuse message text kept.
pub const MAX_REFUSE_TEXT: usize = 1024;
/// Length of the random nonce in a Hello.
pub const NONCE_LEN: usize = 32;
/// Default time the whole handshake may take.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

const HELLO_FIXED_LEN: usize = 2 + 1 + 1 + 16 + 8 + NONCE_LEN + 2;
const HELLO_FLAG_AUTH: u8 = 1 << 0;
const LABEL_CLIENT: &[u8] = b"twinvm replication v1 client proof";
const LABEL_SERVER: &[u8] = b"twinvm replication v1 server proof";

/// What a side is on this link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Live migration: sends the VM.
    Source,
    /// Live migration: receives the VM.
    Destination,
    /// COLO: the primary VM's host.
    Primary,
    /// COLO: the secondary VM's host.
    Secondary,
}

impl Role {
    pub fn to_u8(self) -> u8 {
        match self {
            Role::Source => 1,
            Role::Destination => 2,
            Role::Primary => 3,
            Role::Secondary => 4,
        }
    }

    pub fn from_u8(v: u8) -> Option<Role> {
        Some(match v {
            1 => Role::Source,
            2 => Role::Destination,
            3 => Role::Primary,
            4 => Role::Secondary,
            _ => return None,
        })
    }

    /// The role the peer must have.
    pub fn peer(self) -> Role {
        match self {
            Role::Source => Role::Destination,
            Role::Destination => Role::Source,
            Role::Primary => Role::Secondary,
            Role::Secondary => Role::Primary,
        }
    }
}

/// Why a peer was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefuseReason {
    /// Different protocol version.
    Version,
    /// The refusing side requires authentication; the peer has no key.
    AuthRequired,
    /// The peer asked for authentication; the refusing side has no key.
    AuthNotConfigured,
    /// The peer's proof was wrong (different key).
    AuthFailed,
    /// The peer serves another VM.
    VmIdentity,
    /// The peer's role does not complement ours.
    Role,
    /// Malformed or unexpected handshake message.
    Protocol,
    /// A reason code this build does not know.
    Unknown(u16),
}

impl RefuseReason {
    pub fn to_u16(self) -> u16 {
        match self {
            RefuseReason::Version => 1,
            RefuseReason::AuthRequired => 2,
            RefuseReason::AuthNotConfigured => 3,
            RefuseReason::AuthFailed => 4,
            RefuseReason::VmIdentity => 5,
            RefuseReason::Role => 6,
            RefuseReason::Protocol => 7,
            RefuseReason::Unknown(v) => v,
        }
    }

    pub fn from_u16(v: u16) -> RefuseReason {
        match v {
            1 => RefuseReason::Version,
            2 => RefuseReason::AuthRequired,
            3 => RefuseReason::AuthNotConfigured,
            4 => RefuseReason::AuthFailed,
            5 => RefuseReason::VmIdentity,
            6 => RefuseReason::Role,
            7 => RefuseReason::Protocol,
            other => RefuseReason::Unknown(other),
        }
    }
}

impl std::fmt::Display for RefuseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RefuseReason::Version => write!(f, "protocol version mismatch"),
            RefuseReason::AuthRequired => {
                write!(f, "authentication required but the peer has no key")
            }
            RefuseReason::AuthNotConfigured => {
                write!(f, "peer requested authentication but no key is configured")
            }
            RefuseReason::AuthFailed => write!(f, "authentication failed (wrong key)"),
            RefuseReason::VmIdentity => write!(f, "VM identity mismatch"),
            RefuseReason::Role => write!(f, "role mismatch"),
            RefuseReason::Protocol => write!(f, "handshake protocol error"),
            RefuseReason::Unknown(v) => write!(f, "unknown reason {v}"),
        }
    }
}

/// A Hello message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    pub role: Role,
    /// Whether the sender has a shared secret configured.
    pub auth: bool,
    pub vm_id: [u8; 16],
    pub capabilities: u64,
    pub nonce: [u8; NONCE_LEN],
    /// Opaque to the link; passed up for the caller to compare.
    pub fingerprint: Vec<u8>,
}

impl Hello {
    /// Encodes the Hello payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(HELLO_FIXED_LEN + self.fingerprint.len());
        v.extend_from_slice(&self.version.to_le_bytes());
        v.push(self.role.to_u8());
        v.push(if self.auth { HELLO_FLAG_AUTH } else { 0 });
        v.extend_from_slice(&self.vm_id);
        v.extend_from_slice(&self.capabilities.to_le_bytes());
        v.extend_from_slice(&self.nonce);
        let n = self.fingerprint.len().min(MAX_FINGERPRINT);
        v.extend_from_slice(&(n as u16).to_le_bytes());
        v.extend_from_slice(&self.fingerprint[..n]);
        v
    }

    /// The version field only (its position is the same in every protocol version).
    pub fn peek_version(b: &[u8]) -> Option<u16> {
        Some(u16::from_le_bytes([*b.first()?, *b.get(1)?]))
    }

    /// Decodes a Hello payload of this protocol version.
    pub fn decode(b: &[u8]) -> Result<Hello, String> {
        if b.len() < HELLO_FIXED_LEN {
            return Err(format!(
                "Hello of {} bytes is shorter than {HELLO_FIXED_LEN}",
                b.len()
            ));
        }
        let version = u16::from_le_bytes([b[0], b[1]]);
        let role = Role::from_u8(b[2]).ok_or_else(|| format!("unknown role {}", b[2]))?;
        let flags = b[3];
        if flags & !HELLO_FLAG_AUTH != 0 {
            return Err(format!("unknown Hello flags {flags:#04x}"));
        }
        let mut vm_id = [0u8; 16];
        vm_id.copy_from_slice(&b[4..20]);
        let mut caps = [0u8; 8];
        caps.copy_from_slice(&b[20..28]);
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&b[28..28 + NONCE_LEN]);
        let o = 28 + NONCE_LEN;
        let n = u16::from_le_bytes([b[o], b[o + 1]]) as usize;
        if n > MAX_FINGERPRINT {
            return Err(format!(
                "fingerprint of {n} bytes exceeds {MAX_FINGERPRINT}"
            ));
        }
        if b.len() != HELLO_FIXED_LEN + n {
            return Err(format!(
                "Hello is {} bytes, its fields say {}",
                b.len(),
                HELLO_FIXED_LEN + n
            ));
        }
        Ok(Hello {
            version,
            role,
            auth: flags & HELLO_FLAG_AUTH != 0,
            vm_id,
            capabilities: u64::from_le_bytes(caps),
            nonce,
            fingerprint: b[HELLO_FIXED_LEN..].to_vec(),
        })
    }
}

/// Encodes a Refuse payload: reason code (u16 LE) then UTF-8 text.
pub fn encode_refuse(reason: RefuseReason, text: &str) -> Vec<u8> {
    let mut v = reason.to_u16().to_le_bytes().to_vec();
    let mut n = text.len().min(MAX_REFUSE_TEXT);
    while !text.is_char_boundary(n) {
        n -= 1;
    }
    v.extend_from_slice(&text.as_bytes()[..n]);
    v
}

/// Decodes a Refuse payload; never fails (a short payload is reason `Protocol`).
pub fn decode_refuse(b: &[u8]) -> (RefuseReason, String) {
    if b.len() < 2 {
        return (RefuseReason::Protocol, "malformed Refuse message".into());
    }
    let reason = RefuseReason::from_u16(u16::from_le_bytes([b[0], b[1]]));
    let text = &b[2..b.len().min(2 + MAX_REFUSE_TEXT)];
    (reason, String::from_utf8_lossy(text).into_owned())
}

/// What this side announces and accepts.
#[derive(Debug, Clone)]
pub struct HandshakeConfig {
    pub role: Role,
    /// The VM this side serves (a fresh migration target may send zeros).
    pub vm_id: [u8; 16],
    /// The VM identity the peer must announce; `None` accepts any (a fresh
    /// migration target learns the identity from the outcome).
    pub expect_peer_vm: Option<[u8; 16]>,
    /// Opaque configuration fingerprint, passed to the peer (at most 4096 bytes).
    pub fingerprint: Vec<u8>,
    /// Capability bits this side supports.
    pub capabilities: u64,
    /// Shared secret; if set, the peer must prove it knows it too.
    pub auth_key: Option<AuthKey>,
    /// Time the whole handshake may take.
    pub timeout: Duration,
}

impl HandshakeConfig {
    pub fn new(role: Role, vm_id: [u8; 16]) -> HandshakeConfig {
        HandshakeConfig {
            role,
            vm_id,
            expect_peer_vm: Some(vm_id),
            fingerprint: Vec::new(),
            capabilities: 0,
            auth_key: None,
            timeout: DEFAULT_HANDSHAKE_TIMEOUT,
        }
    }
}

/// The result of a successful handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub role: Role,
    pub vm_id: [u8; 16],
    pub fingerprint: Vec<u8>,
    /// The peer's capability bits.
    pub capabilities: u64,
    /// Capability bits both sides support.
    pub common_capabilities: u64,
    /// Whether both sides proved knowledge of the shared secret.
    pub authenticated: bool,
}

/// Errors of the handshake.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("peer refused the link: {reason}: {message}")]
    RefusedByPeer {
        reason: RefuseReason,
        message: String,
    },
    #[error("refused the peer: {reason}: {message}")]
    RefusedPeer {
        reason: RefuseReason,
        message: String,
    },
    #[error("handshake timed out (the peer did not answer within {0:?})")]
    Timeout(Duration),
    #[error("handshake failed: {0}")]
    Link(#[source] LinkError),
}

impl HandshakeError {
    /// The refusal reason, whichever side refused.
    pub fn reason(&self) -> Option<RefuseReason> {
        match self {
            HandshakeError::RefusedByPeer { reason, .. }
            | HandshakeError::RefusedPeer { reason, .. } => Some(*reason),
            _ => None,
        }
    }
}

/// Runs the handshake as the connecting side.
pub fn client(link: &mut Link, config: &HandshakeConfig) -> Result<Peer, HandshakeError> {
    run(link, config, true)
}

/// Runs the handshake as the accepting side.
pub fn server(link: &mut Link, config: &HandshakeConfig) -> Result<Peer, HandshakeError> {
    run(link, config, false)
}

fn run(link: &mut Link, config: &HandshakeConfig, is_client: bool) -> Result<Peer, HandshakeError> {
    let saved_max = link.config().max_payload;
    link.set_max_payload(HANDSHAKE_MAX_PAYLOAD.min(saved_max));
    let deadline = Instant::now() + config.timeout;
    let r = match link.set_deadline(Some(deadline)) {
        Ok(()) => {
            let mut hs = Hs {
                link: &mut *link,
                config,
            };
            if is_client { hs.client() } else { hs.server() }
        }
        Err(e) => Err(HandshakeError::Link(e)),
    };
    // Always restore the link's own limits, even after an error.
    link.set_max_payload(saved_max);
    let restore = link.set_deadline(None);
    let peer = r.map_err(|e| match e {
        HandshakeError::Link(LinkError::Frame(FrameError::Timeout)) => {
            HandshakeError::Timeout(config.timeout)
        }
        e => e,
    })?;
    restore.map_err(HandshakeError::Link)?;
    Ok(peer)
}

struct Hs<'a> {
    link: &'a mut Link,
    config: &'a HandshakeConfig,
}

impl Hs<'_> {
    fn my_hello(&self) -> Result<Hello, HandshakeError> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|e| {
            HandshakeError::Link(LinkError::Socket(std::io::Error::other(format!(
                "no random numbers for the handshake nonce: {e}"
            ))))
        })?;
        Ok(Hello {
            version: PROTOCOL_VERSION,
            role: self.config.role,
            auth: self.config.auth_key.is_some(),
            vm_id: self.config.vm_id,
            capabilities: self.config.capabilities,
            nonce,
            fingerprint: self.config.fingerprint.clone(),
        })
    }

    fn send(&mut self, t: MsgType, payload: &[u8]) -> Result<(), HandshakeError> {
        self.link.send(t, payload).map_err(HandshakeError::Link)
    }

    /// Tells the peer why it is refused (best effort) and returns the local error.
    fn refuse(&mut self, reason: RefuseReason, message: String) -> HandshakeError {
        let _ = self
            .link
            .send(MsgType::Refuse, &encode_refuse(reason, &message));
        HandshakeError::RefusedPeer { reason, message }
    }

    /// Receives the next handshake frame; a Refuse from the peer becomes an error,
    /// a frame of another type than `want` is refused.
    fn expect(&mut self, want: MsgType) -> Result<Frame, HandshakeError> {
        let f = match self.link.recv_raw() {
            Ok(f) => f,
            Err(
                e @ LinkError::Frame(FrameError::Timeout | FrameError::Closed | FrameError::Io(_)),
            ) => {
                return Err(HandshakeError::Link(e));
            }
            Err(e) => {
                // Garbage on the wire: tell the peer (best effort) and report the cause.
                let _ = self.link.send(
                    MsgType::Refuse,
                    &encode_refuse(RefuseReason::Protocol, &e.to_string()),
                );
                return Err(HandshakeError::Link(e));
            }
        };
        match f.msg_type() {
            MsgType::Refuse => {
                let (reason, message) = decode_refuse(&f.payload);
                Err(HandshakeError::RefusedByPeer { reason, message })
            }
            t if t == want && f.header.version == PROTOCOL_VERSION => Ok(f),
            t if t == want => Err(self.refuse(
                RefuseReason::Version,
                format!(
                    "peer frames carry protocol version {}, this side speaks version {PROTOCOL_VERSION}",
                    f.header.version
                ),
            )),
            t => Err(self.refuse(
                RefuseReason::Protocol,
                format!("expected {want:?} during the handshake, got {t:?}"),
            )),
        }
    }

    /// Checks the peer's Hello for version and auth mode; refuses on mismatch.
    fn check_hello(&mut self, f: &Frame) -> Result<Hello, HandshakeError> {
        if let Some(v) = Hello::peek_version(&f.payload)
            && v != PROTOCOL_VERSION
        {
            return Err(self.refuse(
                RefuseReason::Version,
                format!(
                    "peer speaks protocol version {v}, this side speaks version {PROTOCOL_VERSION}"
                ),
            ));
        }
        let hello = match Hello::decode(&f.payload) {
            Ok(h) => h,
            Err(e) => {
                return Err(self.refuse(RefuseReason::Protocol, format!("malformed Hello: {e}")));
            }
        };
        match (self.config.auth_key.is_some(), hello.auth) {
            (true, false) => Err(self.refuse(
                RefuseReason::AuthRequired,
                "this side requires a shared-secret key (--auth-key) and the peer has none".into(),
            )),
            (false, true) => Err(self.refuse(
                RefuseReason::AuthNotConfigured,
                "the peer uses a shared-secret key (--auth-key) and this side has none".into(),
            )),
            _ => Ok(hello),
        }
    }

    /// Checks role and VM identity of the peer.
    fn verdict(&self, peer: &Hello) -> Result<(), (RefuseReason, String)> {
        if peer.role != self.config.role.peer() {
            return Err((
                RefuseReason::Role,
                format!(
                    "peer is {:?}, a {:?} needs a {:?}",
                    peer.role,
                    self.config.role,
                    self.config.role.peer()
                ),
            ));
        }
        if let Some(want) = self.config.expect_peer_vm
            && want != peer.vm_id
        {
            return Err((
                RefuseReason::VmIdentity,
                format!(
                    "peer serves VM {}, expected VM {}",
                    hex(&peer.vm_id),
                    hex(&want)
                ),
            ));
        }
        Ok(())
    }

    fn proof(&mut self, label: &[u8], transcript: &[u8]) -> Result<(), HandshakeError> {
        let key = self.config.auth_key.as_ref().expect("auth checked");
        let p = key.prove(label, transcript);
        self.send(MsgType::AuthProof, &p)
    }

    fn check_proof(&mut self, label: &[u8], transcript: &[u8]) -> Result<(), HandshakeError> {
        let f = self.expect(MsgType::AuthProof)?;
        let key = self.config.auth_key.as_ref().expect("auth checked");
        if key.verify(label, transcript, &f.payload) {
            Ok(())
        } else {
            Err(self.refuse(
                RefuseReason::AuthFailed,
                "the peer's proof does not match this side's key (different --auth-key files?)"
                    .into(),
            ))
        }
    }

    fn finish(&self, peer: Hello) -> Peer {
        Peer {
            role: peer.role,
            vm_id: peer.vm_id,
            fingerprint: peer.fingerprint,
            capabilities: peer.capabilities,
            common_capabilities: peer.capabilities & self.config.capabilities,
            authenticated: self.config.auth_key.is_some(),
        }
    }

    fn client(&mut self) -> Result<Peer, HandshakeError> {
        let mine = self.my_hello()?.encode();
        self.send(MsgType::Hello, &mine)?;
        let f = self.expect(MsgType::Hello)?;
        let peer = self.check_hello(&f)?;
        let t = transcript(&mine, &f.payload);
        if self.config.auth_key.is_some() {
            self.proof(LABEL_CLIENT, &t)?;
            self.check_proof(LABEL_SERVER, &t)?;
        }
        self.expect(MsgType::Accept)?;
        if let Err((reason, message)) = self.verdict(&peer) {
            return Err(self.refuse(reason, message));
        }
        self.send(MsgType::Accept, &[])?;
        Ok(self.finish(peer))
    }

    fn server(&mut self) -> Result<Peer, HandshakeError> {
        let f = self.expect(MsgType::Hello)?;
        let peer = self.check_hello(&f)?;
        let mine = self.my_hello()?.encode();
        self.send(MsgType::Hello, &mine)?;
        let t = transcript(&f.payload, &mine);
        if self.config.auth_key.is_some() {
            self.check_proof(LABEL_CLIENT, &t)?;
            self.proof(LABEL_SERVER, &t)?;
        }
        if let Err((reason, message)) = self.verdict(&peer) {
            return Err(self.refuse(reason, message));
        }
        self.send(MsgType::Accept, &[])?;
        self.expect(MsgType::Accept)?;
        Ok(self.finish(peer))
    }
}

fn transcript(client_hello: &[u8], server_hello: &[u8]) -> Vec<u8> {
    let mut t = Vec::with_capacity(8 + client_hello.len() + server_hello.len());
    t.extend_from_slice(&(client_hello.len() as u32).to_le_bytes());
    t.extend_from_slice(client_hello);
    t.extend_from_slice(&(server_hello.len() as u32).to_le_bytes());
    t.extend_from_slice(server_hello);
    t
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            role: Role::Source,
            auth: true,
            vm_id: [9; 16],
            capabilities: 0x8000_0000_0000_0001,
            nonce: [4; NONCE_LEN],
            fingerprint: b"cfg".to_vec(),
        }
    }

    #[test]
    fn hello_round_trip_and_layout() {
        let h = hello();
        let b = h.encode();
        assert_eq!(b.len(), HELLO_FIXED_LEN + 3);
        assert_eq!(&b[0..4], &[1, 0, 1, 1]);
        assert_eq!(&b[4..20], &[9; 16]);
        assert_eq!(&b[20..28], &0x8000_0000_0000_0001u64.to_le_bytes());
        assert_eq!(&b[60..62], &[3, 0]);
        assert_eq!(Hello::decode(&b).unwrap(), h);
        assert_eq!(Hello::peek_version(&b), Some(1));
    }

    #[test]
    fn hello_malformed() {
        let b = hello().encode();
        for n in 0..b.len() {
            assert!(Hello::decode(&b[..n]).is_err(), "{n}");
        }
        let mut long = b.clone();
        long.push(0);
        assert!(Hello::decode(&long).is_err());
        let mut bad_role = b.clone();
        bad_role[2] = 9;
        assert!(Hello::decode(&bad_role).unwrap_err().contains("role"));
        let mut bad_flags = b.clone();
        bad_flags[3] = 0x80;
        assert!(Hello::decode(&bad_flags).is_err());
        let mut huge_fp = b;
        huge_fp[60..62].copy_from_slice(&u16::MAX.to_le_bytes());
        assert!(Hello::decode(&huge_fp).is_err());
    }

    #[test]
    fn refuse_round_trip() {
        let b = encode_refuse(RefuseReason::VmIdentity, "nope");
        assert_eq!(&b[..2], &[5, 0]);
        assert_eq!(decode_refuse(&b), (RefuseReason::VmIdentity, "nope".into()));
        assert_eq!(decode_refuse(&[1]).0, RefuseReason::Protocol);
        assert_eq!(
            decode_refuse(&[0x34, 0x12]).0,
            RefuseReason::Unknown(0x1234)
        );
        // Long text is cut on a character boundary.
        let long = "é".repeat(MAX_REFUSE_TEXT);
        let b = encode_refuse(RefuseReason::Role, &long);
        assert!(b.len() <= 2 + MAX_REFUSE_TEXT);
        assert!(!decode_refuse(&b).1.contains('\u{fffd}'));
        for v in 0..=u16::MAX {
            assert_eq!(RefuseReason::from_u16(v).to_u16(), v);
        }
    }

    #[test]
    fn roles_pair_up() {
        for r in [
            Role::Source,
            Role::Destination,
            Role::Primary,
            Role::Secondary,
        ] {
            assert_eq!(r.peer().peer(), r);
            assert_eq!(Role::from_u8(r.to_u8()), Some(r));
        }
        assert_eq!(Role::from_u8(0), None);
    }
}
