//! `twinvm pair`: its command line, and that it starts both VMs with their
//! API sockets and stops both cleanly on SIGTERM. (Whether the secondary
//! is really kept in step is tested with the COLO engine.)

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{BANNER, TempDir, Twinvm, kvm_available, path_str, run_to_exit};

const T: Duration = Duration::from_secs(60);

#[test]
fn help_describes_the_pair() {
    let (status, stdout, stderr) = run_to_exit(&["pair", "--help"], T);
    assert!(status.success(), "{stderr}");
    for want in [
        "--dir <DIR>",
        "--port <PORT>",
        "--memory <SIZE>",
        "--disk",
        "--checkpoint-interval-ms <MS>",
        "--replication-channels <N>",
        "--verify-checkpoints",
    ] {
        assert!(stdout.contains(want), "no {want} in\n{stdout}");
    }
    let (status, stdout, _) = run_to_exit(&["--help"], T);
    assert!(status.success());
    assert!(stdout.contains("pair"), "{stdout}");
}

#[test]
fn bad_pair_options_are_usage_errors() {
    for (args, want) in [
        (&["pair", "--port", "0"][..], "--port"),
        (&["pair", "--port", "http"], "--port"),
        (&["pair", "--memory", "0"], "--memory"),
        (&["pair", "--checkpoint-interval-ms", "1"], "between 10"),
        (
            &["pair", "--replication-channels", "99"],
            "between 1 and 16",
        ),
        (&["pair", "--role", "primary"], "--role"),
        (&["pair", "--dir", ""], "--dir"),
        (
            &["pair", "--net", "tap=t0", "--net", "tap=t0"],
            "tap device 't0'",
        ),
    ] {
        let (status, stdout, stderr) = run_to_exit(args, T);
        assert_eq!(status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stdout.is_empty(), "{args:?}: {stdout}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: {stderr}");
        assert!(lines[0].starts_with("twinvm: error: "), "{stderr}");
        assert!(lines[0].contains(want), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn a_missing_disk_image_fails_before_anything_starts() {
    let dir = TempDir::new("pair-nodisk");
    let pair_dir = dir.path().join("pair");
    let missing = dir.path().join("missing.img");
    let (status, stdout, stderr) = run_to_exit(
        &[
            "pair",
            "--dir",
            path_str(&pair_dir),
            "--disk",
            path_str(&missing),
        ],
        T,
    );
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].starts_with("twinvm: error: cannot copy the disk image"),
        "{stderr}"
    );
    assert!(lines[0].contains(path_str(&missing)), "{stderr}");
    assert!(!pair_dir.join("primary.sock").exists());
    assert!(!pair_dir.join("secondary.sock").exists());
}

/// `GET /vm` on `socket`, as JSON; None if nothing answers (yet).
fn get_vm(socket: &Path) -> Option<serde_json::Value> {
    let mut s = UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(b"GET /vm HTTP/1.1\r\n\r\n").ok()?;
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    if !text.starts_with("HTTP/1.1 200") {
        return None;
    }
    serde_json::from_str(text.split("\r\n\r\n").nth(1)?).ok()
}

/// Waits until `socket` answers `GET /vm`.
fn wait_status(pair: &mut Twinvm, socket: &Path) -> serde_json::Value {
    let deadline = Instant::now() + T;
    loop {
        if let Some(s) = get_vm(socket) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{} did not answer within {T:?}\nstderr: {}\n{}",
            socket.display(),
            pair.stderr(),
            pair.transcript()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The pid `twinvm pair` printed for `role` ("primary (pid N)").
fn pid_of(stderr: &str, role: &str) -> i32 {
    let key = format!("{role} (pid ");
    let at = stderr
        .find(&key)
        .unwrap_or_else(|| panic!("no {role} pid in\n{stderr}"));
    stderr[at + key.len()..]
        .split(')')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("bad {role} pid in\n{stderr}"))
}

fn alive(pid: i32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn pair_starts_both_sides_and_sigterm_stops_both() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("pair");
    let pair_dir = dir.path().join("pair");
    let image = dir.write("data.img", vec![0x5a; 1 << 20]);
    let mut pair = Twinvm::spawn(&[
        "pair",
        "--dir",
        path_str(&pair_dir),
        "--memory",
        "64M",
        "--disk",
        path_str(&image),
    ]);
    // The primary's console is the pair's stdout.
    pair.wait_for_line(|l| l == BANNER, T).unwrap();

    let primary_sock = pair_dir.join("primary.sock");
    let secondary_sock = pair_dir.join("secondary.sock");
    let p = wait_status(&mut pair, &primary_sock);
    assert_eq!(p["replication"]["role"], "primary", "{p}");
    assert_eq!(p["memory_bytes"], 64u64 << 20, "{p}");
    assert_eq!(
        p["devices"]["disks"][0]["path"],
        path_str(&image),
        "the primary uses the image given: {p}"
    );
    let s = wait_status(&mut pair, &secondary_sock);
    assert_eq!(s["replication"]["role"], "secondary", "{s}");
    let copy = pair_dir.join("secondary-0.img");
    assert_eq!(
        s["devices"]["disks"][0]["path"],
        path_str(&copy),
        "the secondary uses its own copy: {s}"
    );

    // The pair's files.
    let key = std::fs::metadata(pair_dir.join("auth.key")).expect("auth key");
    assert_eq!(key.len(), 32);
    assert_eq!(key.permissions().mode() & 0o777, 0o600);
    assert_eq!(std::fs::metadata(&copy).expect("disk copy").len(), 1 << 20);
    assert!(pair_dir.join("secondary.log").exists());

    let stderr = pair.stderr();
    assert!(
        stderr.contains(&format!(
            "twinvm ctl --socket {} status",
            primary_sock.display()
        )),
        "{stderr}"
    );
    let primary = pid_of(&stderr, "primary");
    let secondary = pid_of(&stderr, "secondary");
    assert!(alive(primary) && alive(secondary));

    // SAFETY: kill(2) on the pair's pid, a child of this test that has not
    // been reaped; no memory is involved.
    let rc = unsafe { libc::kill(pair.pid() as i32, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let status = pair.wait_exit(T).unwrap();
    assert_eq!(
        status.code(),
        Some(128 + libc::SIGTERM),
        "{}\n{}",
        pair.stderr(),
        pair.transcript()
    );
    assert!(!alive(primary), "the primary still runs");
    assert!(!alive(secondary), "the secondary still runs");
    let stderr = pair.stderr();
    assert!(!stderr.contains("panicked"), "{stderr}");

    // Both VMs powered off cleanly: their sockets are gone; nothing else
    // was removed.
    assert!(!primary_sock.exists());
    assert!(!secondary_sock.exists());
    assert_eq!(
        std::fs::metadata(&image).expect("image kept").len(),
        1 << 20
    );
    for name in ["auth.key", "secondary.log", "secondary-0.img"] {
        assert!(pair_dir.join(name).exists(), "{name} was removed");
    }
}
