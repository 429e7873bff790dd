//! Helpers for tests: guest memory with a dirty bitmap, and split queues
//! crafted byte by byte the way a (possibly malicious) driver would.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::{GuestMemoryMmap, PAGE_SIZE};

/// Descriptor flag: another descriptor follows.
pub const F_NEXT: u16 = 1;
/// Descriptor flag: device-writable.
pub const F_WRITE: u16 = 2;

/// 16 MiB of guest memory at address 0, with an empty dirty bitmap.
pub fn test_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
}

/// Returns the addresses of the pages the VMM-side bitmap marks dirty and
/// clears it.
pub fn take_dirty_pages(mem: &GuestMemoryMmap) -> Vec<u64> {
    let mut pages = Vec::new();
    for region in mem.iter() {
        let base = region.start_addr().0;
        let words = vm_memory::MmapRegion::bitmap(region).take_words();
        for (i, w) in words.iter().enumerate() {
            for bit in 0..64 {
                if w & (1 << bit) != 0 {
                    pages.push(base + (i as u64 * 64 + bit) * PAGE_SIZE);
                }
            }
        }
    }
    pages
}

/// A split queue laid out on pages of its own: descriptor table at
/// 0x1000, available ring at 0x3000, used ring at 0x5000 (the table of a
/// 256-entry queue fills exactly one page).
pub struct TestQueue<'a> {
    mem: &'a GuestMemoryMmap,
    /// The descriptor table.
    pub desc: GuestAddress,
    /// The available ring.
    pub avail: GuestAddress,
    /// The used ring.
    pub used: GuestAddress,
    /// Queue size.
    pub size: u16,
}

impl<'a> TestQueue<'a> {
    /// A queue of `size` entries with empty rings.
    pub fn new(mem: &'a GuestMemoryMmap, size: u16) -> Self {
        Self::at(mem, size, 0x1000)
    }

    /// A queue whose structures start at `base` (each on its own pages).
    pub fn at(mem: &'a GuestMemoryMmap, size: u16, base: u64) -> Self {
        let q = TestQueue {
            mem,
            desc: GuestAddress(base),
            avail: GuestAddress(base + 0x2000),
            used: GuestAddress(base + 0x4000),
            size,
        };
        mem.write_obj(0u16, q.avail).unwrap();
        q.set_avail_idx(0);
        mem.write_obj(0u16, q.used).unwrap();
        mem.write_obj(0u16, q.used.unchecked_add(2)).unwrap();
        q
    }

    /// Writes descriptor `index`.
    pub fn set_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = self.desc.unchecked_add(u64::from(index) * 16);
        self.mem.write_obj(addr, at).unwrap();
        self.mem.write_obj(len, at.unchecked_add(8)).unwrap();
        self.mem.write_obj(flags, at.unchecked_add(12)).unwrap();
        self.mem.write_obj(next, at.unchecked_add(14)).unwrap();
    }

    /// The available ring's index.
    pub fn avail_idx(&self) -> u16 {
        self.mem.read_obj(self.avail.unchecked_add(2)).unwrap()
    }

    /// Sets the available ring's index.
    pub fn set_avail_idx(&self, idx: u16) {
        self.mem
            .write_obj(idx, self.avail.unchecked_add(2))
            .unwrap();
    }

    /// Makes the chain at `head` available.
    pub fn push_avail(&self, head: u16) {
        let idx = self.avail_idx();
        let slot = u64::from(idx % self.size);
        self.mem
            .write_obj(head, self.avail.unchecked_add(4 + 2 * slot))
            .unwrap();
        self.set_avail_idx(idx.wrapping_add(1));
    }

    /// The used ring's index.
    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(self.used.unchecked_add(2)).unwrap()
    }

    /// Used-ring entry `i`: (head index, length).
    pub fn used_elem(&self, i: u16) -> (u32, u32) {
        let at = self.used.unchecked_add(4 + 8 * u64::from(i % self.size));
        (
            self.mem.read_obj(at).unwrap(),
            self.mem.read_obj(at.unchecked_add(4)).unwrap(),
        )
    }

    /// Sets the available ring's flags (VRING_AVAIL_F_NO_INTERRUPT).
    pub fn set_avail_flags(&self, flags: u16) {
        self.mem.write_obj(flags, self.avail).unwrap();
    }

    /// Sets `used_event`, after the available ring's entries (the driver's
    /// "interrupt me once this entry is used", with EVENT_IDX).
    pub fn set_used_event(&self, idx: u16) {
        let at = self.avail.unchecked_add(4 + 2 * u64::from(self.size));
        self.mem.write_obj(idx, at).unwrap();
    }

    /// The used ring's flags (VRING_USED_F_NO_NOTIFY).
    pub fn used_flags(&self) -> u16 {
        self.mem.read_obj(self.used).unwrap()
    }

    /// `avail_event`, after the used ring's entries (the device's "notify
    /// me once this entry is available", with EVENT_IDX).
    pub fn avail_event(&self) -> u16 {
        let at = self.used.unchecked_add(4 + 8 * u64::from(self.size));
        self.mem.read_obj(at).unwrap()
    }

    /// A ready virtio-queue [`Queue`] over these structures.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.set_desc_table_address(Some(self.desc.0 as u32), Some((self.desc.0 >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail.0 as u32), Some(0));
        q.set_used_ring_address(Some(self.used.0 as u32), Some(0));
        q.set_ready(true);
        q
    }
}

/// Drives a transport the way a driver does: reset, ACKNOWLEDGE, DRIVER,
/// `features`, FEATURES_OK, the queues (size and base of their
/// structures, laid out as [`TestQueue::at`]), DRIVER_OK.
pub fn driver_start(t: &mut super::MmioTransport, features: u64, queues: &[(u16, u64)]) {
    use crate::devices::BusDevice;
    use virtio_bindings::virtio_mmio::*;
    let mut w = |offset: u32, value: u32| t.write(u64::from(offset), &value.to_le_bytes());
    w(VIRTIO_MMIO_STATUS, 0);
    w(VIRTIO_MMIO_STATUS, 1);
    w(VIRTIO_MMIO_STATUS, 1 | 2);
    w(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    w(VIRTIO_MMIO_DRIVER_FEATURES, features as u32);
    w(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    w(VIRTIO_MMIO_DRIVER_FEATURES, (features >> 32) as u32);
    w(VIRTIO_MMIO_STATUS, 1 | 2 | 8);
    for (i, &(size, base)) in queues.iter().enumerate() {
        w(VIRTIO_MMIO_QUEUE_SEL, i as u32);
        w(VIRTIO_MMIO_QUEUE_NUM, u32::from(size));
        w(VIRTIO_MMIO_QUEUE_DESC_LOW, base as u32);
        w(VIRTIO_MMIO_QUEUE_DESC_HIGH, (base >> 32) as u32);
        w(VIRTIO_MMIO_QUEUE_AVAIL_LOW, (base + 0x2000) as u32);
        w(VIRTIO_MMIO_QUEUE_AVAIL_HIGH, 0);
        w(VIRTIO_MMIO_QUEUE_USED_LOW, (base + 0x4000) as u32);
        w(VIRTIO_MMIO_QUEUE_USED_HIGH, 0);
        w(VIRTIO_MMIO_QUEUE_READY, 1);
    }
    w(VIRTIO_MMIO_STATUS, 1 | 2 | 8 | 4);
}

/// Waits up to 5 s for `cond`.
pub fn wait_for(mut cond: impl FnMut() -> bool) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < std::time::Duration::from_secs(5) {
        if cond() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    cond()
}
