//! The memory-dirtying workload: a fixed pseudo-random sequence of pages in
//! the work area, written at an exact rate of pages per second.

use crate::TICKS_PER_SECOND;
use crate::memmap::{PAGE_SIZE, Region};

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

/// The workload state.
#[derive(Debug)]
pub struct Workload {
    area: Region,
    rng: Xorshift64,
    rate: RateSplitter,
    dirtied: u64,
}

impl Workload {
    pub fn new(area: Region, pages_per_second: u64) -> Self {
        Self {
            area,
            rng: Xorshift64::new(SEED),
            rate: RateSplitter::new(pages_per_second),
            dirtied: 0,
        }
    }

    /// Changes the rate to `pages_per_second` from the next tick on.
    pub fn set_rate(&mut self, pages_per_second: u64) {
        self.rate = RateSplitter::new(pages_per_second);
    }

    /// The work area.
    pub fn area(&self) -> Region {
        self.area
    }

    /// Total pages written so far.
    pub fn dirtied(&self) -> u64 {
        self.dirtied
    }

    /// Does one tick's share of work: calls `write(address, counter)` for each
    /// page to dirty (`address` is the page's guest-physical address).
    pub fn tick(&mut self, counter: u64, mut write: impl FnMut(u64, u64)) {
        let due = self.rate.next_tick();
        let pages = self.area.pages();
        if pages == 0 {
            return;
        }
        for _ in 0..due {
            let page = self.rng.below(pages);
            write(self.area.base + page * PAGE_SIZE, counter);
        }
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

    #[test]
    fn workload_writes_pages_in_the_area() {
        let area = Region {
            base: 0x20_0000,
            size: 16 * PAGE_SIZE,
        };
        let mut w = Workload::new(area, 250);
        let mut writes = Vec::new();
        for counter in 1..=200 {
            w.tick(counter, |addr, value| writes.push((addr, value)));
        }
        assert_eq!(w.dirtied(), 500);
        assert_eq!(writes.len(), 500);
        for &(addr, value) in &writes {
            assert!(addr >= area.base && addr < area.base + area.size);
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
        let mut w = Workload::new(Region::default(), 1000);
        for c in 0..100 {
            w.tick(c, |_, _| panic!("no write expected"));
        }
        assert_eq!(w.dirtied(), 0);
    }
}
