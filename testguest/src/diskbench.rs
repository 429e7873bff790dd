//! The disk benchmark (`disk=bench`): the first disk is written
//! sequentially with 4 KiB requests, several in flight, flushed, and read
//! back with 4 KiB requests. The guest does as little as it can per request
//! (no checksums): it stamps the request number into the first 8 bytes of
//! each page it writes and checks that stamp when the page is read back, so
//! that the VMM's side of a request dominates.
//!
//! Request `k` covers bytes `k * 4096 .. (k + 1) * 4096` of the disk. Its
//! page holds `k` (u64 little-endian) in bytes 0..8 and then bytes 8..4096
//! of [`bench_page`], the same for every request.

use crate::disk::STATUS_OK;
use crate::workload::{SEED, Xorshift64};

/// Bytes per request.
pub const REQUEST_BYTES: u64 = 4096;
/// 512-byte sectors per request.
pub const SECTORS_PER_REQUEST: u64 = REQUEST_BYTES / 512;
/// Requests in flight at most.
pub const DEPTH: usize = 8;

/// The content of every benchmark page after its 8-byte stamp: successive
/// outputs of xorshift64 seeded with [`SEED`], 8 little-endian bytes each
/// (the stamp replaces the first output).
pub fn bench_page(page: &mut [u8]) {
    let mut rng = Xorshift64::new(SEED);
    for chunk in page.chunks_mut(8) {
        let word = rng.next_u64().to_le_bytes();
        chunk.copy_from_slice(&word[..chunk.len()]);
    }
}

/// A request of the benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchOp {
    /// Write request `k` (at sector `k * 8`).
    Write(u64),
    /// Flush the device's write cache.
    Flush,
    /// Read request `k` back.
    Read(u64),
}

impl BenchOp {
    /// The first sector the request covers.
    pub fn sector(self) -> u64 {
        match self {
            Self::Write(k) | Self::Read(k) => k * SECTORS_PER_REQUEST,
            Self::Flush => 0,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Write(_) => "write",
            Self::Flush => "flush",
            Self::Read(_) => "read",
        }
    }

    fn request(self) -> u64 {
        match self {
            Self::Write(k) | Self::Read(k) => k,
            Self::Flush => 0,
        }
    }
}

/// A line the benchmark prints (see `report::disk_bench`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchLine {
    /// `disk bench start bytes=<n> requests=<r> request_bytes=4096 in_flight=<d>`
    Start { requests: u64, depth: usize },
    /// `disk bench write bytes=<n> requests=<r> ticks=<t>`
    Write { requests: u64, ticks: u64 },
    /// `disk bench flush ticks=<t>`
    Flush { ticks: u64 },
    /// `disk bench read bytes=<n> requests=<r> ticks=<t>`
    Read { requests: u64, ticks: u64 },
    /// `disk bench error at request <k>: <op> status=<s>`
    Failed {
        request: u64,
        op: &'static str,
        status: u8,
    },
    /// `disk bench error at request <k>: read wrong data`
    WrongData { request: u64 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Writing,
    Flushing,
    Reading,
    Done,
}

/// The benchmark as a state machine. The driver asks [`BenchJob::next_op`]
/// for requests while it has a free slot, hands results to
/// [`BenchJob::complete`], and calls [`BenchJob::settle`] after taking
/// completions (it ends phases and returns their lines).
#[derive(Clone, Copy, Debug)]
pub struct BenchJob {
    requests: u64,
    depth: usize,
    flush: bool,
    phase: Phase,
    /// Requests of the current phase issued and completed.
    issued: u64,
    completed: u64,
    in_flight: usize,
    /// Tick at which the current phase began.
    phase_start: u64,
    written: u64,
    read: u64,
}

impl BenchJob {
    /// A benchmark of `mb` MiB (capped to the whole 4 KiB requests that fit
    /// in `capacity` sectors), `depth` requests in flight at most (at least
    /// 1), flushing between writes and reads if the device can (`flush`),
    /// starting at tick `now`.
    pub fn new(mb: u64, capacity: u64, flush: bool, depth: usize, now: u64) -> Self {
        let requests = mb
            .saturating_mul((1 << 20) / REQUEST_BYTES)
            .min(capacity / SECTORS_PER_REQUEST);
        Self {
            requests,
            depth: depth.max(1),
            flush,
            phase: Phase::Writing,
            issued: 0,
            completed: 0,
            in_flight: 0,
            phase_start: now,
            written: 0,
            read: 0,
        }
    }

    /// The line announcing the benchmark.
    pub fn start_line(&self) -> BenchLine {
        BenchLine::Start {
            requests: self.requests,
            depth: self.depth,
        }
    }

    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// Requests written and read back so far.
    pub fn progress(&self) -> (u64, u64) {
        (self.written, self.read)
    }

    /// Restarts the clock of the current phase at tick `now` if none of
    /// its requests was issued yet: the driver calls this after printing a
    /// line, so that the (slow) serial output does not count as disk time.
    pub fn restart_clock(&mut self, now: u64) {
        if self.issued == 0 {
            self.phase_start = now;
        }
    }

    /// The next request to issue, if one may be issued now.
    pub fn next_op(&mut self) -> Option<BenchOp> {
        let op = match self.phase {
            Phase::Writing | Phase::Reading
                if self.issued < self.requests && self.in_flight < self.depth =>
            {
                if self.phase == Phase::Writing {
                    BenchOp::Write(self.issued)
                } else {
                    BenchOp::Read(self.issued)
                }
            }
            Phase::Flushing if self.issued == 0 => BenchOp::Flush,
            _ => return None,
        };
        self.issued += 1;
        self.in_flight += 1;
        Some(op)
    }

    /// Request `op` finished with `status`; for a read, `stamp` is the
    /// first 8 bytes of the page read (little-endian). Returns an error
    /// line if the benchmark stops.
    pub fn complete(&mut self, op: BenchOp, status: u8, stamp: u64) -> Option<BenchLine> {
        if self.phase == Phase::Done {
            return None;
        }
        self.in_flight = self.in_flight.saturating_sub(1);
        if status != STATUS_OK {
            self.phase = Phase::Done;
            return Some(BenchLine::Failed {
                request: op.request(),
                op: op.name(),
                status,
            });
        }
        match op {
            BenchOp::Read(k) if stamp != k => {
                self.phase = Phase::Done;
                return Some(BenchLine::WrongData { request: k });
            }
            BenchOp::Write(_) => self.written += 1,
            BenchOp::Read(_) => self.read += 1,
            BenchOp::Flush => {}
        }
        self.completed += 1;
        None
    }

    /// Ends the current phase if all its requests completed, at tick `now`,
    /// and returns its line. Call until it returns `None`.
    pub fn settle(&mut self, now: u64) -> Option<BenchLine> {
        let ticks = now.saturating_sub(self.phase_start);
        let (line, next) = match self.phase {
            Phase::Writing if self.completed == self.requests => (
                BenchLine::Write {
                    requests: self.requests,
                    ticks,
                },
                if self.flush {
                    Phase::Flushing
                } else {
                    Phase::Reading
                },
            ),
            Phase::Flushing if self.completed == 1 => (BenchLine::Flush { ticks }, Phase::Reading),
            Phase::Reading if self.completed == self.requests => (
                BenchLine::Read {
                    requests: self.requests,
                    ticks,
                },
                Phase::Done,
            ),
            _ => return None,
        };
        self.phase = next;
        self.phase_start = now;
        self.issued = 0;
        self.completed = 0;
        Some(line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// Runs a job against a simulated disk that completes requests in
    /// order, `per_tick` per tick; returns the lines and the disk.
    fn run(job: &mut BenchJob, per_tick: usize, fail: Option<BenchOp>) -> (Vec<BenchLine>, u64) {
        let mut lines = vec![job.start_line()];
        let mut queue = VecDeque::new();
        let mut max_in_flight = 0;
        for now in 0..100_000u64 {
            for _ in 0..per_tick {
                let Some(op) = queue.pop_front() else { break };
                let status = if Some(op) == fail { 1 } else { STATUS_OK };
                let stamp = match op {
                    BenchOp::Read(k) => k,
                    _ => 0,
                };
                lines.extend(job.complete(op, status, stamp));
            }
            while let Some(line) = job.settle(now) {
                lines.push(line);
            }
            while let Some(op) = job.next_op() {
                queue.push_back(op);
                max_in_flight = max_in_flight.max(queue.len());
            }
            if job.is_done() {
                assert!(max_in_flight <= job.depth);
                return (lines, max_in_flight as u64);
            }
        }
        panic!("the benchmark did not finish");
    }

    #[test]
    fn writes_flushes_and_reads_back() {
        let mut job = BenchJob::new(1, 1 << 20, true, DEPTH, 0);
        let (lines, depth) = run(&mut job, 16, None);
        assert_eq!(depth, DEPTH as u64);
        assert_eq!(
            lines,
            vec![
                BenchLine::Start {
                    requests: 256,
                    depth: DEPTH
                },
                // 256 requests, 16 a tick but 8 in flight: 8 a tick.
                BenchLine::Write {
                    requests: 256,
                    ticks: 32
                },
                BenchLine::Flush { ticks: 1 },
                BenchLine::Read {
                    requests: 256,
                    ticks: 32
                },
            ]
        );
        assert_eq!(job.progress(), (256, 256));
    }

    #[test]
    fn without_flush_capped_to_capacity_and_empty() {
        // 20 sectors hold two whole requests.
        let mut job = BenchJob::new(4, 20, false, 1, 0);
        let (lines, _) = run(&mut job, 1, None);
        assert_eq!(
            lines[1..],
            [
                BenchLine::Write {
                    requests: 2,
                    ticks: 2
                },
                BenchLine::Read {
                    requests: 2,
                    ticks: 2
                },
            ]
        );
        let mut job = BenchJob::new(0, 100, true, 4, 0);
        let (lines, _) = run(&mut job, 1, None);
        assert_eq!(
            lines[1..],
            [
                BenchLine::Write {
                    requests: 0,
                    ticks: 0
                },
                BenchLine::Flush { ticks: 1 },
                BenchLine::Read {
                    requests: 0,
                    ticks: 0
                },
            ]
        );
    }

    #[test]
    fn errors_stop_the_benchmark() {
        let mut job = BenchJob::new(1, 1 << 20, true, 4, 0);
        let (lines, _) = run(&mut job, 2, Some(BenchOp::Write(5)));
        assert_eq!(
            lines.last(),
            Some(&BenchLine::Failed {
                request: 5,
                op: "write",
                status: 1
            })
        );
        assert_eq!(job.progress().0, 5);

        let mut job = BenchJob::new(1, 1 << 20, true, 4, 0);
        job.restart_clock(2);
        for _ in 0..256 {
            let op = job.next_op().unwrap();
            assert_eq!(job.complete(op, STATUS_OK, 0), None);
        }
        assert_eq!(
            job.settle(3),
            Some(BenchLine::Write {
                requests: 256,
                ticks: 1
            })
        );
        job.restart_clock(5);
        let flush = job.next_op().unwrap();
        job.restart_clock(9);
        assert_eq!(flush, BenchOp::Flush);
        assert_eq!(job.next_op(), None);
        assert_eq!(job.complete(flush, STATUS_OK, 0), None);
        assert_eq!(job.settle(6), Some(BenchLine::Flush { ticks: 1 }));
        let read = job.next_op().unwrap();
        assert_eq!(read.sector(), 0);
        assert_eq!(
            job.complete(read, STATUS_OK, 7),
            Some(BenchLine::WrongData { request: 0 })
        );
        assert!(job.is_done());
    }

    #[test]
    fn page_pattern() {
        let mut page = [0u8; REQUEST_BYTES as usize];
        bench_page(&mut page);
        let mut rng = Xorshift64::new(SEED);
        assert_eq!(page[..8], rng.next_u64().to_le_bytes());
        assert_eq!(page[8..16], rng.next_u64().to_le_bytes());
        assert_eq!(BenchOp::Write(3).sector(), 24);
    }
}
