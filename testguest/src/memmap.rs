//! Choosing guest memory from the E820 map: [`work_area`], one range in the
//! first RAM region above a given address (the device memory), and
//! [`work_ranges`], the RAM the dirtying workload writes — every page of
//! every RAM region above a given address, up to a requested size.

use crate::bootparams::E820Entry;

/// Size of a page.
pub const PAGE_SIZE: u64 = 4096;

/// A page-aligned range of guest-physical memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Region {
    pub base: u64,
    pub size: u64,
}

impl Region {
    /// Number of pages in the region.
    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE
    }
}

fn align_up(v: u64) -> Option<u64> {
    Some(v.checked_add(PAGE_SIZE - 1)? & !(PAGE_SIZE - 1))
}

fn align_down(v: u64) -> u64 {
    v & !(PAGE_SIZE - 1)
}

/// The work area: in the RAM entry holding the lowest page-aligned address at
/// or above `image_end`, starting there, `want` bytes (rounded down to whole
/// pages) or up to the end of that entry if it is smaller. Empty if there is
/// no RAM above the image or `want` is below one page.
pub fn work_area(entries: impl Iterator<Item = E820Entry>, image_end: u64, want: u64) -> Region {
    let mut best: Option<(u64, u64)> = None; // (start, end)
    for e in entries.filter(E820Entry::is_ram) {
        let Some(start) = align_up(e.addr.max(image_end)) else {
            continue;
        };
        let end = align_down(e.addr.saturating_add(e.size));
        if end <= start {
            continue;
        }
        if best.is_none_or(|(b, _)| start < b) {
            best = Some((start, end));
        }
    }
    match best {
        Some((start, end)) => Region {
            base: start,
            size: align_down(want.min(end - start)),
        },
        None => Region::default(),
    }
}

/// Most RAM ranges [`work_ranges`] returns (twinvm's E820 map has at most
/// two above 1 MiB: below the MMIO hole and from 4 GiB up).
pub const MAX_RANGES: usize = 8;

/// The RAM the workload may write: up to [`MAX_RANGES`] page-aligned,
/// disjoint ranges in ascending address order, none empty.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct WorkRanges {
    ranges: [Region; MAX_RANGES],
    count: usize,
}

impl WorkRanges {
    /// The ranges, lowest first.
    pub fn ranges(&self) -> &[Region] {
        &self.ranges[..self.count]
    }

    /// Total pages over all ranges.
    pub fn pages(&self) -> u64 {
        self.ranges().iter().map(Region::pages).sum()
    }

    /// Total bytes over all ranges.
    pub fn size(&self) -> u64 {
        self.ranges().iter().map(|r| r.size).sum()
    }

    /// The lowest address (0 if there is no range).
    pub fn base(&self) -> u64 {
        self.ranges().first().map_or(0, |r| r.base)
    }

    /// The end of the highest range (0 if there is no range).
    pub fn end(&self) -> u64 {
        self.ranges().last().map_or(0, |r| r.base + r.size)
    }

    /// Appends `[start, end)` (above all ranges so far), merging it into the
    /// last range if they touch. False if there is no room for it.
    fn push(&mut self, start: u64, end: u64) -> bool {
        if let Some(last) = self.ranges[..self.count].last_mut()
            && last.base + last.size == start
        {
            last.size += end - start;
            return true;
        }
        if self.count == MAX_RANGES {
            return false;
        }
        self.ranges[self.count] = Region {
            base: start,
            size: end - start,
        };
        self.count += 1;
        true
    }
}

/// The RAM at or above `start` in the E820 map, page-aligned, lowest first,
/// up to `want` bytes (rounded down to whole pages; `u64::MAX` for all of
/// it). Overlapping entries count once; touching ones make one range; the
/// entries may come in any order. RAM beyond the [`MAX_RANGES`]-th range is
/// left out.
pub fn work_ranges(
    entries: impl Iterator<Item = E820Entry> + Clone,
    start: u64,
    want: u64,
) -> WorkRanges {
    let mut out = WorkRanges::default();
    let Some(mut cursor) = align_up(start) else {
        return out;
    };
    let mut left = align_down(want);
    while left > 0 {
        // The lowest RAM at or above the cursor.
        let mut next: Option<(u64, u64)> = None;
        for e in entries.clone().filter(E820Entry::is_ram) {
            let Some(s) = align_up(e.addr.max(cursor)) else {
                continue;
            };
            let end = align_down(e.addr.saturating_add(e.size));
            if end <= s {
                continue;
            }
            next = match next {
                Some((b, be)) if b < s || (b == s && be >= end) => Some((b, be)),
                _ => Some((s, end)),
            };
        }
        let Some((s, end)) = next else {
            break;
        };
        let end = end.min(s.saturating_add(left));
        if !out.push(s, end) {
            break;
        }
        left -= end - s;
        cursor = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram(addr: u64, size: u64) -> E820Entry {
        E820Entry {
            addr,
            size,
            kind: 1,
        }
    }

    fn reserved(addr: u64, size: u64) -> E820Entry {
        E820Entry {
            addr,
            size,
            kind: 2,
        }
    }

    const MB: u64 = 1 << 20;

    #[test]
    fn typical_map() {
        let map = [ram(0, 0x9fc00), reserved(0x9fc00, 0x400), ram(MB, 255 * MB)];
        let r = work_area(map.into_iter(), 0x11_2345, 16 * MB);
        assert_eq!(
            r,
            Region {
                base: 0x11_3000,
                size: 16 * MB
            }
        );
        assert_eq!(r.pages(), 4096);
    }

    #[test]
    fn capped_to_the_region() {
        let map = [ram(0, 0x9fc00), ram(MB, 3 * MB)];
        let r = work_area(map.into_iter(), 2 * MB, 16 * MB);
        assert_eq!(
            r,
            Region {
                base: 2 * MB,
                size: 2 * MB
            }
        );
    }

    #[test]
    fn unaligned_region_end_is_rounded_down() {
        let r = work_area([ram(MB, MB + 100)].into_iter(), MB + 10, 64 * MB);
        assert_eq!(
            r,
            Region {
                base: MB + PAGE_SIZE,
                size: MB - PAGE_SIZE
            }
        );
    }

    #[test]
    fn picks_lowest_region_above_image_in_any_order() {
        let map = [
            ram(4096 * MB, 1024 * MB),
            reserved(MB, 8 * MB),
            ram(16 * MB, 32 * MB),
            ram(0, 640 * 1024),
        ];
        let r = work_area(map.into_iter(), 2 * MB, 8 * MB);
        assert_eq!(
            r,
            Region {
                base: 16 * MB,
                size: 8 * MB
            }
        );
    }

    #[test]
    fn region_containing_the_image() {
        let map = [ram(0, 512 * MB)];
        let r = work_area(map.into_iter(), 0x12_0000, MB);
        assert_eq!(
            r,
            Region {
                base: 0x12_0000,
                size: MB
            }
        );
    }

    #[test]
    fn nothing_above_the_image() {
        let map = [ram(0, 0x9fc00), ram(MB, MB)];
        assert_eq!(work_area(map.into_iter(), 2 * MB, MB), Region::default());
        assert_eq!(work_area([].into_iter(), MB, MB), Region::default());
        // A region ending inside the page holding the image end.
        assert_eq!(
            work_area([ram(MB, MB + 10)].into_iter(), 2 * MB + 1, MB),
            Region::default()
        );
    }

    #[test]
    fn zero_or_sub_page_request() {
        let map = [ram(MB, 64 * MB)];
        assert_eq!(work_area(map.into_iter(), 2 * MB, 0).size, 0);
        assert_eq!(work_area(map.into_iter(), 2 * MB, 100).size, 0);
    }

    #[test]
    fn entries_near_the_top_of_the_address_space() {
        let map = [
            ram(u64::MAX - 10 * PAGE_SIZE, 100 * PAGE_SIZE),
            ram(u64::MAX - 5, 5),
        ];
        let r = work_area(map.into_iter(), MB, u64::MAX);
        assert_eq!(r.base, u64::MAX - 10 * PAGE_SIZE + 1);
        assert_eq!(r.size, 9 * PAGE_SIZE);
    }

    #[test]
    fn work_ranges_of_a_small_guest() {
        let map = [ram(0, 0x9fc00), reserved(0x9fc00, 0x400), ram(MB, 63 * MB)];
        let w = work_ranges(map.into_iter(), 0x12_d123, u64::MAX);
        assert_eq!(
            w.ranges(),
            &[Region {
                base: 0x12_e000,
                size: 64 * MB - 0x12_e000
            }]
        );
        assert_eq!(w.base(), 0x12_e000);
        assert_eq!(w.end(), 64 * MB);
        assert_eq!(w.size(), 64 * MB - 0x12_e000);
        assert_eq!(w.pages(), w.size() / PAGE_SIZE);
    }

    #[test]
    fn work_ranges_span_the_mmio_hole() {
        // twinvm's map for 4 GiB: RAM to 3 GiB, the rest from 4 GiB up.
        let map = [
            ram(0, 0x9fc00),
            reserved(0x9fc00, 0x400),
            ram(MB, 3072 * MB - MB),
            ram(4096 * MB, 1024 * MB),
        ];
        let w = work_ranges(map.into_iter(), 2 * MB, u64::MAX);
        assert_eq!(
            w.ranges(),
            &[
                Region {
                    base: 2 * MB,
                    size: 3070 * MB
                },
                Region {
                    base: 4096 * MB,
                    size: 1024 * MB
                }
            ]
        );
        assert_eq!(w.size(), 4094 * MB);
        assert_eq!(w.end(), 5120 * MB);
        // A limit takes the lowest RAM first.
        let w = work_ranges(map.into_iter(), 2 * MB, 16 * MB);
        assert_eq!(
            w.ranges(),
            &[Region {
                base: 2 * MB,
                size: 16 * MB
            }]
        );
        let w = work_ranges(map.into_iter(), 2 * MB, 3071 * MB + 100);
        assert_eq!(
            w.ranges(),
            &[
                Region {
                    base: 2 * MB,
                    size: 3070 * MB
                },
                Region {
                    base: 4096 * MB,
                    size: MB
                }
            ]
        );
    }

    #[test]
    fn work_ranges_start_where_work_area_does() {
        // The same base as the one-region work area for the same start.
        let map = [ram(0, 0x9fc00), ram(MB, 255 * MB)];
        let one = work_area(map.into_iter(), 0x11_2345, 16 * MB);
        let all = work_ranges(map.into_iter(), 0x11_2345, 16 * MB);
        assert_eq!(all.ranges(), &[one]);
    }

    #[test]
    fn work_ranges_unsorted_overlapping_and_touching_entries() {
        let map = [
            ram(32 * MB, 8 * MB),
            reserved(8 * MB, 8 * MB),
            ram(16 * MB, 8 * MB),
            ram(20 * MB, 8 * MB), // overlaps the previous one
            ram(28 * MB, 2 * MB), // touches it
            ram(0, 640 * 1024),
            ram(MB + 10, 2 * MB), // unaligned both ends
        ];
        let w = work_ranges(map.into_iter(), MB, u64::MAX);
        assert_eq!(
            w.ranges(),
            &[
                Region {
                    base: MB + PAGE_SIZE,
                    size: 2 * MB - PAGE_SIZE
                },
                Region {
                    base: 16 * MB,
                    size: 14 * MB
                },
                Region {
                    base: 32 * MB,
                    size: 8 * MB
                }
            ]
        );
    }

    #[test]
    fn work_ranges_empty_and_limited_cases() {
        let map = [ram(0, 0x9fc00), ram(MB, MB)];
        assert_eq!(work_ranges(map.into_iter(), 2 * MB, u64::MAX).pages(), 0);
        assert_eq!(work_ranges([].into_iter(), MB, u64::MAX).base(), 0);
        assert_eq!(work_ranges(map.into_iter(), MB, 0).pages(), 0);
        assert_eq!(work_ranges(map.into_iter(), MB, 100).pages(), 0);
        assert_eq!(work_ranges(map.into_iter(), u64::MAX, u64::MAX).pages(), 0);
        // More regions than MAX_RANGES: the lowest ones are kept.
        let many: Vec<E820Entry> = (0..20).rev().map(|i| ram(i * 4 * MB, MB)).collect();
        let w = work_ranges(many.into_iter(), 0, u64::MAX);
        assert_eq!(w.ranges().len(), MAX_RANGES);
        assert_eq!(w.base(), 0);
        assert_eq!(w.end(), (MAX_RANGES as u64 - 1) * 4 * MB + MB);
        // RAM up to the top of the address space.
        let top = [ram(u64::MAX - 10 * PAGE_SIZE, 100 * PAGE_SIZE)];
        let w = work_ranges(top.into_iter(), MB, u64::MAX);
        assert_eq!(w.pages(), 9);
    }
}
