//! The replication link of twinvm: framed, versioned, optionally authenticated
//! messages over TCP between two hosts (live migration now, COLO checkpoints later).
//!
//! The link itself (`frame`, `link`, `handshake`, `auth`) is pure protocol over
//! `std` TCP and knows nothing of KVM or the VMM; `migration` drives a
//! [`vmm::Vm`] over it. The wire formats are described in
//! `docs/replication-link.md` and `docs/migration.md`.

pub mod auth;
pub mod colo;
pub mod frame;
pub mod handshake;
pub mod link;
pub mod migration;
mod pageio;

pub use auth::{AuthKey, AuthKeyError};
pub use frame::{Frame, FrameError, Header, MsgType};
pub use handshake::{HandshakeConfig, HandshakeError, Peer, RefuseReason, Role};
pub use link::{Link, LinkConfig, LinkError, LinkSender, PROTOCOL_VERSION};

/// `err` and its `source()` chain on one line, joined with ": " (a source
/// whose text the message already ends with is not repeated).
pub fn error_text(err: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !text.is_empty() && !msg.ends_with(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        source = s.source();
    }
    msg
}
