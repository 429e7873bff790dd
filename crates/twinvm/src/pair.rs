//! `twinvm pair`: a protected pair on this machine, as two child processes
//! of this binary — `twinvm run --role secondary` first, then `twinvm run
//! --role primary` with its console on this terminal. docs/colo.md
//! describes it for users.
//!
//! Every wait is bounded: the secondary gets [`READY_TIMEOUT`] to come up,
//! and a child being stopped is asked to power off through its API, then
//! sent SIGTERM, then SIGKILL, each after [`STOP_STEP`].

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use crate::api::server::MAX_SOCKET_PATH;
use crate::cli::PairArgs;
use crate::colo::Role;
use crate::{api, colo, ctl};

/// How long the secondary may take to build its VM and answer on its API.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long each step of stopping a child may take.
const STOP_STEP: Duration = Duration::from_secs(5);
/// How often the children and signals are looked at.
const POLL: Duration = Duration::from_millis(50);
/// Lines of the secondary's log shown when it fails.
const TAIL_LINES: usize = 12;

/// The signal (SIGINT, SIGTERM, SIGHUP) that asked the pair to stop; 0 if
/// none did.
static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);

/// Errors of `twinvm pair`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The pair's directory is unusable.
    #[error("--dir '{}': {why}", .dir.display())]
    Dir {
        /// The directory.
        dir: PathBuf,
        /// Why.
        why: String,
    },
    /// A file in the pair's directory could not be written.
    #[error("cannot write {}", .path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A disk image could not be copied for the secondary.
    #[error("cannot copy the disk image '{}' to '{}' for the secondary", .from.display(), .to.display())]
    CopyDisk {
        /// The primary's image.
        from: PathBuf,
        /// The secondary's copy.
        to: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No free port for the secondary.
    #[error("cannot find a free local port for the secondary (give one with --port)")]
    Port(#[source] std::io::Error),
    /// The kernel's random source failed.
    #[error("cannot read random bytes for the auth key and VM id")]
    Random(#[source] std::io::Error),
    /// This binary cannot be found to start the children.
    #[error("cannot find the twinvm binary to start the pair")]
    Exe(#[source] std::io::Error),
    /// A child could not be started.
    #[error("cannot start the {what}")]
    Spawn {
        /// "primary" or "secondary".
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The signal handlers could not be installed.
    #[error("cannot install the handler of signal {0}")]
    Signal(i32, #[source] std::io::Error),
    /// The secondary ended before it was ready.
    #[error("the secondary {how} before it was ready: {detail} (its log: {})", .log.display())]
    SecondaryFailed {
        /// "exited with status 1", ...
        how: String,
        /// Its error line, or a hint.
        detail: String,
        /// Its log file.
        log: PathBuf,
    },
    /// The secondary did not come up in time.
    #[error("the secondary did not answer on {} within {} s; stopped it (its log: {})", .socket.display(), READY_TIMEOUT.as_secs(), .log.display())]
    SecondaryTimeout {
        /// Its API socket.
        socket: PathBuf,
        /// Its log file.
        log: PathBuf,
    },
}

/// Runs `twinvm pair`; returns the exit status: the primary's, or 128 plus
/// the number of the signal that stopped the pair.
pub fn run(args: &PairArgs) -> Result<u8, Error> {
    install_signal_handlers()?;
    let exe = std::env::current_exe().map_err(Error::Exe)?;
    let dir = match &args.dir {
        Some(dir) => prepare_dir(dir)?,
        None => fresh_dir()?,
    };
    let files = Files::in_dir(&dir)?;
    let port = match args.port {
        Some(p) => p,
        None => free_port().map_err(Error::Port)?,
    };
    let addr = format!("127.0.0.1:{port}");

    let mut key = [0u8; 32];
    fill_random(&mut key).map_err(Error::Random)?;
    write_private(&files.key, &key)?;
    let mut vm_id = [0u8; 16];
    fill_random(&mut vm_id).map_err(Error::Random)?;
    let vm_id = colo::format_vm_id(&vm_id);

    // The secondary's disks: its own copies, as the primary's are now.
    let mut secondary_disks = Vec::with_capacity(args.disk.len());
    for (i, disk) in args.disk.iter().enumerate() {
        let copy = dir.join(format!("secondary-{i}.img"));
        if copy.exists() {
            std::fs::remove_file(&copy).map_err(|source| Error::Write {
                path: copy.clone(),
                source,
            })?;
        }
        std::fs::copy(&disk.path, &copy).map_err(|source| Error::CopyDisk {
            from: disk.path.clone(),
            to: copy.clone(),
            source,
        })?;
        secondary_disks.push(vmm::DiskConfig {
            path: copy,
            ..disk.clone()
        });
    }

    // The secondary first: it must listen before the primary connects.
    let log = File::create(&files.log).map_err(|source| Error::Write {
        path: files.log.clone(),
        source,
    })?;
    let log_err = log.try_clone().map_err(|source| Error::Write {
        path: files.log.clone(),
        source,
    })?;
    let secondary_args = child_args(
        Role::Secondary,
        args,
        &addr,
        &files,
        &vm_id,
        &secondary_disks,
    );
    let secondary = Command::new(&exe)
        .args(&secondary_args)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        // Not in the terminal's process group: Ctrl-C reaches the pair,
        // which stops the secondary in order.
        .process_group(0)
        .spawn()
        .map_err(|source| Error::Spawn {
            what: "secondary",
            source,
        })?;
    let mut secondary = Member {
        child: secondary,
        socket: files.secondary_sock.clone(),
        name: "secondary",
        status: None,
    };
    if let Err(e) = wait_ready(&mut secondary, &files) {
        secondary.stop();
        return e;
    }

    let primary_args = child_args(Role::Primary, args, &addr, &files, &vm_id, &args.disk);
    let primary = match Command::new(&exe).args(&primary_args).spawn() {
        Ok(child) => child,
        Err(source) => {
            secondary.stop();
            return Err(Error::Spawn {
                what: "primary",
                source,
            });
        }
    };
    let mut primary = Member {
        child: primary,
        socket: files.primary_sock.clone(),
        name: "primary",
        status: None,
    };
    eprintln!(
        "twinvm pair: secondary (pid {}) waits for its primary on {addr}; its console and log: {}",
        secondary.child.id(),
        files.log.display()
    );
    eprintln!(
        "twinvm pair: primary (pid {}) runs here; status: twinvm ctl --socket {} status",
        primary.child.id(),
        files.primary_sock.display()
    );

    // Until the primary ends or a signal stops the pair.
    let mut reported = false;
    loop {
        let sig = STOP_SIGNAL.load(Ordering::SeqCst);
        if sig != 0 {
            eprintln!("twinvm pair: signal {sig}: stopping the primary and the secondary");
            primary.ask_to_stop();
            secondary.ask_to_stop();
            primary.stop();
            secondary.stop();
            return Ok(u8::try_from(128 + sig).unwrap_or(255));
        }
        if let Some(status) = primary.poll() {
            secondary.stop();
            return Ok(exit_code(status));
        }
        if !reported && let Some(status) = secondary.poll() {
            reported = true;
            eprintln!(
                "twinvm pair: the secondary {}; the primary runs on unprotected. Its log ({}) ends with:",
                describe(status),
                files.log.display()
            );
            for line in log_tail(&files.log) {
                eprintln!("    {line}");
            }
        }
        std::thread::sleep(POLL);
    }
}

/// The pair's files.
struct Files {
    key: PathBuf,
    log: PathBuf,
    primary_sock: PathBuf,
    secondary_sock: PathBuf,
}

impl Files {
    fn in_dir(dir: &Path) -> Result<Files, Error> {
        let files = Files {
            key: dir.join("auth.key"),
            log: dir.join("secondary.log"),
            primary_sock: dir.join("primary.sock"),
            secondary_sock: dir.join("secondary.sock"),
        };
        let longest = files.secondary_sock.as_os_str().len();
        if longest > MAX_SOCKET_PATH {
            return Err(Error::Dir {
                dir: dir.to_path_buf(),
                why: format!(
                    "the API socket path {} would be {longest} bytes long, at most {MAX_SOCKET_PATH}; give a shorter --dir",
                    files.secondary_sock.display()
                ),
            });
        }
        Ok(files)
    }
}

/// A child of the pair.
struct Member {
    child: Child,
    socket: PathBuf,
    name: &'static str,
    status: Option<ExitStatus>,
}

impl Member {
    /// Its exit status if it has ended (reaped once).
    fn poll(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    fn exited(&mut self) -> bool {
        self.poll().is_some()
    }

    /// Waits up to `bound` for it to end.
    fn wait(&mut self, bound: Duration) -> bool {
        let deadline = Instant::now() + bound;
        loop {
            if self.exited() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(POLL);
        }
    }

    /// Asks its VM to power off through the API (it may not answer).
    fn ask_to_stop(&mut self) {
        if !self.exited() {
            let _ = ctl::call_within(
                &self.socket,
                "PUT",
                "/vm/power-off",
                None,
                Duration::from_secs(2),
            );
        }
    }

    /// Stops it: asks its VM to power off, then sends SIGTERM, then
    /// SIGKILL, each step bounded by [`STOP_STEP`].
    fn stop(&mut self) {
        self.ask_to_stop();
        if self.wait(STOP_STEP) {
            return;
        }
        eprintln!(
            "twinvm pair: the {} (pid {}) did not power off; sending SIGTERM",
            self.name,
            self.child.id()
        );
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: kill(2) on our own child, which has not been reaped
            // (so the pid is still its); no memory is involved.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        if self.wait(STOP_STEP) {
            return;
        }
        eprintln!(
            "twinvm pair: the {} (pid {}) ignored SIGTERM; killing it",
            self.name,
            self.child.id()
        );
        let _ = self.child.kill();
        if !self.wait(STOP_STEP) {
            eprintln!(
                "twinvm pair: the {} (pid {}) did not end even when killed",
                self.name,
                self.child.id()
            );
        }
    }
}

/// Waits until the secondary answers `GET /vm` on its API socket, which
/// it serves once its port is bound and its VM built.
fn wait_ready(secondary: &mut Member, files: &Files) -> Result<(), Result<u8, Error>> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let sig = STOP_SIGNAL.load(Ordering::SeqCst);
        if sig != 0 {
            return Err(Ok(u8::try_from(128 + sig).unwrap_or(255)));
        }
        if let Some(status) = secondary.poll() {
            let tail = log_tail(&files.log);
            // Its own one-line error says it best.
            let detail = tail
                .iter()
                .rev()
                .find_map(|l| l.strip_prefix("twinvm: error: "))
                .map(str::to_string);
            if detail.is_none() {
                eprintln!(
                    "twinvm pair: the secondary's log ({}) ends with:",
                    files.log.display()
                );
                for line in &tail {
                    eprintln!("    {line}");
                }
            }
            return Err(Err(Error::SecondaryFailed {
                how: describe(status),
                detail: detail.unwrap_or_else(|| "see its log above".into()),
                log: files.log.clone(),
            }));
        }
        if files.secondary_sock.exists()
            && ctl::call_within(
                &files.secondary_sock,
                "GET",
                "/vm",
                None,
                Duration::from_secs(2),
            )
            .is_ok_and(|r| r.status == 200)
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Err(Error::SecondaryTimeout {
                socket: files.secondary_sock.clone(),
                log: files.log.clone(),
            }));
        }
        std::thread::sleep(POLL);
    }
}

/// The arguments of the `twinvm run` of `role`, with the secondary's port
/// at `addr` and the disk images `disks`.
fn child_args(
    role: Role,
    args: &PairArgs,
    addr: &str,
    files: &Files,
    vm_id: &str,
    disks: &[vmm::DiskConfig],
) -> Vec<OsString> {
    let (addr_flag, socket) = match role {
        Role::Primary => ("--peer", &files.primary_sock),
        Role::Secondary => ("--listen", &files.secondary_sock),
    };
    let mut v: Vec<OsString> = vec!["run".into(), "--role".into(), role.name().into()];
    v.extend(vm_args(args));
    v.extend(disks.iter().flat_map(disk_arg));
    v.extend([
        addr_flag.into(),
        addr.into(),
        "--api-socket".into(),
        socket.clone().into_os_string(),
        "--auth-key".into(),
        files.key.clone().into_os_string(),
        "--vm-id".into(),
        vm_id.into(),
    ]);
    v
}

/// The VM options both children get, disks apart (each side has its own
/// images).
fn vm_args(args: &PairArgs) -> Vec<OsString> {
    let mut v: Vec<OsString> = Vec::new();
    let mut opt = |flag: &str, value: Option<OsString>| {
        if let Some(value) = value {
            v.push(flag.into());
            v.push(value);
        }
    };
    opt("--kernel", args.kernel.clone().map(Into::into));
    opt("--initrd", args.initrd.clone().map(Into::into));
    opt("--cmdline", args.cmdline.clone().map(Into::into));
    opt("--memory", args.memory.map(|m| m.to_string().into()));
    opt("--cpus", args.cpus.map(|c| c.to_string().into()));
    opt(
        "--checkpoint-interval-ms",
        args.checkpoint_interval_ms.map(|m| m.to_string().into()),
    );
    opt(
        "--replication-channels",
        args.replication_channels.map(|n| n.to_string().into()),
    );
    opt(
        "--staging-limit",
        args.staging_limit.map(|n| n.to_string().into()),
    );
    if args.verify_checkpoints {
        v.push("--verify-checkpoints".into());
    }
    // The secondary needs the same network devices (the same shape); it
    // never opens their taps: they discard frames until a failover.
    for n in &args.net {
        v.push("--net".into());
        v.push(net_arg(n));
    }
    v
}

/// `tap=NAME[,mac=MAC]`.
fn net_arg(n: &vmm::NetConfig) -> OsString {
    let mut s = format!("tap={}", n.tap);
    if let Some(mac) = &n.mac {
        s.push_str(&format!(",mac={}", api::format_mac(mac)));
    }
    s.into()
}

/// `--disk PATH[,readonly][,serial=ID]`.
fn disk_arg(d: &vmm::DiskConfig) -> [OsString; 2] {
    let mut s = d.path.clone().into_os_string();
    if d.readonly {
        s.push(",readonly");
    }
    if let Some(serial) = &d.serial {
        s.push(format!(",serial={serial}"));
    }
    ["--disk".into(), s]
}

/// Makes sure `dir` exists (created with mode 0700 if not) and can hold
/// the pair's files.
fn prepare_dir(dir: &Path) -> Result<PathBuf, Error> {
    let bad = |why: String| Error::Dir {
        dir: dir.to_path_buf(),
        why,
    };
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => return Err(bad("not a directory".into())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| bad(format!("cannot create it: {e}")))?;
        }
        Err(e) => return Err(bad(e.to_string())),
    }
    let dir = std::path::absolute(dir).map_err(|e| bad(e.to_string()))?;
    // `--disk PATH` ends its path at the first ','.
    if dir.as_os_str().as_encoded_bytes().contains(&b',') {
        return Err(bad(
            "contains ',', which a --disk path cannot; give another directory".into(),
        ));
    }
    Ok(dir)
}

/// A new directory, mode 0700, under $TMPDIR (or /tmp).
fn fresh_dir() -> Result<PathBuf, Error> {
    let base = std::env::temp_dir();
    let mut last = None;
    for _ in 0..16 {
        let mut tag = [0u8; 4];
        fill_random(&mut tag).map_err(Error::Random)?;
        let name = format!(
            "twinvm-pair-{}-{}",
            std::process::id(),
            tag.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
        let dir = base.join(name);
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {
                eprintln!("twinvm pair: files in {}", dir.display());
                return prepare_dir(&dir);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => {
                return Err(Error::Dir {
                    dir,
                    why: format!("cannot create it: {e}"),
                });
            }
        }
    }
    Err(Error::Dir {
        dir: base,
        why: format!(
            "cannot create a new directory in it: {}",
            last.map(|e| e.to_string()).unwrap_or_default()
        ),
    })
}

/// Writes `bytes` to a new file at `path` with mode 0600 (replacing a file
/// there).
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let err = |source| Error::Write {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)
}

/// A TCP port on 127.0.0.1 free at the moment.
fn free_port() -> std::io::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Fills `buf` from the kernel's random source.
fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    getrandom::fill(buf).map_err(std::io::Error::from)
}

/// The last lines of the file at `path` (at most [`TAIL_LINES`], from its
/// last 8 KiB), empty ones left out.
fn log_tail(path: &Path) -> Vec<String> {
    let Ok(mut f) = File::open(path) else {
        return Vec::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(8192)));
    let mut buf = Vec::new();
    let _ = f.take(8192).read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<String> = text
        .lines()
        .map(|l| l.trim_end().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    lines[lines.len().saturating_sub(TAIL_LINES)..].to_vec()
}

/// "exited with status 1", "was killed by signal 9".
fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => format!("was killed by signal {sig}"),
        _ => status.to_string(),
    }
}

/// The exit status of the pair for the primary's `status`.
fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code).unwrap_or(1),
        (None, Some(sig)) => u8::try_from(128 + sig).unwrap_or(255),
        _ => 1,
    }
}

extern "C" fn on_stop_signal(sig: libc::c_int) {
    STOP_SIGNAL.store(sig, Ordering::SeqCst);
}

/// Makes SIGINT, SIGTERM and SIGHUP set [`STOP_SIGNAL`] instead of ending
/// this process.
fn install_signal_handlers() -> Result<(), Error> {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask"
        // value; the handler only stores into an atomic, which is
        // async-signal-safe; sigaction reads the struct we pass.
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_stop_signal as extern "C" fn(libc::c_int) as usize;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(Error::Signal(sig, std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn children_get_the_vm_options_back() {
        let args = PairArgs {
            memory: Some(64 << 20),
            cpus: Some(2),
            cmdline: Some("dirty_rate=10".into()),
            net: vec![vmm::NetConfig {
                tap: "tap0".into(),
                mac: Some([0x52, 0x54, 0, 1, 2, 3]),
            }],
            checkpoint_interval_ms: Some(100),
            replication_channels: Some(2),
            verify_checkpoints: true,
            staging_limit: Some(1 << 20),
            ..PairArgs::default()
        };
        let v: Vec<String> = vm_args(&args)
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        assert_eq!(
            v,
            [
                "--cmdline",
                "dirty_rate=10",
                "--memory",
                "67108864",
                "--cpus",
                "2",
                "--checkpoint-interval-ms",
                "100",
                "--replication-channels",
                "2",
                "--staging-limit",
                "1048576",
                "--verify-checkpoints",
                "--net",
                "tap=tap0,mac=52:54:00:01:02:03",
            ]
        );
        let d = vmm::DiskConfig {
            path: "/d/a.img".into(),
            readonly: true,
            serial: Some("s1".into()),
        };
        assert_eq!(disk_arg(&d), ["--disk", "/d/a.img,readonly,serial=s1"]);
        // What the children parse back is what was given.
        let parsed = crate::devices::parse_disk(&disk_arg(&d)[1]).unwrap();
        assert_eq!(parsed, d);
        let n = &args.net[0];
        assert_eq!(
            crate::devices::parse_net(net_arg(n).to_str().unwrap()).unwrap(),
            *n
        );
    }

    #[test]
    fn both_children_get_a_valid_command_line() {
        use clap::Parser;
        let args = PairArgs {
            memory: Some(64 << 20),
            net: vec![
                vmm::NetConfig {
                    tap: "tap0".into(),
                    mac: None,
                },
                vmm::NetConfig {
                    tap: "tap1".into(),
                    mac: None,
                },
            ],
            disk: vec![vmm::DiskConfig {
                path: "/img/a.img".into(),
                readonly: false,
                serial: None,
            }],
            checkpoint_interval_ms: Some(100),
            ..PairArgs::default()
        };
        let files = Files::in_dir(Path::new("/run/p")).unwrap();
        let copies = [vmm::DiskConfig {
            path: "/run/p/secondary-0.img".into(),
            ..args.disk[0].clone()
        }];
        let id = "00112233445566778899aabbccddeeff";
        for (role, disks) in [
            (Role::Primary, &args.disk[..]),
            (Role::Secondary, &copies[..]),
        ] {
            let argv = child_args(role, &args, "127.0.0.1:7777", &files, id, disks);
            let cli = crate::cli::Cli::try_parse_from(
                std::iter::once(OsString::from("twinvm")).chain(argv),
            )
            .expect("parses");
            cli.validate().expect("valid");
            let crate::cli::Command::Run(run) = cli.command else {
                panic!("not run")
            };
            assert_eq!(run.role, Some(role));
            assert_eq!(run.net, args.net);
            assert_eq!(run.disk, disks);
            assert_eq!(run.memory, Some(64 << 20));
            assert_eq!(run.checkpoint_interval_ms, Some(100));
            assert_eq!(run.vm_id, Some(colo::parse_vm_id(id).unwrap()));
            assert_eq!(run.auth_key, Some(files.key.clone()));
            match role {
                Role::Primary => {
                    assert_eq!(run.peer.as_deref(), Some("127.0.0.1:7777"));
                    assert_eq!(run.api_socket, Some(files.primary_sock.clone()));
                }
                Role::Secondary => {
                    assert_eq!(run.listen.as_deref(), Some("127.0.0.1:7777"));
                    assert_eq!(run.api_socket, Some(files.secondary_sock.clone()));
                }
            }
        }
    }

    #[test]
    fn exit_codes_follow_the_primary() {
        assert_eq!(exit_code(ExitStatus::from_raw(0)), 0);
        assert_eq!(exit_code(ExitStatus::from_raw(1 << 8)), 1);
        assert_eq!(exit_code(ExitStatus::from_raw(libc::SIGKILL)), 137);
        assert_eq!(
            describe(ExitStatus::from_raw(2 << 8)),
            "exited with status 2"
        );
        assert_eq!(
            describe(ExitStatus::from_raw(libc::SIGTERM)),
            "was killed by signal 15"
        );
    }

    #[test]
    fn log_tails_keep_the_last_lines() {
        let dir = std::env::temp_dir().join(format!("twinvm-pair-tail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("log");
        let text: String = (0..100).map(|i| format!("line {i}\n\n")).collect();
        std::fs::write(&p, text).unwrap();
        let tail = log_tail(&p);
        assert_eq!(tail.len(), TAIL_LINES);
        assert_eq!(tail.last().map(String::as_str), Some("line 99"));
        assert!(log_tail(&dir.join("missing")).is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn private_files_are_0600_and_replaced() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("twinvm-pair-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("k");
        std::fs::write(&p, b"old").unwrap();
        write_private(&p, &[1; 32]).unwrap();
        let meta = std::fs::metadata(&p).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read(&p).unwrap(), [1; 32]);
        assert!(crate::migration::load_auth_key(&p).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
