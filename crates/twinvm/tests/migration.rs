//! Live migration between two `twinvm` processes on this machine, inside a
//! network namespace the test creates: the destination (`run --incoming`)
//! listens on the namespace's loopback, the source migrates with
//! `twinvm ctl migrate`, and the destination takes over the source's tap.
//!
//! Faults: a destination that dies during the page transfer leaves the
//! source running (and able to migrate again); a source that dies makes the
//! destination exit with an error without ever running the guest; garbage,
//! a wrong key, a truncated stream and pages outside guest RAM are refused
//! with a clear error. The "dies" cases use the
//! `TWINVM_TEST_MIGRATION_DIE_AFTER_PAGES` hook, which makes a process
//! SIGKILL itself after that many pages, as a failing host would end it.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{
    BANNER, GUEST_IP, NetNs, TempDir, Twinvm, counter_of, counters, echo_client, is_counter, json,
    path_str, rss_bytes, twinvm_bin,
};

const T: Duration = Duration::from_secs(60);
const MEMORY: &str = "128M";
/// The guest dirties memory all the time (pages per second, over 8 MiB).
const WORKLOAD: &str = "dirty_rate=3000 dirty_mb=8";
const PORT: u16 = 47_000;

fn available() -> bool {
    common::kvm_available() && common::netns_available()
}

/// One side of a migration: a `twinvm run` in the namespace with an API
/// socket.
struct Side {
    vm: Twinvm,
    socket: PathBuf,
}

/// The VM options both sides share.
fn vm_args(ns: &NetNs) -> Vec<String> {
    vec![
        "run".into(),
        "--memory".into(),
        MEMORY.into(),
        "--net".into(),
        format!("tap={}", ns.tap),
        "--cmdline".into(),
        format!("ip={GUEST_IP}/24 {WORKLOAD}"),
    ]
}

fn spawn(ns: &NetNs, dir: &Path, name: &str, extra: &[&str], env: &[(&str, &str)]) -> Side {
    let socket = dir.join(format!("{name}.sock"));
    let mut cmd = ns.command(twinvm_bin());
    cmd.args(vm_args(ns))
        .args(["--api-socket", path_str(&socket)])
        .args(extra)
        .env("TWINVM_LOG", "info");
    for (k, v) in env {
        cmd.env(k, v);
    }
    Side {
        vm: Twinvm::spawn_command(cmd),
        socket,
    }
}

/// A source VM, booted, on the network, and one second into its
/// dirtying workload (so that it has thousands of pages with data: a
/// migration takes several page batches).
fn source(ns: &NetNs, dir: &Path, env: &[(&str, &str)]) -> Side {
    let mut s = spawn(ns, dir, "source", &[], env);
    s.vm.wait_for_line(|l| l == BANNER, T).unwrap();
    s.vm.wait_for_line(|l| l.starts_with("net0 "), T).unwrap();
    s.vm.wait_for_line(is_counter, T).unwrap();
    s
}

/// A destination waiting on `PORT` + `port_offset`.
fn destination(
    ns: &NetNs,
    dir: &Path,
    name: &str,
    port_offset: u16,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Side {
    let addr = format!("127.0.0.1:{}", PORT + port_offset);
    let mut args = vec!["--incoming", addr.as_str()];
    args.extend_from_slice(extra);
    let side = spawn(ns, dir, name, &args, env);
    wait_for_socket(&side);
    side
}

/// Waits until the side's API socket exists (the destination binds it
/// before it listens for the migration).
fn wait_for_socket(side: &Side) {
    let deadline = Instant::now() + T;
    while !side.socket.exists() {
        assert!(
            Instant::now() < deadline,
            "no API socket\n{}",
            side.vm.transcript()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn migrate(
    ns: &NetNs,
    side: &Side,
    port_offset: u16,
    extra: &[&str],
) -> (ExitStatus, String, String) {
    let to = format!("127.0.0.1:{}", PORT + port_offset);
    let mut args = vec!["migrate", "--to", to.as_str()];
    args.extend_from_slice(extra);
    ns.ctl(&side.socket, &args)
}

#[test]
fn tcp_connection_and_counter_survive_live_migration() {
    if !available() {
        return;
    }
    let ns = NetNs::new("mig");
    let dir = TempDir::new("mig");
    let mut src = source(&ns, dir.path(), &[]);
    let mut dst = destination(&ns, dir.path(), "dest", 0, &["--verify-migration"], &[]);

    let done = AtomicBool::new(false);
    let (report, verified) = std::thread::scope(|s| {
        let client =
            s.spawn(|| ns.run_in_scoped(|| echo_client(&done, 3000, Duration::from_secs(120))));
        // Let the connection carry some traffic first.
        std::thread::sleep(Duration::from_secs(2));
        let (status, out, err) = migrate(&ns, &src, 0, &["--verify", "--channels", "2"]);
        done.store(true, Ordering::SeqCst);
        assert!(
            status.success(),
            "migrate: {status}\n{out}\n{err}\n{}\n{}",
            src.vm.transcript(),
            dst.vm.transcript()
        );
        (json(&out), client.join().unwrap())
    });
    assert!(verified >= 40 * 512, "only {verified} bytes verified");

    // The source hands over and exits cleanly.
    let status = src.vm.wait_exit(T).unwrap();
    assert!(status.success(), "{}", src.vm.transcript());
    let before = counters(&src.vm.stdout());
    let last = *before.last().expect("the source printed counters");

    // The guest goes on on the destination: no second boot, the counter
    // (ticks, printed every 100) neither starts over nor repeats.
    let next = counter_of(&dst.vm.wait_for_line(is_counter, T).unwrap());
    assert!(
        next > last && next <= last + 200,
        "counter before migration {last}, after {next}\n{}",
        dst.vm.transcript()
    );
    assert!(
        !dst.vm.transcript().contains(BANNER),
        "the guest booted again"
    );

    // Both sides computed the same digest of RAM and device state.
    let digest = report["digest"].as_str().expect("digest in the report");
    assert_eq!(digest.len(), 64, "{report}");
    let (status, out, _) = ns.ctl(&dst.socket, &["status"]);
    assert!(status.success());
    let st = json(&out);
    assert_eq!(st["state"], "running", "{st}");
    assert_eq!(st["migration"]["phase"], "completed", "{st}");
    assert_eq!(
        st["migration"]["report"]["digest"].as_str(),
        Some(digest),
        "{st}"
    );
    assert!(report["rounds"].as_u64().unwrap() >= 2, "{report}");
    assert!(report["pages_sent"].as_u64().unwrap() > 0, "{report}");
    assert!(report["zero_pages"].as_u64().unwrap() > 0, "{report}");
    eprintln!(
        "migrated: downtime {} ms, {} rounds, {} pages, {} zero pages, {} echo bytes verified",
        report["downtime_ms"],
        report["rounds"],
        report["pages_sent"],
        report["zero_pages"],
        verified
    );

    dst.vm.send_line("poweroff");
    let status = dst.vm.wait_exit(T).unwrap();
    assert_eq!(status.code(), Some(0), "{}", dst.vm.transcript());
}

#[test]
fn a_prefaulted_destination_holds_all_its_ram_and_an_exact_copy() {
    if !available() {
        return;
    }
    let ns = NetNs::new("mpf");
    let dir = TempDir::new("mpf");
    let mut src = source(&ns, dir.path(), &[]);
    let mut dst = destination(
        &ns,
        dir.path(),
        "dest",
        0,
        &["--prefault", "--verify-migration"],
        &[],
    );
    // All of guest RAM is resident before any page arrives (the API
    // answers once the VM is built).
    let (status, out, _) = ns.ctl(&dst.socket, &["status"]);
    assert!(status.success(), "{out}");
    let ram = 128u64 << 20;
    let rss = rss_bytes(dst.vm.pid());
    assert!(rss >= ram, "destination RSS {rss} < guest RAM {ram}");

    let (status, out, err) = migrate(&ns, &src, 0, &["--verify"]);
    assert!(
        status.success(),
        "migrate: {status}\n{out}\n{err}\n{}\n{}",
        src.vm.transcript(),
        dst.vm.transcript()
    );
    // The digests of RAM and state matched at switchover (a mismatch
    // fails the migration): the kernel the destination loaded when it was
    // built was zeroed in place, and zero pages landed on allocated RAM.
    let report = json(&out);
    assert_eq!(
        report["digest"].as_str().map(str::len),
        Some(64),
        "{report}"
    );
    assert!(report["zero_pages"].as_u64().unwrap() > 0, "{report}");
    assert!(src.vm.wait_exit(T).unwrap().success());
    let last = *counters(&src.vm.stdout()).last().expect("counters");
    let next = counter_of(&dst.vm.wait_for_line(is_counter, T).unwrap());
    assert!(next > last && next <= last + 200, "{last} then {next}");
    dst.vm.send_line("poweroff");
    assert_eq!(dst.vm.wait_exit(T).unwrap().code(), Some(0));
}

#[test]
fn destination_dying_mid_transfer_leaves_the_source_running() {
    if !available() {
        return;
    }
    let ns = NetNs::new("migdd");
    let dir = TempDir::new("migdd");
    let mut src = source(&ns, dir.path(), &[]);
    let mut dying = destination(
        &ns,
        dir.path(),
        "dying",
        0,
        &[],
        &[("TWINVM_TEST_MIGRATION_DIE_AFTER_PAGES", "300")],
    );
    let (status, out, err) = migrate(&ns, &src, 0, &[]);
    assert_eq!(status.code(), Some(1), "{out}\n{err}");
    assert!(err.starts_with("twinvm: error: "), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    let killed = dying.vm.wait_exit(T).unwrap();
    assert!(!killed.success(), "{}", dying.vm.transcript());

    // The source runs on: its counter advances and it reports running.
    let a = counter_of(&src.vm.wait_for_line(is_counter, T).unwrap());
    let b = counter_of(&src.vm.wait_for_line(is_counter, T).unwrap());
    assert_eq!(b, a + 100);
    let (_, out, _) = ns.ctl(&src.socket, &["status"]);
    let st = json(&out);
    assert_eq!(st["state"], "running", "{st}");
    assert_eq!(st["migration"]["phase"], "failed", "{st}");

    // And it can still migrate, to a healthy destination.
    let mut dst = destination(&ns, dir.path(), "dest", 1, &[], &[]);
    let (status, out, err) = migrate(&ns, &src, 1, &[]);
    assert!(status.success(), "{out}\n{err}\n{}", dst.vm.transcript());
    assert!(src.vm.wait_exit(T).unwrap().success());
    dst.vm.wait_for_line(is_counter, T).unwrap();
    dst.vm.send_line("poweroff");
    assert_eq!(dst.vm.wait_exit(T).unwrap().code(), Some(0));
}

#[test]
fn source_dying_mid_transfer_stops_the_destination_without_running_the_guest() {
    if !available() {
        return;
    }
    let ns = NetNs::new("migsd");
    let dir = TempDir::new("migsd");
    let mut src = source(
        &ns,
        dir.path(),
        &[("TWINVM_TEST_MIGRATION_DIE_AFTER_PAGES", "300")],
    );
    let mut dst = destination(&ns, dir.path(), "dest", 0, &[], &[]);
    let (status, _, _) = migrate(&ns, &src, 0, &[]);
    assert!(!status.success());
    assert!(!src.vm.wait_exit(T).unwrap().success());
    let status = dst.vm.wait_exit(T).unwrap();
    assert_eq!(status.code(), Some(1), "{}", dst.vm.transcript());
    let err = dst.vm.stderr();
    assert!(
        err.contains("twinvm: error: incoming migration failed"),
        "{err}"
    );
    // No half-started guest: the destination never ran it.
    assert_eq!(dst.vm.stdout(), "", "{}", dst.vm.transcript());
}

/// Sends `bytes` to the destination's migration port and waits until the
/// connection is closed by it.
fn send_raw(bytes: &[u8], port_offset: u16) {
    let addr: SocketAddr = format!("127.0.0.1:{}", PORT + port_offset).parse().unwrap();
    let mut s = TcpStream::connect_timeout(&addr, T).expect("connect to the destination");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink);
}

#[test]
fn garbage_truncated_streams_and_wrong_keys_are_refused() {
    if !available() {
        return;
    }
    let ns = NetNs::new("miggb");
    let dir = TempDir::new("miggb");
    let key = dir.write("key", [7u8; 32]);
    let other = dir.write("other", [8u8; 32]);
    for k in [&key, &other] {
        std::fs::set_permissions(k, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    }
    let mut src = source(&ns, dir.path(), &[]);
    let mut dst = destination(
        &ns,
        dir.path(),
        "dest",
        0,
        &["--auth-key", path_str(&key)],
        &[],
    );

    ns.run_in_scoped(|| {
        // Garbage, a header cut short, a frame promising more than it has.
        send_raw(b"GET / HTTP/1.0\r\n\r\n", 0);
        send_raw(b"TWRL\x01\x00", 0);
        let mut frame = b"TWRL\x01\x00\x01\x00\x00\x00\x00\x00".to_vec();
        frame.extend_from_slice(&1000u32.to_le_bytes());
        frame.extend_from_slice(&0u64.to_le_bytes());
        frame.extend_from_slice(b"short");
        send_raw(&frame, 0);
    });
    // No key, then a wrong key: refused by the handshake; each source runs
    // on. (They take turns on the namespace's one tap.)
    let (status, _, err) = migrate(&ns, &src, 0, &[]);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("auth"), "{err}");
    src.vm.wait_for_line(is_counter, T).unwrap();
    src.vm.kill();
    let mut src_wrong = spawn(
        &ns,
        dir.path(),
        "wrongkey",
        &["--auth-key", path_str(&other)],
        &[],
    );
    src_wrong.vm.wait_for_line(|l| l == BANNER, T).unwrap();
    wait_for_socket(&src_wrong);
    let (status, _, err) = migrate(&ns, &src_wrong, 0, &[]);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("authentication failed"), "{err}");
    src_wrong.vm.wait_for_line(is_counter, T).unwrap();

    // The destination refused each one, logged why, and still waits.
    let deadline = Instant::now() + T;
    loop {
        let log = dst.vm.stderr();
        if log.matches("refused a migration connection").count() >= 5 {
            break;
        }
        assert!(Instant::now() < deadline, "{log}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_, out, _) = ns.ctl(&dst.socket, &["status"]);
    let st = json(&out);
    assert_eq!(st["migration"]["phase"], "waiting", "{st}");
    assert_eq!(dst.vm.stdout(), "");
    dst.vm.kill();
}

#[test]
fn pages_outside_guest_ram_end_the_incoming_migration() {
    use replication::handshake::{self, HandshakeConfig, Role};
    use replication::migration::wire;
    use replication::{Link, LinkConfig, MsgType};

    if !available() {
        return;
    }
    let ns = NetNs::new("migoob");
    let dir = TempDir::new("migoob");
    let mut dst = destination(&ns, dir.path(), "dest", 0, &[], &[]);
    ns.run_in_scoped(|| {
        let addr = format!("127.0.0.1:{PORT}");
        let mut link = Link::connect(addr.as_str(), T, LinkConfig::default()).unwrap();
        let mut hs = HandshakeConfig::new(Role::Source, [9; 16]);
        hs.expect_peer_vm = None;
        handshake::client(&mut link, &hs).unwrap();
        let begin = wire::Begin {
            session: [1; 16],
            channels: 1,
            flags: wire::BEGIN_RUNNING,
            fingerprint: vmm::snapshot::ConfigFingerprint {
                memory_bytes: 128 << 20,
                vcpus: 1,
                devices: vec![1],
            },
        };
        link.send(MsgType::MigBegin, &begin.encode()).unwrap();
        assert_eq!(link.recv().unwrap().msg_type(), MsgType::MigReady);
        let mut pages = wire::PagesBuilder::new();
        pages.next_page().fill(0x55);
        pages.commit(1 << 40, false);
        link.send(MsgType::MigPages, pages.finish()).unwrap();
        // The destination gives up and says why.
        let f = link.recv().unwrap();
        assert_eq!(f.msg_type(), MsgType::MigAbort);
        let why = wire::decode_abort(&f.payload);
        assert!(why.contains("outside guest RAM"), "{why}");
    });
    let status = dst.vm.wait_exit(T).unwrap();
    assert_eq!(status.code(), Some(1), "{}", dst.vm.transcript());
    let err = dst.vm.stderr();
    assert!(err.contains("outside guest RAM"), "{err}");
    assert_eq!(dst.vm.stdout(), "");
}
