//! virtio-net: a network card whose frames go to and come from a
//! [`NetBackend`].
//!
//! Queue 0 receives (device to guest), queue 1 transmits; 256 entries each.
//! Features: VIRTIO_F_VERSION_1, VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS. No
//! offloads and no mergeable receive buffers, so every buffer starts with a
//! 12-byte `virtio_net_hdr_v1` that twinvm writes as zeros (with
//! `num_buffers` 1) on receive and skips on transmit: back ends see plain
//! Ethernet frames.

use std::io::ErrorKind;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestAddress;

use super::queue::{self, Chain};
use super::worker::{QueueHandler, Worker};
use super::{
    ActivateError, Activation, Backend, DeviceSpecific, F_EVENT_IDX, F_VERSION_1, TYPE_NET,
    VirtioDevice, WarnLimit,
};
use crate::NetConfig;
use crate::memory::GuestMemoryMmap;

/// Entries of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// The receive queue.
pub const RX_QUEUE: usize = 0;
/// The transmit queue.
pub const TX_QUEUE: usize = 1;
/// Size of `virtio_net_hdr_v1`, which precedes every frame in both
/// directions.
pub const HDR_LEN: usize = 12;
/// Largest Ethernet frame (without the virtio header) either direction
/// carries: 64 KiB of payload plus the Ethernet header and a VLAN tag.
pub const MAX_FRAME_LEN: usize = 65_536 + 18;
/// Offset of `num_buffers` in the header.
const NUM_BUFFERS_OFFSET: usize = 10;
/// Transmit batches after which the device reads the back end without
/// waiting for its fd (see [`NetHandler::after_send`]) is not tried again
/// once such a read found nothing.
const ANSWER_BACKOFF: u32 = 16;

/// Where a network card's frames go and come from: a host tap device, or
/// the replication proxy that decides when the guest's frames leave and
/// which frames the guest receives.
///
/// Frames are whole Ethernet frames without any virtio header. Calls come
/// from the device's worker thread and must not block.
pub trait NetBackend: Send {
    /// Takes a frame the guest sent. The back end owns it from now on: it
    /// may send it at once, hold it, or drop it. `WouldBlock` (or any other
    /// error) drops the frame, as a congested link would.
    fn send(&mut self, frame: &[u8]) -> std::io::Result<()>;
    /// Gives the next frame for the guest into `buf` (at least
    /// [`MAX_FRAME_LEN`] bytes) and returns its length; `WouldBlock` when
    /// there is none.
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize>;
    /// An fd that becomes readable when frames are waiting. The device
    /// polls it edge-triggered: it calls [`Self::recv`] until `WouldBlock`,
    /// so the fd must signal again for frames that arrive after that.
    fn ready_fd(&self) -> BorrowedFd<'_>;
}

/// The MAC address twinvm gives network device `index` when none is
/// configured: locally administered, 52:54:00:12:34:56 and up.
pub fn default_mac(index: usize) -> [u8; 6] {
    let n = 0x12_3456 + index as u32;
    [0x52, 0x54, 0x00, (n >> 16) as u8, (n >> 8) as u8, n as u8]
}

fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A virtio-net device.
pub struct Net {
    name: String,
    mac: [u8; 6],
    backend: Option<Box<dyn NetBackend>>,
    /// A frame taken from the back end but not yet delivered, kept across
    /// a pause.
    pending: Option<Vec<u8>>,
    worker: Option<Worker<NetHandler>>,
}

impl Net {
    /// A device named `name` (for messages) with address `mac`, on
    /// `backend`.
    pub fn new(name: String, mac: [u8; 6], backend: Box<dyn NetBackend>) -> Self {
        Net {
            name,
            mac,
            backend: Some(backend),
            pending: None,
            worker: None,
        }
    }

    /// Network device `index` as configured: its tap opened, its MAC
    /// checked or chosen.
    pub fn with_tap(index: usize, config: &NetConfig) -> Result<Self, super::Error> {
        let mut net = Net::detached(index, config)?;
        let tap = super::Tap::open(&config.tap)?;
        net.backend = Some(Box::new(tap));
        Ok(net)
    }

    /// Network device `index` as configured, without its back end: its
    /// MAC checked or chosen, its tap's name checked but the tap not
    /// opened ([`VirtioDevice::set_backend`] gives it one later).
    pub fn detached(index: usize, config: &NetConfig) -> Result<Self, super::Error> {
        let mac = config.mac.unwrap_or_else(|| default_mac(index));
        let bad_mac = |why| super::Error::Mac {
            tap: config.tap.clone(),
            mac: format_mac(&mac),
            why,
        };
        if mac[0] & 1 != 0 {
            return Err(bad_mac("it is a multicast address"));
        }
        if mac == [0; 6] {
            return Err(bad_mac("it is all zeros"));
        }
        super::tap::check_name(&config.tap)?;
        Ok(Net {
            name: format!("net{index} (tap {})", config.tap),
            mac,
            backend: None,
            pending: None,
            worker: None,
        })
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn avail_features(&self) -> u64 {
        F_VERSION_1 | F_EVENT_IDX | 1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_STATUS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    /// `virtio_net_config`: mac[6], status (LINK_UP), max_virtqueue_pairs
    /// (1).
    fn config_space(&self) -> Vec<u8> {
        let mut c = self.mac.to_vec();
        c.extend_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        c.extend_from_slice(&1u16.to_le_bytes());
        c
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        let backend = self.backend.take().ok_or(ActivateError::BackendLost)?;
        let mut queues = a.queues.into_iter();
        let (Some(rx), Some(tx)) = (queues.next(), queues.next()) else {
            self.backend = Some(backend);
            return Err(ActivateError::InvalidQueue {
                index: 1,
                why: "missing".into(),
            });
        };
        let mut handler = NetHandler::new(self.name.clone(), a.mem, rx, tx, backend);
        if let Some(frame) = self.pending.take() {
            handler.frame[..frame.len()].copy_from_slice(&frame);
            handler.pending = Some(frame.len());
        }
        let thread = format!("virtio-{}", self.name.split(' ').next().unwrap_or("net"));
        match Worker::spawn(thread, handler, a.queue_evts, a.interrupt) {
            Ok(worker) => {
                self.worker = Some(worker);
                Ok(())
            }
            Err((e, handler)) => {
                let _ = self.take_back(handler);
                Err(e)
            }
        }
    }

    fn deactivate(&mut self) -> Option<Vec<Queue>> {
        let handler = self.worker.take()?.stop()?;
        Some(self.take_back(handler))
    }

    fn reset(&mut self) {
        self.pending = None;
    }

    fn device_state(&self) -> DeviceSpecific {
        DeviceSpecific::Net {
            pending_rx: self.pending.clone(),
        }
    }

    fn check_device_state(&self, state: &DeviceSpecific) -> Result<(), String> {
        match state {
            DeviceSpecific::Net { pending_rx: None } => Ok(()),
            DeviceSpecific::Net {
                pending_rx: Some(frame),
            } if !frame.is_empty() && frame.len() <= MAX_FRAME_LEN => Ok(()),
            DeviceSpecific::Net {
                pending_rx: Some(frame),
            } => Err(format!(
                "its saved pending frame has {} bytes (1 to {MAX_FRAME_LEN} allowed)",
                frame.len()
            )),
            other => Err(format!(
                "its saved state is not a network device's ({other:?})"
            )),
        }
    }

    fn load_device_state(&mut self, state: &DeviceSpecific) {
        if let DeviceSpecific::Net { pending_rx } = state {
            self.pending.clone_from(pending_rx);
        }
    }

    fn has_backend(&self) -> bool {
        self.backend.is_some() || self.worker.is_some()
    }

    fn take_backend(&mut self) -> Option<Backend> {
        if self.worker.is_some() {
            return None;
        }
        self.backend.take().map(Backend::Net)
    }

    fn set_backend(&mut self, backend: Backend) -> Result<(), String> {
        if self.worker.is_some() {
            return Err("the device is running".into());
        }
        if self.backend.is_some() {
            return Err("the device already has its back end".into());
        }
        match backend {
            Backend::Net(b) => {
                self.backend = Some(b);
                Ok(())
            }
            other => Err(format!(
                "a network device takes a network back end, not a {}",
                other.kind()
            )),
        }
    }
}

impl Net {
    /// Takes the back end and any waiting frame back from a stopped
    /// worker's handler; returns its queues.
    fn take_back(&mut self, handler: NetHandler) -> Vec<Queue> {
        self.pending = handler.pending.map(|n| handler.frame[..n].to_vec());
        self.backend = Some(handler.backend);
        vec![handler.rx, handler.tx]
    }
}

/// What becomes of a received frame.
enum Delivery {
    /// Written into a receive buffer.
    Delivered,
    /// No receive buffer: the frame waits.
    NoBuffer,
    /// Dropped (too big for the buffer).
    Dropped,
}

/// The worker-side state of a network card: its queues and back end.
pub(crate) struct NetHandler {
    name: String,
    mem: GuestMemoryMmap,
    pub(crate) rx: Queue,
    pub(crate) tx: Queue,
    backend: Box<dyn NetBackend>,
    /// Receive buffer; a frame waiting for a guest buffer stays in it.
    frame: Vec<u8>,
    pending: Option<usize>,
    /// The driver was asked to notify the receive queue: the device holds
    /// a frame and has no buffer for it. Otherwise receive-queue
    /// notifications are off (new buffers are found when a frame comes).
    rx_notify: bool,
    /// The back end returned an error: its fd is not watched again until
    /// the worker restarts (a tap that was deleted stays readable).
    backend_failed: bool,
    /// Transmit batches to go before the device reads the back end right
    /// after sending again ([`Self::after_send`]).
    answer_skip: u32,
    tx_buf: Vec<u8>,
    /// The descriptor chain being processed (its buffers reused).
    chain: Chain,
    warn: WarnLimit,
    /// Chains the guest built wrongly, so far.
    pub(crate) malformed: u64,
    /// Frames dropped (back end refused, guest buffer too small).
    pub(crate) dropped: u64,
}

impl NetHandler {
    pub(crate) fn new(
        name: String,
        mem: GuestMemoryMmap,
        rx: Queue,
        tx: Queue,
        backend: Box<dyn NetBackend>,
    ) -> Self {
        NetHandler {
            name,
            mem,
            rx,
            tx,
            backend,
            frame: vec![0; MAX_FRAME_LEN],
            pending: None,
            rx_notify: false,
            backend_failed: false,
            answer_skip: 0,
            tx_buf: Vec::with_capacity(MAX_FRAME_LEN),
            chain: Chain::default(),
            warn: WarnLimit::new(),
            malformed: 0,
            dropped: 0,
        }
    }

    fn warn(&mut self, msg: std::fmt::Arguments<'_>) {
        self.warn.warn(&self.name, msg);
    }

    /// Sends every frame the guest queued for transmission, looking at the
    /// queue once more after asking for the next notification (so that a
    /// frame queued meanwhile needs no wakeup). Returns whether the guest
    /// must be interrupted.
    pub(crate) fn process_tx(&mut self) -> bool {
        let mut used = false;
        // No notifications while the queue is drained (without
        // VIRTIO_F_EVENT_IDX; with it, `avail_event` stays behind).
        let _ = self.tx.disable_notification(&self.mem);
        loop {
            let drained = self.drain_tx(&mut used);
            match self.tx.enable_notification(&self.mem) {
                Ok(true) if drained => continue,
                _ => break,
            }
        }
        used && queue::needs_interrupt(&mut self.tx, &self.mem)
    }

    /// Sends the frames available now. Returns false if the available ring
    /// is corrupt (processing stops until the next notification).
    fn drain_tx(&mut self, used: &mut bool) -> bool {
        loop {
            let head = match queue::pop_head(&mut self.tx, &self.mem) {
                Ok(Some(head)) => head,
                Ok(None) => return true,
                Err(e) => {
                    self.malformed += 1;
                    self.warn(format_args!("transmit queue: {e}"));
                    return false;
                }
            };
            self.transmit(head);
            if let Err(e) = self.tx.add_used(&self.mem, head, 0) {
                self.warn(format_args!(
                    "transmit queue: cannot return buffer {head}: {e}"
                ));
            }
            *used = true;
        }
    }

    /// Sends the frame in the chain at `head`, or drops it with a warning.
    fn transmit(&mut self, head: u16) {
        let mut chain = std::mem::take(&mut self.chain);
        self.transmit_chain(head, &mut chain);
        self.chain = chain;
    }

    /// [`Self::transmit`], reading the chain into `chain`.
    fn transmit_chain(&mut self, head: u16, chain: &mut Chain) {
        let max = (HDR_LEN + MAX_FRAME_LEN) as u64;
        if let Err(e) = queue::read_chain_into(
            chain,
            &self.mem,
            GuestAddress(self.tx.desc_table()),
            self.tx.size(),
            head,
            max,
        ) {
            self.malformed += 1;
            self.warn(format_args!("transmit buffer dropped: {e}"));
            return;
        }
        if !chain.writable.is_empty() {
            self.malformed += 1;
            self.warn(format_args!(
                "transmit buffer {head} dropped: it has device-writable descriptors"
            ));
            return;
        }
        let len = chain.readable_len() as usize;
        if len <= HDR_LEN {
            self.malformed += 1;
            self.warn(format_args!(
                "transmit buffer {head} dropped: {len} bytes hold no frame after the {HDR_LEN}-byte header"
            ));
            return;
        }
        self.tx_buf.resize(len - HDR_LEN, 0);
        if let Err(e) =
            queue::read_from(&self.mem, &chain.readable, HDR_LEN as u64, &mut self.tx_buf)
        {
            self.malformed += 1;
            self.warn(format_args!("transmit buffer {head} dropped: {e}"));
            return;
        }
        if let Err(e) = self.backend.send(&self.tx_buf) {
            self.dropped += 1;
            if e.kind() != ErrorKind::WouldBlock {
                self.warn(format_args!("frame dropped: the back end refused it: {e}"));
            }
        }
    }

    /// After the guest's frames went to the back end: a tap runs the
    /// host's network stack inside the write, which often answers at once
    /// (an acknowledgement, the next segment of a stream), so one read now
    /// finds that frame and saves the `epoll_wait` that would report it.
    /// A read that finds nothing stops this for [`ANSWER_BACKOFF`]
    /// transmit batches (a peer that answers later, such as a
    /// request/response client, costs one read in that many). Returns
    /// whether the guest must be interrupted.
    fn after_send(&mut self) -> bool {
        if self.pending.is_some() || self.backend_failed {
            return false;
        }
        if self.answer_skip > 0 {
            self.answer_skip -= 1;
            return false;
        }
        let mut used = false;
        if !self.receive_frame(&mut used) {
            self.answer_skip = ANSWER_BACKOFF;
        }
        used && queue::needs_interrupt(&mut self.rx, &self.mem)
    }

    /// Takes one frame from the back end (called when its fd is readable)
    /// and delivers it. Returns whether the guest must be interrupted.
    pub(crate) fn receive(&mut self) -> bool {
        let mut used = false;
        if self.pending.is_some() {
            return self.deliver_pending();
        }
        self.receive_frame(&mut used);
        used && queue::needs_interrupt(&mut self.rx, &self.mem)
    }

    /// Takes one frame from the back end into the next receive buffer (or
    /// holds it). Returns whether there was one.
    fn receive_frame(&mut self, used: &mut bool) -> bool {
        let len = loop {
            match self.backend.recv(&mut self.frame) {
                // Nothing to give after all.
                Ok(0) => return false,
                Ok(len) => break len.min(MAX_FRAME_LEN),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.backend_failed = true;
                    self.warn(format_args!(
                        "cannot receive from the back end, no more frames for the guest until the device restarts: {e}"
                    ));
                    return false;
                }
            }
        };
        self.place(len, used);
        true
    }

    /// Delivers the frame the device holds, if any (the guest gave receive
    /// buffers). Returns whether the guest must be interrupted.
    pub(crate) fn deliver_pending(&mut self) -> bool {
        let Some(len) = self.pending else {
            return false;
        };
        let mut used = false;
        self.place(len, &mut used);
        used && queue::needs_interrupt(&mut self.rx, &self.mem)
    }

    /// Moves frames from the back end into the guest's receive buffers
    /// until either runs out, as the worker does over several wakeups.
    /// Returns whether the guest must be interrupted.
    #[cfg(test)]
    pub(crate) fn process_rx(&mut self) -> bool {
        let mut used = false;
        if let Some(len) = self.pending {
            self.place(len, &mut used);
        }
        while self.pending.is_none() && !self.backend_failed && self.receive_frame(&mut used) {}
        used && queue::needs_interrupt(&mut self.rx, &self.mem)
    }

    /// Puts the `len`-byte frame in `self.frame` into the next receive
    /// buffer, or holds it (asking the driver for a notification) if there
    /// is none.
    fn place(&mut self, len: usize, used: &mut bool) {
        loop {
            match self.deliver(len, used) {
                Delivery::Delivered | Delivery::Dropped => {
                    self.pending = None;
                    if self.rx_notify {
                        self.rx_notify = false;
                        let _ = self.rx.disable_notification(&self.mem);
                    }
                    return;
                }
                Delivery::NoBuffer => {
                    self.pending = Some(len);
                    if self.rx_notify {
                        return;
                    }
                    self.rx_notify = true;
                    // Look again after asking: a buffer given meanwhile
                    // came without a notification.
                    match self.rx.enable_notification(&self.mem) {
                        Ok(true) => continue,
                        _ => return,
                    }
                }
            }
        }
    }

    /// Writes the header and the `len`-byte frame into the next receive
    /// buffer. Chains the guest built wrongly are returned empty and the
    /// next one is tried.
    fn deliver(&mut self, len: usize, used: &mut bool) -> Delivery {
        let mut chain = std::mem::take(&mut self.chain);
        let delivery = self.deliver_into(len, used, &mut chain);
        self.chain = chain;
        delivery
    }

    /// [`Self::deliver`], reading receive chains into `chain`.
    fn deliver_into(&mut self, len: usize, used: &mut bool, chain: &mut Chain) -> Delivery {
        loop {
            let head = match queue::pop_head(&mut self.rx, &self.mem) {
                Ok(Some(head)) => head,
                Ok(None) => return Delivery::NoBuffer,
                Err(e) => {
                    self.malformed += 1;
                    self.warn(format_args!("receive queue: {e}"));
                    return Delivery::NoBuffer;
                }
            };
            if !self.receive_chain(head, chain) {
                // Returned with nothing written; try the next buffer.
                if let Err(e) = self.rx.add_used(&self.mem, head, 0) {
                    self.warn(format_args!(
                        "receive queue: cannot return buffer {head}: {e}"
                    ));
                }
                *used = true;
                continue;
            }
            let total = HDR_LEN + len;
            if chain.writable_len() < total as u64 {
                // The buffer stays for the next (smaller) frame.
                self.rx.go_to_previous_position();
                self.dropped += 1;
                self.warn(format_args!(
                    "received frame of {len} bytes dropped: the guest's buffer holds {} bytes",
                    chain.writable_len()
                ));
                return Delivery::Dropped;
            }
            let mut hdr = [0u8; HDR_LEN];
            hdr[NUM_BUFFERS_OFFSET..].copy_from_slice(&1u16.to_le_bytes());
            let written = queue::write_to(&self.mem, &chain.writable, 0, &hdr).and_then(|()| {
                queue::write_to(
                    &self.mem,
                    &chain.writable,
                    HDR_LEN as u64,
                    &self.frame[..len],
                )
            });
            let used_len = match written {
                Ok(()) => total as u32,
                Err(e) => {
                    self.warn(format_args!("received frame dropped: {e}"));
                    0
                }
            };
            if let Err(e) = self.rx.add_used(&self.mem, head, used_len) {
                self.warn(format_args!(
                    "receive queue: cannot return buffer {head}: {e}"
                ));
            }
            *used = true;
            return Delivery::Delivered;
        }
    }

    /// Reads the receive chain at `head` into `chain`; false (warned) if
    /// the guest built it wrongly.
    fn receive_chain(&mut self, head: u16, chain: &mut Chain) -> bool {
        match queue::read_chain_into(
            chain,
            &self.mem,
            GuestAddress(self.rx.desc_table()),
            self.rx.size(),
            head,
            u64::from(u32::MAX),
        ) {
            Ok(()) if chain.readable.is_empty() => true,
            Ok(()) => {
                self.malformed += 1;
                self.warn(format_args!(
                    "receive buffer {head} returned unused: it has device-readable descriptors"
                ));
                false
            }
            Err(e) => {
                self.malformed += 1;
                self.warn(format_args!("receive buffer returned unused: {e}"));
                false
            }
        }
    }
}

impl QueueHandler for NetHandler {
    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.backend.ready_fd().as_raw_fd())
    }

    fn backend_wanted(&self) -> bool {
        self.pending.is_none() && !self.backend_failed
    }

    fn queue_notified(&mut self, index: usize) -> bool {
        match index {
            // New receive buffers: a frame waiting may now go in.
            RX_QUEUE => self.deliver_pending(),
            TX_QUEUE => {
                let sent_before = self.tx.next_used();
                let notify = self.process_tx();
                if self.tx.next_used() == sent_before {
                    return notify;
                }
                self.after_send() || notify
            }
            _ => false,
        }
    }

    fn backend_ready(&mut self) -> bool {
        self.receive()
    }

    fn process_all(&mut self) -> bool {
        // Receive-queue notifications stay off until a frame finds no
        // buffer (without VIRTIO_F_EVENT_IDX they are switched off here;
        // with it, `avail_event` is simply not moved).
        self.rx_notify = false;
        let _ = self.rx.disable_notification(&self.mem);
        let tx = self.process_tx();
        let rx = self.deliver_pending();
        tx || rx
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::devices::virtio::testutil::{
        F_NEXT, F_WRITE, TestQueue, take_dirty_pages, test_memory,
    };
    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use vm_memory::Bytes;
    use vmm_sys_util::eventfd::EventFd;

    /// A back end that records sent frames and hands out queued ones.
    #[derive(Clone)]
    pub(crate) struct MockBackend {
        pub(crate) sent: Arc<Mutex<Vec<Vec<u8>>>>,
        pub(crate) inbox: Arc<Mutex<VecDeque<Vec<u8>>>>,
        pub(crate) ready: Arc<EventFd>,
        /// Calls of `recv`.
        pub(crate) recvs: Arc<AtomicUsize>,
        /// `recv` fails (as a deleted tap does).
        pub(crate) broken: Arc<AtomicBool>,
    }

    impl MockBackend {
        pub(crate) fn new() -> Self {
            MockBackend {
                sent: Arc::default(),
                inbox: Arc::default(),
                ready: Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()),
                recvs: Arc::default(),
                broken: Arc::default(),
            }
        }

        /// Queues a frame for the guest and signals readiness.
        pub(crate) fn inject(&self, frame: &[u8]) {
            self.inbox.lock().unwrap().push_back(frame.to_vec());
            self.ready.write(1).unwrap();
        }
    }

    impl NetBackend for MockBackend {
        fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
            self.sent.lock().unwrap().push(frame.to_vec());
            Ok(())
        }
        fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.recvs.fetch_add(1, Ordering::SeqCst);
            if self.broken.load(Ordering::SeqCst) {
                return Err(std::io::Error::from_raw_os_error(libc::EBADFD));
            }
            match self.inbox.lock().unwrap().pop_front() {
                Some(f) => {
                    buf[..f.len()].copy_from_slice(&f);
                    Ok(f.len())
                }
                None => {
                    let _ = self.ready.read();
                    Err(ErrorKind::WouldBlock.into())
                }
            }
        }
        fn ready_fd(&self) -> BorrowedFd<'_> {
            // SAFETY: the eventfd stays open as long as `self` (which holds
            // a reference to it) is borrowed.
            unsafe { BorrowedFd::borrow_raw(self.ready.as_raw_fd()) }
        }
    }

    fn frame(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
            .collect()
    }

    /// rx queue structures at 0x10000.., tx at 0x20000.. (pages of their
    /// own), buffers from 0x100000.
    fn handler<'a>(
        mem: &'a GuestMemoryMmap,
        backend: &MockBackend,
    ) -> (NetHandler, TestQueue<'a>, TestQueue<'a>) {
        let rxq = TestQueue::at(mem, 256, 0x10000);
        let txq = TestQueue::at(mem, 256, 0x20000);
        let h = NetHandler::new(
            "net-test".into(),
            mem.clone(),
            rxq.queue(),
            txq.queue(),
            Box::new(backend.clone()),
        );
        (h, rxq, txq)
    }

    #[test]
    fn tx_strips_the_header_and_sends_the_frame() {
        let mem = test_memory();
        let backend = MockBackend::new();
        let (mut h, _, txq) = handler(&mem, &backend);
        let f = frame(100, 1);
        // Header in its own descriptor, frame split over two more.
        mem.write_slice(&[0xaa; HDR_LEN], GuestAddress(0x100000))
            .unwrap();
        mem.write_slice(&f[..40], GuestAddress(0x101000)).unwrap();
        mem.write_slice(&f[40..], GuestAddress(0x102000)).unwrap();
        txq.set_desc(0, 0x100000, HDR_LEN as u32, F_NEXT, 1);
        txq.set_desc(1, 0x101000, 40, F_NEXT, 2);
        txq.set_desc(2, 0x102000, 60, 0, 0);
        txq.push_avail(0);
        // Header and frame in one descriptor.
        let g = frame(60, 9);
        let mut one = vec![0u8; HDR_LEN];
        one.extend_from_slice(&g);
        mem.write_slice(&one, GuestAddress(0x103000)).unwrap();
        txq.set_desc(3, 0x103000, one.len() as u32, 0, 0);
        txq.push_avail(3);
        take_dirty_pages(&mem);

        assert!(h.process_tx());
        assert_eq!(*backend.sent.lock().unwrap(), vec![f, g]);
        assert_eq!(txq.used_idx(), 2);
        assert_eq!(txq.used_elem(0), (0, 0));
        assert_eq!(txq.used_elem(1), (3, 0));
        // Only the used ring was written.
        assert_eq!(take_dirty_pages(&mem), vec![0x24000]);
        assert_eq!(h.malformed, 0);
    }

    #[test]
    fn rx_adds_the_header_and_marks_exactly_the_written_pages() {
        let mem = test_memory();
        let backend = MockBackend::new();
        let (mut h, rxq, _) = handler(&mem, &backend);
        // Two buffers of two descriptors each: 12 + 1514 bytes.
        rxq.set_desc(0, 0x100000, HDR_LEN as u32, F_WRITE | F_NEXT, 1);
        rxq.set_desc(1, 0x101000, 1514, F_WRITE, 0);
        rxq.set_desc(2, 0x102ff0, 1526, F_WRITE, 0);
        rxq.push_avail(0);
        rxq.push_avail(2);
        let f = frame(600, 3);
        // The second frame crosses from page 0x102000 into 0x103000.
        let g = frame(1000, 4);
        backend.inject(&f);
        backend.inject(&g);
        take_dirty_pages(&mem);

        assert!(h.process_rx());
        assert_eq!(rxq.used_idx(), 2);
        assert_eq!(rxq.used_elem(0), (0, (HDR_LEN + 600) as u32));
        assert_eq!(rxq.used_elem(1), (2, (HDR_LEN + 1000) as u32));
        let mut hdr = [0xffu8; HDR_LEN];
        mem.read_slice(&mut hdr, GuestAddress(0x100000)).unwrap();
        assert_eq!(hdr, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
        let mut got = vec![0u8; 600];
        mem.read_slice(&mut got, GuestAddress(0x101000)).unwrap();
        assert_eq!(got, f);
        let mut got = vec![0u8; 1000];
        mem.read_slice(&mut got, GuestAddress(0x102ff0 + HDR_LEN as u64))
            .unwrap();
        assert_eq!(got, g);
        assert_eq!(
            take_dirty_pages(&mem),
            vec![0x14000, 0x100000, 0x101000, 0x102000, 0x103000]
        );
    }

    #[test]
    fn rx_waits_for_buffers_and_keeps_the_frame() {
        let mem = test_memory();
        let backend = MockBackend::new();
        let (mut h, rxq, _) = handler(&mem, &backend);
        let f = frame(64, 5);
        backend.inject(&f);
        assert!(!h.process_rx());
        assert_eq!(h.pending, Some(64));
        rxq.set_desc(0, 0x100000, 2048, F_WRITE, 0);
        rxq.push_avail(0);
        assert!(h.queue_notified(RX_QUEUE));
        assert_eq!(rxq.used_elem(0), (0, (HDR_LEN + 64) as u32));
        assert_eq!(h.pending, None);
    }

    /// A handler whose queues use VIRTIO_F_EVENT_IDX.
    fn event_idx_handler<'a>(
        mem: &'a GuestMemoryMmap,
        backend: &MockBackend,
    ) -> (NetHandler, TestQueue<'a>, TestQueue<'a>) {
        let (mut h, rxq, txq) = handler(mem, backend);
        h.rx.set_event_idx(true);
        h.tx.set_event_idx(true);
        (h, rxq, txq)
    }

    /// Queues a 20-byte frame (after the header) at descriptor `head`.
    fn queue_tx(mem: &GuestMemoryMmap, txq: &TestQueue<'_>, head: u16) {
        let addr = 0x100000 + u64::from(head) * 0x1000;
        mem.write_slice(&[0u8; HDR_LEN + 20], GuestAddress(addr))
            .unwrap();
        txq.set_desc(head, addr, (HDR_LEN + 20) as u32, 0, 0);
        txq.push_avail(head);
    }

    #[test]
    fn event_idx_interrupts_only_at_the_drivers_used_event() {
        let mem = test_memory();
        let backend = MockBackend::new();
        let (mut h, rxq, txq) = event_idx_handler(&mem, &backend);
        for i in 0..4 {
            rxq.set_desc(i, 0x200000 + u64::from(i) * 0x1000, 2048, F_WRITE, 0);
            rxq.push_avail(i);
        }
        // The driver waits for entry 0: the first frame interrupts, the
        // second (the driver is still busy with the first) does not.
        rxq.set_used_event(0);
        backend.inject(&frame(60, 1));
        assert!(h.receive());
        backend.inject(&frame(60, 2));
        assert!(!h.receive());
        // The driver took both and waits again.
        rxq.set_used_event(2);
        backend.inject(&frame(60, 3));
        assert!(h.receive());
        assert_eq!(rxq.used_idx(), 3);

        // Transmit completions the driver does not wait for: no interrupt;
        // the device asks to hear of the next entry.
        txq.set_used_event(0x8000);
        queue_tx(&mem, &txq, 0);
        queue_tx(&mem, &txq, 1);
        assert!(!h.process_tx());
        assert_eq!(backend.sent.lock().unwrap().len(), 2);
        assert_eq!(txq.avail_event(), 2);
        // Waiting for completions (all its buffers in use): it gets one.
        txq.set_used_event(2);
        queue_tx(&mem, &txq, 2);
        assert!(h.process_tx());
        assert_eq!(txq.avail_event(), 3);
    }

    #[test]
    fn receive_notifications_are_asked_for_only_while_a_frame_waits() {
        // Without EVENT_IDX: the used ring's NO_NOTIFY flag.
        let mem = test_memory();
        let backend = MockBackend::new();
        let (mut h, rxq, _txq) = handler(&mem, &backend);
        assert!(!h.process_all());
        assert_eq!(rxq.used_flags(), 1, "no notifications while buffers last");
        assert!(h.backend_wanted());
        backend.inject(&frame(64, 1));
        assert!(!h.receive());
        assert_eq!(h.pending, Some(64));
        assert_eq!(rxq.used_flags(), 0, "a frame waits for a buffer");
        assert!(!h.backend_wanted(), "the back end waits too");
        rxq.set_desc(0, 0x100000, 2048, F_WRITE, 0);
        rxq.push_avail(0);
        assert!(h.queue_notified(RX_QUEUE));
        assert_eq!(h.pending, None);
        assert_eq!(rxq.used_flags(), 1);
        assert!(h.backend_wanted());

        // With EVENT_IDX: avail_event, moved only while a frame waits.
        let mem = test_memory();
        let backend = MockBackend::new();
        let (mut h, rxq, _txq) = event_idx_handler(&mem, &backend);
        rxq.set_used_event(0);
        assert!(!h.process_all());
        rxq.set_desc(0, 0x100000, 2048, F_WRITE, 0);
        rxq.push_avail(0);
        backend.inject(&frame(64, 1));
        assert!(h.receive());
        assert_eq!(rxq.avail_event(), 0, "not moved while buffers last");
        backend.inject(&frame(64, 2));
        assert!(!h.receive());
        assert_eq!(rxq.avail_event(), 1, "the next buffer is wanted");
        assert!(!h.backend_wanted());
        // A buffer given while the device asked is found at once.
        rxq.set_desc(1, 0x101000, 2048, F_WRITE, 0);
        rxq.push_avail(1);
        rxq.set_used_event(1);
        assert!(h.queue_notified(RX_QUEUE));
        assert_eq!(rxq.used_idx(), 2);
        assert!(h.backend_wanted());
    }

    #[test]
    fn an_answer_to_a_sent_frame_is_read_at_once_and_misses_back_off() {
        let mem = test_memory();
        let backend = MockBackend::new();
        let (mut h, rxq, txq) = handler(&mem, &backend);
        for i in 0..4 {
            rxq.set_desc(i, 0x200000 + u64::from(i) * 0x1000, 2048, F_WRITE, 0);
            rxq.push_avail(i);
        }
        // The back end has an answer ready when the frame has gone: it is
        // delivered with the transmit notification.
        queue_tx(&mem, &txq, 0);
        backend.inbox.lock().unwrap().push_back(frame(60, 1));
        assert!(h.queue_notified(TX_QUEUE));
        assert_eq!(rxq.used_idx(), 1);
        assert_eq!(backend.recvs.load(Ordering::SeqCst), 1);
        // No answer: one read finds nothing, and the next transmit batches
        // do not read.
        queue_tx(&mem, &txq, 1);
        assert!(h.queue_notified(TX_QUEUE));
        assert_eq!(backend.recvs.load(Ordering::SeqCst), 2);
        for head in 2..2 + ANSWER_BACKOFF as u16 {
            queue_tx(&mem, &txq, head % 16);
            h.queue_notified(TX_QUEUE);
        }
        assert_eq!(backend.recvs.load(Ordering::SeqCst), 2);
        queue_tx(&mem, &txq, 3);
        h.queue_notified(TX_QUEUE);
        assert_eq!(backend.recvs.load(Ordering::SeqCst), 3);
        // A notification without frames to send reads nothing.
        h.queue_notified(TX_QUEUE);
        assert_eq!(backend.recvs.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn no_interrupt_flag_is_honoured_without_event_idx() {
        let mem = test_memory();
        let backend = MockBackend::new();
        let (mut h, _rxq, txq) = handler(&mem, &backend);
        txq.set_avail_flags(1);
        queue_tx(&mem, &txq, 0);
        assert!(!h.process_tx());
        txq.set_avail_flags(0);
        queue_tx(&mem, &txq, 1);
        assert!(h.process_tx());
        assert_eq!(txq.used_idx(), 2);
    }

    #[test]
    fn a_failing_back_end_is_no_longer_watched() {
        let mem = test_memory();
        let backend = MockBackend::new();
        let (mut h, _rxq, _txq) = handler(&mem, &backend);
        assert!(h.backend_wanted());
        backend.broken.store(true, Ordering::SeqCst);
        assert!(!h.receive());
        assert!(!h.backend_wanted());
        assert_eq!(backend.recvs.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn malformed_tx_chains_are_dropped_and_the_queue_goes_on() {
        let mem = test_memory();
        let backend = MockBackend::new();
        let (mut h, _, txq) = handler(&mem, &backend);
        // 0: a loop.
        txq.set_desc(0, 0x100000, 64, F_NEXT, 1);
        txq.set_desc(1, 0x100000, 64, F_NEXT, 0);
        // 2: outside guest memory.
        txq.set_desc(2, 0x4000_0000, 64, 0, 0);
        // 3: device-writable (wrong direction).
        txq.set_desc(3, 0x100000, 64, F_WRITE, 0);
        // 4: oversized (more than a header and the largest frame).
        txq.set_desc(4, 0x100000, (HDR_LEN + MAX_FRAME_LEN + 1) as u32, 0, 0);
        // 5: only a header.
        txq.set_desc(5, 0x100000, HDR_LEN as u32, 0, 0);
        // 6: next index out of range.
        txq.set_desc(6, 0x100000, 64, F_NEXT, 300);
        // 7: a good frame after all that.
        txq.set_desc(7, 0x101000, (HDR_LEN + 20) as u32, 0, 0);
        for head in [0, 2, 3, 4, 5, 6, 7, 999] {
            txq.push_avail(head);
        }
        take_dirty_pages(&mem);
        assert!(h.process_tx());
        assert_eq!(h.malformed, 7);
        assert_eq!(backend.sent.lock().unwrap().len(), 1);
        // Every chain with a valid head went back; 999 could not.
        assert_eq!(txq.used_idx(), 7);
        assert_eq!(take_dirty_pages(&mem), vec![0x24000]);
    }

    #[test]
    fn malformed_rx_chains_are_returned_empty() {
        let mem = test_memory();
        let backend = MockBackend::new();
        let (mut h, rxq, _) = handler(&mem, &backend);
        // 0: device-readable; 1: loop; 2: beyond memory; 3: too small; 4: good.
        rxq.set_desc(0, 0x100000, 2048, 0, 0);
        rxq.set_desc(1, 0x100000, 2048, F_WRITE | F_NEXT, 1);
        rxq.set_desc(2, 0xfff_0000, 2048, F_WRITE, 0);
        rxq.set_desc(3, 0x101000, 30, F_WRITE, 0);
        rxq.set_desc(4, 0x102000, 2048, F_WRITE, 0);
        for head in 0..5 {
            rxq.push_avail(head);
        }
        backend.inject(&frame(100, 1));
        backend.inject(&frame(10, 2));
        take_dirty_pages(&mem);
        assert!(h.process_rx());
        assert_eq!(h.malformed, 3);
        // 100 bytes do not fit buffer 3: the frame is dropped, the buffer
        // kept for the 10-byte frame.
        assert_eq!(h.dropped, 1);
        assert_eq!(rxq.used_idx(), 4);
        assert_eq!(rxq.used_elem(0), (0, 0));
        assert_eq!(rxq.used_elem(1), (1, 0));
        assert_eq!(rxq.used_elem(2), (2, 0));
        assert_eq!(rxq.used_elem(3), (3, (HDR_LEN + 10) as u32));
        // Nothing but the used ring and buffer 3 was written.
        assert_eq!(take_dirty_pages(&mem), vec![0x14000, 0x101000]);
    }

    #[test]
    fn default_macs_are_local_and_distinct() {
        assert_eq!(default_mac(0), [0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        assert_eq!(default_mac(1), [0x52, 0x54, 0, 0x12, 0x34, 0x57]);
        assert_eq!(default_mac(0xaa), [0x52, 0x54, 0, 0x12, 0x35, 0x00]);
    }

    #[test]
    fn config_space_holds_mac_and_link_status() {
        let net = Net::new("n".into(), [2, 3, 4, 5, 6, 7], Box::new(MockBackend::new()));
        assert_eq!(net.config_space(), vec![2, 3, 4, 5, 6, 7, 1, 0, 1, 0]);
        assert_eq!(
            net.avail_features(),
            (1 << 32) | (1 << 29) | (1 << 5) | (1 << 16)
        );
    }

    #[test]
    fn bad_macs_are_refused_before_the_tap_is_opened() {
        for mac in [[1, 0, 0, 0, 0, 1], [0; 6]] {
            let err = Net::with_tap(
                0,
                &NetConfig {
                    tap: "tvnonexist0".into(),
                    mac: Some(mac),
                },
            )
            .err()
            .unwrap()
            .to_string();
            assert!(
                err.contains("MAC") && err.contains("tap tvnonexist0"),
                "{err}"
            );
        }
    }

    /// A disk back end, to give a network device the wrong kind.
    struct NoDisk;

    impl crate::devices::virtio::BlockBackend for NoDisk {
        fn size(&self) -> u64 {
            512
        }
        fn read_at(&mut self, _: u64, _: &mut [u8]) -> std::io::Result<()> {
            Ok(())
        }
        fn write_at(&mut self, _: u64, _: &[u8]) -> std::io::Result<()> {
            Ok(())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_detached_device_takes_one_network_back_end() {
        // The tap does not exist: a detached device does not open it.
        let config = NetConfig {
            tap: "tvnonexist0".into(),
            mac: None,
        };
        let mut net = Net::detached(2, &config).unwrap();
        assert!(!net.has_backend());
        assert_eq!(net.mac(), default_mac(2));
        assert_eq!(net.name(), "net2 (tap tvnonexist0)");
        assert!(net.take_backend().is_none());

        let err = net
            .set_backend(Backend::Block(Box::new(NoDisk)))
            .unwrap_err();
        assert!(err.contains("takes a network back end"), "{err}");
        assert!(!net.has_backend());
        net.set_backend(Backend::Net(Box::new(MockBackend::new())))
            .unwrap();
        assert!(net.has_backend());
        let err = net
            .set_backend(Backend::Net(Box::new(MockBackend::new())))
            .unwrap_err();
        assert!(err.contains("already has its back end"), "{err}");

        // A held frame stays with the device when the back end goes.
        let held = DeviceSpecific::Net {
            pending_rx: Some(b"held".to_vec()),
        };
        net.load_device_state(&held);
        assert!(matches!(net.take_backend(), Some(Backend::Net(_))));
        assert!(!net.has_backend());
        assert!(net.take_backend().is_none());
        assert_eq!(net.device_state(), held);
    }

    #[test]
    fn a_detached_device_checks_its_configuration() {
        for (tap, mac, want) in [
            ("a/b", None, "invalid tap device name"),
            ("", None, "invalid tap device name"),
            ("sixteen-chars-xx", None, "invalid tap device name"),
            ("tap0", Some([1, 0, 0, 0, 0, 1]), "multicast"),
        ] {
            let err = Net::detached(
                0,
                &NetConfig {
                    tap: tap.into(),
                    mac,
                },
            )
            .err()
            .unwrap()
            .to_string();
            assert!(err.contains(want), "{err}");
        }
    }

    #[test]
    fn a_discarding_back_end_takes_the_guests_frames_and_gives_none() {
        let mem = test_memory();
        let discard = crate::devices::virtio::DiscardNet::new().unwrap();
        let rxq = TestQueue::at(&mem, 256, 0x10000);
        let txq = TestQueue::at(&mem, 256, 0x20000);
        let mut h = NetHandler::new(
            "net-test".into(),
            mem.clone(),
            rxq.queue(),
            txq.queue(),
            Box::new(discard.clone()),
        );
        let f = frame(100, 3);
        let mut one = vec![0u8; HDR_LEN];
        one.extend_from_slice(&f);
        mem.write_slice(&one, GuestAddress(0x100000)).unwrap();
        for head in 0..2 {
            txq.set_desc(head, 0x100000, one.len() as u32, 0, 0);
            txq.push_avail(head);
        }
        rxq.set_desc(0, 0x101000, 2048, F_WRITE, 0);
        rxq.push_avail(0);

        assert!(h.process_tx());
        assert_eq!(discard.frames_dropped(), 2);
        // The guest gets its buffers back, as from any link.
        assert_eq!(txq.used_idx(), 2);
        assert_eq!(h.dropped, 0);
        // Nothing ever arrives.
        assert!(!h.process_rx());
        assert_eq!(rxq.used_idx(), 0);
        assert_eq!(h.pending, None);
    }
}
