//! Boot benchmark: time from process start to the test guest's ready
//! banner, the VMM's resident memory besides guest RAM, and the guest's
//! instruction rate under this host's KVM.
//!
//! `cargo bench -p twinvm --bench boot` prints a Markdown report and writes
//! it into `docs/performance.md` between the `bench:boot` markers.
//! `TWINVM_BENCH_BOOTS` sets the number of boots (default 20).

mod report;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use report::{percentile, write_docs_section};

const BIN: &str = env!("CARGO_BIN_EXE_twinvm");
const BANNER: &str = "TWINVM TESTGUEST READY";
const MEMORY: u64 = 128 << 20;

struct Guest {
    child: Child,
    out: BufReader<ChildStdout>,
}

impl Guest {
    fn spawn(cmdline: &str) -> (Guest, Instant) {
        let start = Instant::now();
        let mut child = Command::new(BIN)
            .args(["run", "--memory", &format!("{}M", MEMORY >> 20)])
            .args(["--cmdline", cmdline])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn twinvm");
        let out = BufReader::new(child.stdout.take().expect("stdout"));
        (Guest { child, out }, start)
    }

    /// Reads lines until one satisfies `pred` (bounded by the guest
    /// exiting: EOF ends the loop).
    fn line(&mut self, pred: impl Fn(&str) -> bool) -> String {
        let mut line = String::new();
        loop {
            line.clear();
            if self.out.read_line(&mut line).expect("read console") == 0 {
                panic!("twinvm exited before the expected line");
            }
            if pred(line.trim_end()) {
                return line.trim_end().to_string();
            }
        }
    }

    fn power_off(mut self) {
        let stdin = self.child.stdin.as_mut().expect("stdin");
        let _ = stdin.write_all(b"poweroff\n");
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                assert!(status.success(), "twinvm exited with {status}");
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        panic!("twinvm did not power off");
    }
}

/// Total resident KiB of a process and the resident KiB of its guest RAM
/// mapping (the anonymous mapping exactly the size of guest memory).
fn rss_split(pid: u32) -> (u64, u64) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("smaps");
    let (mut total, mut guest) = (0, 0);
    let mut in_guest = false;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("Size:"), Some(kb)) => {
                in_guest = kb.parse::<u64>().ok() == Some(MEMORY >> 10);
            }
            (Some("Rss:"), Some(kb)) => {
                let kb: u64 = kb.parse().unwrap_or(0);
                total += kb;
                if in_guest {
                    guest += kb;
                }
            }
            _ => {}
        }
    }
    (total, guest)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let boots: usize = std::env::var("TWINVM_BENCH_BOOTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20)
        .max(10);

    // Warm the page cache once.
    let (g, _) = Guest::spawn("");
    let mut g = g;
    g.line(|l| l == BANNER);
    g.power_off();

    let mut banner_ms = Vec::new();
    for _ in 0..boots {
        let (mut g, start) = Guest::spawn("");
        g.line(|l| l == BANNER);
        banner_ms.push(start.elapsed().as_secs_f64() * 1e3);
        g.power_off();
    }
    banner_ms.sort_by(f64::total_cmp);

    // Memory: an idle guest after two counter reports.
    let (mut g, _) = Guest::spawn("");
    g.line(|l| l == BANNER);
    g.line(|l| l.starts_with("counter="));
    g.line(|l| l.starts_with("counter="));
    let (rss_total, rss_guest) = rss_split(g.child.id());
    g.power_off();

    let mut ips = Vec::new();
    for _ in 0..5 {
        let (mut g, _) = Guest::spawn("measure_ips=1");
        let line = g.line(|l| l.starts_with("ips="));
        ips.push(
            line["ips=".len()..]
                .trim()
                .parse::<f64>()
                .expect("ips value"),
        );
        g.power_off();
    }
    ips.sort_by(f64::total_cmp);

    let report = format!(
        "{machine}\n\
         Command: `cargo bench -p twinvm --bench boot` ({boots} boots, 128 MiB guest, 1 vCPU).\n\n\
         | metric | value |\n|---|---|\n\
         | process start → banner, median | {p50:.1} ms |\n\
         | process start → banner, p90 | {p90:.1} ms |\n\
         | process start → banner, min / max | {min:.1} / {max:.1} ms |\n\
         | VMM resident memory besides guest RAM | {vmm_rss} KiB |\n\
         | guest RAM resident (idle test guest) | {rss_guest} KiB |\n\
         | guest instruction rate, median of 5 | {ips:.2} M instructions/s |\n",
        machine = report::machine_line(),
        p50 = percentile(&banner_ms, 0.5),
        p90 = percentile(&banner_ms, 0.9),
        min = banner_ms[0],
        max = banner_ms[banner_ms.len() - 1],
        vmm_rss = rss_total - rss_guest,
        ips = percentile(&ips, 0.5) / 1e6,
    );
    println!("{report}");
    write_docs_section("boot", &report);
}
