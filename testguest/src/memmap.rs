//! Choosing the work area the workload dirties: the first page-aligned RAM
//! above the guest image in the E820 map, as large as requested but no larger
//! than the RAM region it starts in.

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
}
