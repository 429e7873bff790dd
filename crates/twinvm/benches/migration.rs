//! Live-migration benchmark: downtime (p50/p99) and total time of
//! migrations between two `twinvm` processes on this machine, for 1 GiB
//! and 4 GiB guests, idle and with the test guest dirtying memory at fixed
//! rates; the split of the downtime; and the page-transfer throughput of a
//! guest with 512 MiB of data, next to the loopback TCP throughput measured
//! in the same run, one loopback transfer before each of those migrations
//! (the physical limit here, under the same load) — with destinations that
//! allocate guest RAM as pages arrive (the default) and with destinations
//! started with `--prefault`.
//!
//! `cargo bench -p twinvm --bench migration` prints a Markdown report and
//! writes it into `docs/performance.md` between the `bench:migration`
//! markers. `TWINVM_BENCH_MIGRATIONS` sets the migrations per scenario
//! (default 10, at least 10); `TWINVM_BENCH_SIZES` the guest sizes in GiB
//! (default `1,4`). Migrations go over 127.0.0.1 only.

mod report;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use report::{median, percentile, write_docs_section};

const BIN: &str = env!("CARGO_BIN_EXE_twinvm");
const T: Duration = Duration::from_secs(120);
/// First TCP port the destinations listen on (one per migration).
const FIRST_PORT: u16 = 47_300;
const SPLIT: [&str; 8] = [
    "vcpu_stop_ms",
    "dirty_log_ms",
    "last_pages_ms",
    "state_save_ms",
    "state_transfer_ms",
    "state_load_ms",
    "handover_ms",
    "resume_ms",
];

/// A `twinvm run` process with its console lines on a channel.
struct Vm {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    socket: PathBuf,
}

impl Vm {
    /// `extra` goes on a destination's command line.
    fn spawn(
        dir: &Path,
        name: &str,
        gib: u64,
        cmdline: &str,
        incoming: Option<u16>,
        extra: &[&str],
    ) -> Vm {
        let file: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let socket = dir.join(format!("{file}.sock"));
        let mut cmd = Command::new(BIN);
        cmd.args(["run", "--memory", &format!("{gib}G"), "--cmdline", cmdline])
            .args(["--api-socket", socket.to_str().expect("UTF-8 path")]);
        if let Some(port) = incoming {
            cmd.args(["--incoming", &format!("127.0.0.1:{port}")])
                .args(extra);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn twinvm");
        let stdin = child.stdin.take().expect("stdin");
        let out = BufReader::new(child.stdout.take().expect("stdout"));
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in out.lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    // Nobody listens any more; keep draining the pipe.
                }
            }
        });
        let deadline = Instant::now() + T;
        while !socket.exists() {
            assert!(Instant::now() < deadline, "{name}: no API socket");
            std::thread::sleep(Duration::from_millis(10));
        }
        Vm {
            child,
            stdin,
            lines,
            socket,
        }
    }

    fn line(&self, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + T;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if pred(&l) => return l,
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => panic!("no matching console line in {T:?}"),
                Err(RecvTimeoutError::Disconnected) => panic!("twinvm exited"),
            }
        }
    }

    fn send(&mut self, line: &str) {
        self.stdin
            .write_all(format!("{line}\n").as_bytes())
            .expect("write to the console");
    }

    fn wait_exit(mut self) {
        let deadline = Instant::now() + T;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                assert!(status.success(), "twinvm ended with {status}");
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        panic!("twinvm did not exit");
    }

    fn power_off(mut self) {
        self.send("poweroff");
        self.wait_exit();
    }
}

/// `twinvm ctl --socket S migrate --to 127.0.0.1:PORT ARGS` → its report.
fn migrate(vm: &Vm, port: u16, args: &[&str]) -> serde_json::Value {
    let out = Command::new(BIN)
        .args(["ctl", "--socket", vm.socket.to_str().expect("UTF-8 path")])
        .args(["migrate", "--to", &format!("127.0.0.1:{port}")])
        .args(args)
        .output()
        .expect("run twinvm ctl");
    assert!(
        out.status.success(),
        "migrate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the report is JSON")
}

fn f(v: &serde_json::Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("no {key} in {v}"))
}

/// Results of one scenario.
struct Scenario {
    name: String,
    downtime: Vec<f64>,
    total: Vec<f64>,
    rounds: Vec<f64>,
    last_pages: Vec<f64>,
    split: Vec<Vec<f64>>,
    throughput: Vec<f64>,
}

/// Migrates a guest back and forth `n` times: each migration goes to a
/// fresh `--incoming` process, which becomes the next source. `before`
/// runs before each migration. `args` go into the `migrate` request,
/// `dest_args` on each destination's command line.
#[allow(clippy::too_many_arguments)]
fn run_scenario(
    dir: &Path,
    name: &str,
    gib: u64,
    cmdline: &str,
    n: usize,
    port: &mut u16,
    prepare: impl FnOnce(&mut Vm),
    mut before: impl FnMut(),
    args: &[&str],
    dest_args: &[&str],
) -> Scenario {
    let mut vm = Vm::spawn(dir, &format!("{name}-0"), gib, cmdline, None, &[]);
    vm.line(|l| l.starts_with("counter="));
    prepare(&mut vm);
    let mut s = Scenario {
        name: name.to_string(),
        downtime: vec![],
        total: vec![],
        rounds: vec![],
        last_pages: vec![],
        split: vec![vec![]; SPLIT.len()],
        throughput: vec![],
    };
    for i in 1..=n {
        before();
        *port += 1;
        let dest = Vm::spawn(
            dir,
            &format!("{name}-{i}"),
            gib,
            cmdline,
            Some(*port),
            dest_args,
        );
        let r = migrate(&vm, *port, args);
        vm.wait_exit();
        s.downtime.push(f(&r, "downtime_ms"));
        s.total.push(f(&r, "total_ms"));
        s.rounds.push(f(&r, "rounds"));
        s.last_pages.push(f(&r, "last_round_pages"));
        s.throughput.push(f(&r, "throughput_bytes_per_s"));
        for (k, col) in SPLIT.iter().zip(&mut s.split) {
            col.push(f(&r["split"], k));
        }
        vm = dest;
        // The guest runs on: the next migration starts from a live guest.
        vm.line(|l| l.starts_with("counter="));
        eprintln!(
            "{name} #{i}: downtime {:.2} ms, total {:.0} ms, {} rounds",
            f(&r, "downtime_ms"),
            f(&r, "total_ms"),
            r["rounds"]
        );
    }
    vm.power_off();
    s
}

/// Guest data in the throughput scenarios (`dirty_mb=512`).
const DATA: usize = 512 << 20;
/// Size of one loopback write and read.
const LOOP_IO: usize = 256 << 10;

/// Loopback TCP throughput, bytes per second: one stream, 256 KiB writes
/// and reads, `bytes` in all. The sender writes from, and the receiver
/// reads into, successive 256 KiB pieces of a buffer of `span` bytes
/// (touched beforehand), wrapping around: with `span` = 256 KiB the data
/// stays in the CPU's caches, with a span the size of a migration's data
/// every byte comes from and goes to memory, as a migration's pages do.
fn loopback(bytes: usize, span: usize) -> f64 {
    let span = span.max(LOOP_IO) / LOOP_IO * LOOP_IO;
    let l = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let addr = l.local_addr().unwrap();
    let reader = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut buf = vec![1u8; span];
        let mut got = 0;
        let mut at = 0;
        while got < bytes {
            match s.read(&mut buf[at..at + LOOP_IO]) {
                Ok(0) => break,
                Ok(n) => {
                    got += n;
                    at = (at + n) % span;
                    if span - at < LOOP_IO {
                        at = 0;
                    }
                }
                Err(e) => panic!("loopback read: {e}"),
            }
        }
        got
    });
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    let buf = vec![0x5au8; span];
    let start = Instant::now();
    let mut sent = 0;
    while sent < bytes {
        let at = sent % span;
        s.write_all(&buf[at..at + LOOP_IO]).unwrap();
        sent += LOOP_IO;
    }
    let got = reader.join().unwrap();
    got as f64 / start.elapsed().as_secs_f64()
}

/// The host's 1-minute load average (`/proc/loadavg`), or "?".
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let load_before = load_average();
    let n: usize = std::env::var("TWINVM_BENCH_MIGRATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10)
        .max(10);
    let sizes: Vec<u64> = std::env::var("TWINVM_BENCH_SIZES")
        .unwrap_or_else(|_| "1,4".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let dir = std::env::temp_dir().join(format!("twinvm-bench-migration-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut port = FIRST_PORT;
    let mut scenarios = Vec::new();

    for &gib in &sizes {
        for (label, rate) in [
            ("idle", 0u64),
            ("1000 pages/s", 1000),
            ("5000 pages/s", 5000),
        ] {
            let cmdline = format!("dirty_rate={rate} dirty_mb=64");
            scenarios.push(run_scenario(
                &dir,
                &format!("{gib} GiB, {label}"),
                gib,
                &cmdline,
                n,
                &mut port,
                |_| {},
                || {},
                &[],
                &[],
            ));
        }
    }

    // Throughput: 512 MiB of guest data, written by the guest (random
    // pages, three times over, so nearly every page holds data), then the
    // guest is quiet while it migrates. Loopback TCP is measured before
    // each of these migrations, so that both see the host in the same
    // state (other load on it changes both): once with cache-resident
    // buffers, once memory to memory over as many bytes as the guest's
    // data.
    let mut loop_rates: Vec<f64> = Vec::new();
    let mut mem_rates: Vec<f64> = Vec::new();
    let fill = |vm: &mut Vm| {
        vm.send("dirty 200000");
        vm.line(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("dirtied="))
                .and_then(|d| d.parse::<u64>().ok())
                .is_some_and(|d| d >= 3 * 131_072)
        });
        vm.send("dirty 0");
        vm.line(|l| l == "dirty_rate=0");
    };
    let mut tput = Vec::new();
    for prefault in [false, true] {
        for channels in [1u16, 2] {
            let ch = channels.to_string();
            let (label, dest_args): (&str, &[&str]) = if prefault {
                (", destination --prefault", &["--prefault"])
            } else {
                ("", &[])
            };
            let s = run_scenario(
                &dir,
                &format!("1 GiB, 512 MiB of data, {channels} channel(s){label}"),
                1,
                "dirty_rate=0 dirty_mb=512",
                n.min(10),
                &mut port,
                fill,
                || {
                    loop_rates.push(loopback(1 << 30, LOOP_IO));
                    mem_rates.push(loopback(1 << 30, DATA));
                },
                &["--channels", &ch],
                dest_args,
            );
            tput.push(s);
        }
    }
    let loop_runs = loop_rates.len();
    let loop_bw = median(&mut loop_rates);
    let mem_bw = median(&mut mem_rates);
    let _ = std::fs::remove_dir_all(&dir);

    let mut table = String::from(
        "| scenario | downtime p50 | downtime p99 | downtime max | total p50 | rounds p50 | pages in pause p50 |\n|---|---|---|---|---|---|---|\n",
    );
    let mut split_table = report::split_header(&SPLIT);
    for s in scenarios.iter_mut().chain(tput.iter_mut()) {
        s.downtime.sort_by(f64::total_cmp);
        s.total.sort_by(f64::total_cmp);
        table.push_str(&format!(
            "| {} | {:.2} ms | {:.2} ms | {:.2} ms | {:.0} ms | {:.0} | {:.0} |\n",
            s.name,
            percentile(&s.downtime, 0.5),
            percentile(&s.downtime, 0.99),
            s.downtime.last().copied().unwrap_or(f64::NAN),
            percentile(&s.total, 0.5),
            median(&mut s.rounds),
            median(&mut s.last_pages),
        ));
        let cols: Vec<String> = s
            .split
            .iter_mut()
            .map(|c| format!("{:.2}", median(c)))
            .collect();
        split_table.push_str(&format!("| {} | {} |\n", s.name, cols.join(" | ")));
    }
    let mut tput_table = format!(
        "| transfer | throughput (median) | share of loopback, cache to cache | share of loopback, memory to memory |\n|---|---|---|---|\n\
         | loopback TCP, 1 stream, cache to cache: a 256 KiB buffer each side (median of {loop_runs} × 1 GiB, one before each migration below) | {:.0} MB/s | 100 % | {:.0} % |\n\
         | loopback TCP, 1 stream, memory to memory: 512 MiB buffers, as much as the guest's data (median of {loop_runs} × 1 GiB, right after each of the above) | {:.0} MB/s | {:.0} % | 100 % |\n",
        loop_bw / 1e6,
        100.0 * loop_bw / mem_bw,
        mem_bw / 1e6,
        100.0 * mem_bw / loop_bw,
    );
    for s in &mut tput {
        let t = median(&mut s.throughput);
        tput_table.push_str(&format!(
            "| {} | {:.0} MB/s | {:.0} % | {:.0} % |\n",
            s.name,
            t / 1e6,
            100.0 * t / loop_bw,
            100.0 * t / mem_bw
        ));
    }
    let body = format!(
        "{machine}\n\
         Command: `cargo bench -p twinvm --bench migration` ({n} migrations per scenario, each to a new \
         `twinvm run --incoming` process on 127.0.0.1, 1 vCPU, downtime budget 50 ms, 1 channel unless \
         stated). Downtime is measured by the source from pausing the guest until the destination \
         reports it running; the dirtying rates are the test guest's `dirty_rate` over a 64 MiB area. \
         Host load average (1 min) when the run started and ended: {load_before} and {load_after} \
         (other work on the host competes with both migration processes for its CPUs).\n\n\
         {table}\n\
         Median split of the downtime, in ms (source: vCPU stop, dirty log, last pages, state save, \
         handover; destination: state transfer, state load, resume):\n\n\
         {split_table}\n\
         Page-transfer throughput of the pre-copy rounds (page contents moved per second) against \
         loopback TCP measured in the same run, alternating with these migrations:\n\n\
         {tput_table}",
        machine = report::machine_line(),
        load_after = load_average(),
    );
    println!("{body}");
    write_docs_section("migration", &body);
}
