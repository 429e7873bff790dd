//! The VMM-side dirty bitmap of guest RAM: one bit per 4 KiB page that the
//! VMM itself wrote (device DMA, loaded images), with a summary level so
//! that collecting it costs time in proportion to the pages written, not
//! to the size of guest RAM.
//!
//! vm-memory's `AtomicBitmap` does the same job with one level: collecting
//! it swaps every word of the bitmap, 16 Ki atomic operations per 4 GiB of
//! RAM. A COLO checkpoint collects it inside the guest's pause, up to fifty
//! times a second, where that cost alone made a 4 GiB guest's pause 0.1 ms
//! longer than a 1 GiB guest's. Here bit `i` of the summary says that word
//! `i` of the bitmap may be non-zero, so [`PageBitmap::drain_into`] visits
//! only those words.
//!
//! Ordering: a writer sets the page's bit, then the summary's bit; the
//! collector clears a summary word, then the words it names. A page marked
//! while a collection runs is therefore either collected now or left for
//! the next one, never lost.

use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::bitmap::{Bitmap, NewBitmap, RefSlice, WithBitmapSlice};

/// Bytes per bit of a [`PageBitmap`]: the guest page size.
const PAGE_BYTES: usize = 4096;

/// A page-granular dirty bitmap with a summary level (see the module
/// documentation). Plugs into vm-memory as the bitmap of every guest-RAM
/// region, so every write through vm-memory marks its pages.
#[derive(Debug, Default)]
pub struct PageBitmap {
    /// Bit `p % 64` of word `p / 64` is set if page `p` was written.
    words: Vec<AtomicU64>,
    /// Bit `w % 64` of summary word `w / 64` is set if `words[w]` may be
    /// non-zero.
    summary: Vec<AtomicU64>,
    /// Pages covered.
    pages: usize,
}

impl PageBitmap {
    /// A clear bitmap covering `byte_size` bytes (rounded up to whole pages).
    pub fn new(byte_size: usize) -> Self {
        let pages = byte_size.div_ceil(PAGE_BYTES);
        let words = pages.div_ceil(64);
        PageBitmap {
            words: (0..words).map(|_| AtomicU64::new(0)).collect(),
            summary: (0..words.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            pages,
        }
    }

    /// Pages covered.
    pub fn len(&self) -> usize {
        self.pages
    }

    /// True if the bitmap covers no page.
    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }

    /// Marks page `page`; pages past the end are ignored.
    pub fn set_page(&self, page: usize) {
        if page >= self.pages {
            return;
        }
        let word = page / 64;
        self.words[word].fetch_or(1 << (page % 64), Ordering::SeqCst);
        let flag = 1u64 << (word % 64);
        let summary = &self.summary[word / 64];
        if summary.load(Ordering::SeqCst) & flag == 0 {
            summary.fetch_or(flag, Ordering::SeqCst);
        }
    }

    /// Whether page `page` is marked; pages past the end never are.
    pub fn is_page_set(&self, page: usize) -> bool {
        page < self.pages && self.words[page / 64].load(Ordering::SeqCst) & (1 << (page % 64)) != 0
    }

    /// ORs the marked pages into `out` (bit `p % 64` of `out[p / 64]` for
    /// page `p`; words past the end of `out` are dropped) and clears them.
    /// Costs one pass over the summary (a bit per 256 KiB of RAM) plus one
    /// atomic swap per bitmap word that holds marked pages.
    pub fn drain_into(&self, out: &mut [u64]) {
        for (s, summary) in self.summary.iter().enumerate() {
            if summary.load(Ordering::SeqCst) == 0 {
                continue;
            }
            let mut flags = summary.swap(0, Ordering::SeqCst);
            while flags != 0 {
                let word = s * 64 + flags.trailing_zeros() as usize;
                flags &= flags - 1;
                let bits = self.words[word].swap(0, Ordering::SeqCst);
                if let Some(o) = out.get_mut(word) {
                    *o |= bits;
                }
            }
        }
    }

    /// The marked pages as bitmap words (one per 64 pages), clearing them.
    pub fn take_words(&self) -> Vec<u64> {
        let mut out = vec![0; self.words.len()];
        self.drain_into(&mut out);
        out
    }

    /// Clears every page.
    pub fn reset(&self) {
        self.words.iter().for_each(|w| w.store(0, Ordering::SeqCst));
        self.summary
            .iter()
            .for_each(|w| w.store(0, Ordering::SeqCst));
    }
}

impl<'a> WithBitmapSlice<'a> for PageBitmap {
    type S = RefSlice<'a, Self>;
}

impl Bitmap for PageBitmap {
    fn mark_dirty(&self, offset: usize, len: usize) {
        if len == 0 {
            return;
        }
        let first = offset / PAGE_BYTES;
        let last = offset.saturating_add(len - 1) / PAGE_BYTES;
        for page in first..=last.min(self.pages.saturating_sub(1)) {
            self.set_page(page);
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.is_page_set(offset / PAGE_BYTES)
    }

    fn slice_at(&self, offset: usize) -> <Self as WithBitmapSlice<'_>>::S {
        RefSlice::new(self, offset)
    }
}

impl NewBitmap for PageBitmap {
    fn with_len(len: usize) -> Self {
        PageBitmap::new(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_rounds_up_to_pages() {
        assert_eq!(PageBitmap::new(0).len(), 0);
        assert!(PageBitmap::new(0).is_empty());
        assert_eq!(PageBitmap::new(1).len(), 1);
        assert_eq!(PageBitmap::new(4096).len(), 1);
        assert_eq!(PageBitmap::new(4097).len(), 2);
        assert_eq!(PageBitmap::new(1 << 30).take_words().len(), (1 << 18) / 64);
    }

    #[test]
    fn marks_every_page_a_range_touches() {
        let b = PageBitmap::new(64 * 4096 * 70);
        b.mark_dirty(4095, 2); // pages 0 and 1
        b.mark_dirty(4096 * 200, 1);
        b.mark_dirty(4096 * 300, 0); // nothing
        assert!(b.dirty_at(0) && b.dirty_at(4096) && b.dirty_at(4096 * 200 + 17));
        assert!(!b.dirty_at(4096 * 2) && !b.dirty_at(4096 * 300));
        let words = b.take_words();
        assert_eq!(words[0], 0b11);
        assert_eq!(words[3], 1 << (200 - 192));
        assert_eq!(words.iter().map(|w| w.count_ones()).sum::<u32>(), 3);
        // Collected pages are cleared.
        assert!(b.take_words().iter().all(|w| *w == 0));
        assert!(!b.dirty_at(0));
    }

    #[test]
    fn drain_matches_a_plain_bitmap_over_random_marks() {
        let pages = 64 * 64 * 3 + 5;
        let b = PageBitmap::new(pages * 4096);
        let mut expected = vec![0u64; pages.div_ceil(64)];
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for round in 0..50 {
            for _ in 0..round * 7 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let page = (x % pages as u64) as usize;
                b.set_page(page);
                expected[page / 64] |= 1 << (page % 64);
            }
            let mut got = vec![0u64; expected.len()];
            b.drain_into(&mut got);
            assert_eq!(got, expected, "round {round}");
            expected.iter_mut().for_each(|w| *w = 0);
        }
    }

    #[test]
    fn marks_past_the_end_are_ignored() {
        let b = PageBitmap::new(3 * 4096);
        b.set_page(3);
        b.mark_dirty(2 * 4096, 10 * 4096);
        b.mark_dirty(usize::MAX - 10, 100);
        assert!(!b.is_page_set(3) && !b.dirty_at(usize::MAX));
        assert_eq!(b.take_words(), vec![0b100]);
        // A short output drops the words it has no room for.
        b.set_page(1);
        b.drain_into(&mut []);
        assert_eq!(b.take_words(), vec![0]);
    }

    #[test]
    fn reset_clears_both_levels() {
        let b = PageBitmap::new(1 << 20);
        b.mark_dirty(0, 1 << 20);
        b.reset();
        assert!(b.take_words().iter().all(|w| *w == 0));
        b.set_page(5);
        assert_eq!(b.take_words()[0], 1 << 5);
    }

    #[test]
    fn concurrent_marks_are_never_lost() {
        let b = std::sync::Arc::new(PageBitmap::new(4096 * 64 * 64 * 2));
        let pages = b.len();
        let writers: Vec<_> = (0..2)
            .map(|t| {
                let b = b.clone();
                std::thread::spawn(move || {
                    for i in 0..20_000usize {
                        b.set_page((i * 7919 + t * 13) % pages);
                    }
                })
            })
            .collect();
        let mut seen = vec![0u64; pages / 64];
        while !writers.iter().all(|w| w.is_finished()) {
            b.drain_into(&mut seen);
        }
        writers.into_iter().for_each(|w| w.join().unwrap());
        b.drain_into(&mut seen);
        for t in 0..2 {
            for i in 0..20_000usize {
                let p = (i * 7919 + t * 13) % pages;
                assert!(seen[p / 64] & (1 << (p % 64)) != 0, "page {p} lost");
            }
        }
    }

    #[test]
    fn slices_mark_at_their_offset() {
        let b = PageBitmap::new(16 * 4096);
        let s = b.slice_at(4 * 4096);
        s.mark_dirty(4096, 1);
        assert!(b.is_page_set(5));
        assert!(s.dirty_at(4096));
    }
}
