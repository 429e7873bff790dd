//! Payloads of the migration messages (`MsgType::Mig*`), encoded and
//! decoded without any I/O. Integers are little-endian. Every decoder
//! checks lengths before it reads and returns a [`WireError`] for any
//! malformed input; none panics (a fuzz target, `decode_migration`, and a
//! randomized unit test drive them with arbitrary bytes).
//!
//! ```text
//! MigBegin     session[16] channels:u16 flags:u32 memory:u64 vcpus:u32 ndev:u32 dev:u32*ndev
//! MigReady     (empty)
//! MigJoin      session[16] index:u16
//! MigPages     count:u32 entry:u64*count [data[4096]*(entries without ZERO)]
//!              entry = guest address of the page | flags (bit 0 ZERO, bits 1..11 zero),
//!              addresses strictly ascending; the data either ends the payload or,
//!              if the payload stops after the entries, follows the frame on the
//!              stream (what the source sends)
//! MigRoundEnd  round:u32 pages:u64 dirty:u64
//! MigChannelEnd pages:u64            (pages this channel carried, zero ones included)
//! MigState     digest_len:u32 digest[digest_len] state[..]   (state in twinvm's state format)
//! MigLoaded    transfer_us:u64 load_us:u64
//! MigHandover  (empty)
//! MigResumed   attach_us:u64 resume_us:u64
//! MigAbort     reason (UTF-8, at most 1024 bytes kept)
//! MigSummary   the source's Report, postcard-encoded
//! MigRoundAck  round:u32            (destination: every page of the round is in guest memory)
//! ```
//!
//! `MigRoundEnd` is sent on every channel after a round's pages: on the
//! control channel with the round's figures, on the others as a marker. The
//! destination answers on the control channel with `MigRoundAck` once all
//! channels have passed the marker, so the source measures the rounds end
//! to end and never pauses the guest with pages still in flight.

use vmm::snapshot::ConfigFingerprint;

/// Size of a guest page.
pub const PAGE_SIZE: usize = 4096;
/// Most pages in one `MigPages` frame.
pub const MAX_BATCH: usize = 256;
/// Pages per stripe: page `p` travels on channel `(p / STRIPE_PAGES) % channels`.
pub const STRIPE_PAGES: u64 = 512;
/// Entry flag: the page is all zeros; no data follows for it.
pub const ENTRY_ZERO: u64 = 1;
/// Flag bits an entry may carry.
const ENTRY_FLAGS: u64 = (PAGE_SIZE as u64) - 1;
/// Begin flag: compute and compare digests at switchover.
pub const BEGIN_VERIFY: u32 = 1 << 0;
/// Begin flag: the guest runs on the source; resume it on the destination.
pub const BEGIN_RUNNING: u32 = 1 << 1;
const BEGIN_KNOWN: u32 = BEGIN_VERIFY | BEGIN_RUNNING;
/// Most virtio devices a fingerprint may name.
const MAX_DEVICES: u32 = 64;
/// Longest abort reason kept.
pub const MAX_REASON: usize = 1024;

/// A malformed migration payload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The payload ends before the field.
    #[error("{msg} payload is truncated ({len} bytes)")]
    Truncated {
        /// The message.
        msg: &'static str,
        /// Its length.
        len: usize,
    },
    /// Bytes follow the last field.
    #[error("{msg} payload has {extra} trailing bytes")]
    Trailing {
        /// The message.
        msg: &'static str,
        /// How many.
        extra: usize,
    },
    /// A field has a value this version does not accept.
    #[error("{msg}: {why}")]
    Invalid {
        /// The message.
        msg: &'static str,
        /// What is wrong.
        why: String,
    },
}

/// Reads fields off a payload.
struct Reader<'a> {
    msg: &'static str,
    buf: &'a [u8],
    len: usize,
}

impl<'a> Reader<'a> {
    fn new(msg: &'static str, buf: &'a [u8]) -> Self {
        Reader {
            msg,
            buf,
            len: buf.len(),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(WireError::Truncated {
                msg: self.msg,
                len: self.len,
            });
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    fn end(self) -> Result<(), WireError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(WireError::Trailing {
                msg: self.msg,
                extra: self.buf.len(),
            })
        }
    }

    fn invalid(&self, why: impl Into<String>) -> WireError {
        WireError::Invalid {
            msg: self.msg,
            why: why.into(),
        }
    }
}

/// `MigBegin`: what the source asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Begin {
    /// Random per migration; extra channels name it to join.
    pub session: [u8; 16],
    /// Page channels, control channel included.
    pub channels: u16,
    /// [`BEGIN_VERIFY`], [`BEGIN_RUNNING`].
    pub flags: u32,
    /// The shape of the source's VM.
    pub fingerprint: ConfigFingerprint,
}

impl Begin {
    pub fn encode(&self) -> Vec<u8> {
        let f = &self.fingerprint;
        let mut v = Vec::with_capacity(38 + 4 * f.devices.len());
        v.extend_from_slice(&self.session);
        v.extend_from_slice(&self.channels.to_le_bytes());
        v.extend_from_slice(&self.flags.to_le_bytes());
        v.extend_from_slice(&f.memory_bytes.to_le_bytes());
        v.extend_from_slice(&f.vcpus.to_le_bytes());
        v.extend_from_slice(&(f.devices.len() as u32).to_le_bytes());
        for d in &f.devices {
            v.extend_from_slice(&d.to_le_bytes());
        }
        v
    }

    pub fn decode(b: &[u8]) -> Result<Begin, WireError> {
        let mut r = Reader::new("MigBegin", b);
        let session = r.array()?;
        let channels = r.u16()?;
        if channels == 0 || channels > super::MAX_CHANNELS {
            return Err(r.invalid(format!(
                "{channels} channels (1 to {} allowed)",
                super::MAX_CHANNELS
            )));
        }
        let flags = r.u32()?;
        if flags & !BEGIN_KNOWN != 0 {
            return Err(r.invalid(format!("unknown flags {flags:#x}")));
        }
        let memory_bytes = r.u64()?;
        let vcpus = r.u32()?;
        let n = r.u32()?;
        if n > MAX_DEVICES {
            return Err(r.invalid(format!("{n} devices")));
        }
        let devices = (0..n).map(|_| r.u32()).collect::<Result<Vec<_>, _>>()?;
        r.end()?;
        Ok(Begin {
            session,
            channels,
            flags,
            fingerprint: ConfigFingerprint {
                memory_bytes,
                vcpus,
                devices,
            },
        })
    }
}

/// `MigJoin`: an extra channel presents itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Join {
    /// The session of the migration it belongs to.
    pub session: [u8; 16],
    /// Its channel index (1 and up).
    pub index: u16,
}

impl Join {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = self.session.to_vec();
        v.extend_from_slice(&self.index.to_le_bytes());
        v
    }

    pub fn decode(b: &[u8]) -> Result<Join, WireError> {
        let mut r = Reader::new("MigJoin", b);
        let session = r.array()?;
        let index = r.u16()?;
        r.end()?;
        Ok(Join { session, index })
    }
}

/// The channel page `gpa` travels on.
pub fn channel_of(gpa: u64, channels: u16) -> u16 {
    ((gpa / PAGE_SIZE as u64 / STRIPE_PAGES) % u64::from(channels.max(1))) as u16
}

/// Builds `MigPages` payloads: [`Self::next_page`] and [`Self::commit`]
/// pages, then [`Self::finish`]. Page contents go straight into the
/// payload buffer, after room kept for the largest entry table; `finish`
/// writes the count and entries just before the contents, so the payload
/// is never copied. The buffer is reused from batch to batch.
pub struct PagesBuilder {
    entries: Vec<u64>,
    /// `HEAD` bytes of room, then the contents of the pages with data.
    buf: Vec<u8>,
    /// The last finished batch is still in `buf`.
    finished: bool,
}

/// Room for the count and the largest entry table.
const HEAD: usize = 4 + 8 * MAX_BATCH;

impl Default for PagesBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl PagesBuilder {
    pub fn new() -> Self {
        let mut buf = Vec::with_capacity(HEAD + MAX_BATCH * PAGE_SIZE);
        buf.resize(HEAD, 0);
        PagesBuilder {
            entries: Vec::with_capacity(MAX_BATCH),
            buf,
            finished: false,
        }
    }

    /// Pages in the batch.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether the batch is full.
    pub fn is_full(&self) -> bool {
        self.entries.len() >= MAX_BATCH
    }

    /// Room for the next page's contents: the caller fills it, then calls
    /// [`Self::commit`] with the page's address.
    pub fn next_page(&mut self) -> &mut [u8] {
        if self.finished {
            self.buf.truncate(HEAD);
            self.finished = false;
        }
        let start = self.buf.len();
        self.buf.resize(start + PAGE_SIZE, 0);
        &mut self.buf[start..]
    }

    /// Adds the page written into [`Self::next_page`] at `gpa`; if it is all
    /// zeros, it becomes a zero entry (or, with `skip_zero`, is dropped) and
    /// its data is not sent. Returns whether the page was zero.
    pub fn commit(&mut self, gpa: u64, skip_zero: bool) -> bool {
        let start = self.buf.len() - PAGE_SIZE;
        let zero = is_zero(&self.buf[start..]);
        if zero {
            self.buf.truncate(start);
            if !skip_zero {
                self.entries.push(gpa | ENTRY_ZERO);
            }
        } else {
            self.entries.push(gpa);
        }
        zero
    }

    /// The payload of the batch; the builder is empty afterwards (the
    /// slice stays valid until the next call).
    pub fn finish(&mut self) -> &[u8] {
        if self.finished {
            self.buf.truncate(HEAD);
        }
        let n = self.entries.len();
        let start = HEAD - 4 - 8 * n;
        let data_end = self.buf.len();
        self.buf[start..start + 4].copy_from_slice(&(n as u32).to_le_bytes());
        for (i, e) in self.entries.iter().enumerate() {
            let at = start + 4 + 8 * i;
            self.buf[at..at + 8].copy_from_slice(&e.to_le_bytes());
        }
        self.entries.clear();
        // The next page starts a new batch behind the head room.
        self.finished = true;
        &self.buf[start..data_end]
    }
}

/// Builds the head of a `MigPages` frame whose page contents follow the
/// frame on the stream (see [`decode_page_head`]): the count and the
/// entries. [`Self::push`] pages, then [`Self::finish`]; the buffer is
/// reused from batch to batch.
pub struct PagesHead {
    /// The count (written by `finish`), then the entries.
    buf: Vec<u8>,
    /// Entries without [`ENTRY_ZERO`].
    with_data: usize,
}

impl Default for PagesHead {
    fn default() -> Self {
        Self::new()
    }
}

impl PagesHead {
    pub fn new() -> Self {
        let mut buf = Vec::with_capacity(4 + 8 * MAX_BATCH);
        buf.extend_from_slice(&[0; 4]);
        PagesHead { buf, with_data: 0 }
    }

    /// Pages in the batch.
    pub fn len(&self) -> usize {
        (self.buf.len() - 4) / 8
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the batch is full.
    pub fn is_full(&self) -> bool {
        self.len() >= MAX_BATCH
    }

    /// Pages whose contents follow the frame.
    pub fn data_pages(&self) -> usize {
        self.with_data
    }

    /// Adds the page at `gpa` (page-aligned): a zero page (a flag, no
    /// data) or one whose 4096 bytes the caller sends after the frame, in
    /// the order of the pushes.
    pub fn push(&mut self, gpa: u64, zero: bool) {
        let entry = if zero { gpa | ENTRY_ZERO } else { gpa };
        self.buf.extend_from_slice(&entry.to_le_bytes());
        if !zero {
            self.with_data += 1;
        }
    }

    /// The payload: count and entries. Valid until [`Self::clear`].
    pub fn finish(&mut self) -> &[u8] {
        let n = self.len() as u32;
        self.buf[..4].copy_from_slice(&n.to_le_bytes());
        &self.buf
    }

    /// Empties the batch.
    pub fn clear(&mut self) {
        self.buf.truncate(4);
        self.with_data = 0;
    }
}

/// Checks the head of a `MigPages` frame whose payload is `len` bytes:
/// `entries` are its count's entries (the count, at most [`MAX_BATCH`],
/// read by the caller), their addresses strictly ascending. Returns the
/// entries as (address, zero). The page contents, one page per non-zero
/// entry, come right after the entries either way: inside the payload
/// (`len` holds them; what [`PagesBuilder`] writes) or after the frame on
/// the stream (`len` ends with the entries; what the migration source
/// sends, straight from guest memory). Any other `len` is refused.
pub fn decode_page_head(len: usize, entries: &[u8]) -> Result<Vec<(u64, bool)>, WireError> {
    let head = 4 + entries.len();
    let pages = if len == head {
        let with_data = entries
            .chunks_exact(8)
            .filter(|e| e[0] & ENTRY_ZERO as u8 == 0)
            .count();
        decode_page_entries(head + with_data * PAGE_SIZE, entries)?
    } else {
        decode_page_entries(len, entries)?
    };
    if let Some(w) = pages.windows(2).find(|w| w[0].0 >= w[1].0) {
        return Err(WireError::Invalid {
            msg: "MigPages",
            why: format!("page {:#x} follows page {:#x} in one batch", w[1].0, w[0].0),
        });
    }
    Ok(pages)
}

/// Decodes a whole `MigPages` payload of either form ([`decode_page_head`]);
/// returns the entries and whether the data follows the frame.
pub fn decode_pages_payload(b: &[u8]) -> Result<(Vec<(u64, bool)>, bool), WireError> {
    let mut r = Reader::new("MigPages", b);
    let count = r.u32()? as usize;
    if count > MAX_BATCH {
        return Err(r.invalid(format!("{count} pages in one batch (at most {MAX_BATCH})")));
    }
    let entries = r.take(count * 8)?;
    let pages = decode_page_head(b.len(), entries)?;
    let after = r.rest().is_empty() && pages.iter().any(|&(_, zero)| !zero);
    Ok((pages, after))
}

/// Whether `page` is all zeros.
pub fn is_zero(page: &[u8]) -> bool {
    // Wide words: the compiler turns this into vector compares.
    let (head, body, tail) = {
        // SAFETY: every bit pattern is a valid u128; align_to only splits
        // the slice at alignment boundaries.
        unsafe { page.align_to::<u128>() }
    };
    head.iter().all(|&b| b == 0) && body.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// One page of a decoded `MigPages` payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageEntry<'a> {
    /// Guest-physical address (page-aligned).
    pub gpa: u64,
    /// Its contents; `None` for a zero page.
    pub data: Option<&'a [u8]>,
}

/// A decoded, checked `MigPages` payload.
#[derive(Debug)]
pub struct Pages<'a> {
    entries: &'a [u8],
    data: &'a [u8],
}

impl<'a> Pages<'a> {
    /// Checks the whole payload: entry count, flags, and that exactly one
    /// page of data follows per non-zero entry.
    pub fn decode(b: &'a [u8]) -> Result<Pages<'a>, WireError> {
        let mut r = Reader::new("MigPages", b);
        let count = r.u32()? as usize;
        if count > MAX_BATCH {
            return Err(r.invalid(format!("{count} pages in one batch (at most {MAX_BATCH})")));
        }
        let entries = r.take(count * 8)?;
        decode_page_entries(b.len(), entries)?;
        let data = r.rest();
        Ok(Pages { entries, data })
    }

    /// Number of pages.
    pub fn len(&self) -> usize {
        self.entries.len() / 8
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The pages in order.
    pub fn iter(&self) -> impl Iterator<Item = PageEntry<'a>> + 'a {
        let mut data = self.data;
        self.entries.chunks_exact(8).map(move |e| {
            let e = u64::from_le_bytes(e.try_into().unwrap_or_default());
            let gpa = e & !ENTRY_FLAGS;
            if e & ENTRY_ZERO != 0 {
                PageEntry { gpa, data: None }
            } else {
                // `decode` checked there is a page per non-zero entry.
                let (page, rest) = data.split_at(PAGE_SIZE.min(data.len()));
                data = rest;
                PageEntry {
                    gpa,
                    data: Some(page),
                }
            }
        })
    }
}

/// `MigRoundEnd`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoundEnd {
    /// The round that ended (1 and up).
    pub round: u32,
    /// Pages it sent (zero ones included).
    pub pages: u64,
    /// Pages dirty after it.
    pub dirty: u64,
}

impl RoundEnd {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = self.round.to_le_bytes().to_vec();
        v.extend_from_slice(&self.pages.to_le_bytes());
        v.extend_from_slice(&self.dirty.to_le_bytes());
        v
    }

    pub fn decode(b: &[u8]) -> Result<RoundEnd, WireError> {
        let mut r = Reader::new("MigRoundEnd", b);
        let v = RoundEnd {
            round: r.u32()?,
            pages: r.u64()?,
            dirty: r.u64()?,
        };
        r.end()?;
        Ok(v)
    }
}

/// Encodes a message made of `u64` fields (`MigChannelEnd`, `MigLoaded`,
/// `MigResumed`).
pub fn encode_u64s(values: &[u64]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Decodes a message of exactly `N` `u64` fields.
pub fn decode_u64s<const N: usize>(msg: &'static str, b: &[u8]) -> Result<[u64; N], WireError> {
    let mut r = Reader::new(msg, b);
    let mut out = [0u64; N];
    for v in &mut out {
        *v = r.u64()?;
    }
    r.end()?;
    Ok(out)
}

/// Checks that a message without fields is empty.
pub fn decode_empty(msg: &'static str, b: &[u8]) -> Result<(), WireError> {
    Reader::new(msg, b).end()
}

/// `MigState`: the source's digest (if verifying) and the VM state.
#[derive(Debug, PartialEq, Eq)]
pub struct StateMsg<'a> {
    /// The postcard-encoded [`vmm::StateDigest`], if any.
    pub digest: Option<&'a [u8]>,
    /// The state in twinvm's state format.
    pub state: &'a [u8],
}

impl<'a> StateMsg<'a> {
    pub fn encode(digest: Option<&[u8]>, state: &[u8]) -> Vec<u8> {
        let d = digest.unwrap_or(&[]);
        let mut v = Vec::with_capacity(4 + d.len() + state.len());
        v.extend_from_slice(&(d.len() as u32).to_le_bytes());
        v.extend_from_slice(d);
        v.extend_from_slice(state);
        v
    }

    pub fn decode(b: &'a [u8]) -> Result<StateMsg<'a>, WireError> {
        let mut r = Reader::new("MigState", b);
        let n = r.u32()? as usize;
        let digest = r.take(n)?;
        let state = r.rest();
        if state.is_empty() {
            return Err(r.invalid("no state"));
        }
        Ok(StateMsg {
            digest: (n > 0).then_some(digest),
            state,
        })
    }
}

/// `MigAbort` payload for `reason`.
pub fn encode_abort(reason: &str) -> Vec<u8> {
    let mut end = reason.len().min(MAX_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason.as_bytes()[..end].to_vec()
}

/// The reason in a `MigAbort` payload (lossy, bounded).
pub fn decode_abort(b: &[u8]) -> String {
    String::from_utf8_lossy(&b[..b.len().min(MAX_REASON)]).into_owned()
}

/// Decodes any migration payload by message type; for the fuzz target and
/// tests. Returns a short description of what was decoded.
pub fn decode_any(msg_type: u16, b: &[u8]) -> Result<String, WireError> {
    use crate::frame::MsgType as M;
    Ok(match M::from_u16(msg_type) {
        M::MigBegin => format!("{:?}", Begin::decode(b)?),
        M::MigReady => decode_empty("MigReady", b).map(|_| "ready".to_string())?,
        M::MigJoin => format!("{:?}", Join::decode(b)?),
        M::MigPages => {
            let (pages, after) = decode_pages_payload(b)?;
            let place = if after {
                "after the frame"
            } else {
                "in the frame"
            };
            format!("{} pages, data {place}", pages.len())
        }
        M::MigRoundEnd => format!("{:?}", RoundEnd::decode(b)?),
        M::MigChannelEnd => format!("{:?}", decode_u64s::<1>("MigChannelEnd", b)?),
        M::MigState => format!("{} state bytes", StateMsg::decode(b)?.state.len()),
        M::MigLoaded => format!("{:?}", decode_u64s::<2>("MigLoaded", b)?),
        M::MigHandover => decode_empty("MigHandover", b).map(|_| "handover".to_string())?,
        M::MigResumed => format!("{:?}", decode_u64s::<2>("MigResumed", b)?),
        M::MigAbort => decode_abort(b),
        M::MigSummary => format!("{:?}", decode_summary(b)?),
        M::MigRoundAck => format!("{:?}", decode_round_ack(b)?),
        other => format!("not a migration message: {other:?}"),
    })
}

/// `MigRoundAck` payload.
pub fn encode_round_ack(round: u32) -> Vec<u8> {
    round.to_le_bytes().to_vec()
}

/// Decodes a `MigRoundAck` payload.
pub fn decode_round_ack(b: &[u8]) -> Result<u32, WireError> {
    let mut r = Reader::new("MigRoundAck", b);
    let round = r.u32()?;
    r.end()?;
    Ok(round)
}

/// Checks the head of a `MigPages` payload of `len` bytes: `count` (at most
/// [`MAX_BATCH`]) and the entries. Returns the entries as (address, zero)
/// and checks that `len` holds exactly one page of data per non-zero entry.
pub fn decode_page_entries(len: usize, entries: &[u8]) -> Result<Vec<(u64, bool)>, WireError> {
    let msg = "MigPages";
    let mut out = Vec::with_capacity(entries.len() / 8);
    let mut with_data = 0usize;
    for e in entries.chunks_exact(8) {
        let e = u64::from_le_bytes(e.try_into().unwrap_or_default());
        if e & ENTRY_FLAGS & !ENTRY_ZERO != 0 {
            return Err(WireError::Invalid {
                msg,
                why: format!("entry {e:#x} has unknown flags"),
            });
        }
        let zero = e & ENTRY_ZERO != 0;
        if !zero {
            with_data += 1;
        }
        out.push((e & !ENTRY_FLAGS, zero));
    }
    let expected = 4 + entries.len() + with_data * PAGE_SIZE;
    if len != expected {
        return Err(WireError::Invalid {
            msg,
            why: format!("{len} bytes for {} pages, {with_data} with data", out.len()),
        });
    }
    Ok(out)
}

/// `MigSummary` payload.
pub fn encode_summary(report: &super::Report) -> Vec<u8> {
    postcard::to_allocvec(report).unwrap_or_default()
}

/// Decodes a `MigSummary` payload.
pub fn decode_summary(b: &[u8]) -> Result<super::Report, WireError> {
    postcard::from_bytes(b).map_err(|e| WireError::Invalid {
        msg: "MigSummary",
        why: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp() -> ConfigFingerprint {
        ConfigFingerprint {
            memory_bytes: 1 << 30,
            vcpus: 2,
            devices: vec![1, 2],
        }
    }

    #[test]
    fn begin_roundtrips_and_checks_fields() {
        let b = Begin {
            session: [7; 16],
            channels: 4,
            flags: BEGIN_VERIFY | BEGIN_RUNNING,
            fingerprint: fp(),
        };
        let enc = b.encode();
        assert_eq!(Begin::decode(&enc).unwrap(), b);
        for cut in 0..enc.len() {
            assert!(Begin::decode(&enc[..cut]).is_err(), "cut {cut}");
        }
        let mut extra = enc.clone();
        extra.push(0);
        assert!(matches!(
            Begin::decode(&extra),
            Err(WireError::Trailing { .. })
        ));
        let mut zero = b.clone();
        zero.channels = 0;
        assert!(Begin::decode(&zero.encode()).is_err());
        let mut many = b.clone();
        many.channels = super::super::MAX_CHANNELS + 1;
        assert!(Begin::decode(&many.encode()).is_err());
        let mut flags = b.clone();
        flags.flags = 1 << 7;
        assert!(Begin::decode(&flags.encode()).is_err());
        let mut huge = enc.clone();
        huge[34..38].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Begin::decode(&huge).is_err());
    }

    #[test]
    fn pages_roundtrip_with_zero_pages_as_flags() {
        let mut pb = PagesBuilder::new();
        pb.next_page().fill(0xab);
        assert!(!pb.commit(0x1000, false));
        pb.next_page();
        assert!(pb.commit(0x2000, false));
        pb.next_page();
        assert!(pb.commit(0x3000, true), "skipped zero page");
        pb.next_page()[4095] = 1;
        assert!(!pb.commit(0x4000, false));
        assert_eq!(pb.len(), 3);
        let payload = pb.finish().to_vec();
        assert_eq!(payload.len(), 4 + 3 * 8 + 2 * PAGE_SIZE);
        assert!(pb.is_empty());
        let pages = Pages::decode(&payload).unwrap();
        let got: Vec<(u64, Option<u8>)> = pages
            .iter()
            .map(|p| (p.gpa, p.data.map(|d| d[4095])))
            .collect();
        assert_eq!(
            got,
            vec![(0x1000, Some(0xab)), (0x2000, None), (0x4000, Some(1))]
        );
        // The builder starts the next batch afresh.
        pb.next_page().fill(7);
        pb.commit(0x9000, true);
        let second = pb.finish().to_vec();
        assert_eq!(second.len(), 4 + 8 + PAGE_SIZE);
        let pages = Pages::decode(&second).unwrap();
        let got: Vec<u64> = pages.iter().map(|p| p.gpa).collect();
        assert_eq!(got, vec![0x9000]);
        assert!(Pages::decode(pb.finish()).unwrap().is_empty());
    }

    #[test]
    fn malformed_pages_are_refused() {
        let mut pb = PagesBuilder::new();
        pb.next_page().fill(1);
        pb.commit(0x1000, false);
        let good = pb.finish().to_vec();
        // Truncated data, extra data, unknown flags, too many pages.
        assert!(Pages::decode(&good[..good.len() - 1]).is_err());
        let mut long = good.clone();
        long.push(0);
        assert!(Pages::decode(&long).is_err());
        let mut flags = good.clone();
        flags[4] |= 0x2;
        assert!(Pages::decode(&flags).is_err());
        let mut count = good.clone();
        count[0..4].copy_from_slice(&(MAX_BATCH as u32 + 1).to_le_bytes());
        assert!(Pages::decode(&count).is_err());
        count[0..4].copy_from_slice(&2u32.to_le_bytes());
        assert!(Pages::decode(&count).is_err());
    }

    #[test]
    fn page_heads_take_the_data_in_or_after_the_frame() {
        let mut head = PagesHead::new();
        assert!(head.is_empty());
        head.push(0x1000, false);
        head.push(0x2000, true);
        head.push(0x5000, false);
        assert_eq!((head.len(), head.data_pages()), (3, 2));
        let payload = head.finish().to_vec();
        assert_eq!(payload.len(), 4 + 3 * 8);
        let want = vec![(0x1000, false), (0x2000, true), (0x5000, false)];
        // The data follows the frame.
        assert_eq!(
            decode_pages_payload(&payload).unwrap(),
            (want.clone(), true)
        );
        assert_eq!(
            decode_page_head(payload.len(), &payload[4..]).unwrap(),
            want
        );
        // The same head with the data inside the payload.
        let mut inside = payload.clone();
        inside.resize(payload.len() + 2 * PAGE_SIZE, 7);
        assert_eq!(
            decode_pages_payload(&inside).unwrap(),
            (want.clone(), false)
        );
        assert_eq!(decode_page_head(inside.len(), &payload[4..]).unwrap(), want);
        // Addresses must ascend: a page twice, or out of order, is refused.
        let mut twice = PagesHead::new();
        twice.push(0x1000, false);
        twice.push(0x1000, false);
        let twice = twice.finish().to_vec();
        assert!(decode_pages_payload(&twice).is_err());
        let mut back = PagesHead::new();
        back.push(0x2000, true);
        back.push(0x1000, false);
        assert!(decode_pages_payload(back.finish()).is_err());
        // Anything between, or beyond, is refused.
        for len in [
            payload.len() + 1,
            payload.len() + PAGE_SIZE,
            inside.len() + 1,
        ] {
            assert!(decode_page_head(len, &payload[4..]).is_err(), "{len}");
        }
        assert!(decode_pages_payload(&inside[..inside.len() - 1]).is_err());
        // A batch of zero pages only carries no data either way.
        head.clear();
        head.push(0x3000, true);
        let zeros = head.finish().to_vec();
        assert_eq!(
            decode_pages_payload(&zeros).unwrap(),
            (vec![(0x3000, true)], false)
        );
        // Unknown flags and too many pages, as for whole payloads.
        let mut flags = payload.clone();
        flags[4] |= 0x4;
        assert!(decode_pages_payload(&flags).is_err());
        head.clear();
        for i in 0..MAX_BATCH as u64 {
            head.push(i << 12, false);
        }
        assert!(head.is_full());
        let mut many = head.finish().to_vec();
        assert!(decode_pages_payload(&many).is_ok());
        many[0..4].copy_from_slice(&(MAX_BATCH as u32 + 1).to_le_bytes());
        many.extend_from_slice(&[0; 8]);
        assert!(decode_pages_payload(&many).is_err());
        // The builder's payloads decode the same way.
        let mut pb = PagesBuilder::new();
        pb.next_page().fill(1);
        pb.commit(0x7000, false);
        let built = pb.finish().to_vec();
        assert_eq!(
            decode_pages_payload(&built).unwrap(),
            (vec![(0x7000, false)], false)
        );
    }

    #[test]
    fn stripes_keep_a_page_on_one_channel() {
        assert_eq!(channel_of(0, 4), 0);
        assert_eq!(channel_of(511 * 4096, 4), 0);
        assert_eq!(channel_of(512 * 4096, 4), 1);
        assert_eq!(channel_of(4 * 512 * 4096, 4), 0);
        assert_eq!(channel_of(12345 * 4096, 1), 0);
        assert_eq!(channel_of(u64::MAX, 0), 0);
    }

    #[test]
    fn zero_detection() {
        let mut p = vec![0u8; PAGE_SIZE + 3];
        assert!(is_zero(&p[1..PAGE_SIZE + 1]));
        p[PAGE_SIZE] = 1;
        assert!(!is_zero(&p[1..PAGE_SIZE + 1]));
        assert!(is_zero(&p[1..PAGE_SIZE]));
    }

    #[test]
    fn small_messages_roundtrip() {
        let j = Join {
            session: [3; 16],
            index: 2,
        };
        assert_eq!(Join::decode(&j.encode()).unwrap(), j);
        let r = RoundEnd {
            round: 3,
            pages: 10,
            dirty: 4,
        };
        assert_eq!(RoundEnd::decode(&r.encode()).unwrap(), r);
        assert_eq!(
            decode_u64s::<2>("x", &encode_u64s(&[5, 6])).unwrap(),
            [5, 6]
        );
        assert!(decode_u64s::<2>("x", &encode_u64s(&[5])).is_err());
        assert!(decode_empty("x", b"a").is_err());
        let s = StateMsg::encode(Some(b"dg"), b"state");
        let d = StateMsg::decode(&s).unwrap();
        assert_eq!(d.digest, Some(&b"dg"[..]));
        assert_eq!(d.state, b"state");
        assert!(StateMsg::decode(&StateMsg::encode(None, b"")).is_err());
        assert_eq!(
            decode_abort(&encode_abort("é".repeat(600).as_str())).len(),
            1024
        );
        let rep = super::super::Report {
            rounds: 3,
            downtime_ms: 1.5,
            ..Default::default()
        };
        assert_eq!(decode_summary(&encode_summary(&rep)).unwrap(), rep);
    }

    #[test]
    fn random_payloads_never_panic() {
        // A fixed-seed xorshift: the same inputs on every run.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            let ty = 0x0101 + (next() % 14) as u16;
            let len = (next() % 300) as usize;
            let mut b: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if len >= 4 && next() % 2 == 0 {
                // Plausible counts reach the deeper checks.
                b[0..4].copy_from_slice(&((next() % 4) as u32).to_le_bytes());
            }
            let _ = decode_any(ty, &b);
        }
    }
}
