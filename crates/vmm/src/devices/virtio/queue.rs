//! Split virtqueues: their state in plain data, and descriptor chains read
//! defensively.
//!
//! virtio-queue's [`Queue`] walks the available ring and fills the used
//! ring. Descriptor chains are checked here before a device touches them: a
//! chain the guest built wrongly — a loop, an index past the table, an
//! indirect descriptor (not negotiated), a buffer outside guest RAM, a
//! device-readable buffer after a device-writable one, a total length too
//! large — is reported as a [`ChainError`]; nothing of it is accessed.

use std::num::Wrapping;
use std::sync::atomic::{Ordering, fence};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError};

use crate::memory::GuestMemoryMmap;

/// A split virtqueue's state: what the driver configured and how far the
/// device got.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    /// The largest size the device offers (QueueNumMax).
    pub max_size: u16,
    /// The size the driver chose (QueueNum).
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// Guest address of the descriptor table.
    pub desc_table: u64,
    /// Guest address of the available ("driver") ring.
    pub avail_ring: u64,
    /// Guest address of the used ("device") ring.
    pub used_ring: u64,
    /// The next available-ring entry the device will take.
    pub next_avail: u16,
    /// The next used-ring entry the device will fill.
    pub next_used: u16,
}

impl QueueState {
    /// A queue as after reset: full size, not ready, no addresses.
    pub fn new(max_size: u16) -> Self {
        QueueState {
            max_size,
            size: max_size,
            ..Default::default()
        }
    }

    /// The virtio-queue [`Queue`] for this state; fails on a size or an
    /// address alignment the driver should not have chosen.
    pub fn to_queue(&self) -> Result<Queue, virtio_queue::Error> {
        Queue::try_from(virtio_queue::QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: false,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
    }

    /// The state of `queue`.
    pub fn from_queue(queue: &Queue) -> Self {
        let s = queue.state();
        QueueState {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
        }
    }
}

/// One buffer of a descriptor chain, inside guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// A checked descriptor chain: its device-readable buffers, then its
/// device-writable ones.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Chain {
    /// Index of the head descriptor (what goes into the used ring).
    pub head: u16,
    /// Buffers the device reads (driver to device).
    pub readable: Vec<Segment>,
    /// Buffers the device writes (device to driver).
    pub writable: Vec<Segment>,
}

impl Chain {
    /// Total bytes of the readable buffers.
    pub fn readable_len(&self) -> u64 {
        self.readable.iter().map(|s| u64::from(s.len)).sum()
    }

    /// Total bytes of the writable buffers.
    pub fn writable_len(&self) -> u64 {
        self.writable.iter().map(|s| u64::from(s.len)).sum()
    }
}

/// What is wrong with a descriptor chain.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// A descriptor index is not below the queue size.
    #[error("descriptor index {index} is out of range (queue size {size})")]
    IndexOutOfRange {
        /// The index.
        index: u16,
        /// The queue size.
        size: u16,
    },
    /// More descriptors than the queue holds: the chain loops.
    #[error("the chain starting at descriptor {head} loops (more than {size} descriptors)")]
    Loop {
        /// The head index.
        head: u16,
        /// The queue size.
        size: u16,
    },
    /// An indirect descriptor, a feature twinvm does not offer.
    #[error("descriptor {index} is indirect, which was not negotiated")]
    Indirect {
        /// The index.
        index: u16,
    },
    /// A buffer not entirely inside guest RAM.
    #[error("descriptor {index} points outside guest memory ({addr:#x}+{len:#x})")]
    OutOfMemory {
        /// The index.
        index: u16,
        /// Its address.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// A device-readable buffer after a device-writable one.
    #[error("descriptor {index} is device-readable but follows a device-writable one")]
    ReadableAfterWritable {
        /// The index.
        index: u16,
    },
    /// The buffers add up to more than the device accepts.
    #[error("the chain's buffers add up to more than {max} bytes")]
    TooLarge {
        /// The limit.
        max: u64,
    },
    /// The descriptor table could not be read.
    #[error("cannot read descriptor {index} from the descriptor table")]
    Unreadable {
        /// The index.
        index: u16,
    },
}

/// Reads and checks the chain starting at `head` in the descriptor table at
/// `desc_table` of a queue of `size` entries. `max_len` bounds the readable
/// and the writable bytes, each.
pub fn read_chain(
    mem: &GuestMemoryMmap,
    desc_table: GuestAddress,
    size: u16,
    head: u16,
    max_len: u64,
) -> Result<Chain, ChainError> {
    let mut chain = Chain::default();
    read_chain_into(&mut chain, mem, desc_table, size, head, max_len)?;
    Ok(chain)
}

/// [`read_chain`] into `chain`, whose buffers are reused (a device keeps
/// one for every frame rather than allocating).
pub fn read_chain_into(
    chain: &mut Chain,
    mem: &GuestMemoryMmap,
    desc_table: GuestAddress,
    size: u16,
    head: u16,
    max_len: u64,
) -> Result<(), ChainError> {
    chain.head = head;
    chain.readable.clear();
    chain.writable.clear();
    let (mut readable_len, mut writable_len) = (0u64, 0u64);
    let mut index = head;
    for _ in 0..size {
        if index >= size {
            return Err(ChainError::IndexOutOfRange { index, size });
        }
        let addr = desc_table
            .checked_add(u64::from(index) * std::mem::size_of::<Descriptor>() as u64)
            .ok_or(ChainError::Unreadable { index })?;
        let desc: Descriptor = mem
            .read_obj(addr)
            .map_err(|_| ChainError::Unreadable { index })?;
        if desc.refers_to_indirect_table() {
            return Err(ChainError::Indirect { index });
        }
        let len = desc.len();
        let total = if desc.is_write_only() {
            &mut writable_len
        } else if !chain.writable.is_empty() {
            return Err(ChainError::ReadableAfterWritable { index });
        } else {
            &mut readable_len
        };
        *total += u64::from(len);
        if *total > max_len {
            return Err(ChainError::TooLarge { max: max_len });
        }
        if len > 0 && !mem.check_range(desc.addr(), len as usize) {
            return Err(ChainError::OutOfMemory {
                index,
                addr: desc.addr().raw_value(),
                len,
            });
        }
        let segment = Segment {
            addr: desc.addr(),
            len,
        };
        if desc.is_write_only() {
            chain.writable.push(segment);
        } else {
            chain.readable.push(segment);
        }
        if !desc.has_next() {
            return Ok(());
        }
        index = desc.next();
    }
    Err(ChainError::Loop { head, size })
}

/// Why the next chain could not be taken from a queue.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PopError {
    /// The available ring's index is unreadable.
    #[error("cannot read the available ring")]
    Unreadable,
    /// The driver claims more new entries than the queue holds.
    #[error("the available ring index {avail} is more than the queue size ahead of {next}")]
    BadAvailIndex {
        /// The driver's index.
        avail: u16,
        /// The device's next index.
        next: u16,
    },
}

/// The head index of the next chain the driver made available, or `None`
/// when there is none. A corrupt available ring is an error; the caller
/// stops processing the queue until the driver notifies it again.
pub fn pop_head(queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<Option<u16>, PopError> {
    let avail = queue
        .avail_idx(mem, Ordering::Acquire)
        .map_err(|_| PopError::Unreadable)?;
    let next = Wrapping(queue.next_avail());
    if avail == next {
        return Ok(None);
    }
    if (avail - next).0 > queue.size() {
        return Err(PopError::BadAvailIndex {
            avail: avail.0,
            next: next.0,
        });
    }
    // The ring entry, read after the index (acquire): the driver wrote it
    // before it published the index. The size is a power of two.
    let slot = u64::from(next.0 & (queue.size() - 1));
    let head = GuestAddress(queue.avail_ring())
        .checked_add(4 + 2 * slot)
        .ok_or(PopError::Unreadable)
        .and_then(|at| {
            mem.load::<u16>(at, Ordering::Relaxed)
                .map_err(|_| PopError::Unreadable)
        })?;
    queue.set_next_avail(next.0.wrapping_add(1));
    Ok(Some(u16::from_le(head)))
}

/// Whether the driver wants an interrupt for the used entries added to
/// `queue` since the last call. With VIRTIO_F_EVENT_IDX the driver's
/// `used_event` says how far the device may go before it interrupts;
/// without it, `VRING_AVAIL_F_NO_INTERRUPT` in the available ring's flags
/// asks for none. Either is only a hint, read after the used index is
/// published (a full fence between), so that a driver that changes its
/// mind at the same moment still gets its interrupt. An unreadable ring
/// asks for one.
pub fn needs_interrupt(queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
    if queue.event_idx_enabled() {
        return queue.needs_notification(mem).unwrap_or(true);
    }
    fence(Ordering::SeqCst);
    match mem.load::<u16>(GuestAddress(queue.avail_ring()), Ordering::Relaxed) {
        Ok(flags) => u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT as u16 == 0,
        Err(_) => true,
    }
}

/// Copies `buf.len()` bytes from the buffers `segments`, starting `offset`
/// bytes into them. Fails if they hold too few bytes.
pub fn read_from(
    mem: &GuestMemoryMmap,
    segments: &[Segment],
    offset: u64,
    buf: &mut [u8],
) -> Result<(), GuestMemoryError> {
    let mut done = 0usize;
    for (addr, len) in ranges(segments, offset, buf.len() as u64) {
        mem.read_slice(&mut buf[done..done + len], addr)?;
        done += len;
    }
    if done < buf.len() {
        return Err(GuestMemoryError::PartialBuffer {
            expected: buf.len(),
            completed: done,
        });
    }
    Ok(())
}

/// Copies `data` into the buffers `segments`, starting `offset` bytes into
/// them, through vm-memory (which marks the pages dirty). Fails if they
/// hold too few bytes.
pub fn write_to(
    mem: &GuestMemoryMmap,
    segments: &[Segment],
    offset: u64,
    data: &[u8],
) -> Result<(), GuestMemoryError> {
    let mut done = 0usize;
    for (addr, len) in ranges(segments, offset, data.len() as u64) {
        mem.write_slice(&data[done..done + len], addr)?;
        done += len;
    }
    if done < data.len() {
        return Err(GuestMemoryError::PartialBuffer {
            expected: data.len(),
            completed: done,
        });
    }
    Ok(())
}

/// The guest ranges covering `count` bytes from `offset` into `segments`.
fn ranges(
    segments: &[Segment],
    mut offset: u64,
    mut count: u64,
) -> impl Iterator<Item = (GuestAddress, usize)> + '_ {
    segments.iter().filter_map(move |s| {
        let len = u64::from(s.len);
        if offset >= len {
            offset -= len;
            return None;
        }
        if count == 0 {
            return None;
        }
        let n = (len - offset).min(count);
        let addr = s.addr.unchecked_add(offset);
        offset = 0;
        count -= n;
        Some((addr, n as usize))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::testutil::{F_NEXT, F_WRITE, TestQueue, test_memory};

    const MAX: u64 = u32::MAX as u64;

    #[test]
    fn state_round_trips_through_a_queue() {
        let s = QueueState {
            max_size: 256,
            size: 128,
            ready: true,
            desc_table: 0x1000,
            avail_ring: 0x2000,
            used_ring: 0x3000,
            next_avail: 7,
            next_used: 5,
        };
        assert_eq!(QueueState::from_queue(&s.to_queue().unwrap()), s);
        // Sizes that are not powers of two and misaligned rings are refused.
        assert!(QueueState { size: 100, ..s }.to_queue().is_err());
        assert!(
            QueueState {
                used_ring: 0x3002,
                ..s
            }
            .to_queue()
            .is_err()
        );
    }

    #[test]
    fn a_good_chain_is_split_by_direction() {
        let mem = test_memory();
        let q = TestQueue::new(&mem, 16);
        q.set_desc(0, 0x10000, 16, F_NEXT, 3);
        q.set_desc(3, 0x11000, 512, F_NEXT | F_WRITE, 4);
        q.set_desc(4, 0x12000, 1, F_WRITE, 0);
        let c = read_chain(&mem, q.desc, 16, 0, MAX).unwrap();
        assert_eq!(c.head, 0);
        assert_eq!(c.readable_len(), 16);
        assert_eq!(c.writable_len(), 513);
        assert_eq!(c.writable.len(), 2);
    }

    #[test]
    fn malformed_chains_are_errors() {
        let mem = test_memory();
        let q = TestQueue::new(&mem, 16);
        // A loop: 1 -> 2 -> 1.
        q.set_desc(1, 0x10000, 16, F_NEXT, 2);
        q.set_desc(2, 0x10000, 16, F_NEXT, 1);
        assert_eq!(
            read_chain(&mem, q.desc, 16, 1, MAX),
            Err(ChainError::Loop { head: 1, size: 16 })
        );
        // A self loop.
        q.set_desc(5, 0x10000, 16, F_NEXT, 5);
        assert!(matches!(
            read_chain(&mem, q.desc, 16, 5, MAX),
            Err(ChainError::Loop { .. })
        ));
        // Next index past the table, and a head past it.
        q.set_desc(6, 0x10000, 16, F_NEXT, 40);
        assert!(matches!(
            read_chain(&mem, q.desc, 16, 6, MAX),
            Err(ChainError::IndexOutOfRange { index: 40, .. })
        ));
        assert!(matches!(
            read_chain(&mem, q.desc, 16, 16, MAX),
            Err(ChainError::IndexOutOfRange { index: 16, .. })
        ));
        // A buffer beyond RAM, and one that wraps the address space.
        q.set_desc(7, 0xfff_f000, 16, 0, 0);
        assert!(matches!(
            read_chain(&mem, q.desc, 16, 7, MAX),
            Err(ChainError::OutOfMemory { .. })
        ));
        q.set_desc(7, u64::MAX - 4, 16, 0, 0);
        assert!(matches!(
            read_chain(&mem, q.desc, 16, 7, MAX),
            Err(ChainError::OutOfMemory { .. })
        ));
        // Readable after writable.
        q.set_desc(8, 0x10000, 16, F_WRITE | F_NEXT, 9);
        q.set_desc(9, 0x11000, 16, 0, 0);
        assert_eq!(
            read_chain(&mem, q.desc, 16, 8, MAX),
            Err(ChainError::ReadableAfterWritable { index: 9 })
        );
        // Indirect.
        q.set_desc(10, 0x10000, 32, 4, 0);
        assert_eq!(
            read_chain(&mem, q.desc, 16, 10, MAX),
            Err(ChainError::Indirect { index: 10 })
        );
        // Too large.
        q.set_desc(11, 0x10000, 0x1000, F_NEXT, 12);
        q.set_desc(12, 0x11000, 0x1000, 0, 0);
        assert_eq!(
            read_chain(&mem, q.desc, 16, 11, 0x1fff),
            Err(ChainError::TooLarge { max: 0x1fff })
        );
        // A descriptor table outside memory.
        assert!(matches!(
            read_chain(&mem, GuestAddress(0xffff_0000), 16, 0, MAX),
            Err(ChainError::Unreadable { index: 0 })
        ));
    }

    #[test]
    fn scatter_and_gather_cross_segments() {
        let mem = test_memory();
        let segs = [
            Segment {
                addr: GuestAddress(0x10000),
                len: 3,
            },
            Segment {
                addr: GuestAddress(0x20000),
                len: 5,
            },
        ];
        write_to(&mem, &segs, 1, &[1, 2, 3, 4]).unwrap();
        let mut b = [0u8; 4];
        read_from(&mem, &segs, 1, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3, 4]);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x20000)).unwrap(), 3);
        // Past the end of the buffers.
        assert!(write_to(&mem, &segs, 6, &[0; 3]).is_err());
        assert!(read_from(&mem, &segs, 9, &mut [0; 1]).is_err());
        write_to(&mem, &segs, 8, &[]).unwrap();
    }

    #[test]
    fn pop_head_reports_a_runaway_avail_index() {
        let mem = test_memory();
        let q = TestQueue::new(&mem, 16);
        let mut queue = q.queue();
        assert_eq!(pop_head(&mut queue, &mem), Ok(None));
        q.push_avail(3);
        assert_eq!(pop_head(&mut queue, &mem), Ok(Some(3)));
        assert_eq!(pop_head(&mut queue, &mem), Ok(None));
        q.set_avail_idx(40);
        assert!(matches!(
            pop_head(&mut queue, &mem),
            Err(PopError::BadAvailIndex { .. })
        ));
    }

    #[test]
    fn pop_head_follows_the_ring_around() {
        let mem = test_memory();
        let q = TestQueue::new(&mem, 16);
        let mut queue = q.queue();
        for round in 0..3u16 {
            for i in 0..10u16 {
                q.push_avail((round * 10 + i) % 16);
            }
            for i in 0..10u16 {
                assert_eq!(pop_head(&mut queue, &mem), Ok(Some((round * 10 + i) % 16)));
            }
            assert_eq!(pop_head(&mut queue, &mem), Ok(None));
        }
        assert_eq!(queue.next_avail(), 30);
        // Across the 16-bit wrap of the indexes.
        queue.set_next_avail(u16::MAX);
        q.set_avail_idx(u16::MAX);
        q.push_avail(7);
        q.push_avail(8);
        assert_eq!(pop_head(&mut queue, &mem), Ok(Some(7)));
        assert_eq!(pop_head(&mut queue, &mem), Ok(Some(8)));
        assert_eq!(queue.next_avail(), 1);
    }
}
