//! The disk workloads: numbered, checksummed records, one per 512-byte
//! sector. [`RecordJob`] writes a fixed number from sector 0 up, flushes,
//! and optionally reads them back and verifies them; [`StreamJob`] keeps
//! appending them at a steady rate, wrapping around at the end of the disk.
//!
//! Record `k` lives in sector `k` (the stream: sector `k` mod the disk's
//! capacity):
//!
//! | bytes | content |
//! |---|---|
//! | 0..8 | magic `TVMREC01` |
//! | 8..16 | record number `k`, u64 little-endian |
//! | 16..508 | payload: the xorshift64 stream seeded with `k ^ PAYLOAD_SEED` (0 replaced by [`crate::workload::SEED`]), each u64 little-endian, cut at 492 bytes |
//! | 508..512 | CRC-32 (IEEE, as zlib's `crc32`) of bytes 0..508, little-endian |

use crate::workload::{RateSplitter, Xorshift64};

/// Bytes in a sector (and in a record).
pub const SECTOR_SIZE: usize = 512;
/// Magic at the start of every record.
pub const RECORD_MAGIC: [u8; 8] = *b"TVMREC01";
/// Mixed into the payload seed of every record.
pub const PAYLOAD_SEED: u64 = 0x7477_696e_766d_6469; // "twinvmdi"
/// Where the payload starts and the checksum starts.
pub const PAYLOAD_START: usize = 16;
pub const CHECKSUM_START: usize = SECTOR_SIZE - 4;

/// CRC-32 lookup table (reflected polynomial 0xEDB88320).
static CRC_TABLE: [u32; 256] = crc_table();

const fn crc_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut bit = 0;
        while bit < 8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            bit += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
}

/// CRC-32 (IEEE 802.3, the one zlib and Python's `zlib.crc32` compute).
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc = CRC_TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// Writes record `number` into `sector`.
pub fn encode_record(number: u64, sector: &mut [u8; SECTOR_SIZE]) {
    sector[..8].copy_from_slice(&RECORD_MAGIC);
    sector[8..16].copy_from_slice(&number.to_le_bytes());
    let mut rng = Xorshift64::new(number ^ PAYLOAD_SEED);
    for chunk in sector[PAYLOAD_START..CHECKSUM_START].chunks_mut(8) {
        let word = rng.next_u64().to_le_bytes();
        chunk.copy_from_slice(&word[..chunk.len()]);
    }
    let crc = crc32(&sector[..CHECKSUM_START]);
    sector[CHECKSUM_START..].copy_from_slice(&crc.to_le_bytes());
}

/// What is wrong with a sector that should hold a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordError {
    /// Not a record (no magic).
    BadMagic,
    /// A record, but of another number.
    BadNumber(u64),
    /// The checksum does not match the content.
    BadChecksum,
    /// Checksum right, but the payload is not the one of this number.
    BadPayload,
}

impl RecordError {
    /// Short description for the `disk error` line.
    pub fn describe(&self) -> &'static str {
        match self {
            Self::BadMagic => "bad magic",
            Self::BadNumber(_) => "bad number",
            Self::BadChecksum => "bad checksum",
            Self::BadPayload => "bad payload",
        }
    }
}

/// Checks that `sector` holds record `number`.
pub fn verify_record(number: u64, sector: &[u8; SECTOR_SIZE]) -> Result<(), RecordError> {
    if sector[..8] != RECORD_MAGIC {
        return Err(RecordError::BadMagic);
    }
    let mut crc = [0u8; 4];
    crc.copy_from_slice(&sector[CHECKSUM_START..]);
    if crc32(&sector[..CHECKSUM_START]) != u32::from_le_bytes(crc) {
        return Err(RecordError::BadChecksum);
    }
    let mut n = [0u8; 8];
    n.copy_from_slice(&sector[8..16]);
    let found = u64::from_le_bytes(n);
    if found != number {
        return Err(RecordError::BadNumber(found));
    }
    let mut rng = Xorshift64::new(number ^ PAYLOAD_SEED);
    for chunk in sector[PAYLOAD_START..CHECKSUM_START].chunks(8) {
        let word = rng.next_u64().to_le_bytes();
        if chunk != &word[..chunk.len()] {
            return Err(RecordError::BadPayload);
        }
    }
    Ok(())
}

/// Block request status values.
pub const STATUS_OK: u8 = 0;
pub const STATUS_IOERR: u8 = 1;
pub const STATUS_UNSUPP: u8 = 2;

/// The next request the record workload wants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Write record `k` to sector `k`.
    Write(u64),
    /// Flush the device's write cache.
    Flush,
    /// Read sector `k` and verify record `k`.
    Read(u64),
    /// Write record `record` to sector `sector` (the stream).
    Append { record: u64, sector: u64 },
}

impl Op {
    /// The record and the sector of a write.
    pub fn write_target(&self) -> Option<(u64, u64)> {
        match *self {
            Self::Write(k) => Some((k, k)),
            Self::Append { record, sector } => Some((record, sector)),
            Self::Flush | Self::Read(_) => None,
        }
    }
}

/// What a finished request led to, for the console.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// `disk wrote <n> records`
    Wrote(u64),
    /// `disk write refused (read-only)`
    WriteRefused,
    /// `disk verified <n> records`
    Verified(u64),
    /// `disk error at record <k>: write status=<s>` (or read, or flush at
    /// record n)
    IoError {
        record: u64,
        op: &'static str,
        status: u8,
    },
    /// `disk error at record <k>: <what>`
    BadRecord { record: u64, error: RecordError },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Writing(u64),
    Flushing,
    Verifying(u64),
    Done,
}

/// The record workload as a state machine: [`RecordJob::next_op`] says which
/// request to issue, [`RecordJob::complete`] takes its result. One request
/// is in flight at a time.
#[derive(Clone, Copy, Debug)]
pub struct RecordJob {
    records: u64,
    verify: bool,
    read_only: bool,
    flush: bool,
    phase: Phase,
    /// Records per second (0: unthrottled) and the writes allowed so far.
    rate: u64,
    splitter: RateSplitter,
    credit: u64,
    written: u64,
    verified: u64,
}

impl RecordJob {
    /// A job writing `records` records (capped to `capacity` sectors), then
    /// flushing if the device supports it (`flush`), then verifying them if
    /// `verify`. `read_only`: the device said it is read-only (a refused
    /// write is then reported as such). `rate`: writes per second, 0 for as
    /// fast as possible.
    pub fn new(
        records: u64,
        capacity: u64,
        verify: bool,
        read_only: bool,
        flush: bool,
        rate: u64,
    ) -> Self {
        Self {
            records: records.min(capacity),
            verify,
            read_only,
            flush,
            phase: Phase::Writing(0),
            rate,
            splitter: RateSplitter::new(rate),
            credit: 0,
            written: 0,
            verified: 0,
        }
    }

    /// Records the job writes (and verifies).
    pub fn records(&self) -> u64 {
        self.records
    }

    /// A timer tick passed: with a rate set, more writes are allowed.
    pub fn tick(&mut self) {
        if self.rate != 0 && matches!(self.phase, Phase::Writing(_)) {
            self.credit = self.credit.saturating_add(self.splitter.next_tick());
        }
    }

    /// Records written and verified so far.
    pub fn progress(&self) -> (u64, u64) {
        (self.written, self.verified)
    }

    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// The request to issue now, if any (`None` when done or waiting for
    /// write credit).
    pub fn next_op(&mut self) -> Option<Op> {
        loop {
            match self.phase {
                Phase::Writing(k) if k >= self.records => {
                    self.phase = if self.flush {
                        Phase::Flushing
                    } else {
                        // Nothing to flush: the write-back is complete.
                        return None;
                    };
                }
                Phase::Writing(k) => {
                    if self.rate != 0 && self.credit == 0 {
                        return None;
                    }
                    return Some(Op::Write(k));
                }
                Phase::Flushing => return Some(Op::Flush),
                Phase::Verifying(k) if k >= self.records => return None,
                Phase::Verifying(k) => return Some(Op::Read(k)),
                Phase::Done => return None,
            }
        }
    }

    /// Without flush support, the end of the writes must still be reported:
    /// call this when [`Self::next_op`] returned `None`; it finishes the write
    /// phase or the verification if they are complete.
    pub fn settle(&mut self) -> Option<Outcome> {
        match self.phase {
            Phase::Writing(k) if k >= self.records && !self.flush => {
                Some(self.after_writes(Outcome::Wrote(self.records)))
            }
            Phase::Verifying(k) if k >= self.records => {
                self.phase = Phase::Done;
                Some(Outcome::Verified(self.records))
            }
            _ => None,
        }
    }

    fn after_writes(&mut self, outcome: Outcome) -> Outcome {
        self.phase = if self.verify {
            Phase::Verifying(0)
        } else {
            Phase::Done
        };
        outcome
    }

    /// The request [`Self::next_op`] returned finished with `status`; for a
    /// read, `data` is the sector read. Returns a line to print, if any.
    pub fn complete(&mut self, op: Op, status: u8, data: &[u8; SECTOR_SIZE]) -> Option<Outcome> {
        match (self.phase, op) {
            (Phase::Writing(k), Op::Write(w)) if k == w => {
                if status == STATUS_OK {
                    self.phase = Phase::Writing(k + 1);
                    self.written = k + 1;
                    self.credit = self.credit.saturating_sub(1);
                    None
                } else if self.read_only && status == STATUS_IOERR {
                    Some(self.after_writes(Outcome::WriteRefused))
                } else {
                    self.phase = Phase::Done;
                    Some(Outcome::IoError {
                        record: k,
                        op: "write",
                        status,
                    })
                }
            }
            (Phase::Flushing, Op::Flush) => {
                if status == STATUS_OK {
                    Some(self.after_writes(Outcome::Wrote(self.records)))
                } else {
                    self.phase = Phase::Done;
                    Some(Outcome::IoError {
                        record: self.records,
                        op: "flush",
                        status,
                    })
                }
            }
            (Phase::Verifying(k), Op::Read(r)) if k == r => {
                if status != STATUS_OK {
                    self.phase = Phase::Done;
                    return Some(Outcome::IoError {
                        record: k,
                        op: "read",
                        status,
                    });
                }
                if let Err(error) = verify_record(k, data) {
                    self.phase = Phase::Done;
                    return Some(Outcome::BadRecord { record: k, error });
                }
                self.phase = Phase::Verifying(k + 1);
                self.verified = k + 1;
                if k + 1 >= self.records {
                    self.phase = Phase::Done;
                    return Some(Outcome::Verified(self.records));
                }
                None
            }
            _ => None,
        }
    }
}

/// Flush after this many stream records when `disk_flush_every` is not
/// given.
pub const DEFAULT_FLUSH_EVERY: u64 = 16;

/// The continuous workload (`disk=stream`): records 0, 1, 2, ... each
/// written to sector `k` mod the disk's capacity, `rate` per second (0: as
/// fast as the disk completes them), with a flush after every
/// `flush_every` records (0: never; none without FLUSH support). It runs
/// until a request fails. One request is in flight at a time; the requests
/// are the same sequence whatever the timing, only their pace follows the
/// timer.
#[derive(Clone, Copy, Debug)]
pub struct StreamJob {
    sectors: u64,
    flush_every: u64,
    read_only: bool,
    rate: u64,
    splitter: RateSplitter,
    credit: u64,
    written: u64,
    flushed: u64,
    flush_due: bool,
    stopped: bool,
}

impl StreamJob {
    /// A stream over `capacity` sectors (none: the job is done at once).
    /// `flush`: the device offers FLUSH. `read_only`: the device said it is
    /// read-only (a refused write is then reported as such).
    pub fn new(capacity: u64, flush_every: u64, read_only: bool, flush: bool, rate: u64) -> Self {
        Self {
            sectors: capacity,
            flush_every: if flush { flush_every } else { 0 },
            read_only,
            rate,
            splitter: RateSplitter::new(rate),
            credit: 0,
            written: 0,
            flushed: 0,
            flush_due: false,
            stopped: capacity == 0,
        }
    }

    /// Sectors the stream wraps around at.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Records between flushes (0: no flushes).
    pub fn flush_every(&self) -> u64 {
        self.flush_every
    }

    /// Records written, and records covered by the last flush.
    pub fn progress(&self) -> (u64, u64) {
        (self.written, self.flushed)
    }

    pub fn is_done(&self) -> bool {
        self.stopped
    }

    /// A timer tick passed: with a rate set, more writes are allowed (at
    /// most a second's worth is saved up while the disk lags).
    pub fn tick(&mut self) {
        if self.rate != 0 && !self.stopped {
            let due = self.splitter.next_tick();
            self.credit = self.credit.saturating_add(due).min(self.rate);
        }
    }

    /// The request to issue now, if any.
    pub fn next_op(&self) -> Option<Op> {
        if self.stopped {
            None
        } else if self.flush_due {
            Some(Op::Flush)
        } else if self.rate != 0 && self.credit == 0 {
            None
        } else {
            Some(Op::Append {
                record: self.written,
                sector: self.written % self.sectors,
            })
        }
    }

    /// The request [`Self::next_op`] returned finished with `status`.
    /// Returns a line to print, if any (the stream then stops).
    pub fn complete(&mut self, op: Op, status: u8) -> Option<Outcome> {
        match op {
            Op::Append { record, .. } if record == self.written && !self.stopped => {
                if status == STATUS_OK {
                    self.written += 1;
                    self.credit = self.credit.saturating_sub(1);
                    self.flush_due =
                        self.flush_every != 0 && self.written.is_multiple_of(self.flush_every);
                    return None;
                }
                self.stopped = true;
                if self.read_only && status == STATUS_IOERR {
                    Some(Outcome::WriteRefused)
                } else {
                    Some(Outcome::IoError {
                        record,
                        op: "write",
                        status,
                    })
                }
            }
            Op::Flush if self.flush_due && !self.stopped => {
                self.flush_due = false;
                if status == STATUS_OK {
                    self.flushed = self.written;
                    return None;
                }
                self.stopped = true;
                Some(Outcome::IoError {
                    record: self.written,
                    op: "flush",
                    status,
                })
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_reference_values() {
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(
            crc32(b"The quick brown fox jumps over the lazy dog"),
            0x414f_a339
        );
    }

    #[test]
    fn records_round_trip_and_differ() {
        let mut a = [0u8; SECTOR_SIZE];
        let mut b = [0u8; SECTOR_SIZE];
        encode_record(7, &mut a);
        encode_record(8, &mut b);
        assert_eq!(&a[..8], b"TVMREC01");
        assert_eq!(&a[8..16], &7u64.to_le_bytes());
        assert_ne!(a[16..508], b[16..508]);
        assert_eq!(verify_record(7, &a), Ok(()));
        assert_eq!(verify_record(8, &b), Ok(()));
        assert_eq!(verify_record(8, &a), Err(RecordError::BadNumber(7)));
        // Deterministic.
        let mut again = [0xffu8; SECTOR_SIZE];
        encode_record(7, &mut again);
        assert_eq!(a, again);
        // The seed-0 case (number == PAYLOAD_SEED) still has a payload.
        encode_record(PAYLOAD_SEED, &mut a);
        assert_eq!(verify_record(PAYLOAD_SEED, &a), Ok(()));
        assert_ne!(a[16..24], [0u8; 8]);
    }

    #[test]
    fn record_layout_matches_the_documentation() {
        let mut s = [0u8; SECTOR_SIZE];
        encode_record(3, &mut s);
        let mut rng = Xorshift64::new(3 ^ PAYLOAD_SEED);
        assert_eq!(&s[16..24], &rng.next_u64().to_le_bytes());
        assert_eq!(&s[24..32], &rng.next_u64().to_le_bytes());
        let crc = crc32(&s[..508]);
        assert_eq!(&s[508..], &crc.to_le_bytes());
    }

    #[test]
    fn corruption_is_found() {
        let mut s = [0u8; SECTOR_SIZE];
        encode_record(1, &mut s);
        let mut bad = s;
        bad[0] ^= 1;
        assert_eq!(verify_record(1, &bad), Err(RecordError::BadMagic));
        for at in [8, 100, 507, 508, 511] {
            let mut bad = s;
            bad[at] ^= 0x40;
            assert_eq!(
                verify_record(1, &bad),
                Err(RecordError::BadChecksum),
                "byte {at}"
            );
        }
        // A record with a valid checksum but a foreign payload.
        let mut forged = s;
        forged[200] ^= 1;
        let crc = crc32(&forged[..508]);
        forged[508..].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(verify_record(1, &forged), Err(RecordError::BadPayload));
        assert_eq!(
            verify_record(1, &[0; SECTOR_SIZE]),
            Err(RecordError::BadMagic)
        );
    }

    /// Runs a job against a simulated disk; returns the outcomes.
    fn run(job: &mut RecordJob, disk: &mut [[u8; SECTOR_SIZE]], ro: bool) -> Vec<Outcome> {
        let mut out = Vec::new();
        for _ in 0..10_000 {
            let Some(op) = job.next_op() else {
                if let Some(o) = job.settle() {
                    out.push(o);
                    continue;
                }
                break;
            };
            let mut data = [0u8; SECTOR_SIZE];
            let status = match op {
                Op::Write(k) if ro => {
                    let _ = k;
                    STATUS_IOERR
                }
                Op::Write(k) => {
                    encode_record(k, &mut data);
                    disk[k as usize] = data;
                    STATUS_OK
                }
                Op::Flush => STATUS_OK,
                Op::Read(k) => {
                    data = disk[k as usize];
                    STATUS_OK
                }
                Op::Append { .. } => unreachable!("a record job does not append"),
            };
            if let Some(o) = job.complete(op, status, &data) {
                out.push(o);
            }
        }
        out
    }

    #[test]
    fn write_flush_verify() {
        let mut disk = vec![[0u8; SECTOR_SIZE]; 16];
        let mut job = RecordJob::new(10, 16, true, false, true, 0);
        let out = run(&mut job, &mut disk, false);
        assert_eq!(out, vec![Outcome::Wrote(10), Outcome::Verified(10)]);
        assert!(job.is_done());
        assert_eq!(job.progress(), (10, 10));
        assert_eq!(verify_record(9, &disk[9]), Ok(()));
        assert_eq!(disk[10], [0; SECTOR_SIZE]);
    }

    #[test]
    fn without_flush_or_verify() {
        let mut disk = vec![[0u8; SECTOR_SIZE]; 4];
        let mut job = RecordJob::new(3, 4, false, false, false, 0);
        assert_eq!(run(&mut job, &mut disk, false), vec![Outcome::Wrote(3)]);
        assert!(job.is_done());
    }

    #[test]
    fn capped_to_capacity_and_zero_records() {
        let mut disk = vec![[0u8; SECTOR_SIZE]; 4];
        let mut job = RecordJob::new(100, 4, true, false, true, 0);
        assert_eq!(job.records(), 4);
        assert_eq!(
            run(&mut job, &mut disk, false),
            vec![Outcome::Wrote(4), Outcome::Verified(4)]
        );
        let mut job = RecordJob::new(0, 4, true, false, true, 0);
        assert_eq!(
            run(&mut job, &mut disk, false),
            vec![Outcome::Wrote(0), Outcome::Verified(0)]
        );
    }

    #[test]
    fn read_only_disk_refuses_and_verifies_old_records() {
        let mut disk = vec![[0u8; SECTOR_SIZE]; 8];
        run(
            &mut RecordJob::new(5, 8, false, false, true, 0),
            &mut disk,
            false,
        );
        let mut job = RecordJob::new(5, 8, true, true, true, 0);
        assert_eq!(
            run(&mut job, &mut disk, true),
            vec![Outcome::WriteRefused, Outcome::Verified(5)]
        );
        // Verifying more than was written finds the end.
        let mut job = RecordJob::new(6, 8, true, true, true, 0);
        assert_eq!(
            run(&mut job, &mut disk, true),
            vec![
                Outcome::WriteRefused,
                Outcome::BadRecord {
                    record: 5,
                    error: RecordError::BadMagic
                }
            ]
        );
        // A write error on a writable disk is an I/O error.
        let mut job = RecordJob::new(6, 8, true, false, true, 0);
        assert_eq!(
            run(&mut job, &mut disk, true),
            vec![Outcome::IoError {
                record: 0,
                op: "write",
                status: STATUS_IOERR
            }]
        );
    }

    #[test]
    fn rate_limits_writes_per_tick() {
        let mut job = RecordJob::new(10, 100, false, false, true, 250);
        assert_eq!(job.next_op(), None);
        let mut writes = 0;
        let data = [0u8; SECTOR_SIZE];
        for _ in 0..4 {
            job.tick();
            while let Some(Op::Write(k)) = job.next_op() {
                assert_eq!(job.complete(Op::Write(k), STATUS_OK, &data), None);
                writes += 1;
            }
        }
        // 250/s over 4 ticks of 10 ms: 2 + 3 + 2 + 3.
        assert_eq!(writes, 10);
        assert_eq!(job.next_op(), Some(Op::Flush));
    }

    #[test]
    fn mismatched_completions_are_ignored() {
        let mut job = RecordJob::new(3, 8, true, false, true, 0);
        let data = [0u8; SECTOR_SIZE];
        assert_eq!(job.complete(Op::Write(2), STATUS_OK, &data), None);
        assert_eq!(job.complete(Op::Flush, STATUS_OK, &data), None);
        assert_eq!(job.next_op(), Some(Op::Write(0)));
    }

    /// Runs a stream for `ticks` ticks against a simulated disk, issuing as
    /// many requests per tick as it allows (at most `per_tick`); returns
    /// the requests and the outcomes.
    fn run_stream(
        job: &mut StreamJob,
        disk: &mut [[u8; SECTOR_SIZE]],
        ticks: usize,
        per_tick: usize,
        status_of: impl Fn(Op) -> u8,
    ) -> (Vec<Op>, Vec<Outcome>) {
        let (mut ops, mut out) = (Vec::new(), Vec::new());
        for _ in 0..ticks {
            job.tick();
            for _ in 0..per_tick {
                let Some(op) = job.next_op() else {
                    break;
                };
                let status = status_of(op);
                if let (STATUS_OK, Some((record, sector))) = (status, op.write_target()) {
                    encode_record(record, &mut disk[sector as usize]);
                }
                ops.push(op);
                if let Some(o) = job.complete(op, status) {
                    out.push(o);
                }
            }
        }
        (ops, out)
    }

    #[test]
    fn stream_wraps_flushes_and_keeps_its_rate() {
        let mut disk = vec![[0u8; SECTOR_SIZE]; 10];
        let mut job = StreamJob::new(10, 4, false, true, 250);
        assert_eq!(job.next_op(), None, "no credit before the first tick");
        let (ops, out) = run_stream(&mut job, &mut disk, 100, 10, |_| STATUS_OK);
        assert!(out.is_empty());
        // 250 records in one second, a flush after every 4th.
        assert_eq!(job.progress(), (250, 248));
        let writes: Vec<(u64, u64)> = ops.iter().filter_map(Op::write_target).collect();
        assert_eq!(writes.len(), 250);
        for (i, &(record, sector)) in writes.iter().enumerate() {
            assert_eq!((record, sector), (i as u64, i as u64 % 10));
        }
        assert_eq!(ops.iter().filter(|o| **o == Op::Flush).count(), 62);
        assert_eq!(ops[4], Op::Flush);
        // The disk holds the last record written to each sector.
        for (sector, data) in disk.iter().enumerate() {
            assert_eq!(verify_record(240 + sector as u64, data), Ok(()));
        }
        assert!(!job.is_done());
        assert_eq!((job.sectors(), job.flush_every()), (10, 4));
    }

    #[test]
    fn stream_request_sequence_does_not_depend_on_timing() {
        let sequence = |rate, per_tick, ticks| {
            let mut disk = vec![[0u8; SECTOR_SIZE]; 7];
            let mut job = StreamJob::new(7, 3, false, true, rate);
            let (ops, _) = run_stream(&mut job, &mut disk, ticks, per_tick, |_| STATUS_OK);
            ops[..60].to_vec()
        };
        let a = sequence(0, 1, 100);
        assert_eq!(a, sequence(0, 5, 100));
        assert_eq!(a, sequence(1000, 2, 100));
        assert_eq!(a, sequence(7, 100, 1000));
    }

    #[test]
    fn stream_unthrottled_without_flush_and_credit_cap() {
        let mut disk = vec![[0u8; SECTOR_SIZE]; 4];
        let mut job = StreamJob::new(4, 16, false, false, 0);
        let (ops, _) = run_stream(&mut job, &mut disk, 3, 5, |_| STATUS_OK);
        assert_eq!(ops.len(), 15);
        assert!(ops.iter().all(|o| o.write_target().is_some()));
        assert_eq!(job.flush_every(), 0);
        assert_eq!(job.progress(), (15, 0));
        // A disk that lags saves up at most one second of writes.
        let mut job = StreamJob::new(4, 0, false, true, 100);
        for _ in 0..500 {
            job.tick();
        }
        let (ops, _) = run_stream(&mut job, &mut disk, 0, 0, |_| STATUS_OK);
        assert!(ops.is_empty());
        let mut n = 0;
        while let Some(op) = job.next_op() {
            job.complete(op, STATUS_OK);
            n += 1;
        }
        assert_eq!(n, 100);
    }

    #[test]
    fn stream_stops_on_errors() {
        let mut disk = vec![[0u8; SECTOR_SIZE]; 8];
        // A write fails.
        let mut job = StreamJob::new(8, 4, false, true, 0);
        let (ops, out) = run_stream(&mut job, &mut disk, 1, 20, |op| match op {
            Op::Append { record: 6, .. } => STATUS_IOERR,
            _ => STATUS_OK,
        });
        assert_eq!(
            out,
            vec![Outcome::IoError {
                record: 6,
                op: "write",
                status: STATUS_IOERR
            }]
        );
        assert_eq!(ops.len(), 8); // 6 writes, a flush, the failed write
        assert!(job.is_done());
        assert_eq!(job.next_op(), None);
        assert_eq!(job.progress(), (6, 4));
        // A flush fails.
        let mut job = StreamJob::new(8, 4, false, true, 0);
        let (_, out) = run_stream(&mut job, &mut disk, 1, 20, |op| match op {
            Op::Flush => STATUS_UNSUPP,
            _ => STATUS_OK,
        });
        assert_eq!(
            out,
            vec![Outcome::IoError {
                record: 4,
                op: "flush",
                status: STATUS_UNSUPP
            }]
        );
        // A read-only disk.
        let mut job = StreamJob::new(8, 4, true, true, 0);
        let (_, out) = run_stream(&mut job, &mut disk, 1, 20, |_| STATUS_IOERR);
        assert_eq!(out, vec![Outcome::WriteRefused]);
        // No capacity: nothing to do.
        let job = StreamJob::new(0, 4, false, true, 0);
        assert!(job.is_done());
        assert_eq!(job.next_op(), None);
        // Completions of other requests are ignored.
        let mut job = StreamJob::new(8, 4, false, true, 0);
        assert_eq!(job.complete(Op::Flush, STATUS_IOERR), None);
        assert_eq!(job.complete(Op::Write(0), STATUS_IOERR), None);
        assert_eq!(
            job.complete(
                Op::Append {
                    record: 1,
                    sector: 1
                },
                STATUS_IOERR
            ),
            None
        );
        assert_eq!(
            job.next_op(),
            Some(Op::Append {
                record: 0,
                sector: 0
            })
        );
    }
}
