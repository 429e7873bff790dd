//! Shared helpers for integration tests that run the `twinvm` binary.
//!
//! Every wait here is bounded by a timeout, and nothing synchronises by
//! sleeping: output is read by background threads and delivered over
//! channels, and process exit is observed through a pidfd.
//!
//! ```ignore
//! mod common;
//! use common::*;
//!
//! #[test]
//! fn boots() {
//!     if !kvm_available() {
//!         return;
//!     }
//!     let mut vm = Twinvm::spawn(&["run"]);
//!     vm.wait_for_line(|l| l.contains("TWINVM TESTGUEST READY"), secs(30))
//!         .unwrap_or_else(|e| panic!("{e}"));
//!     vm.send_line("poweroff");
//!     let status = vm.wait_exit(secs(30)).unwrap_or_else(|e| panic!("{e}"));
//!     assert!(status.success(), "{}", vm.transcript());
//! }
//! ```

#![allow(dead_code)]

pub mod guest;

use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The test guest's ready banner.
pub const BANNER: &str = "TWINVM TESTGUEST READY";

/// Whether a console line is the test guest's per-second counter line.
pub fn is_counter(line: &str) -> bool {
    line.starts_with("counter=")
}

/// The `counter=<n>` value of a counter line.
pub fn counter_of(line: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("counter="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no counter in {line:?}"))
}

/// Deterministic test data: `len` xorshift64 bytes from `seed`.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A temporary path as a command-line argument.
pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

/// Environment variable that turns "no usable /dev/kvm" from a test failure
/// into a skip.
pub const SKIP_KVM_ENV: &str = "TWINVM_TESTS_SKIP_KVM";

/// The `twinvm` binary under test.
pub fn twinvm_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_twinvm"))
}

/// Shorthand for `Duration::from_secs`.
pub fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// Resident memory of process `pid`, from /proc (0 if it is gone).
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// True if /dev/kvm can be opened read-write. Otherwise panics with the
/// reason, unless `TWINVM_TESTS_SKIP_KVM=1` is set: then it notes the skip
/// on stderr and returns false, and the test should return early.
pub fn kvm_available() -> bool {
    match OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => true,
        Err(e) => {
            if std::env::var_os(SKIP_KVM_ENV).as_deref() == Some(OsStr::new("1")) {
                eprintln!("SKIPPED: /dev/kvm is not usable: {e} ({SKIP_KVM_ENV}=1)");
                false
            } else {
                panic!("/dev/kvm is not usable: {e}; set {SKIP_KVM_ENV}=1 to skip KVM tests");
            }
        }
    }
}

/// A running `twinvm` process with piped stdin, stdout and stderr.
///
/// stdout (the guest's serial console) is split into lines by a background
/// thread; every line is recorded for [`Twinvm::transcript`] and delivered to
/// [`Twinvm::wait_for_line`]. stderr is collected by another thread.
pub struct Twinvm {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    stdout_log: Arc<Mutex<String>>,
    stdout_open: bool,
    stderr_log: Arc<Mutex<String>>,
    stderr_done: Receiver<()>,
    status: Option<ExitStatus>,
    what: String,
}

impl Twinvm {
    /// Starts `twinvm <args>`. Panics if the binary cannot be started.
    pub fn spawn(args: &[&str]) -> Twinvm {
        let mut cmd = Command::new(twinvm_bin());
        cmd.args(args);
        Self::spawn_command(cmd)
    }

    /// Starts an arbitrary command (e.g. `twinvm` behind a wrapper such as
    /// `unshare` or `setpriv`, or with extra environment) with the same
    /// plumbing as [`Twinvm::spawn`]. stdin, stdout and stderr are replaced
    /// by pipes.
    pub fn spawn_command(mut cmd: Command) -> Twinvm {
        let what = format!("{cmd:?}");
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");

        let (tx, lines) = mpsc::channel();
        let stdout_log = Arc::new(Mutex::new(String::new()));
        let log = Arc::clone(&stdout_log);
        thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let text = String::from_utf8_lossy(&buf);
                        lock(&log).push_str(&text);
                        let line = text.trim_end_matches(['\n', '\r']).to_string();
                        // The receiver may be gone (Twinvm dropped); keep
                        // draining so the child never blocks on a full pipe.
                        let _ = tx.send(line);
                    }
                }
            }
        });

        let (done_tx, stderr_done) = mpsc::channel();
        let stderr_log = Arc::new(Mutex::new(String::new()));
        let log = Arc::clone(&stderr_log);
        thread::spawn(move || {
            let mut stderr = stderr;
            let mut chunk = [0u8; 4096];
            loop {
                match stderr.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => lock(&log).push_str(&String::from_utf8_lossy(&chunk[..n])),
                }
            }
            let _ = done_tx.send(());
        });

        Twinvm {
            child,
            stdin,
            lines,
            stdout_log,
            stdout_open: true,
            stderr_log,
            stderr_done,
            status: None,
            what,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until a stdout line satisfies `pred` and returns it. Lines
    /// read before it are consumed. On timeout, or if stdout closes first,
    /// the error holds everything the process has written so far.
    pub fn wait_for_line(
        &mut self,
        pred: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if pred(&line) {
                        return Ok(line);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "timed out after {timeout:?} waiting for a matching line\n{}",
                        self.transcript()
                    ));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.stdout_open = false;
                    return Err(format!(
                        "stdout closed before a matching line appeared\n{}",
                        self.transcript()
                    ));
                }
            }
        }
    }

    /// Writes `line` and a newline to the process's stdin (the guest's
    /// serial input). Panics, with the transcript, if that fails.
    pub fn send_line(&mut self, line: &str) {
        let result = match self.stdin.as_mut() {
            Some(stdin) => stdin
                .write_all(format!("{line}\n").as_bytes())
                .and_then(|()| stdin.flush()),
            None => Err(std::io::Error::other("stdin was closed")),
        };
        if let Err(e) = result {
            panic!("cannot send {line:?} to twinvm: {e}\n{}", self.transcript());
        }
    }

    /// Closes the process's stdin (end of file on the serial input).
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Waits for the process to exit. On timeout it is killed and the error
    /// holds the transcript.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, String> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        match wait_with_timeout(&mut self.child, timeout) {
            Ok(Some(status)) => {
                self.status = Some(status);
                Ok(status)
            }
            Ok(None) => {
                let killed = self.kill();
                Err(format!(
                    "twinvm did not exit within {timeout:?}; killed it ({})\n{}",
                    match killed {
                        Some(s) => s.to_string(),
                        None => "kill failed".to_string(),
                    },
                    self.transcript()
                ))
            }
            Err(e) => Err(format!(
                "waiting for twinvm failed: {e}\n{}",
                self.transcript()
            )),
        }
    }

    /// Kills the process (if still running) and reaps it.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
        self.status
    }

    /// Everything written to stderr. Once the process has exited this waits
    /// (up to 10 s) for the reader to reach end of file, so nothing is lost.
    pub fn stderr(&mut self) -> String {
        if self.status.is_some() {
            let _ = self.stderr_done.recv_timeout(secs(10));
        }
        lock(&self.stderr_log).clone()
    }

    /// Everything written to stdout so far, exactly as written (invalid
    /// UTF-8 replaced). Once the process has exited this waits (up to 10 s)
    /// for the reader to reach end of file; lines not yet taken by
    /// [`Twinvm::wait_for_line`] are then consumed.
    pub fn stdout(&mut self) -> String {
        if self.status.is_some() && self.stdout_open {
            let deadline = Instant::now() + secs(10);
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match self.lines.recv_timeout(left) {
                    Ok(_) => continue,
                    Err(_) => break,
                }
            }
            self.stdout_open = false;
        }
        lock(&self.stdout_log).clone()
    }

    /// A dump of the command, its status, and everything it wrote so far,
    /// for failure messages.
    pub fn transcript(&self) -> String {
        let terminated = |mut text: String| {
            if !text.is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            text
        };
        let stdout = terminated(lock(&self.stdout_log).clone());
        let stderr = terminated(lock(&self.stderr_log).clone());
        let status = match self.status {
            Some(s) => s.to_string(),
            None => "running".to_string(),
        };
        format!(
            "--- command: {}\n--- status: {status}\n--- stdout:\n{stdout}--- stderr:\n{stderr}--- end",
            self.what
        )
    }
}

impl Drop for Twinvm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `twinvm <args>` with empty stdin until it exits (killing it after
/// `timeout`, which fails the test) and returns its status, stdout and
/// stderr. Meant for bad-input tests. `TWINVM_LOG` is cleared so that only
/// warnings and errors reach stderr.
pub fn run_to_exit(args: &[&str], timeout: Duration) -> (ExitStatus, String, String) {
    let mut cmd = Command::new(twinvm_bin());
    cmd.args(args).env_remove("TWINVM_LOG");
    run_command_to_exit(cmd, timeout)
}

/// [`run_to_exit`] for an arbitrary command.
pub fn run_command_to_exit(cmd: Command, timeout: Duration) -> (ExitStatus, String, String) {
    let mut vm = Twinvm::spawn_command(cmd);
    vm.close_stdin();
    let status = vm.wait_exit(timeout).unwrap_or_else(|e| panic!("{e}"));
    let stdout = vm.stdout();
    let stderr = vm.stderr();
    (status, stdout, stderr)
}

/// A temporary directory, removed with its contents when dropped.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates a fresh directory under the system temp dir.
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = std::env::temp_dir().join(format!(
            "twinvm-test-{tag}-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        TempDir { path }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `contents` to `name` inside the directory and returns its path.
    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let p = self.path.join(name);
        std::fs::write(&p, contents)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", p.display()));
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A reader thread cannot panic while holding the lock, but do not turn
    // a poisoned lock into a second panic either.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Waits up to `timeout` for `child` to exit: Ok(None) on timeout. Uses a
/// pidfd, which becomes readable when the process exits; without pidfd
/// support it falls back to polling `try_wait`.
fn wait_with_timeout(child: &mut Child, timeout: Duration) -> std::io::Result<Option<ExitStatus>> {
    if let Some(status) = child.try_wait()? {
        return Ok(Some(status));
    }
    let deadline = Instant::now() + timeout;
    let pid = libc::pid_t::try_from(child.id()).map_err(std::io::Error::other)?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1;
    // it touches no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd >= 0 {
        let fd = i32::try_from(fd).map_err(std::io::Error::other)?;
        // SAFETY: pidfd_open just returned this fd and nothing else owns it.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd) };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ms = libc::c_int::try_from(left.as_millis().saturating_add(1))
                .unwrap_or(libc::c_int::MAX);
            let mut pfd = libc::pollfd {
                fd: pidfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: pfd is a valid pollfd array of length 1 for the call.
            let r = unsafe { libc::poll(&mut pfd, 1, ms) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if let Some(status) = child.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
        }
    }
    // No pidfd (old kernel): poll the child at a short interval.
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// A network namespace of the test's own with a tap device in it, the host
/// side of the guest's network. Everything the test sends stays inside the
/// namespace. Dropping it deletes the namespace, and with it the tap.
pub struct NetNs {
    name: String,
    /// The tap device's name (inside the namespace).
    pub tap: String,
    /// The host's address on the tap (the guest is `GUEST_IP`).
    pub host_ip: &'static str,
}

/// The guest's address in every [`NetNs`].
pub const GUEST_IP: &str = "10.0.0.2";

impl NetNs {
    /// Creates namespace `twvm<tag>-<pid>-<n>` with tap `twtap0` at
    /// 10.0.0.1/24.
    pub fn new(tag: &str) -> NetNs {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "twvm{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let ns = NetNs {
            name,
            tap: "twtap0".into(),
            host_ip: "10.0.0.1",
        };
        ns.ip(&["netns", "add", &ns.name]);
        let steps: [&[&str]; 4] = [
            &["tuntap", "add", "dev", &ns.tap, "mode", "tap"],
            &["addr", "add", "10.0.0.1/24", "dev", &ns.tap],
            &["link", "set", &ns.tap, "up"],
            &["link", "set", "lo", "up"],
        ];
        for step in steps {
            let mut args = vec!["-n", ns.name.as_str()];
            args.extend_from_slice(step);
            ns.ip(&args);
        }
        ns
    }

    fn ip(&self, args: &[&str]) {
        let out = Command::new("ip")
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run ip (iproute2): {e}"));
        assert!(
            out.status.success(),
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Starts `twinvm run` inside the namespace with the guest on the tap at
    /// `GUEST_IP`; `extra` is appended to the arguments.
    pub fn spawn_guest(&self, cmdline: &str, extra: &[&str]) -> Twinvm {
        let mut cmd = self.command(twinvm_bin());
        cmd.args(["run", "--net", &format!("tap={}", self.tap)])
            .args(["--cmdline", &format!("ip={GUEST_IP}/24 {cmdline}")])
            .args(extra);
        Twinvm::spawn_command(cmd)
    }

    /// Runs `f` on a thread that has entered the namespace, so sockets it
    /// opens live there.
    pub fn run_in<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.run_in_scoped(f)
    }

    /// [`NetNs::run_in`] for a closure that borrows from the caller.
    pub fn run_in_scoped<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        thread::scope(|s| {
            s.spawn(move || {
                let file = std::fs::File::open(&path)
                    .unwrap_or_else(|e| panic!("cannot open {path}: {e}"));
                // SAFETY: setns with a namespace fd we own; it changes only
                // this thread's network namespace.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }
}

impl NetNs {
    /// `twinvm ctl --socket SOCKET ARGS...` from inside the namespace.
    pub fn ctl(&self, socket: &Path, args: &[&str]) -> (ExitStatus, String, String) {
        let mut cmd: Command = self.command(twinvm_bin());
        cmd.env_remove("TWINVM_LOG")
            .args(["ctl", "--socket", path_str(socket)])
            .args(args);
        run_command_to_exit(cmd, Duration::from_secs(300))
    }
}

/// The counters a VM printed, in order.
pub fn counters(stdout: &str) -> Vec<u64> {
    stdout
        .lines()
        .filter(|l| is_counter(l))
        .map(counter_of)
        .collect()
}

/// Parses JSON output, or fails the test showing it.
pub fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// A client of the guest's TCP echo service (run it inside the guest's
/// namespace) that keeps one connection busy — a 512-byte message, its
/// echo checked byte for byte, every 20 ms — until `done` is set and 20
/// more exchanges have passed (bounded by `max_exchanges` and `limit`).
/// Returns the bytes verified.
pub fn echo_client(
    done: &std::sync::atomic::AtomicBool,
    max_exchanges: u64,
    limit: Duration,
) -> usize {
    let addr: std::net::SocketAddr = format!("{GUEST_IP}:7").parse().unwrap();
    let t = Duration::from_secs(60);
    let mut s =
        std::net::TcpStream::connect_timeout(&addr, t).expect("connect to the echo service");
    s.set_read_timeout(Some(t)).unwrap();
    s.set_write_timeout(Some(t)).unwrap();
    let started = Instant::now();
    let mut verified = 0;
    let mut after = 0;
    for i in 0..max_exchanges {
        let msg = pattern(512, i + 1);
        s.write_all(&msg).expect("send to the guest");
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back)
            .unwrap_or_else(|e| panic!("echo {i} ({verified} bytes verified before): {e}"));
        assert!(back == msg, "echo {i} differs from what was sent");
        verified += msg.len();
        if done.load(Ordering::SeqCst) {
            after += 1;
            if after >= 20 {
                return verified;
            }
        }
        assert!(started.elapsed() < limit, "the echo client ran too long");
        thread::sleep(Duration::from_millis(20));
    }
    panic!("not done within {max_exchanges} exchanges");
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
    }
}

/// True if this process may create network namespaces and taps (root).
/// Otherwise panics, unless `TWINVM_TESTS_SKIP_NET=1` is set: then notes the
/// skip and returns false.
pub fn netns_available() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var_os("TWINVM_TESTS_SKIP_NET").as_deref() == Some(OsStr::new("1")) {
        eprintln!("SKIPPED: network tests need root (TWINVM_TESTS_SKIP_NET=1)");
        return false;
    }
    panic!(
        "network tests need root to create namespaces and taps; set TWINVM_TESTS_SKIP_NET=1 to skip them"
    );
}
