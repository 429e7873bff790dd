//! Guest RAM: its layout in the guest-physical address space, its KVM memory
//! slots, and dirty-page tracking.
//!
//! Every slot is registered with `KVM_MEM_LOG_DIRTY_PAGES`, so KVM records the
//! pages the guest writes. Writes the VMM itself makes into guest memory
//! (loading a kernel, device DMA) go through vm-memory, whose `AtomicBitmap`
//! records them. [`GuestRam::take_dirty`] returns the union of both and
//! resets them: that union is the exact set of pages changed since the last
//! call, which live migration and checkpoints rely on.

use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_userspace_memory_region};
use kvm_ioctls::VmFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// Guest memory as twinvm uses it: mmap-backed, with a VMM-side dirty bitmap.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;
/// One region of [`GuestMemoryMmap`].
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<AtomicBitmap>;

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
        self.slots.iter().flat_map(|(base, words)| {
            words.iter().enumerate().flat_map(move |(i, &word)| {
                (0..64)
                    .filter(move |bit| word & (1u64 << bit) != 0)
                    .map(move |bit| base.unchecked_add((i as u64 * 64 + bit) * PAGE_SIZE))
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
}

/// Guest RAM registered with a KVM VM.
pub struct GuestRam {
    mem: GuestMemoryMmap,
}

impl GuestRam {
    /// Allocates `size` bytes of guest RAM (pages are not touched, so the host
    /// only commits what the guest uses) and registers every region with
    /// `vm` as a slot with dirty logging on.
    pub fn new(vm: &VmFd, size: u64) -> Result<Self, MemoryError> {
        let mut regions = Vec::new();
        for (addr, len) in ram_ranges(size)? {
            let len_usize = usize::try_from(len).map_err(|_| MemoryError::InvalidSize(size))?;
            let map = vm_memory::MmapRegion::<AtomicBitmap>::new(len_usize)
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
        Ok(GuestRam { mem })
    }

    /// The guest memory, for reads and writes by the VMM (tracked as dirty).
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Total RAM in bytes.
    pub fn size(&self) -> u64 {
        self.mem.iter().map(|r| r.len()).sum()
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
            let vmm_words = vm_memory::MmapRegion::bitmap(region).get_and_reset();
            for (w, v) in words.iter_mut().zip(vmm_words) {
                *w |= v;
            }
            slots.push((region.start_addr(), words));
        }
        Ok(DirtyBitmap { slots })
    }
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
}
