//! COLO protection between two `twinvm` processes on this machine, inside
//! a network namespace the test creates: a secondary (`run --role
//! secondary --listen`) and a primary (`run --role primary --peer`) of the
//! test guest, with verify mode on, so that at every checkpoint the
//! secondary compares a page-granular digest of its loaded RAM and machine
//! state with the one the primary took in the pause.
//!
//! Faults use test hooks: `TWINVM_TEST_COLO_DIE=<side>:<epoch>:<pages>`
//! makes a process SIGKILL itself in the middle of a checkpoint, as a
//! failing host would end it; `TWINVM_TEST_COLO_CORRUPT=<kind>:<epoch>`
//! makes the primary send a bad page batch.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{
    GUEST_IP, NetNs, TempDir, Twinvm, echo_client, json, path_str, rss_bytes, twinvm_bin,
};

const T: Duration = Duration::from_secs(60);
/// Guest RAM of the pair.
const MEMORY_MIB: u64 = 160;
/// The secondary's staging bound (`--staging-limit`).
const STAGING_LIMIT: &str = "2M";
/// The guest dirties random pages all over its RAM, and appends records
/// to its disk.
const WORKLOAD: &str = "dirty_rate=4000 disk=stream disk_rate=20 disk_flush_every=5";
const PORT: u16 = 47_200;
const KEY: &[u8] = b"colo test key: thirty-two bytes or more, kept 0600";
const VM_ID: &str = "0123456789abcdef0123456789abcdef";

fn available() -> bool {
    common::kvm_available() && common::netns_available()
}

/// One side of the pair.
struct Side {
    vm: Twinvm,
    socket: PathBuf,
}

impl Side {
    /// `GET /vm`'s replication object.
    fn replication(&self, ns: &NetNs) -> serde_json::Value {
        let (status, out, err) = ns.ctl(&self.socket, &["status"]);
        assert!(status.success(), "status: {err}\n{}", self.vm.transcript());
        json(&out)["replication"].clone()
    }

    /// Waits (bounded) until the replication status satisfies `pred`.
    fn wait_until(
        &self,
        ns: &NetNs,
        what: &str,
        limit: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + limit;
        loop {
            let r = self.replication(ns);
            if pred(&r) {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "{what} not reached within {limit:?}: {r:#}\n{}",
                self.vm.transcript()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The files a pair needs: an auth key and a disk image per side.
struct Files {
    dir: TempDir,
    key: PathBuf,
}

impl Files {
    fn new(tag: &str) -> Files {
        let dir = TempDir::new(tag);
        let key = dir.write("key", KEY);
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        for name in ["primary.img", "secondary.img"] {
            let f = std::fs::File::create(dir.path().join(name)).unwrap();
            f.set_len(4 << 20).unwrap();
        }
        Files { dir, key }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// Starts one side in the namespace; `extra` goes after the common
/// options, `env` into its environment.
fn spawn(ns: &NetNs, files: &Files, role: &str, extra: &[&str], env: &[(&str, &str)]) -> Side {
    static SPAWNED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let dir = files.path();
    let n = SPAWNED.fetch_add(1, Ordering::Relaxed);
    let socket = dir.join(format!("{role}-{n}.sock"));
    let disk = dir.join(format!("{role}.img"));
    let mut cmd = ns.command(twinvm_bin());
    cmd.args(["run", "--role", role])
        .args(["--memory", &format!("{MEMORY_MIB}M")])
        .args(["--net", &format!("tap={}", ns.tap)])
        .args(["--disk", path_str(&disk)])
        .args(["--cmdline", &format!("ip={GUEST_IP}/24 {WORKLOAD}")])
        .args(["--api-socket", path_str(&socket)])
        .args(["--checkpoint-interval-ms", "100"])
        .args(["--staging-limit", STAGING_LIMIT])
        .arg("--verify-checkpoints")
        .args(extra)
        .env("TWINVM_LOG", "info");
    if !extra.contains(&"--auth-key") {
        cmd.args(["--auth-key", path_str(&files.key)]);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let side = Side {
        vm: Twinvm::spawn_command(cmd),
        socket,
    };
    let deadline = Instant::now() + T;
    while !side.socket.exists() {
        assert!(
            Instant::now() < deadline,
            "no API socket\n{}",
            side.vm.transcript()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    side
}

fn secondary(ns: &NetNs, files: &Files, port: u16, extra: &[&str], env: &[(&str, &str)]) -> Side {
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec!["--listen", listen.as_str(), "--vm-id", VM_ID];
    args.extend_from_slice(extra);
    spawn(ns, files, "secondary", &args, env)
}

fn primary(ns: &NetNs, files: &Files, port: u16, extra: &[&str], env: &[(&str, &str)]) -> Side {
    let peer = format!("127.0.0.1:{port}");
    let mut args = vec!["--peer", peer.as_str()];
    if !extra.contains(&"--vm-id") {
        args.extend_from_slice(&["--vm-id", VM_ID]);
    }
    args.extend_from_slice(extra);
    spawn(ns, files, "primary", &args, env)
}

fn protected(r: &serde_json::Value) -> bool {
    r["state"] == "protected"
}

fn checkpoints(r: &serde_json::Value) -> u64 {
    r["checkpoints"].as_u64().unwrap_or(0)
}

/// The next counter a side prints, waiting for it. A secondary's console
/// is speculative: a checkpoint can roll its guest back in the middle of a
/// line, which is then printed again after the cut, so the value is the
/// one after the line's last `counter=`.
fn next_counter(side: &mut Side) -> u64 {
    let line = side
        .vm
        .wait_for_line(|l| l.contains("counter="), T)
        .unwrap();
    counter_in(&line).unwrap_or_else(|| panic!("no counter in {line:?}"))
}

/// The value after the last `counter=` of a console line.
fn counter_in(line: &str) -> Option<u64> {
    let (_, rest) = line.rsplit_once("counter=")?;
    rest.split_whitespace().next()?.parse().ok()
}

#[test]
fn a_hundred_verified_checkpoints_under_memory_network_and_disk_load() {
    if !available() {
        return;
    }
    let ns = NetNs::new("colo");
    let files = Files::new("colo");
    let mut sec = secondary(&ns, &files, PORT, &[], &[]);
    // Pages travel on two connections.
    let mut pri = primary(&ns, &files, PORT, &["--replication-channels", "2"], &[]);
    let r = pri.wait_until(&ns, "protection", T, protected);
    assert!(checkpoints(&r) >= 1, "{r:#}");

    // The secondary's memory is sampled while the pair runs.
    let ram = MEMORY_MIB << 20;
    let stop = AtomicBool::new(false);
    let sec_pid = sec.vm.pid();
    let pri_pid = pri.vm.pid();
    let (verified, (max_rss, pri_rss), status) = std::thread::scope(|s| {
        let client =
            s.spawn(|| ns.run_in_scoped(|| echo_client(&stop, 20_000, Duration::from_secs(300))));
        let sampler = s.spawn(|| {
            let (mut max, mut pri_max) = (0, 0);
            while !stop.load(Ordering::SeqCst) {
                max = max.max(rss_bytes(sec_pid));
                pri_max = pri_max.max(rss_bytes(pri_pid));
                std::thread::sleep(Duration::from_millis(50));
            }
            (max, pri_max)
        });
        let status = pri.wait_until(&ns, "100 checkpoints", Duration::from_secs(240), |r| {
            checkpoints(r) >= 101
        });
        stop.store(true, Ordering::SeqCst);
        (client.join().unwrap(), sampler.join().unwrap(), status)
    });
    let sec_status = sec.replication(&ns);
    eprintln!(
        "primary: {status:#}\nsecondary: {sec_status:#}\nRSS max: secondary {} KiB, primary {} KiB; echo bytes verified {verified}",
        max_rss / 1024,
        pri_rss / 1024
    );
    // Every checkpoint's digests were compared by the secondary and equal
    // (a mismatch ends protection with the first differing page).
    assert!(protected(&status), "{status:#}");
    assert!(protected(&sec_status), "{sec_status:#}");
    assert!(
        status["verified_checkpoints"].as_u64().unwrap() >= 100,
        "{status:#}"
    );
    assert!(
        sec_status["verified_checkpoints"].as_u64().unwrap() >= 100,
        "{sec_status:#}"
    );
    assert!(status["last_error"].is_null(), "{status:#}");
    // Protection started with live pre-copy: the checkpoint that ended
    // the sync carried a residue, not the guest's memory.
    let sync = &status["sync_checkpoint"];
    assert_eq!(sync["trigger"], "sync", "{status:#}");
    let ram_pages = (MEMORY_MIB << 20) / 4096;
    assert!(
        sync["pages_in_pause"].as_u64().unwrap() < ram_pages / 16,
        "{sync:#}"
    );
    // The guest used its network throughout, and both sides' guests
    // dirtied pages (the secondary reports its own).
    assert!(verified >= 100 * 512, "only {verified} echo bytes verified");
    assert!(
        status["background_pages"].as_u64().unwrap() > 1000,
        "{status:#}"
    );
    assert!(status["pause_pages"].as_u64().unwrap() > 0, "{status:#}");
    // The secondary keeps one epoch of pages, not a second copy of RAM.
    assert!(
        max_rss as f64 <= 1.15 * ram as f64,
        "secondary RSS {} KiB > 1.15 × {} KiB of guest RAM",
        max_rss / 1024,
        ram / 1024
    );
    // The guest kept writing records to its disk on the primary.
    let records = pri
        .vm
        .stdout()
        .lines()
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("records="))
        })
        .filter_map(|n| n.parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    assert!(
        records >= 100,
        "{records} disk records\n{}",
        pri.vm.transcript()
    );

    pri.vm.send_line("poweroff");
    assert!(
        pri.vm.wait_exit(T).unwrap().success(),
        "{}",
        pri.vm.transcript()
    );
    // The guest powered off on the primary: the protected VM is off, and
    // the secondary ends with it (only a lost primary makes it go on).
    let status = sec.vm.wait_exit(T).unwrap();
    assert!(status.success(), "{}", sec.vm.transcript());
}

#[test]
fn primary_dying_mid_checkpoint_leaves_the_secondary_on_its_last_checkpoint() {
    if !available() {
        return;
    }
    let ns = NetNs::new("colopd");
    let files = Files::new("colopd");
    let mut sec = secondary(&ns, &files, PORT + 1, &[], &[]);
    let mut pri = primary(
        &ns,
        &files,
        PORT + 1,
        &[],
        &[("TWINVM_TEST_COLO_DIE", "primary:12:5")],
    );
    let killed = pri.vm.wait_exit(Duration::from_secs(120)).unwrap();
    assert!(!killed.success(), "{}", pri.vm.transcript());
    let before = sec.vm.stdout();
    let r = sec.wait_until(&ns, "primary lost", T, |r| r["state"] == "primary-lost");
    // Checkpoint 12 was half received and dropped: the secondary's digest
    // after dropping it equals its digest when it paused for it.
    let d = &r["discarded"];
    assert!(d["epoch"].as_u64().unwrap() >= 12, "{r:#}");
    assert_eq!(d["epoch"].as_u64().unwrap(), checkpoints(&r) + 1, "{r:#}");
    assert!(d["staged_pages"].as_u64().unwrap() > 0, "{r:#}");
    assert!(d["digest_at_pause"].is_string(), "{r:#}");
    assert_eq!(d["digest_at_pause"], d["digest_after_discard"], "{r:#}");
    // The guest goes on from its own state: the counter continues, no
    // second boot. (The secondary's console is speculative between
    // checkpoints: a line it printed after the last complete checkpoint
    // may come again.)
    let last = before
        .lines()
        .filter_map(counter_in)
        .next_back()
        .unwrap_or(0);
    let next = next_counter(&mut sec);
    assert!(
        next + 100 >= last && next > 0,
        "counter {next} after {last}\n{}",
        sec.vm.transcript()
    );
    // The secondary may print the banner itself once, if checkpoint 1
    // caught the primary's guest before it had printed it; a second boot
    // would print it after the guest's counters.
    let out = sec.vm.stdout();
    let running = out.find("counter=").unwrap_or(out.len());
    assert!(!out[running..].contains(common::BANNER), "{out}");
    sec.vm.send_line("poweroff");
    sec.vm.kill();
}

#[test]
fn secondary_dying_mid_checkpoint_leaves_the_primary_running_degraded() {
    if !available() {
        return;
    }
    let ns = NetNs::new("colosd");
    let files = Files::new("colosd");
    let mut sec = secondary(
        &ns,
        &files,
        PORT + 2,
        &[],
        &[("TWINVM_TEST_COLO_DIE", "secondary:12:5")],
    );
    let mut pri = primary(&ns, &files, PORT + 2, &[], &[]);
    let killed = sec.vm.wait_exit(Duration::from_secs(120)).unwrap();
    assert!(!killed.success(), "{}", sec.vm.transcript());
    let r = pri.wait_until(&ns, "degraded", T, |r| r["state"] == "degraded");
    assert!(r["last_error"].is_string(), "{r:#}");
    assert!(checkpoints(&r) >= 11, "{r:#}");
    // The primary's guest runs on, and still serves its network.
    let a = next_counter(&mut pri);
    let b = next_counter(&mut pri);
    assert_eq!(b, a + 100);
    let done = AtomicBool::new(true);
    let verified = ns.run_in_scoped(|| echo_client(&done, 100, T));
    assert!(verified >= 20 * 512);
    let (_, out, _) = ns.ctl(&pri.socket, &["status"]);
    assert_eq!(json(&out)["state"], "running", "{out}");
    pri.vm.send_line("poweroff");
    assert!(
        pri.vm.wait_exit(T).unwrap().success(),
        "{}",
        pri.vm.transcript()
    );
}

#[test]
fn bad_checkpoints_are_dropped_and_the_secondary_guest_is_untouched() {
    if !available() {
        return;
    }
    for (i, kind) in ["page-outside-ram", "truncated"].into_iter().enumerate() {
        let ns = NetNs::new("colobad");
        let files = Files::new("colobad");
        let port = PORT + 3 + i as u16;
        let mut sec = secondary(&ns, &files, port, &[], &[]);
        let corrupt = format!("{kind}:8");
        let pri = primary(
            &ns,
            &files,
            port,
            &[],
            &[("TWINVM_TEST_COLO_CORRUPT", corrupt.as_str())],
        );
        let r = sec.wait_until(&ns, "primary lost", T, |r| r["state"] == "primary-lost");
        let d = &r["discarded"];
        assert_eq!(checkpoints(&r), 7, "{kind}: {r:#}");
        assert_eq!(d["epoch"], 8, "{kind}: {r:#}");
        assert_eq!(
            d["digest_at_pause"], d["digest_after_discard"],
            "{kind}: {r:#}"
        );
        let reason = d["reason"].as_str().unwrap_or_default();
        let expect = if kind == "truncated" {
            "truncated"
        } else {
            "outside guest RAM"
        };
        assert!(reason.contains(expect), "{kind}: {reason}");
        // The primary learns why and runs on unprotected.
        let p = pri.wait_until(&ns, "degraded", T, |r| r["state"] == "degraded");
        assert!(p["last_error"].is_string(), "{p:#}");
        next_counter(&mut sec);
    }
}

#[test]
fn wrong_keys_identities_and_garbage_are_refused_before_anything_runs() {
    if !available() {
        return;
    }
    let ns = NetNs::new("colokey");
    let files = Files::new("colokey");
    let port = PORT + 6;
    let mut sec = secondary(&ns, &files, port, &[], &[]);
    // Garbage on the port.
    ns.run_in_scoped(|| {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let _ = s.write_all(b"GET / HTTP/1.1\r\n\r\n\0\0\0\0garbage");
    });
    // A primary with another key, then one of another VM.
    let other_key = files.dir.write(
        "other-key",
        b"another key of thirty-two bytes or more......",
    );
    std::fs::set_permissions(
        &other_key,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let mut wrong_key = primary(
        &ns,
        &files,
        port,
        &["--auth-key", path_str(&other_key)],
        &[],
    );
    let r = wrong_key.wait_until(&ns, "a refusal", T, |r| r["last_error"].is_string());
    assert_eq!(r["state"], "connecting", "{r:#}");
    wrong_key.vm.kill();
    let mut wrong_vm = primary(
        &ns,
        &files,
        port,
        &["--vm-id", "ffffffffffffffffffffffffffffffff"],
        &[],
    );
    let r = wrong_vm.wait_until(&ns, "a refusal", T, |r| r["last_error"].is_string());
    assert_eq!(r["state"], "connecting", "{r:#}");
    wrong_vm.vm.kill();
    let s = sec.replication(&ns);
    assert_eq!(s["state"], "waiting-for-primary", "{s:#}");
    assert_eq!(checkpoints(&s), 0, "{s:#}");
    // The secondary's guest never ran; a right primary is still welcome.
    assert!(!sec.vm.stdout().contains("counter="));
    let pri = primary(&ns, &files, port, &[], &[]);
    pri.wait_until(&ns, "protection", T, protected);
    sec.wait_until(&ns, "protection", T, protected);
}

#[test]
fn verify_mode_names_a_page_left_out_of_a_checkpoint() {
    if !available() {
        return;
    }
    let ns = NetNs::new("coloskip");
    let files = Files::new("coloskip");
    let port = PORT + 7;
    let mut sec = secondary(&ns, &files, port, &[], &[]);
    // From checkpoint 6 on, the primary leaves one dirty page out of each
    // checkpoint, as a bug in dirty tracking would.
    let mut pri = primary(
        &ns,
        &files,
        port,
        &[],
        &[("TWINVM_TEST_COLO_CORRUPT", "skip-page:6")],
    );
    let status = sec
        .vm
        .wait_exit(Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}\n{}", pri.vm.transcript()));
    assert_eq!(status.code(), Some(1), "{}", sec.vm.transcript());
    let p = pri.wait_until(&ns, "degraded", T, |r| r["state"] == "degraded");
    let err = sec.vm.stderr();
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("twinvm: error: replication failed: checkpoint "),
        "{err}"
    );
    // The secondary names a page the primary left out.
    let pri_err = pri.vm.stderr();
    let left_out: Vec<u64> = pri_err
        .lines()
        .filter(|l| l.contains("leaving page"))
        .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("0x")))
        .filter_map(|h| u64::from_str_radix(h, 16).ok())
        .collect();
    assert!(!left_out.is_empty(), "no page left out\n{pri_err}");
    assert!(last.contains("does not match"), "{last}");
    assert!(
        left_out
            .iter()
            .any(|gpa| last.contains(&format!("Ram {{ gpa: {gpa} }}"))),
        "{last}\nleft out: {left_out:x?}"
    );
    assert!(
        p["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("does not match"),
        "{p:#}"
    );
}
