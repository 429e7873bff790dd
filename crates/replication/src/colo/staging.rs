//! The secondary's staging area: the pages of the epoch being received,
//! held apart from guest memory (the secondary's guest runs meanwhile and
//! must not see them) until the whole checkpoint has arrived.
//!
//! Memory is taken in chunks of [`CHUNK_PAGES`] pages, each its own
//! anonymous mapping that never moves, so a page batch can be read from
//! the socket straight into its slots. A page staged twice in one epoch
//! keeps its slot (the later copy wins). When a checkpoint has been
//! applied, or dropped, the chunks' pages go back to the host
//! (`MADV_DONTNEED`): between checkpoints the staging area holds only the
//! pages of the epoch in progress.

use std::collections::HashMap;

use vm_memory::{Bytes, GuestAddress};
use vmm::memory::GuestMemoryMmap;

use crate::migration::wire::{PAGE_SIZE, is_zero};

/// Pages per chunk of staging memory (1 MiB).
pub const CHUNK_PAGES: usize = 256;
/// Index value of a page staged as all zeros (no slot).
const ZERO: u32 = u32::MAX;

/// Bytes in a chunk.
const CHUNK_BYTES: usize = CHUNK_PAGES * PAGE_SIZE;

/// One chunk of staging memory: a private anonymous mapping.
struct Chunk(std::ptr::NonNull<u8>);

// SAFETY: the chunk owns its mapping; access goes through `&`/`&mut`
// borrows of the `Staging` that holds it.
unsafe impl Send for Chunk {}

impl Chunk {
    fn new() -> Chunk {
        // SAFETY: a fresh private anonymous mapping, not aliasing anything;
        // the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                CHUNK_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            // Out of address space: what an allocation failure does.
            std::alloc::handle_alloc_error(
                std::alloc::Layout::from_size_align(CHUNK_BYTES, PAGE_SIZE)
                    .unwrap_or(std::alloc::Layout::new::<u8>()),
            );
        }
        Chunk(std::ptr::NonNull::new(p.cast()).expect("mmap returned a valid address"))
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is CHUNK_BYTES long, readable, and lives as
        // long as `self`.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr(), CHUNK_BYTES) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as for `bytes`, and `&mut self` makes this the only
        // borrow.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_ptr(), CHUNK_BYTES) }
    }

    /// Gives the chunk's pages back to the host; it reads as zeros after.
    fn release(&mut self) {
        // SAFETY: the range is this chunk's own mapping; no borrow of its
        // bytes is alive (`&mut self`).
        unsafe {
            libc::madvise(self.0.as_ptr().cast(), CHUNK_BYTES, libc::MADV_DONTNEED);
        }
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        // SAFETY: unmapping this chunk's own mapping, which nothing uses
        // any more.
        unsafe {
            libc::munmap(self.0.as_ptr().cast(), CHUNK_BYTES);
        }
    }
}

/// Pages staged for one epoch, by guest address.
#[derive(Default)]
pub struct Staging {
    /// Guest address → slot (or [`ZERO`]).
    index: HashMap<u64, u32>,
    /// Slot `s` is at `chunks[s / CHUNK_PAGES]`, page `s % CHUNK_PAGES`.
    chunks: Vec<Chunk>,
    /// Slots handed out this epoch.
    used: u32,
}

impl Staging {
    /// An empty staging area; it takes memory as pages arrive.
    pub fn new() -> Staging {
        Staging::default()
    }

    /// Pages staged (data and zero).
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether nothing is staged.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Bytes of page data staged.
    pub fn data_bytes(&self) -> u64 {
        u64::from(self.used) * PAGE_SIZE as u64
    }

    /// Bytes of address space held for slots (staged or free); only the
    /// staged pages take host memory.
    pub fn capacity_bytes(&self) -> u64 {
        (self.chunks.len() * CHUNK_BYTES) as u64
    }

    /// Whether the page at `gpa` is staged.
    pub fn contains(&self, gpa: u64) -> bool {
        self.index.contains_key(&gpa)
    }

    /// The slot for `gpa`'s data: its own if staged with data, else a new
    /// one.
    fn slot(&mut self, gpa: u64) -> u32 {
        if let Some(&s) = self.index.get(&gpa)
            && s != ZERO
        {
            return s;
        }
        let s = self.used;
        self.used += 1;
        let chunk = s as usize / CHUNK_PAGES;
        if chunk == self.chunks.len() {
            self.chunks.push(Chunk::new());
        }
        self.index.insert(gpa, s);
        s
    }

    fn page_mut(&mut self, slot: u32) -> &mut [u8] {
        let s = slot as usize;
        let off = (s % CHUNK_PAGES) * PAGE_SIZE;
        &mut self.chunks[s / CHUNK_PAGES].bytes_mut()[off..off + PAGE_SIZE]
    }

    fn page(&self, slot: u32) -> &[u8] {
        let s = slot as usize;
        let off = (s % CHUNK_PAGES) * PAGE_SIZE;
        &self.chunks[s / CHUNK_PAGES].bytes()[off..off + PAGE_SIZE]
    }

    /// Stages a copy of `data` (one page) for `gpa`.
    pub fn stage(&mut self, gpa: u64, data: &[u8]) {
        let s = self.slot(gpa);
        self.page_mut(s).copy_from_slice(&data[..PAGE_SIZE]);
    }

    /// Stages `gpa` as a page of zeros.
    pub fn stage_zero(&mut self, gpa: u64) {
        self.index.insert(gpa, ZERO);
    }

    /// Stages a batch: `entries` are (guest address, zero) pairs; zero
    /// pages are staged at once, and `read` fills the data pages, in
    /// order, through the buffers it is given (one page each). A page that
    /// appears twice gets the same buffer twice, so the later copy wins.
    pub(crate) fn receive<E>(
        &mut self,
        entries: &[(u64, bool)],
        read: impl FnOnce(&mut [libc::iovec]) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut slots = Vec::with_capacity(entries.len());
        for &(gpa, zero) in entries {
            if zero {
                self.stage_zero(gpa);
            } else {
                slots.push(self.slot(gpa));
            }
        }
        let mut iov: Vec<libc::iovec> = slots
            .iter()
            .map(|&s| {
                let page = self.page_mut(s);
                libc::iovec {
                    iov_base: page.as_mut_ptr().cast(),
                    iov_len: PAGE_SIZE,
                }
            })
            .collect();
        // The buffers point into chunks `self` owns, which stay where they
        // are (boxed) and alive while `self` is borrowed by this call.
        read(&mut iov)
    }

    /// Writes every staged page into `mem` (a zero page only where the
    /// page is not zero already, so untouched memory stays untouched).
    /// Returns the pages written.
    pub fn apply(&self, mem: &GuestMemoryMmap) -> Result<u64, String> {
        for (&gpa, &slot) in &self.index {
            if slot == ZERO {
                clear_page(mem, gpa)?;
            } else {
                mem.write_slice(self.page(slot), GuestAddress(gpa))
                    .map_err(|e| format!("cannot write page {gpa:#x}: {e}"))?;
            }
        }
        Ok(self.index.len() as u64)
    }

    /// Forgets every staged page and gives their memory back to the host.
    /// The address space stays for the next epoch (at most what the
    /// busiest epoch used).
    pub fn clear(&mut self) {
        let used_chunks = (self.used as usize).div_ceil(CHUNK_PAGES);
        for c in self.chunks.iter_mut().take(used_chunks) {
            c.release();
        }
        self.index.clear();
        self.used = 0;
    }
}

/// Makes the page at `gpa` zeros, writing only if it is not zero already
/// (so an untouched page stays untouched).
pub(crate) fn clear_page(mem: &GuestMemoryMmap, gpa: u64) -> Result<(), String> {
    static ZEROS: [u8; PAGE_SIZE] = [0; PAGE_SIZE];
    let addr = GuestAddress(gpa);
    let mut cur = [0u8; PAGE_SIZE];
    mem.read_slice(&mut cur, addr)
        .map_err(|e| format!("cannot read page {gpa:#x}: {e}"))?;
    if !is_zero(&cur) {
        mem.write_slice(&ZEROS, addr)
            .map_err(|e| format!("cannot write page {gpa:#x}: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(fill: u8) -> Vec<u8> {
        vec![fill; PAGE_SIZE]
    }

    fn ram() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    #[test]
    fn staged_pages_reach_memory_only_when_applied() {
        let mem = ram();
        let mut s = Staging::new();
        s.stage(0x1000, &page(1));
        s.stage(0x3000, &page(3));
        s.stage(0x1000, &page(7)); // the later copy wins, same slot
        assert_eq!(s.len(), 2);
        assert_eq!(s.data_bytes(), 2 * PAGE_SIZE as u64);
        let mut b = [0u8; 1];
        mem.read_slice(&mut b, GuestAddress(0x1000)).unwrap();
        assert_eq!(b[0], 0, "nothing reaches memory before apply");
        assert_eq!(s.apply(&mem).unwrap(), 2);
        mem.read_slice(&mut b, GuestAddress(0x1000)).unwrap();
        assert_eq!(b[0], 7);
        mem.read_slice(&mut b, GuestAddress(0x3fff)).unwrap();
        assert_eq!(b[0], 3);
    }

    #[test]
    fn zero_pages_clear_what_is_there() {
        let mem = ram();
        mem.write_slice(&page(9), GuestAddress(0x2000)).unwrap();
        let mut s = Staging::new();
        s.stage(0x2000, &page(5));
        s.stage_zero(0x2000);
        s.stage_zero(0x5000);
        assert_eq!(s.len(), 2);
        s.apply(&mem).unwrap();
        let mut b = vec![0u8; PAGE_SIZE];
        mem.read_slice(&mut b, GuestAddress(0x2000)).unwrap();
        assert!(is_zero(&b));
    }

    #[test]
    fn batches_are_read_into_their_slots() {
        let mut s = Staging::new();
        let entries = [(0x1000, false), (0x2000, true), (0x3000, false)];
        s.receive(&entries, |iov| -> Result<(), ()> {
            assert_eq!(iov.len(), 2);
            for (i, v) in iov.iter().enumerate() {
                // SAFETY: each iovec is one page of a slot, valid for
                // writes while `receive` runs.
                unsafe { std::ptr::write_bytes(v.iov_base.cast::<u8>(), 10 + i as u8, v.iov_len) };
            }
            Ok(())
        })
        .unwrap();
        let mem = ram();
        s.apply(&mem).unwrap();
        let mut b = [0u8; 1];
        mem.read_slice(&mut b, GuestAddress(0x3000)).unwrap();
        assert_eq!(b[0], 11);
        assert!(s.contains(0x2000));
    }

    #[test]
    fn clear_gives_the_memory_back_and_reuses_the_chunks() {
        let mut s = Staging::new();
        for i in 0..(4 * CHUNK_PAGES as u64) {
            s.stage(i * 4096, &page(1));
        }
        assert_eq!(s.capacity_bytes(), (4 * CHUNK_BYTES) as u64);
        let before = resident(&s);
        assert_eq!(before, 4 * CHUNK_PAGES);
        s.clear();
        assert!(s.is_empty());
        assert_eq!(s.data_bytes(), 0);
        assert_eq!(resident(&s), 0, "cleared pages are given back");
        // The next epoch reuses the chunks, which read as zeros.
        s.stage(4096, &page(2));
        assert_eq!(s.capacity_bytes(), (4 * CHUNK_BYTES) as u64);
        assert_eq!(s.page(0)[0], 2);
        assert!(is_zero(s.chunks[0].bytes()[PAGE_SIZE..].as_ref()));
    }

    /// Pages of `s`'s chunks in host memory (mincore).
    fn resident(s: &Staging) -> usize {
        let mut n = 0;
        for c in &s.chunks {
            let mut vec = vec![0u8; CHUNK_PAGES];
            // SAFETY: the range is the chunk's mapping; mincore writes one
            // byte per page into `vec`, which has room for all of them.
            let rc =
                unsafe { libc::mincore(c.0.as_ptr().cast(), CHUNK_BYTES, vec.as_mut_ptr().cast()) };
            assert_eq!(rc, 0);
            n += vec.iter().filter(|b| **b & 1 != 0).count();
        }
        n
    }
}
