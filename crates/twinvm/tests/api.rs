//! The control API of a running VM (`twinvm run --api-socket`), driven with
//! `twinvm ctl` and with raw bytes on the socket: status, pause and resume
//! seen in the guest's counter, power-off, socket permissions and clean-up,
//! stale and live sockets, and misbehaving clients.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use common::{
    BANNER, TempDir, Twinvm, counter_of, is_counter, kvm_available, path_str, run_to_exit,
};

const T: Duration = Duration::from_secs(60);

/// Runs `twinvm ctl --socket SOCKET ACTION`.
fn ctl(socket: &Path, action: &str) -> (ExitStatus, String, String) {
    run_to_exit(&["ctl", "--socket", path_str(socket), action], T)
}

/// `twinvm ctl ACTION`, which must succeed; returns its stdout.
fn ctl_ok(vm: &Twinvm, socket: &Path, action: &str) -> String {
    let (status, stdout, stderr) = ctl(socket, action);
    assert!(
        status.success(),
        "ctl {action}: {status}\nstdout: {stdout}\nstderr: {stderr}\n{}",
        vm.transcript()
    );
    stdout
}

/// The VM's status, through `twinvm ctl status`.
fn status(vm: &Twinvm, socket: &Path) -> serde_json::Value {
    let out = ctl_ok(vm, socket, "status");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("status is not JSON ({e}): {out}"))
}

/// Sends `request` on a fresh connection (a write error is ignored: the
/// server may close early) and returns everything the server sends back
/// before closing, within `timeout`.
fn raw(socket: &Path, request: &[u8], timeout: Duration) -> Vec<u8> {
    let mut s = UnixStream::connect(socket).expect("connect to the API socket");
    s.set_read_timeout(Some(timeout)).unwrap();
    s.set_write_timeout(Some(timeout)).unwrap();
    let _ = s.write_all(request);
    read_all(&mut s)
}

/// Reads until the server closes; a reset after some bytes ends the read.
fn read_all(s: &mut UnixStream) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("reading the response: {e} (after {} bytes)", buf.len()),
        }
    }
    buf
}

/// The status code of a raw response, or None for a closed connection.
fn status_code(response: &[u8]) -> Option<u16> {
    let text = String::from_utf8_lossy(response);
    let line = text.lines().next()?;
    line.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// The `error` of a raw JSON error response.
fn error_text(response: &[u8]) -> String {
    let text = String::from_utf8_lossy(response);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
    let json: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    json["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error field: {text}"))
        .to_string()
}

#[test]
fn status_pause_resume_and_stop() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("api");
    let socket = dir.path().join("api.sock");
    let mut vm = Twinvm::spawn(&[
        "run",
        "--cpus",
        "2",
        "--memory",
        "64M",
        "--api-socket",
        path_str(&socket),
    ]);
    vm.wait_for_line(|l| l == BANNER, T).unwrap();
    let mut last = counter_of(&vm.wait_for_line(is_counter, T).unwrap());

    let meta = std::fs::symlink_metadata(&socket).expect("socket exists");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "socket mode");

    let s = status(&vm, &socket);
    assert_eq!(s["state"], "running", "{s}");
    assert_eq!(s["vcpus"], 2, "{s}");
    assert_eq!(s["memory_bytes"], 64u64 << 20, "{s}");
    assert!(s["uptime_ms"].as_u64().is_some_and(|u| u > 0), "{s}");
    assert_eq!(
        s["devices"],
        serde_json::json!({"net": [], "disks": []}),
        "{s}"
    );

    assert_eq!(ctl_ok(&vm, &socket, "pause").trim(), "VM paused");
    // Pausing a paused VM is fine.
    assert_eq!(ctl_ok(&vm, &socket, "pause").trim(), "VM paused");
    assert_eq!(status(&vm, &socket)["state"], "paused");
    // A line the guest wrote just before the pause may still be on its way.
    if let Ok(line) = vm.wait_for_line(is_counter, Duration::from_millis(500)) {
        last = counter_of(&line);
    }
    let quiet = vm.wait_for_line(is_counter, Duration::from_millis(2500));
    assert!(quiet.is_err(), "the guest ran while paused: {quiet:?}");
    let uptime = status(&vm, &socket)["uptime_ms"].as_u64().expect("uptime");

    assert_eq!(ctl_ok(&vm, &socket, "resume").trim(), "VM resumed");
    let s = status(&vm, &socket);
    assert_eq!(s["state"], "running", "{s}");
    assert!(s["uptime_ms"].as_u64().expect("uptime") >= uptime, "{s}");
    let next = counter_of(&vm.wait_for_line(is_counter, T).unwrap());
    assert!(next > last, "counter did not continue: {last} then {next}");

    assert_eq!(ctl_ok(&vm, &socket, "stop").trim(), "VM powering off");
    let exit = vm.wait_exit(T).unwrap();
    assert_eq!(exit.code(), Some(0), "{}", vm.transcript());
    assert!(!socket.exists(), "the socket file was left behind");

    let (status, stdout, stderr) = ctl(&socket, "status");
    assert_eq!(status.code(), Some(1));
    assert!(stdout.is_empty(), "{stdout}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("twinvm: error: cannot connect to the API socket"),
        "{stderr}"
    );
}

#[test]
fn misbehaving_clients_do_not_hurt_the_vm() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("api-garbage");
    let socket = dir.path().join("api.sock");
    let mut vm = Twinvm::spawn(&["run", "--memory", "64M", "--api-socket", path_str(&socket)]);
    vm.wait_for_line(|l| l == BANNER, T).unwrap();
    let first = counter_of(&vm.wait_for_line(is_counter, T).unwrap());
    let short = Duration::from_secs(10);

    // A request that never ends: the server gives up after its timeout
    // (5 s). Meanwhile other clients are served.
    let stalled = {
        let socket = socket.clone();
        std::thread::spawn(move || {
            let mut s = UnixStream::connect(&socket).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            s.write_all(b"PUT /vm/pause HTTP/1.1\r\nContent-Length: 10\r\n\r\n{")
                .unwrap();
            let started = Instant::now();
            let response = read_all(&mut s);
            (started.elapsed(), response)
        })
    };
    assert_eq!(status(&vm, &socket)["state"], "running");

    // Random bytes.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let noise: Vec<u8> = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let r = raw(&socket, &noise, short);
    assert!(matches!(status_code(&r), Some(400) | None), "{r:?}");

    // A huge header.
    let mut huge = b"GET /vm HTTP/1.1\r\nX-Filler: ".to_vec();
    huge.resize(256 * 1024, b'a');
    let r = raw(&socket, &huge, short);
    assert!(matches!(status_code(&r), Some(431) | None), "{r:?}");

    // A body larger than allowed, announced up front.
    let r = raw(
        &socket,
        b"PUT /vm/pause HTTP/1.1\r\nContent-Length: 10000000\r\n\r\n",
        short,
    );
    assert_eq!(status_code(&r), Some(413), "{r:?}");

    // Well-formed HTTP the API does not accept.
    let r = raw(&socket, b"GET /nope HTTP/1.1\r\n\r\n", short);
    assert_eq!(status_code(&r), Some(404));
    assert!(error_text(&r).contains("/nope"));
    let r = raw(&socket, b"DELETE /vm HTTP/1.1\r\n\r\n", short);
    assert_eq!(status_code(&r), Some(405));
    let r = raw(
        &socket,
        b"PUT /vm/pause HTTP/1.1\r\nContent-Length: 5\r\n\r\n{oops",
        short,
    );
    assert_eq!(status_code(&r), Some(400));
    assert!(error_text(&r).contains("invalid JSON"), "{r:?}");
    // A client that connects and leaves.
    drop(UnixStream::connect(&socket).expect("connect"));

    let (waited, response) = stalled.join().expect("stalled client");
    assert_eq!(status_code(&response), Some(408), "{response:?}");
    assert!(waited < Duration::from_secs(15), "took {waited:?}");

    // Still running, still answering, never paused by the garbage.
    let s = status(&vm, &socket);
    assert_eq!(s["state"], "running", "{s}");
    let later = counter_of(&vm.wait_for_line(is_counter, T).unwrap());
    assert!(later > first, "counter stuck: {first} then {later}");
    vm.send_line("poweroff");
    assert_eq!(vm.wait_exit(T).unwrap().code(), Some(0));
    assert!(!socket.exists());
}

#[test]
fn too_many_connections_get_503_and_service_recovers() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("api-many");
    let socket = dir.path().join("api.sock");
    let mut vm = Twinvm::spawn(&["run", "--memory", "64M", "--api-socket", path_str(&socket)]);
    vm.wait_for_line(|l| l == BANNER, T).unwrap();

    // Idle connections, each holding a server thread until its timeout.
    let idle: Vec<UnixStream> = (0..16)
        .map(|_| UnixStream::connect(&socket).expect("connect"))
        .collect();
    // The accept loop hands each to a thread in order; the next one finds
    // all of them busy.
    let r = raw(
        &socket,
        b"GET /vm HTTP/1.1\r\n\r\n",
        Duration::from_secs(10),
    );
    assert_eq!(status_code(&r), Some(503), "{r:?}");
    drop(idle);

    // The threads notice the closed connections at once.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = raw(
            &socket,
            b"GET /vm HTTP/1.1\r\n\r\n",
            Duration::from_secs(10),
        );
        if status_code(&r) == Some(200) {
            break;
        }
        assert_eq!(status_code(&r), Some(503), "{r:?}");
        assert!(Instant::now() < deadline, "still refused after 10 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    ctl_ok(&vm, &socket, "stop");
    assert_eq!(vm.wait_exit(T).unwrap().code(), Some(0));
}

#[test]
fn config_file_socket_replaces_a_stale_one_and_a_live_one_is_refused() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("api-stale");
    let cfg = dir.write(
        "vm.toml",
        "[vm]\nmemory = \"64M\"\n\n[api]\nsocket = \"vm.sock\"\n",
    );
    let socket = dir.path().join("vm.sock");
    // A socket left behind by a twinvm that was killed.
    drop(UnixListener::bind(&socket).expect("bind"));
    assert!(socket.exists());

    let mut vm = Twinvm::spawn(&["run", "--config", path_str(&cfg)]);
    vm.wait_for_line(|l| l == BANNER, T).unwrap();
    assert_eq!(status(&vm, &socket)["memory_bytes"], 64u64 << 20);

    // A second VM on the same socket is refused before it boots.
    let (status, stdout, stderr) = run_to_exit(
        &["run", "--api-socket", path_str(&socket), "--memory", "64M"],
        T,
    );
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("is in use"), "{stderr}");
    assert!(stderr.contains(path_str(&socket)), "{stderr}");

    // The first VM still owns its socket.
    ctl_ok(&vm, &socket, "pause");
    ctl_ok(&vm, &socket, "stop");
    assert_eq!(vm.wait_exit(T).unwrap().code(), Some(0));
    assert!(!socket.exists());
}

#[test]
fn checkpoint_is_refused_without_replication() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("api-ckpt");
    let socket = dir.path().join("api.sock");
    let mut vm = Twinvm::spawn(&["run", "--memory", "64M", "--api-socket", path_str(&socket)]);
    vm.wait_for_line(|l| l == BANNER, T).unwrap();

    let s = status(&vm, &socket);
    assert!(s.get("replication").is_none(), "{s}");

    let r = raw(
        &socket,
        b"PUT /vm/checkpoint HTTP/1.1\r\n\r\n",
        Duration::from_secs(10),
    );
    assert_eq!(status_code(&r), Some(409), "{r:?}");
    let msg = error_text(&r);
    assert!(msg.contains("not replicated"), "{msg}");
    assert!(!msg.contains('\n'), "{msg}");
    let r = raw(&socket, b"GET /vm/checkpoint HTTP/1.1\r\n\r\n", T);
    assert_eq!(status_code(&r), Some(405), "{r:?}");

    let (code, stdout, stderr) = ctl(&socket, "checkpoint");
    assert_eq!(code.code(), Some(1), "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("twinvm: error: the VM answered 409 Conflict: cannot take a checkpoint"),
        "{stderr}"
    );

    // Nothing changed: the VM still takes the usual requests.
    ctl_ok(&vm, &socket, "pause");
    ctl_ok(&vm, &socket, "resume");
    ctl_ok(&vm, &socket, "stop");
    assert_eq!(vm.wait_exit(T).unwrap().code(), Some(0));
}

#[test]
fn a_primary_without_its_secondary_runs_and_refuses_what_would_split_the_pair() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("api-primary");
    let socket = dir.path().join("api.sock");
    // A port nothing listens on: the primary keeps trying to reach it.
    let peer = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("address").to_string()
    };
    let mut vm = Twinvm::spawn(&[
        "run",
        "--memory",
        "64M",
        "--api-socket",
        path_str(&socket),
        "--role",
        "primary",
        "--peer",
        &peer,
        "--checkpoint-interval-ms",
        "200",
        "--vm-id",
        "00112233445566778899aabbccddeeff",
    ]);
    // The guest runs unprotected meanwhile.
    vm.wait_for_line(|l| l == BANNER, T).unwrap();
    vm.wait_for_line(is_counter, T).unwrap();

    let s = status(&vm, &socket);
    let r = &s["replication"];
    assert_eq!(r["role"], "primary", "{s}");
    assert_eq!(r["peer"], peer.as_str(), "{s}");
    assert_eq!(r["interval_ms"], 200.0, "{s}");
    assert_ne!(r["state"], "protected", "{s}");
    assert_eq!(s["state"], "running", "{s}");

    let r = raw(&socket, b"PUT /vm/checkpoint HTTP/1.1\r\n\r\n", T);
    assert_eq!(status_code(&r), Some(409), "{r:?}");
    assert!(
        error_text(&r).starts_with("cannot take a checkpoint: "),
        "{r:?}"
    );
    for (action, verb) in [("pause", "pause"), ("resume", "resume")] {
        let (code, _, stderr) = ctl(&socket, action);
        assert_eq!(code.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains(&format!("cannot {verb} the VM: COLO replication is active")),
            "{stderr}"
        );
    }
    let snap = dir.path().join("snap");
    let (code, _, stderr) = run_to_exit(
        &[
            "ctl",
            "--socket",
            path_str(&socket),
            "snapshot",
            "--to",
            path_str(&snap),
        ],
        T,
    );
    assert_eq!(code.code(), Some(1), "{stderr}");
    assert!(stderr.contains("COLO replication is active"), "{stderr}");
    assert!(!snap.exists());
    let (code, _, stderr) = run_to_exit(
        &[
            "ctl",
            "--socket",
            path_str(&socket),
            "migrate",
            "--to",
            "127.0.0.1:1",
        ],
        T,
    );
    assert_eq!(code.code(), Some(1), "{stderr}");
    assert!(stderr.contains("COLO replication is active"), "{stderr}");

    // Powering off ends it.
    ctl_ok(&vm, &socket, "stop");
    assert_eq!(
        vm.wait_exit(T).unwrap().code(),
        Some(0),
        "{}",
        vm.transcript()
    );
    assert!(!socket.exists());
}
