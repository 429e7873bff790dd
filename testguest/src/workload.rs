//! The memory-dirtying workload: a fixed pseudo-random sequence of pages
//! spread over the whole work area (all the RAM ranges it spans), written
//! at an exact rate of pages per second.

use crate::TICKS_PER_SECOND;
use crate::memmap::{MAX_RANGES, PAGE_SIZE, WorkRanges};

/// Seed of the page sequence (the same in every guest, for determinism).
pub const SEED: u64 = 0x2545_f491_4f6c_dd1d;

/// xorshift64 pseudo-random generator.
#[derive(Clone, Copy, Debug)]
pub struct Xorshift64 {
    state: u64,
}

impl Xorshift64 {
    /// A generator from `seed` (0, which xorshift cannot leave, is replaced).
    pub const fn new(seed: u64) -> Self {
        Self {
            state: if seed == 0 { SEED } else { seed },
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.state = x;
        x
    }

    /// A value in `0..n` (`n` > 0), by multiply-shift (no division).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// The generator of the page sequence: a 64-bit linear congruential
/// generator (Knuth's MMIX constants), `x = x * LCG_MUL + LCG_INC`, whose
/// high bits pick the page. Two instructions a step: under the instruction
/// emulator that is what makes high page rates possible.
#[derive(Clone, Copy, Debug)]
pub struct Lcg64 {
    state: u64,
}

/// Multiplier and increment of [`Lcg64`].
pub const LCG_MUL: u64 = 6_364_136_223_846_793_005;
pub const LCG_INC: u64 = 1_442_695_040_888_963_407;

impl Lcg64 {
    pub const fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The next value in `0..n`: the new state times `n`, its high 64 bits
    /// (so the state's high bits decide).
    #[inline(always)]
    pub fn below(&mut self, n: u64) -> u64 {
        self.state = self.state.wrapping_mul(LCG_MUL).wrapping_add(LCG_INC);
        ((u128::from(self.state) * u128::from(n)) >> 64) as u64
    }
}

/// Spreads a per-second rate over the ticks of each second, carrying the
/// remainder so that every second gets exactly `per_second` units.
#[derive(Clone, Copy, Debug)]
pub struct RateSplitter {
    per_second: u64,
    carry: u64,
}

impl RateSplitter {
    pub fn new(per_second: u64) -> Self {
        Self {
            per_second,
            carry: 0,
        }
    }

    /// Units due on the next tick.
    pub fn next_tick(&mut self) -> u64 {
        let total = self.carry.saturating_add(self.per_second);
        let due = total / TICKS_PER_SECOND;
        self.carry = total % TICKS_PER_SECOND;
        due
    }
}

/// Page index to address over the ranges of a [`WorkRanges`]: page `i` of
/// the area (counting through the ranges in address order) is at
/// `offset[r] + i * PAGE_SIZE` for the last range `r` with `first[r] <= i`.
#[derive(Clone, Copy, Debug)]
struct PageMap {
    /// Index of the first page of each range (`first[0]` is 0).
    first: [u64; MAX_RANGES],
    /// `base - first * PAGE_SIZE` of each range (wrapping).
    offset: [u64; MAX_RANGES],
    count: usize,
    pages: u64,
}

impl PageMap {
    fn new(area: &WorkRanges) -> Self {
        let mut map = Self {
            first: [0; MAX_RANGES],
            offset: [0; MAX_RANGES],
            count: 0,
            pages: 0,
        };
        for (i, r) in area.ranges().iter().enumerate() {
            map.first[i] = map.pages;
            map.offset[i] = r.base.wrapping_sub(map.pages * PAGE_SIZE);
            map.pages += r.pages();
            map.count = i + 1;
        }
        map
    }

    /// The address of page `index` (< `pages`; `count` > 0).
    fn address(&self, index: u64) -> u64 {
        let mut offset = self.offset[0];
        let n = self.count.clamp(1, MAX_RANGES);
        for (&first, &o) in self.first[1..n].iter().zip(&self.offset[1..n]) {
            if index >= first {
                offset = o;
            }
        }
        offset.wrapping_add(index * PAGE_SIZE)
    }
}

/// The workload state.
#[derive(Debug)]
pub struct Workload {
    area: WorkRanges,
    map: PageMap,
    rng: Lcg64,
    rate: RateSplitter,
    dirtied: u64,
}

impl Workload {
    pub fn new(area: WorkRanges, pages_per_second: u64) -> Self {
        Self {
            area,
            map: PageMap::new(&area),
            rng: Lcg64::new(SEED),
            rate: RateSplitter::new(pages_per_second),
            dirtied: 0,
        }
    }

    /// Changes the rate to `pages_per_second` from the next tick on.
    pub fn set_rate(&mut self, pages_per_second: u64) {
        self.rate = RateSplitter::new(pages_per_second);
    }

    /// The work area.
    pub fn area(&self) -> &WorkRanges {
        &self.area
    }

    /// Total pages written so far.
    pub fn dirtied(&self) -> u64 {
        self.dirtied
    }

    /// Does one tick's share of work: calls `write(address, counter)` for each
    /// page to dirty (`address` is the page's guest-physical address, page
    /// `i` of the sequence is page `below(pages)` of the area, counted
    /// through its ranges in address order). One tight loop, the generator
    /// kept in registers: this is the guest's hot path.
    #[inline(always)]
    pub fn tick(&mut self, counter: u64, mut write: impl FnMut(u64, u64)) {
        let due = self.rate.next_tick();
        let pages = self.map.pages;
        if pages == 0 || due == 0 {
            return;
        }
        let map = self.map;
        let mut rng = self.rng;
        // One or two ranges (all guests below 3 GiB, and those above) get
        // loops of their own, a handful of instructions per page.
        match map.count {
            1 => {
                let offset = map.offset[0];
                for _ in 0..due {
                    write(offset + rng.below(pages) * PAGE_SIZE, counter);
                }
            }
            2 => {
                let (low, high, first_high) = (map.offset[0], map.offset[1], map.first[1]);
                for _ in 0..due {
                    let index = rng.below(pages);
                    let offset = if index >= first_high { high } else { low };
                    write(offset.wrapping_add(index * PAGE_SIZE), counter);
                }
            }
            _ => {
                for _ in 0..due {
                    write(map.address(rng.below(pages)), counter);
                }
            }
        }
        self.rng = rng;
        self.dirtied += due;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xorshift_known_sequence_and_determinism() {
        let mut a = Xorshift64::new(1);
        // Reference values of xorshift64 (13, 7, 17) from seed 1.
        assert_eq!(a.next_u64(), 0x4082_2041);
        assert_eq!(a.next_u64(), 0x1000_4106_0c01_1441);
        let mut x = Xorshift64::new(SEED);
        let mut y = Xorshift64::new(SEED);
        for _ in 0..1000 {
            assert_eq!(x.next_u64(), y.next_u64());
        }
        assert_ne!(Xorshift64::new(0).next_u64(), 0);
    }

    #[test]
    fn below_stays_in_range_and_covers_it() {
        let mut r = Xorshift64::new(SEED);
        let mut seen = [false; 7];
        for _ in 0..1000 {
            let v = r.below(7);
            assert!(v < 7);
            seen[v as usize] = true;
        }
        assert!(seen.iter().all(|&s| s));
        assert_eq!(r.below(1), 0);
    }

    #[test]
    fn rate_is_exact_every_second() {
        for rate in [0, 1, 7, 99, 100, 101, 150, 1000, 12_345, 1_000_003] {
            let mut s = RateSplitter::new(rate);
            for _second in 0..3 {
                let per_tick: Vec<u64> = (0..TICKS_PER_SECOND).map(|_| s.next_tick()).collect();
                assert_eq!(per_tick.iter().sum::<u64>(), rate, "rate {rate}");
                let (min, max) = (
                    per_tick.iter().min().unwrap(),
                    per_tick.iter().max().unwrap(),
                );
                assert!(max - min <= 1, "rate {rate} spread evenly");
            }
        }
    }

    #[test]
    fn huge_rate_does_not_overflow() {
        let mut s = RateSplitter::new(u64::MAX);
        assert_eq!(s.next_tick(), u64::MAX / 100);
        let _ = s.next_tick();
    }

    use crate::bootparams::E820Entry;
    use crate::memmap::{Region, work_ranges};

    fn ranges(regions: &[(u64, u64)]) -> WorkRanges {
        let entries = regions.iter().map(|&(addr, size)| E820Entry {
            addr,
            size,
            kind: 1,
        });
        work_ranges(entries, 0, u64::MAX)
    }

    #[test]
    fn workload_writes_pages_in_the_area() {
        let region = Region {
            base: 0x20_0000,
            size: 16 * PAGE_SIZE,
        };
        let area = ranges(&[(region.base, region.size)]);
        let mut w = Workload::new(area, 250);
        let mut writes = Vec::new();
        for counter in 1..=200 {
            w.tick(counter, |addr, value| writes.push((addr, value)));
        }
        assert_eq!(w.dirtied(), 500);
        assert_eq!(writes.len(), 500);
        for &(addr, value) in &writes {
            assert!(addr >= region.base && addr < region.base + region.size);
            assert_eq!(addr % PAGE_SIZE, 0);
            assert!((1..=200).contains(&value));
        }
        // Deterministic: a second workload writes the same pages.
        let mut w2 = Workload::new(area, 250);
        let mut writes2 = Vec::new();
        for counter in 1..=200 {
            w2.tick(counter, |addr, value| writes2.push((addr, value)));
        }
        assert_eq!(writes, writes2);
    }

    #[test]
    fn empty_area_writes_nothing() {
        let mut w = Workload::new(WorkRanges::default(), 1000);
        for c in 0..100 {
            w.tick(c, |_, _| panic!("no write expected"));
        }
        assert_eq!(w.dirtied(), 0);
    }

    #[test]
    fn pages_are_spread_uniformly_over_all_ranges() {
        // Three ranges of 8, 16 and 8 pages with holes between them.
        const MB: u64 = 1 << 20;
        let area = ranges(&[
            (4 * MB, 8 * PAGE_SIZE),
            (16 * MB, 16 * PAGE_SIZE),
            (64 * MB, 8 * PAGE_SIZE),
        ]);
        assert_eq!(area.ranges().len(), 3);
        let mut w = Workload::new(area, 32_000);
        let mut hits = std::collections::BTreeMap::new();
        for counter in 1..=100 {
            w.tick(counter, |addr, _| *hits.entry(addr).or_insert(0u64) += 1);
        }
        assert_eq!(w.dirtied(), 32_000);
        // Every page of every range, and nothing else, about equally often.
        let expected: Vec<u64> = area
            .ranges()
            .iter()
            .flat_map(|r| (0..r.pages()).map(move |p| r.base + p * PAGE_SIZE))
            .collect();
        assert_eq!(hits.keys().copied().collect::<Vec<_>>(), expected);
        for (&addr, &n) in &hits {
            assert!((800..1200).contains(&n), "page {addr:#x} hit {n} times");
        }
    }

    #[test]
    fn page_map_boundaries() {
        const GB: u64 = 1 << 30;
        let area = ranges(&[(2 << 20, 3 * GB - (2 << 20)), (4 * GB, GB)]);
        let map = PageMap::new(&area);
        let low = (3 * GB - (2 << 20)) / PAGE_SIZE;
        assert_eq!(map.pages, low + GB / PAGE_SIZE);
        assert_eq!(map.address(0), 2 << 20);
        assert_eq!(map.address(low - 1), 3 * GB - PAGE_SIZE);
        assert_eq!(map.address(low), 4 * GB);
        assert_eq!(map.address(map.pages - 1), 5 * GB - PAGE_SIZE);
    }

    #[test]
    fn sequence_is_the_documented_one() {
        // Page i: the high bits of the i+1-th LCG state from SEED, scaled
        // to the area's page count.
        let area = ranges(&[(1 << 20, 1000 * PAGE_SIZE)]);
        let mut w = Workload::new(area, 100);
        let mut got = Vec::new();
        for c in 1..=100 {
            w.tick(c, |addr, _| got.push(addr));
        }
        let mut x = SEED;
        let want: Vec<u64> = (0..100)
            .map(|_| {
                x = x
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                (1 << 20) + ((u128::from(x) * 1000) >> 64) as u64 * PAGE_SIZE
            })
            .collect();
        assert_eq!(got, want);
        assert_eq!(got[..3], [0x2d_8000, 0x1d_8000, 0x47_0000]);
    }
}
