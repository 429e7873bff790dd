//! The replication link of twinvm: framed, versioned, optionally authenticated
//! messages over TCP between two hosts (live migration now, COLO checkpoints later).
//!
//! Pure protocol over `std` TCP; knows nothing of KVM or the VMM. The wire format
//! is described in `docs/replication-link.md`.

pub mod auth;
pub mod frame;
pub mod handshake;
pub mod link;

pub use auth::{AuthKey, AuthKeyError};
pub use frame::{Frame, FrameError, Header, MsgType};
pub use handshake::{HandshakeConfig, HandshakeError, Peer, RefuseReason, Role};
pub use link::{Link, LinkConfig, LinkError, PROTOCOL_VERSION};
