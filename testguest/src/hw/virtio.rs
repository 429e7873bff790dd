//! Virtio over MMIO (version 2): the transport, split virtqueues, and the
//! network and block drivers.
//!
//! An own small driver rather than the `virtio-drivers` crate: the guest
//! needs two devices with one fixed buffer layout each, all memory is carved
//! statically out of RAM above the image (no allocator, no DMA
//! abstraction), and every instruction counts under the instruction
//! emulator, so the rings are driven directly with volatile accesses.
//!
//! Notification suppression: the network driver negotiates
//! VIRTIO_RING_F_EVENT_IDX when the device offers it. It then notifies a
//! queue only when the device's `avail_event` asks for the entries just
//! published (twinvm asks for transmit entries whenever it has drained the
//! queue, for receive buffers only while it holds a frame without one),
//! and it asks for interrupts with `used_event`: every received frame
//! while it would halt, transmit completions only while all its transmit
//! buffers are in use. Without the feature it honours the device's
//! `VRING_USED_F_NO_NOTIFY` and takes every interrupt. The disk driver
//! always notifies and takes every interrupt.
//!
//! Memory ordering: the guest has one vCPU and x86 keeps stores in order,
//! so compiler fences around the ring index updates suffice for what the
//! device reads. Suppression needs store-to-load order as well — the
//! driver writes an index, then reads the device's event index (and the
//! device does the opposite) — which x86 only gives with a full fence:
//! [`full_fence`].

use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{AtomicU32, Ordering, compiler_fence};

use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use testguest::disk::SECTOR_SIZE;
use testguest::diskbench::{self, BenchOp, DEPTH as BENCH_DEPTH, REQUEST_BYTES};
use testguest::virtio::{
    DESC_F_NEXT, DESC_F_WRITE, INTERRUPT_CONFIG_CHANGE, INTERRUPT_USED_BUFFER, MAGIC, MmioDevice,
    QueueLayout, USED_F_NO_NOTIFY, VERSION, feature, need_event, negotiate, queue_size, reg,
    status,
};

/// A full memory barrier: stores before it are visible to the device
/// before loads after it are made. A locked exchange rather than `mfence`,
/// which the instruction emulator does not run.
fn full_fence() {
    static FENCE: AtomicU32 = AtomicU32::new(0);
    FENCE.swap(0, Ordering::SeqCst);
}

/// Page size; queues and request areas take whole pages.
pub const PAGE: u64 = 4096;

/// A bump allocator over the device memory area (RAM above the image).
pub struct DeviceMemory {
    next: u64,
    end: u64,
}

impl DeviceMemory {
    /// # Safety
    /// `[base, base + size)` is RAM used by nothing else, identity mapped.
    pub unsafe fn new(base: u64, size: u64) -> Self {
        Self {
            next: base,
            end: base + size,
        }
    }

    /// `bytes` of memory at a page boundary, zeroed; `None` if the area is
    /// exhausted.
    pub fn alloc(&mut self, bytes: u64) -> Option<u64> {
        let start = self.next.next_multiple_of(PAGE);
        let end = start.checked_add(bytes)?;
        if end > self.end {
            return None;
        }
        self.next = end;
        // SAFETY: inside the area this allocator owns (see new); each range
        // is handed out once.
        unsafe { core::ptr::write_bytes(start as *mut u8, 0, bytes as usize) };
        Some(start)
    }
}

/// The register window of one device.
#[derive(Clone, Copy)]
pub struct Mmio {
    base: usize,
}

impl Mmio {
    /// # Safety
    /// `base` is the identity-mapped address of a virtio-mmio register
    /// window that only this driver uses.
    pub unsafe fn new(base: u64) -> Self {
        Self {
            base: base as usize,
        }
    }

    pub fn read(&self, offset: usize) -> u32 {
        // SAFETY: an aligned register of the window (see new).
        unsafe { read_volatile((self.base + offset) as *const u32) }
    }

    pub fn write(&self, offset: usize, value: u32) {
        // SAFETY: an aligned register of the window (see new).
        unsafe { write_volatile((self.base + offset) as *mut u32, value) }
    }

    /// Byte `offset` of the device configuration space.
    pub fn config_u8(&self, offset: usize) -> u8 {
        // SAFETY: the configuration space follows the registers.
        unsafe { read_volatile((self.base + reg::CONFIG + offset) as *const u8) }
    }

    /// A u64 of the configuration space, read as two u32 halves until the
    /// configuration generation is stable.
    pub fn config_u64(&self, offset: usize) -> u64 {
        let mut value = 0;
        for _ in 0..16 {
            let generation = self.read(reg::CONFIG_GENERATION);
            let low = self.read(reg::CONFIG + offset);
            let high = self.read(reg::CONFIG + offset + 4);
            value = u64::from(low) | (u64::from(high) << 32);
            if self.read(reg::CONFIG_GENERATION) == generation {
                break;
            }
        }
        value
    }

    pub fn device_id(&self) -> u32 {
        self.read(reg::DEVICE_ID)
    }

    /// Checks the magic and version and resets the device. Returns why not
    /// if it is not a version 2 virtio-mmio device.
    pub fn probe(&self) -> Result<(), &'static str> {
        if self.read(reg::MAGIC_VALUE) != MAGIC {
            return Err("no virtio device (bad magic)");
        }
        if self.read(reg::VERSION) != VERSION {
            return Err("not virtio-mmio version 2");
        }
        self.write(reg::STATUS, 0);
        Ok(())
    }

    /// The device-independent part of initialization up to FEATURES_OK.
    /// Returns the accepted features.
    pub fn negotiate(&self, required: u64, optional: u64) -> Result<u64, &'static str> {
        self.write(reg::STATUS, status::ACKNOWLEDGE);
        self.write(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        self.write(reg::DEVICE_FEATURES_SEL, 0);
        let low = self.read(reg::DEVICE_FEATURES);
        self.write(reg::DEVICE_FEATURES_SEL, 1);
        let high = self.read(reg::DEVICE_FEATURES);
        let offered = u64::from(low) | (u64::from(high) << 32);
        let Some(accepted) = negotiate(offered, required, optional) else {
            self.fail();
            return Err("required features not offered");
        };
        self.write(reg::DRIVER_FEATURES_SEL, 0);
        self.write(reg::DRIVER_FEATURES, accepted as u32);
        self.write(reg::DRIVER_FEATURES_SEL, 1);
        self.write(reg::DRIVER_FEATURES, (accepted >> 32) as u32);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        self.write(reg::STATUS, s);
        if self.read(reg::STATUS) & status::FEATURES_OK == 0 {
            self.fail();
            return Err("device refused the features");
        }
        Ok(accepted)
    }

    /// Ends initialization: the device may be used.
    pub fn driver_ok(&self) {
        self.write(
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
    }

    pub fn fail(&self) {
        self.write(reg::STATUS, status::FAILED);
    }

    /// Acknowledges the interrupt (both causes: the guest polls its queues
    /// after this and has no use for configuration changes). Writing without
    /// reading InterruptStatus first saves an exit to the VMM.
    pub fn ack_interrupt(&self) {
        self.write(
            reg::INTERRUPT_ACK,
            INTERRUPT_USED_BUFFER | INTERRUPT_CONFIG_CHANGE,
        );
    }
}

/// A split virtqueue in device memory.
pub struct Queue {
    mmio: Mmio,
    index: u32,
    base: u64,
    layout: QueueLayout,
    /// Next free-running available index to publish.
    avail_idx: u16,
    /// The available index when the driver last decided whether to
    /// notify.
    kicked_idx: u16,
    /// Used entries consumed so far (free-running).
    last_used: u16,
    /// VIRTIO_RING_F_EVENT_IDX was negotiated.
    event_idx: bool,
}

impl Queue {
    /// Sets up queue `index` with up to `want` entries in memory from
    /// `mem`.
    pub fn new(
        mmio: Mmio,
        index: u32,
        want: u16,
        mem: &mut DeviceMemory,
    ) -> Result<Self, &'static str> {
        mmio.write(reg::QUEUE_SEL, index);
        if mmio.read(reg::QUEUE_READY) != 0 {
            return Err("queue already in use");
        }
        let size = queue_size(mmio.read(reg::QUEUE_NUM_MAX), want).ok_or("queue unavailable")?;
        let layout = QueueLayout::new(size);
        let base = mem
            .alloc(layout.bytes as u64)
            .ok_or("out of device memory")?;
        mmio.write(reg::QUEUE_NUM, u32::from(size));
        for (low, high, addr) in [
            (
                reg::QUEUE_DESC_LOW,
                reg::QUEUE_DESC_HIGH,
                base + layout.desc as u64,
            ),
            (
                reg::QUEUE_DRIVER_LOW,
                reg::QUEUE_DRIVER_HIGH,
                base + layout.avail as u64,
            ),
            (
                reg::QUEUE_DEVICE_LOW,
                reg::QUEUE_DEVICE_HIGH,
                base + layout.used as u64,
            ),
        ] {
            mmio.write(low, addr as u32);
            mmio.write(high, (addr >> 32) as u32);
        }
        mmio.write(reg::QUEUE_READY, 1);
        Ok(Self {
            mmio,
            index,
            base,
            layout,
            avail_idx: 0,
            kicked_idx: 0,
            last_used: 0,
            event_idx: false,
        })
    }

    pub fn size(&self) -> u16 {
        self.layout.size
    }

    /// Fills descriptor `i`.
    pub fn set_desc(&mut self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = self.base + self.layout.desc as u64 + 16 * u64::from(i % self.layout.size);
        // SAFETY: descriptor i of this queue's table, in memory this queue
        // owns; the device reads it only after it is made available.
        unsafe {
            write_volatile(at as *mut u64, addr);
            write_volatile((at + 8) as *mut u32, len);
            write_volatile((at + 12) as *mut u16, flags);
            write_volatile((at + 14) as *mut u16, next);
        }
    }

    /// Makes the chain starting at descriptor `head` available (after
    /// [`Self::publish`]).
    pub fn push_avail(&mut self, head: u16) {
        let at = self.base + self.layout.avail_entry(self.avail_idx) as u64;
        // SAFETY: an available-ring slot of this queue that the device does
        // not read until the index below covers it.
        unsafe { write_volatile(at as *mut u16, head) };
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Publishes the entries pushed so far to the device.
    pub fn publish(&mut self) {
        compiler_fence(Ordering::SeqCst);
        let at = self.base + self.layout.avail as u64 + 2;
        // SAFETY: avail.idx of this queue.
        unsafe { write_volatile(at as *mut u16, self.avail_idx) };
        compiler_fence(Ordering::SeqCst);
    }

    /// Tells the device there are new available entries.
    pub fn notify(&self) {
        self.mmio.write(reg::QUEUE_NOTIFY, self.index);
    }

    /// Tells the device about the entries published since the last call,
    /// unless it said it does not need to hear of them (its `avail_event`
    /// with VIRTIO_RING_F_EVENT_IDX, else `VRING_USED_F_NO_NOTIFY`).
    pub fn kick(&mut self) {
        let (old, new) = (self.kicked_idx, self.avail_idx);
        self.kicked_idx = new;
        // The published index must reach the device before its answer is
        // read: a device that finished just now reads the new index or
        // wrote an event this read sees.
        full_fence();
        let wanted = if self.event_idx {
            need_event(self.read_u16(self.layout.avail_event()), new, old)
        } else {
            self.read_u16(self.layout.used) & USED_F_NO_NOTIFY == 0
        };
        if wanted {
            self.notify();
        }
    }

    /// Asks for an interrupt once the device has used entry `idx` (a
    /// free-running index; with VIRTIO_RING_F_EVENT_IDX only). The caller
    /// fences before it looks at the used ring again.
    fn set_used_event(&mut self, idx: u16) {
        let at = self.base + self.layout.used_event() as u64;
        // SAFETY: used_event of this queue, written only by the driver.
        unsafe { write_volatile(at as *mut u16, idx) };
    }

    /// A u16 of the queue's memory at `offset` (an index or flags the
    /// device writes).
    fn read_u16(&self, offset: usize) -> u16 {
        let at = self.base + offset as u64;
        // SAFETY: inside this queue's memory (offsets from its layout).
        unsafe { read_volatile(at as *const u16) }
    }

    /// Whether the device has returned buffers not yet taken.
    pub fn has_used(&self) -> bool {
        self.used_idx() != self.last_used
    }

    fn used_idx(&self) -> u16 {
        self.read_u16(self.layout.used + 2)
    }

    /// The next buffer the device returned: (descriptor head, bytes
    /// written).
    pub fn pop_used(&mut self) -> Option<(u16, u32)> {
        if self.used_idx() == self.last_used {
            return None;
        }
        compiler_fence(Ordering::SeqCst);
        let at = self.base + self.layout.used_entry(self.last_used) as u64;
        // SAFETY: a used-ring entry the device published (covered by
        // used.idx, read before).
        let (id, len) = unsafe {
            (
                read_volatile(at as *const u32),
                read_volatile((at + 4) as *const u32),
            )
        };
        self.last_used = self.last_used.wrapping_add(1);
        Some(((id % u32::from(self.layout.size)) as u16, len))
    }
}

/// Receive and transmit entries the network driver uses (each with one
/// buffer of [`NET_BUFFER`] bytes).
pub const NET_QUEUE: u16 = 64;
/// virtio_net_hdr_v1 (no offloads, no merged buffers).
pub const NET_HDR: usize = 12;
/// Header plus a full Ethernet frame (1514 bytes), rounded up.
pub const NET_BUFFER: usize = 1536;
/// Largest Ethernet frame without FCS.
pub const ETHERNET_MTU: usize = 1514;

/// Device memory one network device needs.
pub const NET_MEMORY: u64 = 2 * PAGE + 2 * (NET_QUEUE as u64) * NET_BUFFER as u64;

/// The receive side: every descriptor owns one buffer and is always either
/// with the device or being processed.
pub struct NetRxSide {
    queue: Queue,
    buffers: u64,
    kick: bool,
    frames: u64,
}

/// The transmit side: descriptor i owns buffer i; free ones are stacked.
pub struct NetTxSide {
    queue: Queue,
    buffers: u64,
    free: [u16; NET_QUEUE as usize],
    nfree: usize,
    kick: bool,
    frames: u64,
    /// The stack wanted to send while every buffer was in use: it holds
    /// frames back until one is free.
    starved: bool,
}

impl NetTxSide {
    /// Takes back the buffers the device has sent.
    fn reclaim(&mut self) {
        for _ in 0..self.queue.size() {
            let Some((id, _)) = self.queue.pop_used() else {
                break;
            };
            if self.nfree < self.free.len() {
                self.free[self.nfree] = id;
                self.nfree += 1;
            }
        }
    }
}

/// A virtio network device.
pub struct VirtioNet {
    mmio: Mmio,
    mac: [u8; 6],
    rx: NetRxSide,
    tx: NetTxSide,
    /// VIRTIO_RING_F_EVENT_IDX was negotiated.
    event_idx: bool,
}

/// With VIRTIO_RING_F_EVENT_IDX, how far ahead of the transmit queue's
/// consumed entries `used_event` is put while no transmit completion is
/// awaited: half the index space, which the device does not reach before
/// the driver moves it again (each time it is about to halt).
const NO_EVENT_DISTANCE: u16 = 0x8000;

impl VirtioNet {
    /// Initializes the device at `mmio` (already probed, device ID 1).
    pub fn new(mmio: Mmio, mem: &mut DeviceMemory) -> Result<Self, &'static str> {
        let features = mmio.negotiate(
            feature::VERSION_1 | feature::NET_MAC,
            feature::RING_EVENT_IDX,
        )?;
        let event_idx = features & feature::RING_EVENT_IDX != 0;
        let mut rx_queue = Queue::new(mmio, 0, NET_QUEUE, mem)?;
        let mut tx_queue = Queue::new(mmio, 1, NET_QUEUE, mem)?;
        rx_queue.event_idx = event_idx;
        tx_queue.event_idx = event_idx;
        let rx_buffers = mem
            .alloc(u64::from(rx_queue.size()) * NET_BUFFER as u64)
            .ok_or("out of device memory")?;
        let tx_buffers = mem
            .alloc(u64::from(tx_queue.size()) * NET_BUFFER as u64)
            .ok_or("out of device memory")?;
        let mut mac = [0u8; 6];
        for (i, byte) in mac.iter_mut().enumerate() {
            *byte = mmio.config_u8(i);
        }
        let mut rx = NetRxSide {
            queue: rx_queue,
            buffers: rx_buffers,
            kick: false,
            frames: 0,
        };
        for i in 0..rx.queue.size() {
            let addr = rx.buffers + u64::from(i) * NET_BUFFER as u64;
            rx.queue
                .set_desc(i, addr, NET_BUFFER as u32, DESC_F_WRITE, 0);
            rx.queue.push_avail(i);
        }
        rx.queue.publish();
        let mut tx = NetTxSide {
            queue: tx_queue,
            buffers: tx_buffers,
            free: [0; NET_QUEUE as usize],
            nfree: 0,
            kick: false,
            frames: 0,
            starved: false,
        };
        for i in (0..tx.queue.size()).rev() {
            tx.free[tx.nfree] = i;
            tx.nfree += 1;
        }
        mmio.driver_ok();
        rx.queue.notify();
        rx.queue.kicked_idx = rx.queue.avail_idx;
        Ok(Self {
            mmio,
            mac,
            rx,
            tx,
            event_idx,
        })
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Frames received and sent so far.
    pub fn frames(&self) -> (u64, u64) {
        (self.rx.frames, self.tx.frames)
    }

    pub fn ack_interrupt(&self) {
        self.mmio.ack_interrupt()
    }

    /// Whether there is work now: a received frame that could be
    /// processed (a transmit buffer is free for a reply), or frames the
    /// stack held back that a freed transmit buffer can take. Called
    /// before halting; with VIRTIO_RING_F_EVENT_IDX it first asks for the
    /// interrupts the guest needs while it halts: for the next received
    /// frame, and for the next transmit completion if all transmit
    /// buffers are in use (no others).
    pub fn can_receive(&mut self) -> bool {
        self.tx.reclaim();
        if self.event_idx {
            let rx_event = self.rx.queue.last_used;
            self.rx.queue.set_used_event(rx_event);
            let tx_used = self.tx.queue.last_used;
            let tx_event = if self.tx.nfree == 0 {
                tx_used
            } else {
                tx_used.wrapping_add(NO_EVENT_DISTANCE)
            };
            self.tx.queue.set_used_event(tx_event);
            // The events must reach the device before the rings are read
            // again: what it used before them is seen below, what it uses
            // after them interrupts.
            full_fence();
            self.tx.reclaim();
        }
        if self.tx.starved && self.tx.nfree > 0 {
            return true;
        }
        self.tx.nfree > 0 && self.rx.queue.has_used()
    }

    /// Whether the stack held frames back for want of a transmit buffer
    /// and one is free now (it should be polled to send them). Clears
    /// the condition.
    pub fn tx_unblocked(&mut self) -> bool {
        if !self.tx.starved {
            return false;
        }
        self.tx.reclaim();
        if self.tx.nfree == 0 {
            return false;
        }
        self.tx.starved = false;
        true
    }

    /// Notifies the device of buffers given back or frames queued (as far
    /// as it asked to hear of them).
    pub fn flush(&mut self) {
        if self.rx.kick {
            self.rx.kick = false;
            self.rx.queue.kick();
        }
        if self.tx.kick {
            self.tx.kick = false;
            self.tx.queue.kick();
        }
    }
}

pub struct NetRx<'a> {
    rx: &'a mut NetRxSide,
    id: u16,
    len: usize,
}

pub struct NetTx<'a> {
    tx: &'a mut NetTxSide,
}

impl phy::RxToken for NetRx<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let addr = self.rx.buffers + u64::from(self.id) * NET_BUFFER as u64;
        let len = self.len.clamp(NET_HDR, NET_BUFFER);
        // SAFETY: buffer `id` of the receive side, returned by the device
        // (it no longer writes it) and holding `len` <= NET_BUFFER bytes.
        let frame = unsafe {
            core::slice::from_raw_parts((addr as usize + NET_HDR) as *const u8, len - NET_HDR)
        };
        let r = f(frame);
        self.rx.frames += 1;
        self.rx.queue.push_avail(self.id);
        self.rx.queue.publish();
        self.rx.kick = true;
        r
    }
}

impl phy::TxToken for NetTx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let tx = self.tx;
        // Tokens are only handed out with a free buffer (see transmit and
        // receive), and nothing takes one in between.
        tx.nfree -= 1;
        let id = tx.free[tx.nfree];
        let addr = tx.buffers + u64::from(id) * NET_BUFFER as u64;
        let len = len.min(NET_BUFFER - NET_HDR);
        // SAFETY: buffer `id` is free (not with the device) and NET_BUFFER
        // bytes long.
        let buffer =
            unsafe { core::slice::from_raw_parts_mut(addr as usize as *mut u8, NET_HDR + len) };
        buffer[..NET_HDR].fill(0);
        let r = f(&mut buffer[NET_HDR..]);
        tx.queue.set_desc(id, addr, (NET_HDR + len) as u32, 0, 0);
        tx.queue.push_avail(id);
        tx.queue.publish();
        tx.kick = true;
        tx.frames += 1;
        r
    }
}

impl phy::Device for VirtioNet {
    type RxToken<'a> = NetRx<'a>;
    type TxToken<'a> = NetTx<'a>;

    fn receive(&mut self, _: Instant) -> Option<(NetRx<'_>, NetTx<'_>)> {
        self.tx.reclaim();
        if self.tx.nfree == 0 {
            return None;
        }
        let (id, len) = self.rx.queue.pop_used()?;
        Some((
            NetRx {
                rx: &mut self.rx,
                id,
                len: len as usize,
            },
            NetTx { tx: &mut self.tx },
        ))
    }

    fn transmit(&mut self, _: Instant) -> Option<NetTx<'_>> {
        self.tx.reclaim();
        if self.tx.nfree == 0 {
            self.tx.starved = true;
            return None;
        }
        Some(NetTx { tx: &mut self.tx })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = ETHERNET_MTU;
        caps
    }
}

/// Block request types.
const BLK_T_IN: u32 = 0;
const BLK_T_OUT: u32 = 1;
const BLK_T_FLUSH: u32 = 4;
const BLK_T_GET_ID: u32 = 8;
/// Bytes of the device ID string.
pub const BLK_ID_BYTES: usize = 20;

/// Device memory one block device needs: its queue and a request page
/// (header at 0, status at 16, data at 512).
pub const BLK_MEMORY: u64 = 2 * PAGE;
const REQ_STATUS: u64 = 16;
const REQ_DATA: u64 = 512;
/// Entries of a block device's queue: three descriptors (header, data,
/// status) for each benchmark request in flight.
const BLK_QUEUE: u16 = 32;
const _: () = assert!(3 * BENCH_DEPTH <= BLK_QUEUE as usize);
/// Device memory of the disk benchmark (first disk only): a page of
/// request headers (request `s` at `32 * s`, its status byte at
/// `32 * s + 16`) and one data page per request in flight.
pub const BLK_BENCH_MEMORY: u64 = (1 + BENCH_DEPTH as u64) * PAGE;
const BENCH_SLOT_BYTES: u64 = 32;

/// A virtio block device: one request at a time (the record workload,
/// GET_ID), or up to [`BENCH_DEPTH`] benchmark requests in slots.
pub struct VirtioBlk {
    mmio: Mmio,
    queue: Queue,
    request: u64,
    /// Base of the benchmark memory, once the benchmark is enabled.
    bench: Option<u64>,
    pub capacity: u64,
    pub read_only: bool,
    pub flush: bool,
    busy: bool,
}

/// A block request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlkRequest {
    Read(u64),
    Write(u64),
    Flush,
    GetId,
}

impl VirtioBlk {
    /// Initializes the device at `mmio` (already probed, device ID 2).
    pub fn new(mmio: Mmio, mem: &mut DeviceMemory) -> Result<Self, &'static str> {
        let features = mmio.negotiate(
            feature::VERSION_1,
            feature::BLK_RO | feature::BLK_FLUSH | feature::BLK_SEG_MAX,
        )?;
        let queue = Queue::new(mmio, 0, BLK_QUEUE, mem)?;
        let request = mem.alloc(PAGE).ok_or("out of device memory")?;
        let capacity = mmio.config_u64(0);
        mmio.driver_ok();
        Ok(Self {
            mmio,
            queue,
            request,
            bench: None,
            capacity,
            read_only: features & feature::BLK_RO != 0,
            flush: features & feature::BLK_FLUSH != 0,
            busy: false,
        })
    }

    pub fn ack_interrupt(&self) {
        self.mmio.ack_interrupt()
    }

    /// The data buffer of the request page (one sector).
    pub fn data(&mut self) -> &mut [u8; SECTOR_SIZE] {
        // SAFETY: the request page belongs to this driver; the device only
        // accesses it while a request is in flight, and callers use the
        // buffer only before submitting or after completion.
        unsafe { &mut *((self.request + REQ_DATA) as *mut [u8; SECTOR_SIZE]) }
    }

    /// Makes the chain header → data → status available at descriptor
    /// `first` (three descriptors; two without data).
    fn push_request(
        &mut self,
        first: u16,
        header: u64,
        data: Option<(u64, u32, bool)>,
        status: u64,
    ) {
        self.queue
            .set_desc(first, header, 16, DESC_F_NEXT, first + 1);
        let status_desc = match data {
            Some((addr, len, device_writes)) => {
                let flags = DESC_F_NEXT | if device_writes { DESC_F_WRITE } else { 0 };
                self.queue.set_desc(first + 1, addr, len, flags, first + 2);
                first + 2
            }
            None => first + 1,
        };
        self.queue.set_desc(status_desc, status, 1, DESC_F_WRITE, 0);
        self.queue.push_avail(first);
        self.queue.publish();
    }

    /// Submits a request (the data buffer holds the sector for a write).
    /// Only one request may be in flight.
    pub fn submit(&mut self, request: BlkRequest) {
        let (kind, sector, data_len, device_writes) = match request {
            BlkRequest::Read(s) => (BLK_T_IN, s, SECTOR_SIZE as u32, true),
            BlkRequest::Write(s) => (BLK_T_OUT, s, SECTOR_SIZE as u32, false),
            BlkRequest::Flush => (BLK_T_FLUSH, 0, 0, false),
            BlkRequest::GetId => (BLK_T_GET_ID, 0, BLK_ID_BYTES as u32, true),
        };
        let header = self.request;
        // SAFETY: the request page belongs to this driver and no request is
        // in flight.
        unsafe { write_header(header, kind, sector) };
        let data = (data_len > 0).then_some((header + REQ_DATA, data_len, device_writes));
        self.push_request(0, header, data, header + REQ_STATUS);
        self.busy = true;
        self.queue.notify();
    }

    /// The status of the request in flight once it is done.
    pub fn poll(&mut self) -> Option<u8> {
        if !self.busy {
            return None;
        }
        self.queue.pop_used()?;
        self.busy = false;
        compiler_fence(Ordering::SeqCst);
        // SAFETY: the status byte of the request page, written by the
        // device before it returned the request.
        Some(unsafe { read_volatile((self.request + REQ_STATUS) as *const u8) })
    }

    /// Sets up the benchmark's memory and fills its data pages with
    /// [`diskbench::bench_page`]. No single request may be in flight.
    pub fn enable_bench(&mut self, mem: &mut DeviceMemory) -> Result<(), &'static str> {
        let base = mem.alloc(BLK_BENCH_MEMORY).ok_or("out of device memory")?;
        self.bench = Some(base);
        for slot in 0..BENCH_DEPTH {
            let page = self.bench_page(slot);
            // SAFETY: a data page of the benchmark memory just allocated,
            // REQUEST_BYTES long, not with the device.
            let page =
                unsafe { core::slice::from_raw_parts_mut(page as *mut u8, REQUEST_BYTES as usize) };
            diskbench::bench_page(page);
        }
        Ok(())
    }

    fn bench_page(&self, slot: usize) -> u64 {
        self.bench.unwrap_or(0) + PAGE * (1 + slot as u64)
    }

    fn bench_header(&self, slot: usize) -> u64 {
        self.bench.unwrap_or(0) + BENCH_SLOT_BYTES * slot as u64
    }

    /// Queues benchmark request `op` in slot `slot` (< [`BENCH_DEPTH`],
    /// not in use), stamping a write's page with its request number. The
    /// device learns of it at the next [`Self::kick`].
    pub fn submit_bench(&mut self, slot: usize, op: BenchOp) {
        if self.bench.is_none() || slot >= BENCH_DEPTH {
            return;
        }
        let header = self.bench_header(slot);
        let page = self.bench_page(slot);
        let (kind, data) = match op {
            BenchOp::Write(k) => {
                // SAFETY: the slot's data page, not with the device (the
                // slot is free).
                unsafe { write_volatile(page as *mut u64, k) };
                (BLK_T_OUT, Some((page, REQUEST_BYTES as u32, false)))
            }
            BenchOp::Read(_) => (BLK_T_IN, Some((page, REQUEST_BYTES as u32, true))),
            BenchOp::Flush => (BLK_T_FLUSH, None),
        };
        // SAFETY: the slot's header in the benchmark memory; the slot is
        // free, so the device does not use it.
        unsafe { write_header(header, kind, op.sector()) };
        self.push_request(3 * slot as u16, header, data, header + REQ_STATUS);
    }

    /// Tells the device about the requests queued.
    pub fn kick(&self) {
        self.queue.notify();
    }

    /// A finished benchmark request: its slot, its status and the first 8
    /// bytes of its data page (little-endian).
    pub fn pop_bench(&mut self) -> Option<(usize, u8, u64)> {
        let (head, _) = self.queue.pop_used()?;
        let slot = usize::from(head / 3);
        if self.bench.is_none() || slot >= BENCH_DEPTH {
            return Some((BENCH_DEPTH, 0xff, 0));
        }
        compiler_fence(Ordering::SeqCst);
        // SAFETY: the slot's status byte and data page, written by the
        // device before it returned the request.
        unsafe {
            let status = read_volatile((self.bench_header(slot) + REQ_STATUS) as *const u8);
            let stamp = read_volatile(self.bench_page(slot) as *const u64);
            Some((slot, status, stamp))
        }
    }
}

/// Writes a request header (type, reserved, sector) and a status byte of
/// 0xff at `header + 16`.
///
/// # Safety
/// `header` is 17 bytes of driver memory the device does not use now.
unsafe fn write_header(header: u64, kind: u32, sector: u64) {
    // SAFETY: see the function's contract.
    unsafe {
        write_volatile(header as *mut u32, kind);
        write_volatile((header + 4) as *mut u32, 0);
        write_volatile((header + 8) as *mut u64, sector);
        write_volatile((header + REQ_STATUS) as *mut u8, 0xff);
    }
}

/// Checks the window of `device` and returns its registers.
pub fn open(device: &MmioDevice) -> Result<Mmio, &'static str> {
    // The first 4 GiB are identity mapped; higher windows are refused.
    if device.base.saturating_add(device.size) > 1 << 32 {
        return Err("window above 4 GiB");
    }
    // SAFETY: the command line names this window as a virtio-mmio device,
    // and it is identity mapped (checked above).
    let mmio = unsafe { Mmio::new(device.base) };
    mmio.probe()?;
    Ok(mmio)
}
