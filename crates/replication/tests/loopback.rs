//! Loopback TCP tests of the link and the handshake (127.0.0.1 only).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use replication::handshake::{self, HandshakeConfig, HandshakeError, Peer, RefuseReason, Role};
use replication::{AuthKey, FrameError, Link, LinkConfig, LinkError, MsgType};

const VM: [u8; 16] = *b"0123456789abcdef";

fn key(b: u8) -> AuthKey {
    AuthKey::from_bytes(&[b; 32]).unwrap()
}

fn cfg(role: Role, key: Option<AuthKey>) -> HandshakeConfig {
    let mut c = HandshakeConfig::new(role, VM);
    c.auth_key = key;
    c.timeout = Duration::from_secs(5);
    c
}

type Res = Result<(Peer, Link), HandshakeError>;

/// Runs a server handshake and a client handshake against each other.
fn run(client: HandshakeConfig, server: HandshakeConfig) -> (Res, Res) {
    run_with(client, server, |_| {})
}

fn run_with(
    client: HandshakeConfig,
    server: HandshakeConfig,
    tweak_client: impl FnOnce(&mut Link) + Send + 'static,
) -> (Res, Res) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let s = thread::spawn(move || {
        let (mut link, _) = Link::accept(&l, LinkConfig::default()).unwrap();
        handshake::server(&mut link, &server).map(|p| (p, link))
    });
    let mut link = Link::connect(addr, Duration::from_secs(5), LinkConfig::default()).unwrap();
    tweak_client(&mut link);
    let c = handshake::client(&mut link, &client).map(|p| (p, link));
    (c, s.join().unwrap())
}

fn refused_by_peer(r: &Res) -> RefuseReason {
    match r {
        Err(HandshakeError::RefusedByPeer { reason, .. }) => *reason,
        other => panic!("expected a refusal by the peer, got {other:?}"),
    }
}

fn refused_peer(r: &Res) -> RefuseReason {
    match r {
        Err(HandshakeError::RefusedPeer { reason, .. }) => *reason,
        other => panic!("expected to refuse the peer, got {other:?}"),
    }
}

#[test]
fn handshake_without_key_then_data() {
    let mut c = cfg(Role::Source, None);
    c.capabilities = 0b1011;
    c.fingerprint = b"mem=256M".to_vec();
    let mut s = cfg(Role::Destination, None);
    s.capabilities = 0b0110;
    let (c, s) = run(c, s);
    let (cp, mut cl) = c.unwrap();
    let (sp, mut sl) = s.unwrap();
    assert_eq!(cp.role, Role::Destination);
    assert_eq!(sp.role, Role::Source);
    assert_eq!(sp.fingerprint, b"mem=256M");
    assert_eq!(cp.common_capabilities, 0b0010);
    assert_eq!(sp.common_capabilities, 0b0010);
    assert!(!cp.authenticated && !sp.authenticated);
    // The link carries data after the handshake, with the normal payload limit.
    let t = thread::spawn(move || {
        let big = vec![0x5au8; 1 << 20];
        cl.send(MsgType::Unknown(0x0100), b"").unwrap();
        cl.send(MsgType::Heartbeat, &big).unwrap();
        cl
    });
    // First frame: the unknown mandatory type is refused by recv...
    assert!(matches!(
        sl.recv(),
        Err(LinkError::UnknownMandatory(0x0100))
    ));
    // ...and the next one arrives intact.
    let f = sl.recv().unwrap();
    assert_eq!(f.msg_type(), MsgType::Heartbeat);
    assert_eq!(f.payload.len(), 1 << 20);
    t.join().unwrap();
}

#[test]
fn handshake_with_key() {
    let (c, s) = run(
        cfg(Role::Primary, Some(key(1))),
        cfg(Role::Secondary, Some(key(1))),
    );
    let (cp, _) = c.unwrap();
    let (sp, _) = s.unwrap();
    assert!(cp.authenticated && sp.authenticated);
    assert_eq!(cp.vm_id, VM);
}

#[test]
fn wrong_key_refused_on_both_sides() {
    let (c, s) = run(
        cfg(Role::Source, Some(key(1))),
        cfg(Role::Destination, Some(key(2))),
    );
    assert_eq!(refused_peer(&s), RefuseReason::AuthFailed);
    assert_eq!(refused_by_peer(&c), RefuseReason::AuthFailed);
    assert!(c.unwrap_err().to_string().contains("authentication failed"));
}

#[test]
fn missing_key_on_client_refused() {
    let (c, s) = run(
        cfg(Role::Source, None),
        cfg(Role::Destination, Some(key(1))),
    );
    assert_eq!(refused_peer(&s), RefuseReason::AuthRequired);
    assert_eq!(refused_by_peer(&c), RefuseReason::AuthRequired);
}

#[test]
fn missing_key_on_server_refused() {
    let (c, s) = run(
        cfg(Role::Source, Some(key(1))),
        cfg(Role::Destination, None),
    );
    assert_eq!(refused_peer(&s), RefuseReason::AuthNotConfigured);
    assert_eq!(refused_by_peer(&c), RefuseReason::AuthNotConfigured);
}

#[test]
fn wrong_version_refused() {
    let (c, s) = run_with(cfg(Role::Source, None), cfg(Role::Destination, None), |l| {
        l.set_wire_version_for_tests(2)
    });
    assert_eq!(refused_peer(&s), RefuseReason::Version);
    assert_eq!(refused_by_peer(&c), RefuseReason::Version);
    assert!(s.unwrap_err().to_string().contains("version 2"));
}

#[test]
fn wrong_vm_identity_refused() {
    let mut server = cfg(Role::Destination, Some(key(3)));
    server.expect_peer_vm = Some([0xee; 16]);
    let (c, s) = run(cfg(Role::Source, Some(key(3))), server);
    assert_eq!(refused_peer(&s), RefuseReason::VmIdentity);
    assert_eq!(refused_by_peer(&c), RefuseReason::VmIdentity);
    assert!(c.unwrap_err().to_string().contains("3031323334353637"));
}

#[test]
fn client_refuses_wrong_server_identity() {
    let mut server = cfg(Role::Destination, None);
    server.vm_id = [1; 16];
    server.expect_peer_vm = None;
    let (c, s) = run(cfg(Role::Source, None), server);
    assert_eq!(refused_peer(&c), RefuseReason::VmIdentity);
    assert_eq!(refused_by_peer(&s), RefuseReason::VmIdentity);
}

#[test]
fn fresh_target_accepts_any_identity() {
    let mut server = cfg(Role::Destination, Some(key(4)));
    server.vm_id = [0; 16];
    server.expect_peer_vm = None;
    let mut client = cfg(Role::Source, Some(key(4)));
    client.expect_peer_vm = None;
    let (c, s) = run(client, server);
    assert_eq!(s.unwrap().0.vm_id, VM);
    assert_eq!(c.unwrap().0.vm_id, [0; 16]);
}

#[test]
fn wrong_role_refused() {
    let (c, s) = run(cfg(Role::Source, None), cfg(Role::Secondary, None));
    assert_eq!(refused_peer(&s), RefuseReason::Role);
    assert_eq!(refused_by_peer(&c), RefuseReason::Role);
}

/// A raw TCP peer against a handshake server.
fn server_against_raw(
    peer: impl FnOnce(TcpStream) + Send + 'static,
    key: Option<AuthKey>,
) -> HandshakeError {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let t = thread::spawn(move || peer(TcpStream::connect(addr).unwrap()));
    let (mut link, _) = Link::accept(&l, LinkConfig::default()).unwrap();
    let mut c = cfg(Role::Destination, key);
    c.timeout = Duration::from_millis(500);
    let start = Instant::now();
    let e = handshake::server(&mut link, &c).unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(3));
    drop(link);
    t.join().unwrap();
    e
}

#[test]
fn garbage_instead_of_hello() {
    let e = server_against_raw(
        |mut s| {
            s.write_all(b"GET / HTTP/1.1\r\nHost: twinvm\r\n\r\n")
                .unwrap();
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf);
        },
        None,
    );
    assert!(
        matches!(
            e,
            HandshakeError::Link(LinkError::Frame(FrameError::BadMagic(_)))
        ),
        "{e}"
    );
}

#[test]
fn huge_length_in_handshake_refused_without_allocation() {
    let e = server_against_raw(
        |mut s| {
            let mut h = replication::frame::encode_frame(1, MsgType::Hello, 0, 0, b"").unwrap();
            h[12..16].copy_from_slice(&(32u32 << 20).to_le_bytes());
            s.write_all(&h).unwrap();
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf);
        },
        None,
    );
    assert!(
        matches!(
            e,
            HandshakeError::Link(LinkError::Frame(FrameError::PayloadTooLarge { .. }))
        ),
        "{e}"
    );
}

#[test]
fn peer_closes_mid_frame() {
    let e = server_against_raw(
        |mut s| {
            let f = replication::frame::encode_frame(1, MsgType::Hello, 0, 0, &[0u8; 62]).unwrap();
            s.write_all(&f[..40]).unwrap();
        },
        Some(key(1)),
    );
    assert!(
        matches!(
            e,
            HandshakeError::Link(LinkError::Frame(FrameError::TruncatedPayload {
                got: 16,
                expected: 62
            }))
        ),
        "{e}"
    );
}

#[test]
fn silent_peer_times_out() {
    let e = server_against_raw(
        |s| {
            thread::sleep(Duration::from_millis(1500));
            drop(s)
        },
        None,
    );
    assert!(matches!(e, HandshakeError::Timeout(_)), "{e}");
}

#[test]
fn trickling_peer_times_out() {
    let e = server_against_raw(
        |mut s| {
            let f = replication::frame::encode_frame(1, MsgType::Hello, 0, 0, &[0u8; 62]).unwrap();
            for b in f {
                if s.write_all(&[b]).is_err() {
                    break;
                }
                thread::sleep(Duration::from_millis(100));
            }
        },
        None,
    );
    assert!(matches!(e, HandshakeError::Timeout(_)), "{e}");
}

#[test]
fn unauthenticated_peer_gets_no_server_proof() {
    // A peer that claims to have a key but sends a bogus proof sees a refusal and
    // nothing else: no server Hello proof, no Accept.
    let e = server_against_raw(
        |s| {
            let mut link = Link::from_stream(s, LinkConfig::default()).unwrap();
            let h = handshake::Hello {
                version: 1,
                role: Role::Source,
                auth: true,
                vm_id: VM,
                capabilities: 0,
                nonce: [0; 32],
                fingerprint: vec![],
            };
            link.send(MsgType::Hello, &h.encode()).unwrap();
            assert_eq!(link.recv().unwrap().msg_type(), MsgType::Hello);
            link.send(MsgType::AuthProof, &[0u8; 32]).unwrap();
            let f = link.recv().unwrap();
            assert_eq!(f.msg_type(), MsgType::Refuse);
            assert_eq!(
                handshake::decode_refuse(&f.payload).0,
                RefuseReason::AuthFailed
            );
            assert!(matches!(
                link.recv(),
                Err(LinkError::Frame(FrameError::Closed))
            ));
        },
        Some(key(1)),
    );
    assert_eq!(e.reason(), Some(RefuseReason::AuthFailed));
}
