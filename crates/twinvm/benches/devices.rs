//! Network and disk device benchmark: TCP throughput each way and echoed,
//! request/response latency and disk throughput of the test guest, and
//! what the VMM itself spends on them: the host CPU time of the device
//! worker threads per frame and per 4 KiB block request, read from the
//! process's per-thread accounting, and the split of the process's CPU
//! between the vCPU thread (the guest, emulated) and everything else.
//!
//! A tap runs the host's network stack inside the write that hands it a
//! frame, so part of the network device thread's CPU is the host's. After
//! each network run the bench runs the same phase against a plain process
//! on a tap of its own (see [`peer`]) and measures what its writes cost;
//! the report splits the device thread's CPU per frame into its tap writes
//! at that cost and the rest, twinvm's own.
//!
//! `cargo bench -p twinvm --bench devices` (as root: it creates a network
//! namespace with a tap, removed afterwards) prints a Markdown report and
//! writes it into `docs/performance.md` between the `bench:devices`
//! markers. Environment:
//! - `TWINVM_BENCH_RUNS`: runs of each TCP throughput measurement (default 5);
//! - `TWINVM_BENCH_NET_KB`: KiB moved per run (default 256);
//! - `TWINVM_BENCH_REQUESTS`: request/response round trips, over as many
//!   runs as the throughput measurements (default 1000);
//! - `TWINVM_BENCH_DISK_RUNS`: boots running the disk benchmark (default 3);
//! - `TWINVM_BENCH_DISK_MB`: MiB each disk benchmark writes and reads (default 32).

#[path = "../tests/common/mod.rs"]
mod common;
mod report;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{GUEST_IP, NetNs, TempDir, Twinvm};
use report::{median, percentile, write_docs_section};

/// Bound on every wait for the guest or a socket.
const T: Duration = Duration::from_secs(60);
/// Bound on the whole request/response measurement.
const LATENCY_BUDGET: Duration = Duration::from_secs(90);
/// Seed of the source service's stream (docs/test-guest.md).
const SOURCE_SEED: u64 = 0x2545_f491_4f6c_dd1d;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn guest(port: u16) -> SocketAddr {
    format!("{GUEST_IP}:{port}").parse().expect("address")
}

// ---------------------------------------------------------------------
// Per-thread CPU accounting of the twinvm process.

/// One thread's counters.
#[derive(Clone, Debug, Default)]
struct ThreadCpu {
    name: String,
    /// Time on a CPU, ns (schedstat: exact).
    run_ns: u64,
    /// User and system time, clock ticks (stat: sampled).
    utime: u64,
    stime: u64,
    /// Voluntary context switches: for a device thread, the times it went
    /// to sleep in epoll_wait, i.e. its wakeups.
    voluntary: u64,
    /// read- and write-type system calls (io: syscr + syscw).
    syscalls: u64,
}

/// What a thread is, by its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Role {
    Vcpu,
    Net,
    Disk,
    Other,
}

impl Role {
    fn of(name: &str) -> Role {
        if name.starts_with("vcpu") {
            Role::Vcpu
        } else if name.starts_with("virtio-net") {
            Role::Net
        } else if name.starts_with("virtio-disk") {
            Role::Disk
        } else {
            Role::Other
        }
    }
}

/// The process's counters at one moment: its threads, its tap's frame
/// counters and KVM's exit counters.
#[derive(Clone, Debug, Default)]
struct Sample {
    threads: HashMap<u64, ThreadCpu>,
    /// Frames the tap received from twinvm (the guest's) plus frames it
    /// gave twinvm (for the guest).
    tap_frames: u64,
    /// Of those, the frames twinvm wrote into the tap (the guest sent).
    tap_from_guest: u64,
    at: Option<Instant>,
}

fn read_thread(dir: &std::path::Path) -> Option<ThreadCpu> {
    let name = std::fs::read_to_string(dir.join("comm")).ok()?;
    let schedstat = std::fs::read_to_string(dir.join("schedstat")).ok()?;
    let run_ns = schedstat.split_whitespace().next()?.parse().ok()?;
    let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
    // Fields after the ")" closing the name start at field 3 (state);
    // utime and stime are fields 14 and 15.
    let rest: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime = rest.get(11)?.parse().ok()?;
    let stime = rest.get(12)?.parse().ok()?;
    let status = std::fs::read_to_string(dir.join("status")).ok()?;
    let voluntary = status
        .lines()
        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let io = std::fs::read_to_string(dir.join("io")).unwrap_or_default();
    let syscalls = io
        .lines()
        .filter_map(|l| {
            l.strip_prefix("syscr:")
                .or_else(|| l.strip_prefix("syscw:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .sum();
    Some(ThreadCpu {
        name: name.trim().to_string(),
        run_ns,
        utime,
        stime,
        voluntary,
        syscalls,
    })
}

fn sample(pid: u32, tap: &str) -> Sample {
    let mut threads = HashMap::new();
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for entry in dir.flatten() {
            let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            if let Some(t) = read_thread(&entry.path()) {
                threads.insert(tid, t);
            }
        }
    }
    let (from_guest, to_guest) = tap_frames(pid, tap);
    Sample {
        threads,
        tap_frames: from_guest + to_guest,
        tap_from_guest: from_guest,
        at: Some(Instant::now()),
    }
}

/// rx and tx packets of `tap` as seen from the process's network
/// namespace: the frames written into it (by twinvm: the guest's) and the
/// frames read from it (for the guest).
fn tap_frames(pid: u32, tap: &str) -> (u64, u64) {
    let dev = std::fs::read_to_string(format!("/proc/{pid}/net/dev")).unwrap_or_default();
    for line in dev.lines() {
        if let Some((name, counters)) = line.split_once(':')
            && name.trim() == tap
        {
            let c: Vec<u64> = counters
                .split_whitespace()
                .map(|v| v.parse().unwrap_or(0))
                .collect();
            if c.len() >= 10 {
                return (c[1], c[9]);
            }
        }
    }
    (0, 0)
}

/// Counts the exits KVM hands to twinvm's vCPU thread (tracepoint
/// `kvm:kvm_userspace_exit`) with `perf stat -I`, 20 ms at a time, for the
/// life of the VM; nothing if perf is missing or may not trace. Each
/// interval's count is placed at the moment its line arrives (perf prints
/// it as the interval ends), which needs no mapping of perf's clock.
struct ExitTrace {
    child: std::process::Child,
    /// (arrival of an interval's line, exits in the interval)
    points: std::sync::Arc<std::sync::Mutex<Vec<(Instant, u64)>>>,
}

impl ExitTrace {
    fn start(pid: u32) -> Option<ExitTrace> {
        let mut child = std::process::Command::new("perf")
            .args([
                "stat",
                "-I",
                "20",
                "-x",
                ",",
                "-e",
                "kvm:kvm_userspace_exit",
                "-p",
            ])
            .arg(pid.to_string())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .ok()?;
        let err = child.stderr.take()?;
        let points = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = std::sync::Arc::clone(&points);
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                let mut f = line.split(',');
                let (Some(_time), Some(n)) = (f.next(), f.next()) else {
                    continue;
                };
                if let Ok(n) = n.trim().parse::<u64>() {
                    let at = Instant::now();
                    sink.lock().unwrap_or_else(|e| e.into_inner()).push((at, n));
                }
            }
        });
        Some(ExitTrace { child, points })
    }

    /// Exits in the intervals that ended between `a` and `b`.
    fn between(&self, a: Option<Instant>, b: Option<Instant>) -> Option<u64> {
        let (a, b) = (a?, b?);
        let points = self.points.lock().unwrap_or_else(|e| e.into_inner());
        if points.is_empty() {
            return None;
        }
        Some(
            points
                .iter()
                .filter(|(t, _)| *t > a && *t <= b)
                .map(|(_, n)| n)
                .sum(),
        )
    }
}

impl Drop for ExitTrace {
    fn drop(&mut self) {
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: kill sends a signal to our own child; no memory
            // involved.
            unsafe { libc::kill(pid, libc::SIGINT) };
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What happened between two samples.
#[derive(Clone, Debug, Default)]
struct Delta {
    /// CPU ns per role.
    run_ns: HashMap<Role, u64>,
    /// User and system clock ticks per role.
    ticks: HashMap<Role, (u64, u64)>,
    /// Voluntary context switches per role.
    wakeups: HashMap<Role, u64>,
    /// read/write system calls per role.
    syscalls: HashMap<Role, u64>,
    tap_frames: u64,
    /// Of those, the frames twinvm wrote into the tap.
    tap_from_guest: u64,
    wall: Duration,
    /// Exits to twinvm's vCPU thread, if counted.
    exits: Option<u64>,
    /// Deltas added together in this one.
    parts: u32,
}

impl Delta {
    fn between(a: &Sample, b: &Sample) -> Delta {
        let mut d = Delta::default();
        for (tid, after) in &b.threads {
            let before = a.threads.get(tid).cloned().unwrap_or_default();
            let role = Role::of(&after.name);
            *d.run_ns.entry(role).or_default() += after.run_ns.saturating_sub(before.run_ns);
            let t = d.ticks.entry(role).or_default();
            t.0 += after.utime.saturating_sub(before.utime);
            t.1 += after.stime.saturating_sub(before.stime);
            *d.wakeups.entry(role).or_default() += after.voluntary.saturating_sub(before.voluntary);
            *d.syscalls.entry(role).or_default() += after.syscalls.saturating_sub(before.syscalls);
        }
        d.tap_frames = b.tap_frames.saturating_sub(a.tap_frames);
        d.tap_from_guest = b.tap_from_guest.saturating_sub(a.tap_from_guest);
        if let (Some(x), Some(y)) = (a.at, b.at) {
            d.wall = y.saturating_duration_since(x);
        }
        d.parts = 1;
        d
    }

    fn add(&mut self, o: &Delta) {
        for (r, v) in &o.run_ns {
            *self.run_ns.entry(*r).or_default() += v;
        }
        for (r, (u, s)) in &o.ticks {
            let t = self.ticks.entry(*r).or_default();
            t.0 += u;
            t.1 += s;
        }
        for (r, v) in &o.wakeups {
            *self.wakeups.entry(*r).or_default() += v;
        }
        for (r, v) in &o.syscalls {
            *self.syscalls.entry(*r).or_default() += v;
        }
        self.tap_frames += o.tap_frames;
        self.tap_from_guest += o.tap_from_guest;
        self.exits = if self.parts == 0 {
            o.exits
        } else {
            self.exits.zip(o.exits).map(|(x, y)| x + y)
        };
        self.parts += o.parts;
        self.wall += o.wall;
    }

    fn ns(&self, role: Role) -> u64 {
        self.run_ns.get(&role).copied().unwrap_or(0)
    }

    fn total_ns(&self) -> u64 {
        self.run_ns.values().sum()
    }
}

/// One row of the VMM CPU table: a phase, the device that served it and
/// how many frames or requests it handled.
struct CpuRow {
    phase: String,
    device: Role,
    /// Frames (network) or requests (disk).
    units: u64,
    unit: &'static str,
    delta: Delta,
    /// Device-thread µs per frame or request of each run, if several.
    per_run: Vec<f64>,
}

impl CpuRow {
    fn device_us_per_unit(&self) -> f64 {
        us_per_unit(&self.delta, self.device, self.units)
    }
}

fn us_per_unit(delta: &Delta, device: Role, units: u64) -> f64 {
    delta.ns(device) as f64 / 1e3 / units.max(1) as f64
}

// ---------------------------------------------------------------------
// The guest.

struct Vm {
    vm: Twinvm,
    tap: String,
    exits: Option<ExitTrace>,
}

impl Vm {
    fn boot(ns: &NetNs, image: &str, cmdline: &str) -> Vm {
        let mut vm = ns.spawn_guest(cmdline, &["--disk", image]);
        vm.wait_for_line(|l| l == "TWINVM TESTGUEST READY", T)
            .unwrap_or_else(|e| panic!("{e}"));
        // The vCPU thread runs now: perf finds every thread to trace. (The
        // guest prints its settings and probes its devices before its disk
        // benchmark starts.)
        let exits = ExitTrace::start(vm.pid());
        Vm {
            vm,
            tap: ns.tap.clone(),
            exits,
        }
    }

    fn line(&mut self, prefix: &str) -> String {
        self.vm
            .wait_for_line(
                |l| l.starts_with(prefix) || l.starts_with("disk bench error"),
                T,
            )
            .map(|l| {
                assert!(l.starts_with(prefix), "{l}");
                l
            })
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn sample(&self) -> Sample {
        sample(self.vm.pid(), &self.tap)
    }

    /// What happened between two samples, with the exits counted then
    /// (once perf has reported the intervals up to `b`).
    fn delta(&self, a: &Sample, b: &Sample) -> Delta {
        if let Some(at) = b.at {
            let settle = Duration::from_millis(60);
            std::thread::sleep(settle.saturating_sub(at.elapsed()));
        }
        let mut d = Delta::between(a, b);
        d.exits = self.exits.as_ref().and_then(|e| e.between(a.at, b.at));
        d
    }

    fn power_off(mut self) {
        self.exits = None;
        self.vm.send_line("poweroff");
        let status = self.vm.wait_exit(T).unwrap_or_else(|e| panic!("{e}"));
        assert!(status.success(), "{}", self.vm.transcript());
    }
}

/// `key=<number>` of a guest line.
fn field(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

// ---------------------------------------------------------------------
// Disk.

struct DiskRun {
    requests: u64,
    write_ticks: u64,
    flush_ticks: u64,
    read_ticks: u64,
    /// Host wall time from the start line to the read line.
    host_wall: Duration,
    write: Delta,
    read: Delta,
}

/// Waits for the disk benchmark the guest runs at boot.
fn disk_run(vm: &mut Vm) -> DiskRun {
    let start = vm.line("disk bench start");
    let s0 = vm.sample();
    let write = vm.line("disk bench write");
    let s1 = vm.sample();
    let flush = vm.line("disk bench flush");
    let read = vm.line("disk bench read");
    let s3 = vm.sample();
    let requests = field(&start, "requests");
    assert_eq!(field(&write, "requests"), requests);
    assert_eq!(field(&read, "requests"), requests);
    DiskRun {
        requests,
        write_ticks: field(&write, "ticks"),
        flush_ticks: field(&flush, "ticks"),
        read_ticks: field(&read, "ticks"),
        host_wall: s3.at.zip(s0.at).map(|(b, a)| b - a).unwrap_or_default(),
        write: vm.delta(&s0, &s1),
        // The flush (one request) goes with the reads.
        read: vm.delta(&s1, &s3),
    }
}

/// Checks the image the benchmark wrote: request `k`'s page holds `k` and
/// then the fixed page pattern.
fn check_image(path: &std::path::Path, requests: u64) {
    let data = std::fs::read(path).expect("read the disk image");
    let mut page = Vec::with_capacity(4096);
    let mut x = SOURCE_SEED;
    while page.len() < 4096 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        page.extend_from_slice(&x.to_le_bytes());
    }
    for k in 0..requests {
        let at = (k * 4096) as usize;
        assert_eq!(&data[at..at + 8], &k.to_le_bytes(), "stamp of request {k}");
        assert!(
            data[at + 8..at + 4096] == page[8..],
            "content of request {k}"
        );
    }
}

// ---------------------------------------------------------------------
// Network.

struct NetRun {
    /// Payload bytes per second, one way.
    rate: f64,
    delta: Delta,
}

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect_timeout(&guest(port), T).expect("connect to the guest");
    s.set_read_timeout(Some(T)).expect("timeout");
    s.set_write_timeout(Some(T)).expect("timeout");
    s
}

/// Host → guest: `len` bytes to the discard service; done when the guest,
/// having taken everything, closes its side.
fn discard(len: usize) -> f64 {
    let mut s = connect(9);
    let start = Instant::now();
    let chunk = vec![0x5au8; 16 * 1024];
    let mut sent = 0;
    while sent < len {
        let n = chunk.len().min(len - sent);
        s.write_all(&chunk[..n]).expect("send to discard");
        sent += n;
    }
    s.shutdown(Shutdown::Write).expect("shutdown");
    let mut rest = Vec::new();
    (&s).take(1024)
        .read_to_end(&mut rest)
        .expect("wait for close");
    assert!(rest.is_empty(), "discard sent data");
    len as f64 / start.elapsed().as_secs_f64()
}

/// The source service's stream.
fn source_stream(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    let mut x = SOURCE_SEED;
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Guest → host: `len` bytes from the source service, checked.
fn source(len: usize, expect: &[u8]) -> f64 {
    let mut s = connect(19);
    let start = Instant::now();
    s.write_all(format!("{len}\n").as_bytes()).expect("request");
    let mut got = Vec::with_capacity(len);
    (&s).take(len as u64 + 1)
        .read_to_end(&mut got)
        .expect("receive from source");
    let rate = len as f64 / start.elapsed().as_secs_f64();
    assert_eq!(got.len(), len, "source sent {} of {len} bytes", got.len());
    assert!(got == expect, "source stream differs");
    rate
}

/// Both ways at once through the echo service; the rate is each way's.
fn echo(len: usize) -> f64 {
    let s = connect(7);
    let mut writer = s.try_clone().expect("clone");
    let data: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
    let to_send = data.clone();
    let start = Instant::now();
    let sender = std::thread::spawn(move || {
        for chunk in to_send.chunks(16 * 1024) {
            writer.write_all(chunk).expect("send to echo");
        }
        writer.shutdown(Shutdown::Write).expect("shutdown");
    });
    let mut back = Vec::with_capacity(len);
    (&s).take(len as u64 + 1)
        .read_to_end(&mut back)
        .expect("receive echo");
    let rate = len as f64 / start.elapsed().as_secs_f64();
    sender.join().expect("sender");
    assert!(back == data, "echo returned other bytes");
    rate
}

/// Round trips of one request at a time on the TCP counter service, at
/// most `count` and at most `LATENCY_BUDGET`. Returns each one's time, ms.
fn latency(count: u64) -> Vec<f64> {
    let s = connect(8000);
    s.set_nodelay(true).expect("nodelay");
    let mut reader = BufReader::new(s.try_clone().expect("clone"));
    let mut writer = s;
    let mut times = Vec::new();
    let deadline = Instant::now() + LATENCY_BUDGET;
    let mut line = String::new();
    for n in 0..count {
        if Instant::now() > deadline {
            break;
        }
        let start = Instant::now();
        writer
            .write_all(format!("{n}\n").as_bytes())
            .expect("request");
        line.clear();
        reader.read_line(&mut line).expect("reply");
        times.push(start.elapsed().as_secs_f64() * 1e3);
        assert!(
            line.starts_with(&format!("{} ", n + 1)),
            "reply {line:?} to {n}"
        );
    }
    times
}

// ---------------------------------------------------------------------
// The host's share: the same tap, written by a plain process.

/// A plain process in the guest's place on the tap: a minimal TCP/IP
/// endpoint at the guest's MAC and address that serves the discard,
/// source, echo and TCP counter services the way the test guest does (no
/// TCP options but the MSS, an 8 KiB window, every segment answered at
/// once, at most 8 KiB unacknowledged), taking one frame per `pace` like
/// the guest. It writes its frames into the tap with the same call as
/// twinvm's tap back end and measures the thread CPU time of each write:
/// what handing the host such a frame costs any process, most of it the
/// host's own network stack running inside the write.
mod peer {
    use std::collections::{HashMap, VecDeque};
    use std::os::fd::AsRawFd;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    use vmm::NetBackend;
    use vmm::devices::virtio::Tap;

    /// The test guest's MAC address (device 0's default) and IPv4 address.
    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    const IP: [u8; 4] = [10, 0, 0, 2];
    /// Receive window and send buffer, as the guest's sockets.
    const WINDOW: u32 = 8192;
    const MSS: usize = 1460;

    const TCP_FIN: u8 = 0x01;
    const TCP_SYN: u8 = 0x02;
    const TCP_RST: u8 = 0x04;
    const TCP_PSH: u8 = 0x08;
    const TCP_ACK: u8 = 0x10;

    /// The thread CPU time, ns.
    fn thread_ns() -> u64 {
        let mut t = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes the timespec we pass.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
        t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
    }

    /// The Internet checksum of `parts` (concatenated; odd lengths only at
    /// the end).
    fn checksum(parts: &[&[u8]]) -> u16 {
        let mut sum = 0u32;
        for part in parts {
            for pair in part.chunks(2) {
                let word = if pair.len() == 2 {
                    u16::from_be_bytes([pair[0], pair[1]])
                } else {
                    u16::from_be_bytes([pair[0], 0])
                };
                sum += u32::from(word);
            }
        }
        while sum >> 16 != 0 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    /// What a connection's service does with the bytes it receives.
    enum Service {
        Discard,
        /// The request line so far; `None` once answered.
        Source(Option<Vec<u8>>),
        Echo,
        /// The current line.
        Counter(Vec<u8>),
    }

    struct Conn {
        host_mac: [u8; 6],
        host_ip: [u8; 4],
        host_port: u16,
        port: u16,
        rcv_nxt: u32,
        snd_una: u32,
        snd_nxt: u32,
        host_window: u32,
        host_mss: usize,
        /// Bytes to send, not yet sent.
        out: VecDeque<u8>,
        /// Send a FIN once `out` is empty.
        closing: bool,
        fin_sent: bool,
        host_fin: bool,
        service: Service,
    }

    /// Counters of a run.
    #[derive(Clone, Copy, Debug, Default)]
    pub struct Stats {
        /// Frames written into the tap.
        pub writes: u64,
        /// Thread CPU time inside those writes, ns.
        pub write_ns: u64,
        /// Frames read from the tap.
        pub reads: u64,
    }

    struct Peer {
        tap: Tap,
        conns: HashMap<(u16, u16), Conn>,
        ip_id: u16,
        next_iss: u32,
        counter_total: u64,
        stats: Stats,
    }

    /// The peer, running on a thread of its own until dropped.
    pub struct Running {
        stop: Arc<AtomicBool>,
        pace: Arc<std::sync::Mutex<Duration>>,
        thread: Option<std::thread::JoinHandle<Stats>>,
        stats: Arc<std::sync::Mutex<Stats>>,
    }

    impl Running {
        /// Starts the peer on `tap` (opened in the tap's namespace).
        pub fn start(tap: Tap) -> Running {
            let stop = Arc::new(AtomicBool::new(false));
            let pace = Arc::new(std::sync::Mutex::new(Duration::ZERO));
            let stats = Arc::new(std::sync::Mutex::new(Stats::default()));
            let (s, p, st) = (stop.clone(), pace.clone(), stats.clone());
            let thread = std::thread::spawn(move || {
                let mut peer = Peer {
                    tap,
                    conns: HashMap::new(),
                    ip_id: 1,
                    next_iss: 0x1000_0000,
                    counter_total: 0,
                    stats: Stats::default(),
                };
                peer.run(&s, &p, &st);
                peer.stats
            });
            Running {
                stop,
                pace,
                thread: Some(thread),
                stats,
            }
        }

        /// The time the peer takes for each frame it receives from now on.
        pub fn set_pace(&self, pace: Duration) {
            *self.pace.lock().unwrap_or_else(|e| e.into_inner()) = pace;
        }

        /// The counters so far.
        pub fn stats(&self) -> Stats {
            *self.stats.lock().unwrap_or_else(|e| e.into_inner())
        }
    }

    impl Drop for Running {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::SeqCst);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    impl Peer {
        fn run(
            &mut self,
            stop: &AtomicBool,
            pace: &std::sync::Mutex<Duration>,
            shared: &std::sync::Mutex<Stats>,
        ) {
            let mut buf = vec![0u8; 65_536];
            while !stop.load(Ordering::SeqCst) {
                let mut pfd = libc::pollfd {
                    fd: self.tap.ready_fd().as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd for the duration of the call.
                unsafe { libc::poll(&mut pfd, 1, 20) };
                while let Ok(len) = self.tap.recv(&mut buf) {
                    self.stats.reads += 1;
                    let pace = *pace.lock().unwrap_or_else(|e| e.into_inner());
                    if !pace.is_zero() {
                        // The guest's time for the frame.
                        let until = Instant::now() + pace;
                        while let Some(left) = until.checked_duration_since(Instant::now()) {
                            std::thread::sleep(left);
                        }
                    }
                    let frame = buf[..len].to_vec();
                    self.handle(&frame);
                    *shared.lock().unwrap_or_else(|e| e.into_inner()) = self.stats;
                }
            }
        }

        fn send(&mut self, frame: &[u8]) {
            let t0 = thread_ns();
            let _ = self.tap.send(frame);
            self.stats.write_ns += thread_ns() - t0;
            self.stats.writes += 1;
        }

        fn handle(&mut self, f: &[u8]) {
            if f.len() < 14 {
                return;
            }
            let src_mac: [u8; 6] = f[6..12].try_into().unwrap_or_default();
            match u16::from_be_bytes([f[12], f[13]]) {
                0x0806 => self.arp(&src_mac, &f[14..]),
                0x0800 => self.ipv4(&src_mac, &f[14..]),
                _ => {}
            }
        }

        fn arp(&mut self, src_mac: &[u8; 6], a: &[u8]) {
            // Ethernet/IPv4 request for our address.
            if a.len() < 28 || a[6..8] != [0, 1] || a[24..28] != IP {
                return;
            }
            let mut f = Vec::with_capacity(42);
            f.extend_from_slice(src_mac);
            f.extend_from_slice(&MAC);
            f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 2]);
            f.extend_from_slice(&MAC);
            f.extend_from_slice(&IP);
            f.extend_from_slice(&a[8..18]);
            self.send(&f);
        }

        fn ipv4(&mut self, src_mac: &[u8; 6], p: &[u8]) {
            if p.len() < 20 || p[0] >> 4 != 4 || p[16..20] != IP || p[9] != 6 {
                return;
            }
            let ihl = usize::from(p[0] & 15) * 4;
            let total = usize::from(u16::from_be_bytes([p[2], p[3]])).min(p.len());
            if ihl < 20 || total < ihl + 20 {
                return;
            }
            let src_ip: [u8; 4] = p[12..16].try_into().unwrap_or_default();
            self.tcp(src_mac, src_ip, &p[ihl..total]);
        }

        fn tcp(&mut self, src_mac: &[u8; 6], src_ip: [u8; 4], t: &[u8]) {
            let host_port = u16::from_be_bytes([t[0], t[1]]);
            let port = u16::from_be_bytes([t[2], t[3]]);
            let seq = u32::from_be_bytes([t[4], t[5], t[6], t[7]]);
            let ack = u32::from_be_bytes([t[8], t[9], t[10], t[11]]);
            let off = usize::from(t[12] >> 4) * 4;
            let flags = t[13];
            let window = u32::from(u16::from_be_bytes([t[14], t[15]]));
            if off < 20 || off > t.len() {
                return;
            }
            let data = &t[off..];
            let key = (host_port, port);
            if flags & TCP_RST != 0 {
                self.conns.remove(&key);
                return;
            }
            if flags & TCP_SYN != 0 && flags & TCP_ACK == 0 {
                let service = match port {
                    9 => Service::Discard,
                    19 => Service::Source(Some(Vec::new())),
                    7 => Service::Echo,
                    8000 => Service::Counter(Vec::new()),
                    _ => return,
                };
                // The host's MSS option, if any.
                let mut host_mss = 536;
                let mut opts = &t[20..off];
                while let [kind, rest @ ..] = opts {
                    match kind {
                        0 => break,
                        1 => opts = rest,
                        _ => {
                            let Some(&len) = rest.first() else { break };
                            let len = usize::from(len);
                            if len < 2 || len > opts.len() {
                                break;
                            }
                            if *kind == 2 && len == 4 {
                                host_mss = usize::from(u16::from_be_bytes([opts[2], opts[3]]));
                            }
                            opts = &opts[len..];
                        }
                    }
                }
                let iss = self.next_iss;
                self.next_iss = self.next_iss.wrapping_add(0x0100_0000);
                let conn = Conn {
                    host_mac: *src_mac,
                    host_ip: src_ip,
                    host_port,
                    port,
                    rcv_nxt: seq.wrapping_add(1),
                    snd_una: iss,
                    snd_nxt: iss.wrapping_add(1),
                    host_window: window,
                    host_mss: host_mss.min(MSS),
                    out: VecDeque::new(),
                    closing: false,
                    fin_sent: false,
                    host_fin: false,
                    service,
                };
                let syn_ack = self.segment(&conn, iss, TCP_SYN | TCP_ACK, &[], true);
                self.conns.insert(key, conn);
                self.send(&syn_ack);
                return;
            }
            let Some(mut conn) = self.conns.remove(&key) else {
                return;
            };
            if flags & TCP_ACK != 0 {
                let acked = ack.wrapping_sub(conn.snd_una);
                if acked <= conn.snd_nxt.wrapping_sub(conn.snd_una) {
                    conn.snd_una = ack;
                }
                conn.host_window = window;
            }
            let mut answer = false;
            if !data.is_empty() {
                answer = true;
                if seq == conn.rcv_nxt {
                    conn.rcv_nxt = conn.rcv_nxt.wrapping_add(data.len() as u32);
                    self.serve(&mut conn, data);
                }
            }
            if flags & TCP_FIN != 0 && seq.wrapping_add(data.len() as u32) == conn.rcv_nxt {
                conn.rcv_nxt = conn.rcv_nxt.wrapping_add(1);
                conn.host_fin = true;
                conn.closing = true;
                answer = true;
            }
            let mut sent = false;
            loop {
                let in_flight = conn.snd_nxt.wrapping_sub(conn.snd_una);
                let room = conn.host_window.min(WINDOW).saturating_sub(in_flight) as usize;
                let n = conn.out.len().min(conn.host_mss).min(room);
                if n == 0 {
                    break;
                }
                let payload: Vec<u8> = conn.out.drain(..n).collect();
                let seg = self.segment(&conn, conn.snd_nxt, TCP_ACK | TCP_PSH, &payload, false);
                conn.snd_nxt = conn.snd_nxt.wrapping_add(n as u32);
                self.send(&seg);
                sent = true;
            }
            if conn.closing && conn.out.is_empty() && !conn.fin_sent {
                let seg = self.segment(&conn, conn.snd_nxt, TCP_ACK | TCP_FIN, &[], false);
                conn.snd_nxt = conn.snd_nxt.wrapping_add(1);
                conn.fin_sent = true;
                self.send(&seg);
                sent = true;
            }
            if answer && !sent {
                let seg = self.segment(&conn, conn.snd_nxt, TCP_ACK, &[], false);
                self.send(&seg);
            }
            let done = conn.fin_sent && conn.host_fin && conn.snd_una == conn.snd_nxt;
            if !done {
                self.conns.insert(key, conn);
            }
        }

        /// The service's answer to `data`, queued on `conn`.
        fn serve(&mut self, conn: &mut Conn, data: &[u8]) {
            match &mut conn.service {
                Service::Discard => {}
                Service::Echo => conn.out.extend(data),
                Service::Source(line) => {
                    let Some(l) = line else { return };
                    l.extend_from_slice(data);
                    if let Some(end) = l.iter().position(|&b| b == b'\n') {
                        let n: usize = std::str::from_utf8(&l[..end])
                            .ok()
                            .and_then(|s| s.trim().parse().ok())
                            .unwrap_or(0);
                        conn.out.extend(super::source_stream(n));
                        conn.closing = true;
                        *line = None;
                    }
                }
                Service::Counter(line) => {
                    for &b in data {
                        if b != b'\n' {
                            line.push(b);
                            continue;
                        }
                        let reply = match std::str::from_utf8(line)
                            .ok()
                            .and_then(|s| s.trim().parse::<u64>().ok())
                        {
                            Some(n) if n < u64::MAX => {
                                self.counter_total += 1;
                                format!("{} {}\n", n + 1, self.counter_total)
                            }
                            _ => "error\n".to_string(),
                        };
                        conn.out.extend(reply.as_bytes());
                        line.clear();
                    }
                }
            }
        }

        /// An Ethernet frame with a TCP segment of `conn`.
        fn segment(
            &mut self,
            conn: &Conn,
            seq: u32,
            flags: u8,
            payload: &[u8],
            mss: bool,
        ) -> Vec<u8> {
            let tcp_len = 20 + if mss { 4 } else { 0 } + payload.len();
            let mut tcp = Vec::with_capacity(tcp_len);
            tcp.extend_from_slice(&conn.port.to_be_bytes());
            tcp.extend_from_slice(&conn.host_port.to_be_bytes());
            tcp.extend_from_slice(&seq.to_be_bytes());
            tcp.extend_from_slice(&conn.rcv_nxt.to_be_bytes());
            tcp.push((((tcp_len - payload.len()) / 4) as u8) << 4);
            tcp.push(flags);
            tcp.extend_from_slice(&(WINDOW as u16).to_be_bytes());
            tcp.extend_from_slice(&[0, 0, 0, 0]);
            if mss {
                tcp.extend_from_slice(&[2, 4]);
                tcp.extend_from_slice(&(MSS as u16).to_be_bytes());
            }
            tcp.extend_from_slice(payload);
            let mut pseudo = Vec::with_capacity(12);
            pseudo.extend_from_slice(&IP);
            pseudo.extend_from_slice(&conn.host_ip);
            pseudo.extend_from_slice(&[0, 6]);
            pseudo.extend_from_slice(&(tcp_len as u16).to_be_bytes());
            let sum = checksum(&[&pseudo, &tcp]);
            tcp[16..18].copy_from_slice(&sum.to_be_bytes());

            let mut ip = Vec::with_capacity(20);
            ip.extend_from_slice(&[0x45, 0]);
            ip.extend_from_slice(&((20 + tcp_len) as u16).to_be_bytes());
            ip.extend_from_slice(&self.ip_id.to_be_bytes());
            self.ip_id = self.ip_id.wrapping_add(1);
            ip.extend_from_slice(&[0x40, 0, 64, 6, 0, 0]);
            ip.extend_from_slice(&IP);
            ip.extend_from_slice(&conn.host_ip);
            let sum = checksum(&[&ip]);
            ip[10..12].copy_from_slice(&sum.to_be_bytes());

            let mut f = Vec::with_capacity(14 + 20 + tcp_len);
            f.extend_from_slice(&conn.host_mac);
            f.extend_from_slice(&MAC);
            f.extend_from_slice(&[0x08, 0x00]);
            f.extend_from_slice(&ip);
            f.extend_from_slice(&tcp);
            f
        }
    }
}

/// Round trips of the plain process's request/response run (at most).
const PLAIN_REQUESTS: u64 = 300;

/// What a plain process's tap writes cost in one phase.
#[derive(Clone, Copy, Debug, Default)]
struct PlainRun {
    /// Frames it wrote into the tap.
    writes: u64,
    /// Thread CPU time inside those writes, ns.
    write_ns: u64,
}

impl PlainRun {
    fn us_per_write(&self) -> f64 {
        self.write_ns as f64 / 1e3 / self.writes.max(1) as f64
    }
}

/// The plain process on a tap of its own, ready for runs.
struct Plain {
    ns: NetNs,
    peer: peer::Running,
}

impl Plain {
    /// A namespace like the guest's with [`peer`] on its tap.
    fn start() -> Plain {
        let ns = NetNs::new("benchplain");
        let name = ns.tap.clone();
        let tap = ns.run_in(move || {
            vmm::devices::virtio::Tap::open(&name).expect("open the tap for the plain process")
        });
        Plain {
            peer: peer::Running::start(tap),
            ns,
        }
    }

    /// Runs `phase` once (request/response with `requests` round trips),
    /// taking for each frame received the time the guest took on average
    /// in its run (`guest`: twinvm's counters of that run).
    fn run(
        &self,
        phase: &str,
        guest: &Delta,
        net_len: usize,
        requests: u64,
        expect: &[u8],
    ) -> PlainRun {
        let to_guest = guest.tap_frames.saturating_sub(guest.tap_from_guest).max(1);
        self.peer
            .set_pace(guest.wall / u32::try_from(to_guest).unwrap_or(u32::MAX));
        let before = self.peer.stats();
        let (phase, expect) = (phase.to_string(), expect.to_vec());
        self.ns.run_in(move || match phase.as_str() {
            "discard" => {
                discard(net_len);
            }
            "source" => {
                source(net_len, &expect);
            }
            "echo" => {
                echo(net_len);
            }
            _ => {
                let n = latency(requests).len() as u64;
                assert_eq!(
                    n, requests,
                    "plain process: request/response ran out of time"
                );
            }
        });
        // The last frames (the close) are written after the host's side
        // returns.
        std::thread::sleep(Duration::from_millis(100));
        let after = self.peer.stats();
        PlainRun {
            writes: after.writes - before.writes,
            write_ns: after.write_ns - before.write_ns,
        }
    }
}

impl PlainRun {
    fn add(&mut self, o: &PlainRun) {
        self.writes += o.writes;
        self.write_ns += o.write_ns;
    }
}

// ---------------------------------------------------------------------

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("the devices benchmark needs root (network namespaces, taps): skipped");
        return;
    }
    let runs = env_or("TWINVM_BENCH_RUNS", 5).max(1);
    let net_len = (env_or("TWINVM_BENCH_NET_KB", 256).max(1) * 1024) as usize;
    let requests = env_or("TWINVM_BENCH_REQUESTS", 1000).max(1);
    let disk_runs = env_or("TWINVM_BENCH_DISK_RUNS", 3).max(1);
    let disk_mb = env_or("TWINVM_BENCH_DISK_MB", 32).max(1);

    let ns = NetNs::new("bench");
    let dir = TempDir::new("bench-devices");
    let image = dir.path().join("bench.img");
    std::fs::write(&image, vec![0u8; (disk_mb << 20) as usize]).expect("create the disk image");
    let image_arg = image.to_str().expect("image path").to_string();
    let cmdline = format!("disk=bench disk_bench_mb={disk_mb}");

    // First boot: the instruction rate, a disk run, then the network.
    let mut vm = Vm::boot(&ns, &image_arg, &format!("measure_ips=1 {cmdline}"));
    let ips = field(&vm.line("ips="), "ips") as f64;
    let mut disk = vec![disk_run(&mut vm)];
    check_image(&image, disk[0].requests);
    eprintln!("disk run 1 of {disk_runs} done");

    // Warm-up (ARP, first connection).
    ns.run_in(|| {
        let _ = echo(4096);
    });

    // After each run, the same run against the plain process (see
    // `peer`), so that both see the same load on the host.
    let plain_ctx = Plain::start();
    let plain_requests = requests.min(PLAIN_REQUESTS);
    let mut plain: Vec<Vec<PlainRun>> = Vec::new();
    let expect = source_stream(net_len);
    let mut net_rows: Vec<(&str, Vec<NetRun>)> = Vec::new();
    for (name, kind) in [("discard", 0), ("source", 1), ("echo", 2)] {
        let mut results = Vec::new();
        let mut plain_results = Vec::new();
        for _ in 0..runs {
            let before = vm.sample();
            let expected = expect.clone();
            let rate = ns.run_in(move || match kind {
                0 => discard(net_len),
                1 => source(net_len, &expected),
                _ => echo(net_len),
            });
            let after = vm.sample();
            let delta = vm.delta(&before, &after);
            plain_results.push(plain_ctx.run(name, &delta, net_len, plain_requests, &expect));
            results.push(NetRun { rate, delta });
        }
        eprintln!("{name} done");
        net_rows.push((name, results));
        plain.push(plain_results);
    }
    // Request/response in as many runs as the others, each followed by
    // its plain process run.
    let per_run = (requests / runs).max(1);
    let plain_per_run = (plain_requests / runs).max(1);
    let mut rtt = Vec::new();
    let mut rtt_runs = Vec::new();
    let mut plain_rtt = Vec::new();
    for _ in 0..runs {
        let before = vm.sample();
        rtt.extend(ns.run_in(move || latency(per_run)));
        let after = vm.sample();
        let delta = vm.delta(&before, &after);
        plain_rtt.push(plain_ctx.run("request/response", &delta, net_len, plain_per_run, &expect));
        rtt_runs.push(delta);
    }
    plain.push(plain_rtt);
    let mut rtt_delta = Delta::default();
    for d in &rtt_runs {
        rtt_delta.add(d);
    }
    drop(plain_ctx);
    eprintln!("request/response done");
    vm.vm.send_line("net");
    let net_line = vm.line("net0 rx=");
    let bulk_line = vm.line("net0 discard_bytes=");
    vm.power_off();

    for i in 1..disk_runs {
        let mut vm = Vm::boot(&ns, &image_arg, &cmdline);
        disk.push(disk_run(&mut vm));
        vm.power_off();
        eprintln!("disk run {} of {disk_runs} done", i + 1);
    }
    drop(ns);

    // ----- Report.
    let kib = |rate: f64| rate / 1024.0;
    let mut throughput = String::new();
    let titles = [
        ("discard", "TCP host → guest (discard, port 9)"),
        ("source", "TCP guest → host (source, port 19)"),
        ("echo", "TCP echo (port 7), each way"),
    ];
    let mut cpu_rows = Vec::new();
    for (name, results) in &net_rows {
        let title = titles.iter().find(|t| t.0 == *name).map_or("", |t| t.1);
        let mut rates: Vec<f64> = results.iter().map(|r| kib(r.rate)).collect();
        let med = median(&mut rates);
        throughput.push_str(&format!(
            "| {title} | {med:.0} KiB/s | {:.0} / {:.0} KiB/s |\n",
            rates[0],
            rates[rates.len() - 1]
        ));
        let mut delta = Delta::default();
        for r in results {
            delta.add(&r.delta);
        }
        cpu_rows.push(CpuRow {
            phase: format!("TCP {name}, {runs} × {} KiB", net_len / 1024),
            device: Role::Net,
            units: delta.tap_frames,
            unit: "frame",
            delta,
            per_run: results
                .iter()
                .map(|r| us_per_unit(&r.delta, Role::Net, r.delta.tap_frames))
                .collect(),
        });
    }
    rtt.sort_by(f64::total_cmp);
    throughput.push_str(&format!(
        "| request/response round trip (port 8000), p50 / p99 of {} | {:.2} / {:.2} ms | {:.2} / {:.2} ms |\n",
        rtt.len(),
        percentile(&rtt, 0.5),
        percentile(&rtt, 0.99),
        rtt[0],
        rtt[rtt.len() - 1]
    ));
    cpu_rows.push(CpuRow {
        phase: format!("request/response, {runs} × {per_run} round trips"),
        device: Role::Net,
        units: rtt_delta.tap_frames,
        unit: "frame",
        delta: rtt_delta.clone(),
        per_run: rtt_runs
            .iter()
            .map(|d| us_per_unit(d, Role::Net, d.tap_frames))
            .collect(),
    });

    let mib = |requests: u64, ticks: u64| {
        requests as f64 * 4096.0 / (1 << 20) as f64 / (ticks.max(1) as f64 / 100.0)
    };
    let mut w: Vec<f64> = disk
        .iter()
        .map(|d| mib(d.requests, d.write_ticks))
        .collect();
    let mut r: Vec<f64> = disk.iter().map(|d| mib(d.requests, d.read_ticks)).collect();
    let mut wall_ratio: Vec<f64> = disk
        .iter()
        .map(|d| {
            d.host_wall.as_secs_f64()
                / ((d.write_ticks + d.flush_ticks + d.read_ticks) as f64 / 100.0)
        })
        .collect();
    let mut host_rate: Vec<f64> = disk
        .iter()
        .map(|d| {
            2.0 * d.requests as f64 * 4096.0
                / (1 << 20) as f64
                / d.host_wall.as_secs_f64().max(1e-9)
        })
        .collect();
    let mut flush_ms: Vec<f64> = disk.iter().map(|d| d.flush_ticks as f64 * 10.0).collect();
    let (wm, rm) = (median(&mut w), median(&mut r));
    let per_req = |m: f64| m * (1 << 20) as f64 / 4096.0;
    throughput.push_str(&format!(
        "| disk write, 4 KiB requests, up to 8 in flight ({disk_mb} MiB, guest clock) | {wm:.1} MiB/s ({:.0} requests/s) | {:.1} / {:.1} MiB/s |\n\
         | disk flush after the writes | {:.0} ms | {:.0} / {:.0} ms |\n\
         | disk read, 4 KiB requests, up to 8 in flight (guest clock) | {rm:.1} MiB/s ({:.0} requests/s) | {:.1} / {:.1} MiB/s |\n\
         | disk write + flush + read on the host's clock (start line → read line; both ways' bytes) | {:.1} MiB/s | {:.1} / {:.1} MiB/s |\n\
         | disk: host's time ÷ guest's ticks over write + flush + read | {:.2} | {:.2} / {:.2} |\n",
        per_req(wm),
        w[0],
        w[w.len() - 1],
        median(&mut flush_ms),
        flush_ms[0],
        flush_ms[flush_ms.len() - 1],
        per_req(rm),
        r[0],
        r[r.len() - 1],
        median(&mut host_rate),
        host_rate[0],
        host_rate[host_rate.len() - 1],
        median(&mut wall_ratio),
        wall_ratio[0],
        wall_ratio[wall_ratio.len() - 1],
    ));
    let mut dw = Delta::default();
    let mut dr = Delta::default();
    let mut reqs = 0;
    for d in &disk {
        dw.add(&d.write);
        dr.add(&d.read);
        reqs += d.requests;
    }
    cpu_rows.push(CpuRow {
        phase: format!("disk write, {disk_runs} × {disk_mb} MiB"),
        device: Role::Disk,
        units: reqs,
        unit: "request",
        delta: dw,
        per_run: disk
            .iter()
            .map(|d| us_per_unit(&d.write, Role::Disk, d.requests))
            .collect(),
    });
    cpu_rows.push(CpuRow {
        phase: format!("disk flush + read, {disk_runs} × {disk_mb} MiB"),
        device: Role::Disk,
        units: reqs + disk_runs,
        unit: "request",
        delta: dr,
        per_run: disk
            .iter()
            .map(|d| us_per_unit(&d.read, Role::Disk, d.requests + 1))
            .collect(),
    });

    let mut cpu = String::new();
    let mut worst: f64 = 0.0;
    for row in &cpu_rows {
        let d = &row.delta;
        let n = row.units.max(1) as f64;
        let us = row.device_us_per_unit();
        worst = worst.max(us);
        let split = |role: Role| {
            let (u, s) = d.ticks.get(&role).copied().unwrap_or_default();
            if u + s == 0 {
                "–".to_string()
            } else {
                format!(
                    "{:.0} % / {:.0} %",
                    100.0 * u as f64 / (u + s) as f64,
                    100.0 * s as f64 / (u + s) as f64
                )
            }
        };
        let total = d.total_ns().max(1) as f64;
        let pct = |ns: u64| 100.0 * ns as f64 / total;
        let other = d.total_ns() - d.ns(Role::Vcpu) - d.ns(row.device);
        let per = |m: &HashMap<Role, u64>| m.get(&row.device).copied().unwrap_or(0) as f64 / n;
        let exits = d
            .exits
            .map_or("–".to_string(), |e| format!("{:.2}", e as f64 / n));
        let mut runs = row.per_run.clone();
        runs.sort_by(f64::total_cmp);
        let range = match (runs.first(), runs.last()) {
            (Some(lo), Some(hi)) if runs.len() > 1 => format!(" (runs {lo:.1}–{hi:.1})"),
            _ => String::new(),
        };
        cpu.push_str(&format!(
            "| {} | {} {}s | **{us:.1} µs**{range} | {:.2} / {:.2} | {} | {:.1} % / {:.1} % / {:.1} % | {:.0} % busy; {} | {exits} |\n",
            row.phase,
            row.units,
            row.unit,
            per(&d.wakeups),
            per(&d.syscalls),
            split(row.device),
            pct(d.ns(Role::Vcpu)),
            pct(d.ns(row.device)),
            pct(other),
            100.0 * d.ns(Role::Vcpu) as f64 / d.wall.as_secs_f64().max(1e-9) / 1e9,
            split(Role::Vcpu),
        ));
    }
    let verdict = if worst <= 10.0 {
        format!("met: at most {worst:.1} µs of device-thread CPU per frame or request")
    } else {
        format!("**missed**: up to {worst:.1} µs of device-thread CPU per frame or request")
    };

    // The network rows (the first ones, in the order of `plain`) split
    // into the tap writes at a plain process's cost and the rest.
    let mut split_rows = String::new();
    let mut worst_own: f64 = 0.0;
    let mut worst_write: f64 = 0.0;
    let net_deltas: Vec<Vec<&Delta>> = net_rows
        .iter()
        .map(|(_, results)| results.iter().map(|r| &r.delta).collect())
        .chain([rtt_runs.iter().collect()])
        .collect();
    let range = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        match (v.first(), v.last()) {
            (Some(lo), Some(hi)) if v.len() > 1 => format!(" (runs {lo:.1}–{hi:.1})"),
            _ => String::new(),
        }
    };
    for ((row, plain_runs), deltas) in cpu_rows.iter().zip(&plain).zip(&net_deltas) {
        let mut run = PlainRun::default();
        for r in plain_runs {
            run.add(r);
        }
        let share = |d: &Delta| d.tap_from_guest as f64 / d.tap_frames.max(1) as f64;
        let written = share(&row.delta);
        let writes = run.us_per_write() * written;
        let us = row.device_us_per_unit();
        let own = us - writes;
        worst_own = worst_own.max(own);
        worst_write = worst_write.max(run.us_per_write());
        let write_runs = range(plain_runs.iter().map(PlainRun::us_per_write).collect());
        let own_runs = range(
            plain_runs
                .iter()
                .zip(deltas)
                .map(|(p, d)| us_per_unit(d, Role::Net, d.tap_frames) - p.us_per_write() * share(d))
                .collect(),
        );
        split_rows.push_str(&format!(
            "| {} | {} frames, **{:.1} µs** per write{write_runs} | {:.2} | {us:.1} µs | {writes:.1} µs | **{own:.1} µs**{own_runs} |\n",
            row.phase,
            run.writes,
            run.us_per_write(),
            written,
        ));
    }
    for row in &cpu_rows[plain.len()..] {
        worst_own = worst_own.max(row.device_us_per_unit());
    }
    let own_verdict = if worst_own <= 10.0 {
        format!(
            "met: at most {worst_own:.1} µs per frame or request once the tap writes are counted at what a plain process pays for them"
        )
    } else {
        format!(
            "**missed** even so: up to {worst_own:.1} µs per frame or request once the tap writes are counted at what a plain process pays for them"
        )
    };

    let report = format!(
        "{machine}\n\
         Command: `cargo bench -p twinvm --bench devices` (as root; 128 MiB guest, 1 vCPU, \
         virtio-net on a tap in a network namespace, virtio-blk on a {disk_mb} MiB raw image on the host's file system). \
         TCP: {runs} runs of {net_kb} KiB per direction, median; {disk_runs} boots running the guest's disk benchmark. \
         Guest instruction rate: {ips:.2} M instructions/s.\n\n\
         | measurement | median | min / max |\n|---|---|---|\n\
         {throughput}\n\
         VMM CPU per phase, from the process's per-thread accounting \
         (`/proc/<pid>/task/<tid>/`: `schedstat` for CPU time, `stat` for its user/system split, \
         `status` for wakeups, `io` for read/write system calls); frames from the tap's counters \
         (both directions), requests from the guest's lines; device-thread CPU over all runs of a phase, \
         with the spread of single runs; exits from perf's `kvm:kvm_userspace_exit` \
         tracepoint. Target ≤ 10 µs of device-thread CPU per frame or 4 KiB request: {verdict}.\n\n\
         | phase | handled | device thread CPU per frame/request | device thread wakeups / read+write syscalls per frame/request | device thread user / system | process CPU: vCPU / device / other threads | vCPU thread: busy; user (twinvm) / system (KVM) | exits to twinvm's vCPU thread per frame/request |\n\
         |---|---|---|---|---|---|---|---|\n\
         {cpu}\n\
         Guest counters at the end of the network runs: `{net_line}`, `{bulk_line}`.\n\n\
         The host's share. After each network run, the same run (request/response: {plain_per_run} round trips) \
         against a plain process on a tap of its own, set up like the guest's in a namespace like the bench's: a minimal \
         TCP endpoint at the guest's addresses that serves like the test guest (MSS option only, 8 KiB window and send \
         buffer, every segment answered at once) and takes for each frame it receives the time the guest took on \
         average in the run just before. It writes its frames with \
         the call twinvm's tap back end makes, and its thread CPU time is measured around each write: what handing the \
         host such a frame costs any process, the host's network stack (TCP receive, the replies and wakeups it causes) \
         running inside the write. The device thread's CPU per frame is split into its tap writes at that cost \
         (the frames the guest sent, as a share of the frames handled) and the rest, twinvm's own. Largest cost of a \
         plain process's write: {worst_write:.1} µs. Target for the rest: {own_verdict}.\n\n\
         | phase | plain process: frames written, CPU per write | frames twinvm wrote per frame handled | device thread CPU per frame | of which tap writes at a plain process's cost | the rest (twinvm's own) |\n\
         |---|---|---|---|---|---|\n\
         {split_rows}",
        machine = report::machine_line(),
        net_kb = net_len / 1024,
        ips = ips / 1e6,
    );
    println!("{report}");
    write_docs_section("devices", &report);
}
