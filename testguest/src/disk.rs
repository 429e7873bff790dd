//! The disk workload: numbered, checksummed records, one per 512-byte
//! sector, written from sector 0 up, flushed, and optionally read back and
//! verified.
//!
//! Record `k` lives in sector `k`:
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
}
