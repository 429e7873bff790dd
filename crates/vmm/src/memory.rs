//! Guest RAM: its layout in the guest-physical address space, its KVM memory
//! slots, and dirty-page tracking.
//!
//! Every slot is registered with `KVM_MEM_LOG_DIRTY_PAGES`, so KVM records the
//! pages the guest writes. Writes the VMM itself makes into guest memory
//! (loading a kernel, device DMA) go through vm-memory, whose bitmap
//! ([`PageBitmap`]) records them. [`GuestRam::take_dirty`] returns the
//! union of both and resets them: that union is the exact set of pages
//! changed since the last call, which live migration and checkpoints rely
//! on.

use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_userspace_memory_region};
use kvm_ioctls::VmFd;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

pub use crate::page_bitmap::PageBitmap;

/// Guest memory as twinvm uses it: mmap-backed, with a VMM-side dirty bitmap.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<PageBitmap>;
/// One region of [`GuestMemoryMmap`].
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<PageBitmap>;

/// Size of a guest page as tracked by the dirty log.
pub const PAGE_SIZE: u64 = 4096;
/// Start of the hole below 4 GiB reserved for MMIO (IOAPIC, LAPIC, devices).
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// First address above the MMIO hole.
pub const MMIO_HOLE_END: u64 = 1 << 32;
/// Smallest guest RAM twinvm accepts: room for the boot structures, the
/// kernel at 1 MiB and a little more.
pub const MIN_MEMORY: u64 = 2 << 20;

/// Errors of guest memory setup and dirty tracking.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The size is unusable.
    #[error(
        "guest memory of {0} bytes is invalid: it must be at least 2 MiB and a multiple of 4 KiB"
    )]
    InvalidSize(u64),
    /// The host refused the mapping.
    #[error("cannot allocate {size} bytes of guest memory")]
    Allocate {
        /// Bytes asked for.
        size: u64,
        /// Why the host refused.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    /// The regions overlap or overflow (a layout bug).
    #[error("invalid guest memory layout")]
    Layout,
    /// KVM refused a memory slot.
    #[error("cannot register guest memory slot {slot} with KVM")]
    SetSlot {
        /// Slot number.
        slot: u32,
        /// The ioctl error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A region is not private anonymous memory, so discarding its pages
    /// would not leave zeros (a layout bug).
    #[error("guest memory region at {addr:#x} is not private anonymous memory: cannot discard it")]
    NotAnonymous {
        /// The region's guest address.
        addr: u64,
    },
    /// The host refused to discard pages.
    #[error("cannot discard guest memory region at {addr:#x}")]
    Discard {
        /// The region's guest address.
        addr: u64,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The host could not allocate guest pages up front.
    #[error(
        "cannot allocate the guest memory region at {addr:#x} up front (prefault needs Linux 5.14 or later and enough free host memory)"
    )]
    Prefault {
        /// The region's guest address.
        addr: u64,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// KVM could not return a dirty log.
    #[error("cannot read KVM's dirty log of slot {slot}")]
    DirtyLog {
        /// Slot number.
        slot: u32,
        /// The ioctl error.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// The guest-physical ranges RAM of `size` bytes occupies: everything below
/// the MMIO hole first, the rest from 4 GiB up.
pub fn ram_ranges(size: u64) -> Result<Vec<(GuestAddress, u64)>, MemoryError> {
    if size < MIN_MEMORY || !size.is_multiple_of(PAGE_SIZE) {
        return Err(MemoryError::InvalidSize(size));
    }
    let low = size.min(MMIO_HOLE_START);
    let mut ranges = vec![(GuestAddress(0), low)];
    if size > low {
        ranges.push((GuestAddress(MMIO_HOLE_END), size - low));
    }
    Ok(ranges)
}

/// A set of guest pages, one bit per 4 KiB page of each memory slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyBitmap {
    /// Per slot: the slot's first guest address and its bitmap words.
    pub slots: Vec<(GuestAddress, Vec<u64>)>,
}

impl DirtyBitmap {
    /// Number of pages in the set.
    pub fn count(&self) -> usize {
        self.slots
            .iter()
            .flat_map(|(_, words)| words.iter())
            .map(|w| w.count_ones() as usize)
            .sum()
    }

    /// Guest addresses of the pages in the set, in ascending order.
    pub fn pages(&self) -> impl Iterator<Item = GuestAddress> + '_ {
        // Set bits only, lowest first. Empty words are skipped eight at a
        // time (one vectorized test per 64 bytes of bitmap): a sparse set
        // over a large RAM is walked at memory speed.
        self.slots.iter().flat_map(|(base, words)| {
            words
                .chunks(8)
                .enumerate()
                .filter(|(_, chunk)| chunk.iter().fold(0, |a, w| a | w) != 0)
                .flat_map(|(c, chunk)| chunk.iter().enumerate().map(move |(j, w)| (c * 8 + j, w)))
                .filter(|(_, w)| **w != 0)
                .flat_map(move |(i, &word)| {
                    let mut rest = word;
                    std::iter::from_fn(move || {
                        if rest == 0 {
                            return None;
                        }
                        let bit = u64::from(rest.trailing_zeros());
                        rest &= rest - 1;
                        Some(base.unchecked_add((i as u64 * 64 + bit) * PAGE_SIZE))
                    })
                })
        })
    }

    /// Whether the page holding `addr` is in the set.
    pub fn contains(&self, addr: GuestAddress) -> bool {
        self.slots.iter().any(|(base, words)| {
            addr.checked_offset_from(*base)
                .map(|off| off / PAGE_SIZE)
                .and_then(|page| words.get((page / 64) as usize).map(|w| (w, page % 64)))
                .is_some_and(|(w, bit)| w & (1u64 << bit) != 0)
        })
    }

    /// Whether some slot of the set covers the page holding `addr`: a
    /// page that [`Self::insert`] would take.
    pub fn covers(&self, addr: GuestAddress) -> bool {
        self.slots.iter().any(|(base, words)| {
            addr.checked_offset_from(*base)
                .is_some_and(|off| off / PAGE_SIZE / 64 < words.len() as u64)
        })
    }

    /// Removes the page holding `addr`, if it is in the set.
    pub fn remove(&mut self, addr: GuestAddress) {
        for (base, words) in &mut self.slots {
            if let Some(w) = addr
                .checked_offset_from(*base)
                .map(|off| off / PAGE_SIZE)
                .and_then(|page| words.get_mut((page / 64) as usize).map(|w| (w, page % 64)))
            {
                *w.0 &= !(1u64 << w.1);
                return;
            }
        }
    }

    /// An empty set over the same slots as `self`.
    pub fn empty_like(&self) -> DirtyBitmap {
        DirtyBitmap {
            slots: self
                .slots
                .iter()
                .map(|(base, words)| (*base, vec![0; words.len()]))
                .collect(),
        }
    }

    /// Adds the page holding `addr`; returns `false` (and changes nothing)
    /// if no slot covers it.
    pub fn insert(&mut self, addr: GuestAddress) -> bool {
        for (base, words) in &mut self.slots {
            let Some(page) = addr.checked_offset_from(*base).map(|off| off / PAGE_SIZE) else {
                continue;
            };
            if let Some(w) = words.get_mut((page / 64) as usize) {
                *w |= 1u64 << (page % 64);
                return true;
            }
        }
        false
    }

    /// Adds every page of `other` (`self` ∪= `other`). Both must cover the
    /// same slots (as every bitmap of one VM does); pages of `other` beyond
    /// `self`'s slots are ignored.
    pub fn union_with(&mut self, other: &DirtyBitmap) {
        for ((_, a), (_, b)) in self.slots.iter_mut().zip(&other.slots) {
            for (x, y) in a.iter_mut().zip(b) {
                *x |= y;
            }
        }
    }

    /// Number of pages in `self` ∪ `other` (same slots as for
    /// [`Self::union_with`]), without building the union.
    pub fn union_count(&self, other: &DirtyBitmap) -> usize {
        self.slots
            .iter()
            .zip(&other.slots)
            .flat_map(|((_, a), (_, b))| a.iter().zip(b))
            .map(|(x, y)| (x | y).count_ones() as usize)
            .sum()
    }

    /// Removes every page.
    pub fn clear(&mut self) {
        for (_, words) in &mut self.slots {
            words.iter_mut().for_each(|w| *w = 0);
        }
    }
}

/// Guest RAM registered with a KVM VM.
pub struct GuestRam {
    mem: GuestMemoryMmap,
    /// Every page was allocated up front ([`GuestRam::prefault`]).
    prefaulted: std::sync::atomic::AtomicBool,
}

impl GuestRam {
    /// Allocates `size` bytes of guest RAM (pages are not touched, so the host
    /// only commits what the guest uses) and registers every region with
    /// `vm` as a slot with dirty logging on.
    pub fn new(vm: &VmFd, size: u64) -> Result<Self, MemoryError> {
        let mut regions = Vec::new();
        for (addr, len) in ram_ranges(size)? {
            let len_usize = usize::try_from(len).map_err(|_| MemoryError::InvalidSize(size))?;
            let map = vm_memory::MmapRegion::<PageBitmap>::new(len_usize)
                .map_err(|source| MemoryError::Allocate { size, source })?;
            regions.push(GuestRegionMmap::new(map, addr).ok_or(MemoryError::Layout)?);
        }
        let mem = GuestMemoryMmap::from_regions(regions).map_err(|_| MemoryError::Layout)?;
        for (slot, region) in mem.iter().enumerate() {
            let region_desc = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
                flags: KVM_MEM_LOG_DIRTY_PAGES,
            };
            // SAFETY: the region is a live mapping of `memory_size` bytes owned
            // by `mem`, which outlives the VM's use of it: `GuestRam` is
            // dropped only with the VM (the `Vm` struct drops its VmFd first).
            unsafe { vm.set_user_memory_region(region_desc) }.map_err(|source| {
                MemoryError::SetSlot {
                    slot: slot as u32,
                    source,
                }
            })?;
        }
        Ok(GuestRam {
            mem,
            prefaulted: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Allocates every page of guest RAM now, on all host CPUs
    /// ([`prefault`]), so that no access by the guest or the VMM later
    /// waits for the host to allocate and zero a page. The contents do not
    /// change. From then on [`GuestRam::discard`] zeroes pages in place
    /// rather than giving them back, so RAM stays allocated.
    pub fn prefault(&self) -> Result<(), MemoryError> {
        prefault(&self.mem)?;
        self.prefaulted
            .store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// Whether [`GuestRam::prefault`] allocated every page.
    pub fn is_prefaulted(&self) -> bool {
        self.prefaulted.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The guest memory, for reads and writes by the VMM (tracked as dirty).
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Total RAM in bytes.
    pub fn size(&self) -> u64 {
        self.mem.iter().map(|r| r.len()).sum()
    }

    /// Makes every page read as zeros: returns them to the untouched
    /// state ([`discard`]), or, on prefaulted RAM, zeroes the pages that
    /// are not zero in place ([`zero_in_place`]). Either way the VMM-side
    /// dirty bitmap is cleared. Nothing may run in the guest or write guest
    /// memory meanwhile (the VM is paused).
    pub fn discard(&self) -> Result<(), MemoryError> {
        if self.is_prefaulted() {
            zero_in_place(&self.mem);
            Ok(())
        } else {
            discard(&self.mem)
        }
    }

    /// The pages that may hold something other than zeros
    /// ([`populated_pages`]).
    pub fn populated_pages(&self) -> DirtyBitmap {
        populated_pages(&self.mem)
    }

    /// Returns the pages written since the previous call — by the guest
    /// (KVM's dirty log) or by the VMM (vm-memory's bitmap) — and starts a
    /// new tracking interval.
    pub fn take_dirty(&self, vm: &VmFd) -> Result<DirtyBitmap, MemoryError> {
        let mut slots = Vec::new();
        for (slot, region) in self.mem.iter().enumerate() {
            let slot = slot as u32;
            let len = region.len() as usize;
            let mut words = vm
                .get_dirty_log(slot, len)
                .map_err(|source| MemoryError::DirtyLog { slot, source })?;
            vm_memory::MmapRegion::bitmap(region).drain_into(&mut words);
            slots.push((region.start_addr(), words));
        }
        Ok(DirtyBitmap { slots })
    }
}

/// Bit of a `/proc/<pid>/pagemap` entry: the page is in RAM.
pub const PAGEMAP_PRESENT: u64 = 1 << 63;
/// Bit of a `/proc/<pid>/pagemap` entry: the page is in swap.
pub const PAGEMAP_SWAPPED: u64 = 1 << 62;
/// Pagemap entries read at a time (512 KiB of entries, 256 MiB of RAM): a
/// multiple of 64, so every read fills whole bitmap words.
const PAGEMAP_BATCH: usize = 64 << 10;

/// Turns pagemap entries, one per page, into bitmap words: bit `i % 64` of
/// word `i / 64` is set if page `i` is present or swapped, i.e. has been
/// populated and may hold something other than zeros. Bits past the last
/// entry are clear.
pub fn pagemap_words(entries: &[u64]) -> Vec<u64> {
    entries
        .chunks(64)
        .map(|chunk| {
            chunk
                .iter()
                .enumerate()
                .filter(|(_, e)| *e & (PAGEMAP_PRESENT | PAGEMAP_SWAPPED) != 0)
                .fold(0u64, |word, (bit, _)| word | 1 << bit)
        })
        .collect()
}

/// Returns every page of `mem` to the untouched state: zeros, using no
/// host memory. `madvise(MADV_DONTNEED)` over each whole region drops its
/// pages; the regions are private anonymous mappings (vm-memory's
/// `MmapRegion::new`, which [`GuestRam::new`] uses, maps them
/// `MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE`; checked here), for which
/// the next access of a dropped page finds a fresh zero-filled page. KVM
/// follows through its MMU notifiers. The VMM-side dirty bitmap is cleared
/// too (KVM's dirty log is left as it is).
///
/// Nothing may read or write `mem` meanwhile (the VM is paused): what is
/// read during the call may be the old contents or zeros.
pub fn discard(mem: &GuestMemoryMmap) -> Result<(), MemoryError> {
    let wanted = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
    for region in mem.iter() {
        let addr = region.start_addr().raw_value();
        if region.flags() & wanted != wanted || region.file_offset().is_some() {
            return Err(MemoryError::NotAnonymous { addr });
        }
    }
    for region in mem.iter() {
        let addr = region.start_addr().raw_value();
        // SAFETY: the range is exactly one live mapping owned by `mem` (its
        // start and length as mapped). MADV_DONTNEED on private anonymous
        // memory only replaces its contents with zeros: no Rust reference
        // into guest memory exists (vm-memory reaches it through volatile
        // copies), and the VM is paused, so no vCPU or device writes it
        // meanwhile.
        let ret =
            unsafe { libc::madvise(region.as_ptr().cast(), region.size(), libc::MADV_DONTNEED) };
        if ret != 0 {
            return Err(MemoryError::Discard {
                addr,
                source: std::io::Error::last_os_error(),
            });
        }
        vm_memory::MmapRegion::bitmap(region).reset();
    }
    Ok(())
}

/// Bytes one [`prefault`] call allocates: small enough to spread a region
/// over several threads, large enough that the calls cost nothing.
const PREFAULT_CHUNK: usize = 64 << 20;

/// Allocates every page of `mem` (`madvise(MADV_POPULATE_WRITE)`, chunk by
/// chunk on up to one thread per host CPU). Contents do not change: pages
/// present keep theirs, absent ones become the zero pages they read as.
pub fn prefault(mem: &GuestMemoryMmap) -> Result<(), MemoryError> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    // (region's guest address, host address, length) of every chunk.
    let chunks: Vec<(u64, usize, usize)> = mem
        .iter()
        .flat_map(|region| {
            let (host, size) = (region.as_ptr() as usize, region.size());
            let addr = region.start_addr().raw_value();
            (0..size)
                .step_by(PREFAULT_CHUNK)
                .map(move |off| (addr, host + off, PREFAULT_CHUNK.min(size - off)))
        })
        .collect();
    let next = AtomicUsize::new(0);
    let work = || -> Result<(), MemoryError> {
        while let Some(&(addr, host, len)) = chunks.get(next.fetch_add(1, Ordering::Relaxed)) {
            // SAFETY: the range lies inside one live mapping owned by `mem`
            // (a chunk of a region, as mapped). MADV_POPULATE_WRITE only
            // fills in page tables as a write fault would, without writing:
            // contents do not change. No Rust reference into guest memory
            // exists (vm-memory reaches it through volatile copies).
            let r =
                unsafe { libc::madvise(host as *mut libc::c_void, len, libc::MADV_POPULATE_WRITE) };
            if r != 0 {
                return Err(MemoryError::Prefault {
                    addr,
                    source: std::io::Error::last_os_error(),
                });
            }
        }
        Ok(())
    };
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(chunks.len())
        .max(1);
    std::thread::scope(|s| {
        // A helper that cannot start leaves its share to the others.
        let helpers: Vec<_> = (1..threads)
            .filter_map(|i| {
                std::thread::Builder::new()
                    .name(format!("prefault{i}"))
                    .spawn_scoped(s, work)
                    .ok()
            })
            .collect();
        let mut result = work();
        for h in helpers {
            let r = h.join().unwrap_or_else(|_| {
                Err(MemoryError::Prefault {
                    addr: 0,
                    source: std::io::Error::other("a prefault thread panicked"),
                })
            });
            result = result.and(r);
        }
        result
    })
}

/// Makes every page of `mem` read as zeros without giving any back: a page
/// that is not all zeros is overwritten with zeros. Clears the VMM-side
/// dirty bitmap. Nothing may write `mem` meanwhile (the VM is paused).
pub fn zero_in_place(mem: &GuestMemoryMmap) {
    use vm_memory::Bytes;
    static ZERO: [u8; PAGE_SIZE as usize] = [0; PAGE_SIZE as usize];
    const WORDS: usize = PAGE_SIZE as usize / 8;
    for region in mem.iter() {
        let base = region.as_ptr().cast::<u64>().cast_const();
        let pages = region.len() / PAGE_SIZE;
        for p in 0..pages {
            let mut any = 0u64;
            for w in 0..WORDS {
                // SAFETY: page `p` lies inside the region's live mapping
                // (`pages` whole pages from its start, which is page
                // aligned, so every u64 is aligned). A volatile read of
                // memory the guest or a device could write is what
                // vm-memory does too; the VM is paused, so nothing does.
                any |= unsafe { base.add(p as usize * WORDS + w).read_volatile() };
            }
            if any != 0 {
                // Whole pages inside the region: the write cannot fail.
                let _ = region.write_slice(&ZERO, vm_memory::MemoryRegionAddress(p * PAGE_SIZE));
            }
        }
        vm_memory::MmapRegion::bitmap(region).reset();
    }
}

/// Every page of `mem`, as a [`DirtyBitmap`].
fn all_pages(mem: &GuestMemoryMmap) -> DirtyBitmap {
    let slots = mem
        .iter()
        .map(|region| {
            let pages = region.len() / PAGE_SIZE;
            let mut words = vec![u64::MAX; pages.div_ceil(64) as usize];
            if let Some(last) = words.last_mut()
                && !pages.is_multiple_of(64)
            {
                *last = (1u64 << (pages % 64)) - 1;
            }
            (region.start_addr(), words)
        })
        .collect();
    DirtyBitmap { slots }
}

/// The pages of `mem` that this process's page tables map or have in swap,
/// read from `/proc/self/pagemap`.
fn read_pagemap(mem: &GuestMemoryMmap) -> std::io::Result<DirtyBitmap> {
    use std::os::unix::fs::FileExt;
    let pagemap = std::fs::File::open("/proc/self/pagemap")?;
    let mut buf = vec![0u8; PAGEMAP_BATCH * 8];
    let mut entries = Vec::with_capacity(PAGEMAP_BATCH);
    let mut slots = Vec::new();
    for region in mem.iter() {
        let first = region.as_ptr() as u64 / PAGE_SIZE;
        let pages = region.len() / PAGE_SIZE;
        let mut words = Vec::with_capacity(pages.div_ceil(64) as usize);
        let mut done = 0u64;
        while done < pages {
            let n = (pages - done).min(PAGEMAP_BATCH as u64) as usize;
            let bytes = &mut buf[..n * 8];
            pagemap.read_exact_at(bytes, (first + done) * 8)?;
            entries.clear();
            entries.extend(
                bytes
                    .chunks_exact(8)
                    .map(|e| u64::from_ne_bytes(e.try_into().unwrap_or_default())),
            );
            words.extend(pagemap_words(&entries));
            done += n as u64;
        }
        slots.push((region.start_addr(), words));
    }
    Ok(DirtyBitmap { slots })
}

/// The pages of `mem` that may hold something other than zeros: those
/// present in this process's page tables or in swap. A page never touched
/// since it was mapped (or discarded, [`GuestRam::discard`]) reads as
/// zeros and is not in the set. A page only ever read may be (the kernel
/// maps its shared zero page), so the set may hold some zero pages too.
///
/// If `/proc/self/pagemap` cannot be read, every page is returned (and a
/// warning logged once): that is always a correct answer, only slower to
/// use.
pub fn populated_pages(mem: &GuestMemoryMmap) -> DirtyBitmap {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    read_pagemap(mem).unwrap_or_else(|e| {
        if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::warn!(
                "cannot read /proc/self/pagemap ({e}): every page of guest RAM is taken as populated"
            );
        }
        all_pages(mem)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_ram_is_one_range() {
        let r = ram_ranges(256 << 20).unwrap();
        assert_eq!(r, vec![(GuestAddress(0), 256 << 20)]);
    }

    #[test]
    fn large_ram_skips_the_mmio_hole() {
        let r = ram_ranges(4 << 30).unwrap();
        assert_eq!(
            r,
            vec![
                (GuestAddress(0), MMIO_HOLE_START),
                (GuestAddress(MMIO_HOLE_END), (4 << 30) - MMIO_HOLE_START)
            ]
        );
    }

    #[test]
    fn bad_sizes_are_refused() {
        for size in [0, 4096, (2 << 20) + 1] {
            assert!(matches!(ram_ranges(size), Err(MemoryError::InvalidSize(_))));
        }
    }

    #[test]
    fn dirty_bitmap_lists_pages() {
        let bm = DirtyBitmap {
            slots: vec![
                (GuestAddress(0), vec![0b101, 1 << 63]),
                (GuestAddress(MMIO_HOLE_END), vec![1]),
            ],
        };
        let pages: Vec<u64> = bm.pages().map(|a| a.raw_value()).collect();
        assert_eq!(pages, vec![0, 2 * 4096, 127 * 4096, MMIO_HOLE_END]);
        assert_eq!(bm.count(), 4);
        assert!(bm.contains(GuestAddress(2 * 4096 + 17)));
        assert!(!bm.contains(GuestAddress(4096)));
        assert!(bm.contains(GuestAddress(MMIO_HOLE_END + 5)));
        assert!(!bm.contains(GuestAddress(MMIO_HOLE_END + 4096)));
    }

    #[test]
    fn dirty_bitmap_set_operations() {
        let a = DirtyBitmap {
            slots: vec![
                (GuestAddress(0), vec![0b0110, 0]),
                (GuestAddress(MMIO_HOLE_END), vec![1]),
            ],
        };
        let mut e = a.empty_like();
        assert_eq!(e.count(), 0);
        assert_eq!(e.slots.len(), 2);
        assert!(e.insert(GuestAddress(4096 + 5)));
        assert!(!e.insert(GuestAddress(MMIO_HOLE_END + 64 * 4096)));
        assert!(e.insert(GuestAddress(65 * 4096)));
        assert!(!e.insert(GuestAddress(1 << 40)));
        assert_eq!(e.slots[0].1, vec![0b0010, 0b10]);
        let mut u = e.clone();
        assert_eq!(e.union_count(&a), 4);
        u.union_with(&a);
        assert_eq!(u.count(), 4);
        assert_eq!(u.slots[0].1, vec![0b0110, 0b10]);
        assert_eq!(u.slots[1].1, vec![1]);
        u.clear();
        assert_eq!(u.count(), 0);
        // Coverage and removal.
        assert!(a.covers(GuestAddress(127 * 4096 + 7)));
        assert!(a.covers(GuestAddress(MMIO_HOLE_END + 63 * 4096)));
        assert!(!a.covers(GuestAddress(128 * 4096)));
        assert!(!a.covers(GuestAddress(MMIO_HOLE_END + 64 * 4096)));
        let mut r = a.clone();
        r.remove(GuestAddress(2 * 4096 + 9));
        r.remove(GuestAddress(3 * 4096)); // not in the set
        r.remove(GuestAddress(1 << 40)); // outside every slot
        assert_eq!(r.slots[0].1, vec![0b0010, 0]);
        assert_eq!(r.count(), 2);
    }

    #[test]
    fn pages_of_a_sparse_set_come_in_order() {
        let words = 1000;
        let mut b = DirtyBitmap {
            slots: vec![
                (GuestAddress(0), vec![0; words]),
                (GuestAddress(MMIO_HOLE_END), vec![0; 3]),
            ],
        };
        let mut want = Vec::new();
        for page in [
            0u64,
            63,
            64,
            511,
            512,
            7 * 64 + 5,
            9 * 64 + 1,
            999 * 64 + 63,
        ] {
            assert!(b.insert(GuestAddress(page * 4096)));
            want.push(page * 4096);
        }
        assert!(b.insert(GuestAddress(MMIO_HOLE_END + 130 * 4096)));
        want.sort_unstable();
        want.push(MMIO_HOLE_END + 130 * 4096);
        let got: Vec<u64> = b.pages().map(|a| a.0).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn pagemap_entries_become_bitmap_words() {
        let mut entries = vec![0u64; 130];
        entries[0] = PAGEMAP_PRESENT | 0x1234;
        entries[5] = PAGEMAP_SWAPPED;
        // Other bits (soft-dirty, exclusive, file-mapped, a PFN) alone do
        // not make a page populated.
        entries[6] = 1 << 55 | 1 << 56 | 1 << 61 | 0xabc;
        entries[63] = PAGEMAP_PRESENT;
        entries[64] = PAGEMAP_PRESENT | PAGEMAP_SWAPPED;
        entries[129] = PAGEMAP_PRESENT;
        assert_eq!(
            pagemap_words(&entries),
            vec![1 | 1 << 5 | 1 << 63, 1, 1 << 1]
        );
        assert_eq!(pagemap_words(&[]), Vec::<u64>::new());
        assert_eq!(pagemap_words(&[0; 64]), vec![0]);
    }

    #[test]
    fn all_pages_covers_each_region_exactly() {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 130 * PAGE_SIZE as usize),
            (GuestAddress(MMIO_HOLE_END), 64 * PAGE_SIZE as usize),
        ])
        .unwrap();
        let all = all_pages(&mem);
        assert_eq!(all.count(), 194);
        assert_eq!(all.slots[0].1, vec![u64::MAX, u64::MAX, 0b11]);
        assert_eq!(all.slots[1], (GuestAddress(MMIO_HOLE_END), vec![u64::MAX]));
    }

    #[test]
    fn populated_pages_are_those_touched() {
        use vm_memory::Bytes;
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 16 << 20),
            (GuestAddress(MMIO_HOLE_END), 4 << 20),
        ])
        .unwrap();
        let fresh = populated_pages(&mem);
        assert_eq!(fresh.count(), 0, "{:?}", fresh.pages().collect::<Vec<_>>());
        assert_eq!(fresh.slots.len(), 2);
        assert_eq!(fresh.slots[0].1.len(), (16 << 20) / 4096 / 64);
        let touched = [
            0u64,
            3 * 4096,
            100 * 4096 + 17,
            (16 << 20) - 1,
            MMIO_HOLE_END + 8192,
        ];
        for &addr in &touched {
            mem.write_obj(0x5au8, GuestAddress(addr)).unwrap();
        }
        let got: Vec<u64> = populated_pages(&mem).pages().map(|a| a.0).collect();
        let want: Vec<u64> = touched.iter().map(|a| a & !(PAGE_SIZE - 1)).collect();
        if crate::testing::thp_always() {
            // Transparent huge pages may bring in a whole 2 MiB page.
            for w in &want {
                assert!(got.contains(w), "{w:#x} missing");
            }
            for g in &got {
                assert!(
                    want.iter().any(|w| w >> 21 == g >> 21),
                    "{g:#x} not touched"
                );
            }
        } else {
            assert_eq!(got, want);
        }
    }

    #[test]
    fn discarded_memory_reads_zeros_and_is_given_back() {
        use vm_memory::Bytes;
        let size = 32usize << 20;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap();
        let pattern: Vec<u8> = (0..size).map(|i| (i % 251) as u8 | 1).collect();
        mem.write_slice(&pattern, GuestAddress(0)).unwrap();
        drop(pattern);
        assert_eq!(populated_pages(&mem).count(), size / 4096);
        let before = crate::testing::resident_pages();
        discard(&mem).unwrap();
        let after = crate::testing::resident_pages();
        // At least three quarters of the 8192 pages went back to the host.
        assert!(
            before.saturating_sub(after) >= 6144,
            "resident pages {before} before, {after} after"
        );
        assert_eq!(populated_pages(&mem).count(), 0);
        assert_zeros_and_clean(&mem);
        // And it is usable again.
        mem.write_obj(7u32, GuestAddress(4096)).unwrap();
        assert_eq!(mem.read_obj::<u32>(GuestAddress(4096)).unwrap(), 7);
    }

    #[test]
    fn prefault_allocates_every_page_and_zeroing_keeps_them() {
        use vm_memory::Bytes;
        let size = 48 << 20;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap();
        let pages = size as u64 / PAGE_SIZE;
        assert_eq!(populated_pages(&mem).count(), 0);
        mem.write_obj(0x1234_5678u32, GuestAddress(5 * PAGE_SIZE))
            .unwrap();
        prefault(&mem).unwrap();
        // Every page is there, and what was written is kept.
        assert_eq!(populated_pages(&mem).count() as u64, pages);
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(5 * PAGE_SIZE)).unwrap(),
            0x1234_5678
        );
        // Zeroing in place leaves every page allocated and every byte zero.
        mem.write_obj(7u8, GuestAddress(size as u64 - 1)).unwrap();
        zero_in_place(&mem);
        assert_eq!(populated_pages(&mem).count() as u64, pages);
        assert_zeros_and_clean(&mem);
    }

    /// Every byte of `mem` reads zero and its VMM-side dirty bitmap is
    /// clear.
    fn assert_zeros_and_clean(mem: &GuestMemoryMmap) {
        use vm_memory::Bytes;
        for region in mem.iter() {
            let mut back = vec![0xffu8; region.len() as usize];
            mem.read_slice(&mut back, region.start_addr()).unwrap();
            assert!(back.iter().all(|&b| b == 0));
            assert!(
                vm_memory::MmapRegion::bitmap(region)
                    .take_words()
                    .iter()
                    .all(|&w| w == 0)
            );
        }
    }

    #[test]
    fn only_anonymous_memory_is_discarded() {
        let file = vmm_sys_util::tempfile::TempFile::new().unwrap();
        file.as_file().set_len(1 << 20).unwrap();
        let offset = vm_memory::FileOffset::new(file.as_file().try_clone().unwrap(), 0);
        let region = vm_memory::MmapRegion::<PageBitmap>::from_file(offset, 1 << 20).unwrap();
        let mem = GuestMemoryMmap::from_regions(vec![
            GuestRegionMmap::new(region, GuestAddress(0)).unwrap(),
        ])
        .unwrap();
        assert!(matches!(
            discard(&mem),
            Err(MemoryError::NotAnonymous { addr: 0 })
        ));
    }
}
