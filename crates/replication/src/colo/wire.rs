//! Payloads of the COLO messages (`MsgType::Colo*`), encoded and decoded
//! without I/O. Integers are little-endian. Decoders check every length
//! before reading and never panic (a randomized test drives them with
//! arbitrary bytes). Setup and page batches reuse the migration formats.
//!
//! ```text
//! ColoBegin     as MigBegin (session, channels, flags: bit 0 VERIFY, VM shape)
//! ColoReady     (empty)
//! ColoJoin      as MigJoin (session, index)
//! ColoPages     as MigPages (count, entries, page data)
//! ColoRoundEnd  round:u64 epoch:u64
//! ColoRoundAck  round:u64 staged_bytes:u64 count:u32 page:u64*count
//! ColoPause     epoch:u64
//! ColoSvmDirty  epoch:u64 count:u32 page:u64*count
//! ColoState     epoch:u64 round:u64 digest_len:u32 digest[digest_len] state[..]
//! ColoReceived  epoch:u64
//! ColoLoaded    epoch:u64 apply_us:u64 load_us:u64 staged_pages:u64 rss_bytes:u64
//! ColoAbort     reason (UTF-8, at most 1024 bytes kept)
//! ```
//!
//! `page` entries are page-aligned guest addresses. Rounds are numbered
//! across the whole session; epoch `n` is the interval that checkpoint `n`
//! closes.

use crate::migration::wire::{PAGE_SIZE, WireError};

pub use crate::migration::wire::{
    BEGIN_VERIFY, Begin, Join, MAX_BATCH, decode_abort, decode_empty, decode_page_entries,
    decode_u64s, encode_abort, encode_u64s,
};

/// Most page addresses one report may carry (64 GiB of pages).
pub const MAX_REPORT_PAGES: usize = 16 << 20;

fn truncated(msg: &'static str, len: usize) -> WireError {
    WireError::Truncated { msg, len }
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Encodes `head` (u64 fields), then a list of page addresses.
fn encode_with_pages(head: &[u64], pages: &[u64]) -> Vec<u8> {
    let mut v = Vec::with_capacity(head.len() * 8 + 4 + pages.len() * 8);
    for h in head {
        v.extend_from_slice(&h.to_le_bytes());
    }
    v.extend_from_slice(&(pages.len() as u32).to_le_bytes());
    for p in pages {
        v.extend_from_slice(&p.to_le_bytes());
    }
    v
}

/// Decodes `N` u64 fields and a list of page-aligned addresses.
fn decode_with_pages<const N: usize>(
    msg: &'static str,
    b: &[u8],
) -> Result<([u64; N], Vec<u64>), WireError> {
    let fixed = N * 8 + 4;
    if b.len() < fixed {
        return Err(truncated(msg, b.len()));
    }
    let mut head = [0u64; N];
    for (i, h) in head.iter_mut().enumerate() {
        *h = u64_at(b, i * 8);
    }
    let mut c = [0u8; 4];
    c.copy_from_slice(&b[N * 8..fixed]);
    let count = u32::from_le_bytes(c) as usize;
    if count > MAX_REPORT_PAGES {
        return Err(WireError::Invalid {
            msg,
            why: format!("{count} pages (at most {MAX_REPORT_PAGES})"),
        });
    }
    let need = fixed + count * 8;
    if b.len() < need {
        return Err(truncated(msg, b.len()));
    }
    if b.len() > need {
        return Err(WireError::Trailing {
            msg,
            extra: b.len() - need,
        });
    }
    let mut pages = Vec::with_capacity(count);
    for i in 0..count {
        let p = u64_at(b, fixed + i * 8);
        if p % PAGE_SIZE as u64 != 0 {
            return Err(WireError::Invalid {
                msg,
                why: format!("page address {p:#x} is not page-aligned"),
            });
        }
        pages.push(p);
    }
    Ok((head, pages))
}

/// `ColoRoundAck`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoundAck {
    /// The round acknowledged.
    pub round: u64,
    /// Bytes the secondary holds staged.
    pub staged_bytes: u64,
    /// Pages the secondary's guest dirtied that are not staged.
    pub dirty: Vec<u64>,
}

impl RoundAck {
    pub fn encode(&self) -> Vec<u8> {
        encode_with_pages(&[self.round, self.staged_bytes], &self.dirty)
    }

    pub fn decode(b: &[u8]) -> Result<RoundAck, WireError> {
        let ([round, staged_bytes], dirty) = decode_with_pages::<2>("ColoRoundAck", b)?;
        Ok(RoundAck {
            round,
            staged_bytes,
            dirty,
        })
    }
}

/// `ColoSvmDirty`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SvmDirty {
    /// The checkpoint.
    pub epoch: u64,
    /// Pages the secondary's guest dirtied since its last report that are
    /// not staged.
    pub dirty: Vec<u64>,
}

impl SvmDirty {
    pub fn encode(&self) -> Vec<u8> {
        encode_with_pages(&[self.epoch], &self.dirty)
    }

    pub fn decode(b: &[u8]) -> Result<SvmDirty, WireError> {
        let ([epoch], dirty) = decode_with_pages::<1>("ColoSvmDirty", b)?;
        Ok(SvmDirty { epoch, dirty })
    }
}

/// `ColoState`.
#[derive(Debug, PartialEq, Eq)]
pub struct StateMsg<'a> {
    /// The checkpoint.
    pub epoch: u64,
    /// The last round of pages that belongs to it.
    pub round: u64,
    /// Verify mode: the postcard-encoded page digest of the primary.
    pub digest: Option<&'a [u8]>,
    /// The VM state in twinvm's state format.
    pub state: &'a [u8],
}

impl<'a> StateMsg<'a> {
    pub fn encode(epoch: u64, round: u64, digest: Option<&[u8]>, state: &[u8]) -> Vec<u8> {
        let d = digest.unwrap_or(&[]);
        let mut v = Vec::with_capacity(20 + d.len() + state.len());
        v.extend_from_slice(&epoch.to_le_bytes());
        v.extend_from_slice(&round.to_le_bytes());
        v.extend_from_slice(&(d.len() as u32).to_le_bytes());
        v.extend_from_slice(d);
        v.extend_from_slice(state);
        v
    }

    pub fn decode(b: &'a [u8]) -> Result<StateMsg<'a>, WireError> {
        let msg = "ColoState";
        if b.len() < 20 {
            return Err(truncated(msg, b.len()));
        }
        let epoch = u64_at(b, 0);
        let round = u64_at(b, 8);
        let mut c = [0u8; 4];
        c.copy_from_slice(&b[16..20]);
        let n = u32::from_le_bytes(c) as usize;
        let rest = &b[20..];
        if rest.len() < n {
            return Err(truncated(msg, b.len()));
        }
        let (digest, state) = rest.split_at(n);
        if state.is_empty() {
            return Err(WireError::Invalid {
                msg,
                why: "no state".into(),
            });
        }
        Ok(StateMsg {
            epoch,
            round,
            digest: (n > 0).then_some(digest),
            state,
        })
    }
}

/// `ColoLoaded`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loaded {
    pub epoch: u64,
    pub apply_us: u64,
    pub load_us: u64,
    pub staged_pages: u64,
    pub rss_bytes: u64,
}

impl Loaded {
    pub fn encode(&self) -> Vec<u8> {
        encode_u64s(&[
            self.epoch,
            self.apply_us,
            self.load_us,
            self.staged_pages,
            self.rss_bytes,
        ])
    }

    pub fn decode(b: &[u8]) -> Result<Loaded, WireError> {
        let [epoch, apply_us, load_us, staged_pages, rss_bytes] =
            decode_u64s::<5>("ColoLoaded", b)?;
        Ok(Loaded {
            epoch,
            apply_us,
            load_us,
            staged_pages,
            rss_bytes,
        })
    }
}

/// Decodes any COLO payload by message type; for tests and fuzzing.
/// Returns a short description of what was decoded.
pub fn decode_any(msg_type: u16, b: &[u8]) -> Result<String, WireError> {
    use crate::frame::MsgType as M;
    Ok(match M::from_u16(msg_type) {
        M::ColoBegin => format!("{:?}", Begin::decode(b)?),
        M::ColoReady => decode_empty("ColoReady", b).map(|_| "ready".to_string())?,
        M::ColoJoin => format!("{:?}", Join::decode(b)?),
        M::ColoPages => format!(
            "{} pages",
            crate::migration::wire::Pages::decode(b)?.iter().count()
        ),
        M::ColoRoundEnd => format!("{:?}", decode_u64s::<2>("ColoRoundEnd", b)?),
        M::ColoRoundAck => format!("{:?}", RoundAck::decode(b)?),
        M::ColoPause => format!("{:?}", decode_u64s::<1>("ColoPause", b)?),
        M::ColoSvmDirty => format!("{:?}", SvmDirty::decode(b)?),
        M::ColoState => format!("{} state bytes", StateMsg::decode(b)?.state.len()),
        M::ColoReceived => format!("{:?}", decode_u64s::<1>("ColoReceived", b)?),
        M::ColoLoaded => format!("{:?}", Loaded::decode(b)?),
        M::ColoAbort => decode_abort(b),
        other => format!("not a COLO message: {other:?}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let a = RoundAck {
            round: 7,
            staged_bytes: 4096 * 3,
            dirty: vec![0, 4096, 1 << 32],
        };
        assert_eq!(RoundAck::decode(&a.encode()).unwrap(), a);
        let d = SvmDirty {
            epoch: 3,
            dirty: vec![],
        };
        assert_eq!(SvmDirty::decode(&d.encode()).unwrap(), d);
        let s = StateMsg::encode(4, 9, Some(b"dig"), b"state");
        let m = StateMsg::decode(&s).unwrap();
        assert_eq!((m.epoch, m.round), (4, 9));
        assert_eq!(m.digest, Some(&b"dig"[..]));
        assert_eq!(m.state, b"state");
        let plain = StateMsg::encode(1, 2, None, b"x");
        let m = StateMsg::decode(&plain).unwrap();
        assert_eq!(m.digest, None);
        let l = Loaded {
            epoch: 1,
            apply_us: 2,
            load_us: 3,
            staged_pages: 4,
            rss_bytes: 5,
        };
        assert_eq!(Loaded::decode(&l.encode()).unwrap(), l);
    }

    #[test]
    fn malformed_reports_are_refused() {
        let good = SvmDirty {
            epoch: 1,
            dirty: vec![8192],
        }
        .encode();
        for cut in 0..good.len() {
            assert!(SvmDirty::decode(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(matches!(
            SvmDirty::decode(&trailing),
            Err(WireError::Trailing { .. })
        ));
        let unaligned = SvmDirty {
            epoch: 1,
            dirty: vec![4097],
        }
        .encode();
        assert!(matches!(
            SvmDirty::decode(&unaligned),
            Err(WireError::Invalid { .. })
        ));
        let mut huge = Vec::new();
        huge.extend_from_slice(&1u64.to_le_bytes());
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(SvmDirty::decode(&huge).is_err());
        assert!(StateMsg::decode(&StateMsg::encode(1, 1, None, b"")).is_err());
        let mut bad_digest = StateMsg::encode(1, 1, Some(b"abc"), b"s");
        bad_digest[16..20].copy_from_slice(&100u32.to_le_bytes());
        assert!(StateMsg::decode(&bad_digest).is_err());
    }

    #[test]
    fn random_payloads_never_panic() {
        // xorshift: deterministic, no dependency.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            let ty = 0x0201 + (next() % 12) as u16;
            let len = (next() % 64) as usize;
            let mut b: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if next() % 4 == 0 && b.len() >= 12 {
                // Plausible small counts reach the page-list decoders.
                b[8..12].copy_from_slice(&((next() % 4) as u32).to_le_bytes());
            }
            let _ = decode_any(ty, &b);
        }
    }
}
