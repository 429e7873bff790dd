//! virtio devices over the virtio-mmio transport (version 2, "modern"):
//! a network card backed by a [`net::NetBackend`] (a host tap device, or
//! later the replication proxy) and a disk backed by a
//! [`block::BlockBackend`] (a raw image file, or later block replication).
//!
//! The guest finds the devices through `virtio_mmio.device=4K@ADDR:IRQ`
//! words on its kernel command line ([`cmdline_word`]). Queue notifications
//! reach a device's worker thread through ioeventfds and interrupts leave it
//! through an irqfd, so no device work runs on a vCPU thread. The worker
//! owns the queues while the driver has the device running and hands them
//! back, as plain [`QueueState`]s, when the driver resets the device or the
//! VMM pauses it.
//!
//! Every byte a device writes into guest memory — used-ring entries,
//! received frames, data read from a disk, status bytes, disk IDs — goes
//! through vm-memory, whose bitmap (`memory::PageBitmap`) marks the page dirty.

pub mod block;
pub mod discard;
pub mod mmio;
pub mod net;
pub mod queue;
pub mod tap;
mod worker;

#[cfg(test)]
mod kvm_tests;
#[cfg(test)]
mod testutil;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestMemoryMmap;

pub use block::{Block, BlockBackend, RawFile};
pub use discard::DiscardNet;
pub use mmio::MmioTransport;
pub use net::{Net, NetBackend};
pub use queue::QueueState;
pub use tap::Tap;

/// Guest-physical address of the first virtio-mmio device.
pub const MMIO_BASE: u64 = 0xd000_0000;
/// Size of each device's register window.
pub const MMIO_SIZE: u64 = 0x1000;
/// GSI (ISA IRQ) of the first device; device `i` uses `FIRST_GSI + i`.
pub const FIRST_GSI: u32 = 5;
/// Most virtio devices a VM may have: their IRQs (5 to 15) must stay below
/// 16 so that they reach the 8259 PIC as well as the IOAPIC.
pub const MAX_DEVICES: usize = 11;

/// virtio device type of a network card.
pub const TYPE_NET: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_NET;
/// virtio device type of a block device.
pub const TYPE_BLOCK: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;

/// Feature bit every twinvm device offers and requires: a virtio 1.x
/// ("modern") driver.
pub const F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
/// Feature bit VIRTIO_RING_F_EVENT_IDX: the driver and the device tell each
/// other, through `used_event` and `avail_event` at the ends of the rings,
/// up to which entry they need no interrupt or notification.
pub const F_EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// Interrupt status bit: a queue has new used buffers.
pub const INT_VRING: u32 = VIRTIO_MMIO_INT_VRING;
/// Interrupt status bit: the configuration space changed.
pub const INT_CONFIG: u32 = VIRTIO_MMIO_INT_CONFIG;

/// Guest-physical address of virtio device `index`.
pub fn mmio_address(index: usize) -> u64 {
    MMIO_BASE + index as u64 * MMIO_SIZE
}

/// GSI of virtio device `index`.
pub fn gsi(index: usize) -> u32 {
    FIRST_GSI + index as u32
}

/// The kernel command-line word that announces virtio device `index`, in
/// Linux's `virtio_mmio.device=<size>@<base>:<irq>` syntax.
pub fn cmdline_word(index: usize) -> String {
    format!(
        "virtio_mmio.device=4K@{:#x}:{}",
        mmio_address(index),
        gsi(index)
    )
}

/// Errors of virtio device setup: every message names the tap device or
/// disk it is about.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The tap name cannot be a Linux interface name.
    #[error("invalid tap device name {name:?}: {why}")]
    TapName {
        /// The name.
        name: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// No interface of that name exists.
    #[error(
        "tap device {tap} does not exist (create it first, e.g. `ip tuntap add dev {tap} mode tap`)"
    )]
    TapMissing {
        /// The tap name.
        tap: String,
    },
    /// `/dev/net/tun` could not be opened.
    #[error("cannot open /dev/net/tun to attach to tap device {tap}")]
    TunOpen {
        /// The tap name.
        tap: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The tap belongs to another user and twinvm lacks CAP_NET_ADMIN.
    #[error(
        "permission denied attaching to tap device {tap} (it must be owned by this user, or twinvm needs CAP_NET_ADMIN)"
    )]
    TapPermission {
        /// The tap name.
        tap: String,
    },
    /// Another process (or another network device of this VM) has it.
    #[error("tap device {tap} is busy: another process or device already has it open")]
    TapBusy {
        /// The tap name.
        tap: String,
    },
    /// The interface exists but is no single-queue tap device.
    #[error(
        "{tap} is not a tap device twinvm can use (a tun device, a multi-queue tap or no tap at all)"
    )]
    NotATap {
        /// The interface name.
        tap: String,
    },
    /// TUNSETIFF failed for another reason.
    #[error("cannot attach to tap device {tap}")]
    TapAttach {
        /// The tap name.
        tap: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The MAC address cannot be a network card's.
    #[error("invalid MAC address {mac} for the network device on tap {tap}: {why}")]
    Mac {
        /// The tap name.
        tap: String,
        /// The address.
        mac: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The image file does not exist.
    #[error("disk {} does not exist", .path.display())]
    DiskMissing {
        /// The image path.
        path: PathBuf,
    },
    /// The image may not be written but the disk is not read-only.
    #[error(
        "disk {} is not writable: give it the readonly option to attach it read-only, or make the file writable",
        .path.display()
    )]
    DiskNotWritable {
        /// The image path.
        path: PathBuf,
    },
    /// The image could not be opened for another reason.
    #[error("cannot open disk {}", .path.display())]
    DiskOpen {
        /// The image path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A directory, socket, FIFO, character device...
    #[error("disk {} is not a regular file or a block device", .path.display())]
    DiskNotAFile {
        /// The image path.
        path: PathBuf,
    },
    /// Less than one sector.
    #[error("disk {} is {size} bytes long, less than one 512-byte sector", .path.display())]
    DiskTooSmall {
        /// The image path.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// Locked by another user of the image.
    #[error(
        "disk {} is in use: another process (or another disk of this VM) has it open{}",
        .path.display(),
        if *.readonly { " for writing" } else { "" }
    )]
    DiskLocked {
        /// The image path.
        path: PathBuf,
        /// Whether this disk was asked for read-only.
        readonly: bool,
    },
    /// The disk's ID would not fit VIRTIO_BLK_T_GET_ID's 20 bytes.
    #[error("invalid serial {serial:?} for disk {}: longer than 20 bytes", .path.display())]
    DiskSerial {
        /// The image path.
        path: PathBuf,
        /// The serial.
        serial: String,
    },
    /// More devices than there are IRQs for.
    #[error(
        "too many virtio devices: {count} network devices and disks, at most {MAX_DEVICES} are supported"
    )]
    TooManyDevices {
        /// Devices asked for.
        count: usize,
    },
    /// A back end does not fit its device (a disk image that changed
    /// size), or the device cannot take one now.
    #[error("cannot attach the back end of virtio device {device}: {why}")]
    Backend {
        /// The device.
        device: String,
        /// What is wrong.
        why: String,
    },
    /// Eventfds for a device could not be created.
    #[error("cannot create eventfds for virtio device {device}")]
    EventFd {
        /// The device.
        device: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Why a device could not start processing its queues. The transport logs
/// it and sets DEVICE_NEEDS_RESET; the VM goes on.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// A queue the driver set up is unusable.
    #[error("queue {index} is invalid: {why}")]
    InvalidQueue {
        /// The queue.
        index: usize,
        /// What is wrong.
        why: String,
    },
    /// The worker thread or its epoll set could not be created.
    #[error("cannot start the device's worker thread")]
    Worker(#[source] std::io::Error),
    /// The device has no back end: it was released (the VM migrates) or
    /// an earlier worker thread failed and took it with it.
    #[error(
        "the device has no back end (it was released for a migration, or lost when its worker thread failed)"
    )]
    BackendLost,
}

/// The interrupt line of a device: the interrupt status register shared
/// with the transport, and the irqfd that pulses the device's GSI.
///
/// Each [`Interrupt::signal`] sets status bits and writes the irqfd once:
/// KVM raises and lowers the GSI, an edge the 8259 PIC and the IOAPIC (both
/// edge-triggered for ISA IRQs) latch. The driver reads InterruptStatus and
/// clears bits with InterruptACK.
#[derive(Clone)]
pub struct Interrupt {
    status: Arc<AtomicU32>,
    irqfd: Arc<EventFd>,
}

impl Interrupt {
    /// An interrupt line that signals `irqfd`.
    pub fn new(irqfd: EventFd) -> Self {
        Interrupt {
            status: Arc::new(AtomicU32::new(0)),
            irqfd: Arc::new(irqfd),
        }
    }

    /// Sets `bits` in the interrupt status and pulses the GSI.
    pub fn signal(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        if let Err(e) = self.irqfd.write(1) {
            tracing::warn!("virtio: cannot signal an interrupt: {e}");
        }
    }

    /// Signals used buffers.
    pub fn signal_used(&self) {
        self.signal(INT_VRING);
    }

    /// The interrupt status register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Clears `bits` (InterruptACK).
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Sets the whole status register (reset, state load).
    pub fn set_status(&self, value: u32) {
        self.status.store(value, Ordering::SeqCst);
    }

    /// The irqfd, to register with KVM.
    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }
}

/// What a device needs to start processing its queues.
pub struct Activation {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The queues, in the device's order, all ready and valid.
    pub queues: Vec<Queue>,
    /// One eventfd per queue, signalled when the driver notifies it.
    pub queue_evts: Vec<EventFd>,
    /// The device's interrupt line.
    pub interrupt: Interrupt,
    /// The features the driver accepted.
    pub acked_features: u64,
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// virtio device type ([`TYPE_NET`], [`TYPE_BLOCK`]).
    fn device_type(&self) -> u32;
    /// A name for log messages, e.g. `net0 (tap tap0)`.
    fn name(&self) -> &str;
    /// The feature bits the device offers.
    fn avail_features(&self) -> u64;
    /// The largest size of each queue; their number is the device's number
    /// of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// The device-specific configuration space.
    fn config_space(&self) -> Vec<u8>;
    /// The driver writes the configuration space. twinvm's devices have no
    /// writable configuration fields: the write is ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::warn!(
            "{}: ignoring a {}-byte write to read-only configuration offset {offset:#x}",
            self.name(),
            data.len()
        );
    }
    /// Starts processing queues on a worker thread.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// Stops the worker thread and hands the queues back (`None` if the
    /// device was not active, or its worker failed).
    fn deactivate(&mut self) -> Option<Vec<Queue>>;
    /// Forgets in-flight work (a frame read from the back end but not yet
    /// delivered); called on a driver reset, after [`Self::deactivate`].
    fn reset(&mut self) {}
    /// The device's own state beyond the transport's registers and queues.
    /// Exact only while the device is not active (paused).
    fn device_state(&self) -> DeviceSpecific {
        DeviceSpecific::None
    }
    /// Checks that [`Self::load_device_state`] would accept `state`;
    /// returns what is wrong otherwise.
    fn check_device_state(&self, state: &DeviceSpecific) -> Result<(), String> {
        match state {
            DeviceSpecific::None => Ok(()),
            other => Err(format!(
                "its saved state is of another device kind ({other:?})"
            )),
        }
    }
    /// Takes `state`, checked by [`Self::check_device_state`], as its own.
    /// Called on an inactive device, after [`Self::reset`].
    fn load_device_state(&mut self, _state: &DeviceSpecific) {}
    /// Makes everything written to the back end durable (a disk image is
    /// synced); called while the device is paused. A device without a back
    /// end has nothing to sync.
    fn sync_backend(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    /// Whether the device has its back end (held by the device, or by its
    /// worker while it runs).
    fn has_backend(&self) -> bool {
        true
    }
    /// Takes the back end away from the device, which must not be active;
    /// `None` if it has none (or is active). Work the device holds (a
    /// received frame not yet delivered) stays with the device.
    fn take_backend(&mut self) -> Option<Backend> {
        None
    }
    /// Gives the device, which must not be active and must have no back
    /// end, `backend`; returns what is wrong otherwise (the back end is
    /// then dropped).
    fn set_backend(&mut self, backend: Backend) -> Result<(), String> {
        Err(format!(
            "the device takes no back end, and was given a {}",
            backend.kind()
        ))
    }
}

/// The back end of a virtio device, while it is detached from the device:
/// what [`VirtioDevice::take_backend`] returns and
/// [`VirtioDevice::set_backend`] takes.
pub enum Backend {
    /// A network card's: a tap, or the replication proxy.
    Net(Box<dyn NetBackend>),
    /// A disk's: an image file, or block replication.
    Block(Box<dyn BlockBackend>),
}

impl Backend {
    /// What kind of back end this is, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Backend::Net(_) => "network back end",
            Backend::Block(_) => "disk back end",
        }
    }
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.kind())
    }
}

/// Whether the devices of a new VM open their back ends at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backends {
    /// Taps and disk images are opened (and disk images locked) while the
    /// VM is built.
    Open,
    /// Nothing is opened: configurations are checked, the devices are built
    /// without back ends, and [`crate::Vm::attach_backends`] opens them
    /// later (the destination of a migration on the same host, whose
    /// source still holds the taps and images).
    Deferred,
}

/// The configuration of one virtio device, in guest order.
#[derive(Clone, Copy, Debug)]
pub(crate) enum DeviceConfig<'a> {
    /// A network card.
    Net(&'a crate::NetConfig),
    /// A disk.
    Disk(&'a crate::DiskConfig),
}

impl DeviceConfig<'_> {
    /// Opens the device's back end: attaches to the tap, or opens and
    /// locks the disk image.
    pub(crate) fn open_backend(&self) -> Result<Backend, Error> {
        Ok(match self {
            DeviceConfig::Net(c) => Backend::Net(Box::new(Tap::open(&c.tap)?)),
            DeviceConfig::Disk(c) => Backend::Block(Box::new(RawFile::open(&c.path, c.readonly)?)),
        })
    }
}

/// The device configurations in guest order: network devices, then disks.
pub(crate) fn device_configs<'a>(
    net: &'a [crate::NetConfig],
    disks: &'a [crate::DiskConfig],
) -> impl Iterator<Item = DeviceConfig<'a>> {
    net.iter()
        .map(DeviceConfig::Net)
        .chain(disks.iter().map(DeviceConfig::Disk))
}

/// What a device holds beyond the transport's registers and queues.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceSpecific {
    /// Nothing. virtio-blk is so: its worker completes every request it
    /// takes from the queue (data, status byte, used-ring entry) before it
    /// looks for the next one or stops, so a paused disk has no request
    /// half done; requests the driver queued meanwhile wait in the
    /// available ring, which is guest memory.
    #[default]
    None,
    /// virtio-net.
    Net {
        /// A frame taken from the back end that no receive buffer has taken
        /// yet (the guest had none free).
        #[serde(with = "crate::snapshot::codec::opt_bytes")]
        pending_rx: Option<Vec<u8>>,
    },
}

/// A saved device state that does not fit the device it is loaded into.
#[derive(Debug, thiserror::Error)]
#[error("cannot load the saved state of virtio device {device}: {why}")]
pub struct StateError {
    /// The device.
    pub device: String,
    /// What does not fit.
    pub why: String,
}

/// Reads `data.len()` bytes at `offset` of a configuration space; bytes
/// beyond its end read as zero.
pub fn read_config(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

/// The state of a virtio-mmio device, in plain data: what a snapshot or
/// checkpoint must carry to recreate it — what the guest can observe, and
/// the work the device holds between its back end and its queues.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioState {
    /// virtio device type.
    pub device_type: u32,
    /// Features the device offers.
    pub avail_features: u64,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// QueueSel.
    pub queue_sel: u32,
    /// The device status register.
    pub status: u32,
    /// The interrupt status register.
    pub interrupt_status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// The device-specific configuration space.
    #[serde(with = "crate::snapshot::codec::bytes")]
    pub config: Vec<u8>,
    /// The queues.
    #[serde(with = "crate::snapshot::codec::seq")]
    pub queues: Vec<QueueState>,
    /// The device's own state (in-flight work).
    pub device: DeviceSpecific,
}

/// Rate limit for warnings about guest misbehaviour, so that a guest
/// cannot flood the log: at most `BURST` warnings per second per device.
pub(crate) struct WarnLimit {
    window: Instant,
    count: u32,
    suppressed: u64,
}

impl WarnLimit {
    const BURST: u32 = 10;

    pub(crate) fn new() -> Self {
        WarnLimit {
            window: Instant::now(),
            count: 0,
            suppressed: 0,
        }
    }

    /// Logs `msg` for `device` unless the limit is reached.
    pub(crate) fn warn(&mut self, device: &str, msg: std::fmt::Arguments<'_>) {
        if self.window.elapsed() >= Duration::from_secs(1) {
            if self.suppressed > 0 {
                tracing::warn!("{device}: {} more warnings suppressed", self.suppressed);
            }
            self.window = Instant::now();
            self.count = 0;
            self.suppressed = 0;
        }
        if self.count < Self::BURST {
            self.count += 1;
            tracing::warn!("{device}: {msg}");
        } else {
            self.suppressed += 1;
        }
    }
}

/// Builds the configured network devices and disks, in guest order
/// (network devices first), with their back ends opened or, with
/// [`Backends::Deferred`], only checked. Nothing touches KVM or guest
/// memory yet, so bad configuration is reported before the VM is built.
pub fn open_devices(
    net: &[crate::NetConfig],
    disks: &[crate::DiskConfig],
    backends: Backends,
) -> Result<Vec<Box<dyn VirtioDevice>>, Error> {
    let count = net.len() + disks.len();
    if count > MAX_DEVICES {
        return Err(Error::TooManyDevices { count });
    }
    let mut devices: Vec<Box<dyn VirtioDevice>> = Vec::with_capacity(count);
    for (i, config) in net.iter().enumerate() {
        devices.push(Box::new(match backends {
            Backends::Open => Net::with_tap(i, config)?,
            Backends::Deferred => Net::detached(i, config)?,
        }));
    }
    for (i, config) in disks.iter().enumerate() {
        devices.push(Box::new(match backends {
            Backends::Open => Block::with_file(i, config)?,
            Backends::Deferred => Block::detached(i, config)?,
        }));
    }
    Ok(devices)
}

#[cfg(test)]
mod tests {
    use super::*;
    use net::tests::MockBackend;

    #[test]
    fn layout_matches_the_contract() {
        assert_eq!(mmio_address(0), 0xd000_0000);
        assert_eq!(mmio_address(3), 0xd000_3000);
        assert_eq!(gsi(0), 5);
        assert_eq!(gsi(MAX_DEVICES - 1), 15);
        assert_eq!(cmdline_word(0), "virtio_mmio.device=4K@0xd0000000:5");
        assert_eq!(cmdline_word(2), "virtio_mmio.device=4K@0xd0002000:7");
    }

    #[test]
    fn config_reads_past_the_end_are_zero() {
        let mut b = [0xffu8; 4];
        read_config(&[1, 2, 3], 1, &mut b);
        assert_eq!(b, [2, 3, 0, 0]);
        read_config(&[1, 2, 3], 7, &mut b);
        assert_eq!(b, [0; 4]);
        read_config(&[1, 2, 3], u64::MAX, &mut b);
        assert_eq!(b, [0; 4]);
    }

    #[test]
    fn interrupt_status_is_set_and_acked() {
        let irq = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        irq.signal_used();
        irq.signal(INT_CONFIG);
        assert_eq!(irq.status(), INT_VRING | INT_CONFIG);
        assert_eq!(irq.irqfd().read().unwrap(), 2);
        irq.ack(INT_VRING);
        assert_eq!(irq.status(), INT_CONFIG);
    }

    /// A virtio-net device over a mock back end, behind its MMIO transport
    /// on `mem`, not yet started by a driver.
    fn mock_net(mem: &GuestMemoryMmap) -> (MockBackend, MmioTransport) {
        let backend = MockBackend::new();
        let dev = Net::new(
            "net0".into(),
            net::default_mac(0),
            Box::new(backend.clone()),
        );
        let t = MmioTransport::new(Box::new(dev), mem.clone()).unwrap();
        (backend, t)
    }

    #[test]
    fn net_device_runs_on_its_worker_thread() {
        use crate::devices::BusDevice;
        use testutil::{F_NEXT, F_WRITE, TestQueue, driver_start, test_memory, wait_for};
        use vm_memory::{Bytes, GuestAddress};

        let mem = test_memory();
        let (backend, mut t) = mock_net(&mem);
        let rxq = TestQueue::at(&mem, 256, 0x10000);
        let txq = TestQueue::at(&mem, 256, 0x20000);
        let features = F_VERSION_1 | 1 << 5 | 1 << 16;
        driver_start(&mut t, features, &[(256, 0x10000), (256, 0x20000)]);
        assert!(t.is_running());
        assert_eq!(t.state().status, 15);

        // Transmit: a notification (forwarded as KVM's ioeventfd would be)
        // wakes the worker, the frame reaches the back end, an interrupt
        // follows.
        mem.write_slice(&[0u8; 12], GuestAddress(0x100000)).unwrap();
        mem.write_slice(b"hello, world", GuestAddress(0x10000c))
            .unwrap();
        txq.set_desc(0, 0x100000, 24, 0, 0);
        txq.push_avail(0);
        t.write(mmio::NOTIFY_OFFSET, &1u32.to_le_bytes());
        assert!(wait_for(|| backend.sent.lock().unwrap().len() == 1));
        assert_eq!(backend.sent.lock().unwrap()[0], b"hello, world");
        assert!(wait_for(|| txq.used_idx() == 1));
        assert!(wait_for(|| t.irqfd().read().is_ok()));
        assert_eq!(t.state().interrupt_status & INT_VRING, INT_VRING);

        // Receive: the back end's readiness wakes the worker.
        rxq.set_desc(0, 0x200000, 12, F_WRITE | F_NEXT, 1);
        rxq.set_desc(1, 0x201000, 1514, F_WRITE, 0);
        rxq.push_avail(0);
        t.write(mmio::NOTIFY_OFFSET, &0u32.to_le_bytes());
        backend.inject(b"a frame for the guest");
        assert!(wait_for(|| rxq.used_idx() == 1));
        assert_eq!(rxq.used_elem(0), (0, 12 + 21));
        let mut got = [0u8; 21];
        mem.read_slice(&mut got, GuestAddress(0x201000)).unwrap();
        assert_eq!(&got, b"a frame for the guest");

        // Pausing hands the queues back with the device's progress.
        t.pause();
        assert!(!t.is_running());
        let s = t.state();
        assert_eq!((s.queues[0].next_avail, s.queues[0].next_used), (1, 1));
        assert_eq!((s.queues[1].next_avail, s.queues[1].next_used), (1, 1));
        // A frame arriving while paused waits; resume delivers it.
        rxq.set_desc(2, 0x202000, 1526, F_WRITE, 0);
        rxq.push_avail(2);
        backend.inject(b"later");
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(rxq.used_idx(), 1);
        t.resume();
        assert!(wait_for(|| rxq.used_idx() == 2));

        // Reset stops the worker and forgets the queues.
        t.write(0x70, &0u32.to_le_bytes());
        assert!(!t.is_running());
        assert_eq!(t.state().queues[0], QueueState::new(256));
    }

    #[test]
    fn a_pending_frame_moves_with_the_state_to_another_device() {
        use crate::devices::BusDevice;
        use testutil::{F_WRITE, TestQueue, driver_start, test_memory, wait_for};
        use vm_memory::{Bytes, GuestAddress};

        let mem = test_memory();
        let features = F_VERSION_1 | 1 << 5 | 1 << 16;
        let queues = [(256, 0x10000), (256, 0x20000)];
        let backend_a = MockBackend::new();
        let mut a = MmioTransport::new(
            Box::new(Net::new(
                "net0".into(),
                net::default_mac(0),
                Box::new(backend_a.clone()),
            )),
            mem.clone(),
        )
        .unwrap();
        let rxq = TestQueue::at(&mem, 256, 0x10000);
        let _txq = TestQueue::at(&mem, 256, 0x20000);
        driver_start(&mut a, features, &queues);
        // One receive buffer, two frames: the second waits in the device.
        rxq.set_desc(0, 0x200000, 1526, F_WRITE, 0);
        rxq.push_avail(0);
        a.write(mmio::NOTIFY_OFFSET, &0u32.to_le_bytes());
        backend_a.inject(b"first");
        backend_a.inject(b"second, held by the device");
        assert!(wait_for(|| rxq.used_idx() == 1));
        assert!(wait_for(|| backend_a.inbox.lock().unwrap().is_empty()));
        a.pause();
        let saved = a.state();
        assert_eq!(
            saved.device,
            DeviceSpecific::Net {
                pending_rx: Some(b"second, held by the device".to_vec())
            }
        );
        assert_eq!(
            (saved.queues[0].next_avail, saved.queues[0].next_used),
            (1, 1)
        );
        drop(a);

        // Another device, on another back end, takes the state; its next
        // receive buffer gets the held frame.
        let backend_b = MockBackend::new();
        let mut b = MmioTransport::new(
            Box::new(Net::new(
                "net0".into(),
                net::default_mac(0),
                Box::new(backend_b.clone()),
            )),
            mem.clone(),
        )
        .unwrap();
        b.load_state(&saved).unwrap();
        assert_eq!(b.state(), saved);
        b.resume();
        assert!(b.is_running());
        rxq.set_desc(1, 0x201000, 1526, F_WRITE, 0);
        rxq.push_avail(1);
        b.write(mmio::NOTIFY_OFFSET, &0u32.to_le_bytes());
        assert!(wait_for(|| rxq.used_idx() == 2));
        assert_eq!(rxq.used_elem(1), (1, 12 + 26));
        let mut got = [0u8; 26];
        mem.read_slice(&mut got, GuestAddress(0x201000 + 12))
            .unwrap();
        assert_eq!(&got, b"second, held by the device");
        b.pause();
        assert_eq!(b.state().device, DeviceSpecific::Net { pending_rx: None });

        // A held frame larger than any frame is refused.
        let mut bad = saved.clone();
        bad.device = DeviceSpecific::Net {
            pending_rx: Some(vec![0; net::MAX_FRAME_LEN + 1]),
        };
        let err = b.load_state(&bad).unwrap_err().to_string();
        assert!(err.contains("pending frame has 65555 bytes"), "{err}");
    }

    #[test]
    fn with_event_idx_the_worker_interrupts_only_when_the_driver_waits() {
        use crate::devices::BusDevice;
        use std::sync::atomic::Ordering;
        use testutil::{F_WRITE, TestQueue, driver_start, test_memory, wait_for};
        use vm_memory::{Bytes, GuestAddress};

        let mem = test_memory();
        let (backend, mut t) = mock_net(&mem);
        let rxq = TestQueue::at(&mem, 256, 0x10000);
        let txq = TestQueue::at(&mem, 256, 0x20000);
        // The driver waits for no transmit completion, and for the first
        // received frame.
        txq.set_used_event(0x8000);
        rxq.set_used_event(0);
        let features = F_VERSION_1 | F_EVENT_IDX | 1 << 5 | 1 << 16;
        driver_start(&mut t, features, &[(256, 0x10000), (256, 0x20000)]);
        assert!(t.is_running());

        mem.write_slice(&[0u8; 16], GuestAddress(0x100000)).unwrap();
        txq.set_desc(0, 0x100000, 16, 0, 0);
        txq.push_avail(0);
        t.write(mmio::NOTIFY_OFFSET, &1u32.to_le_bytes());
        assert!(wait_for(|| txq.used_idx() == 1 && txq.avail_event() == 1));
        assert_eq!(backend.sent.lock().unwrap().len(), 1);
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(t.irqfd().read().is_err(), "no transmit interrupt");

        // One buffer, two frames: the first interrupts, the second waits
        // for a buffer without the worker polling the back end meanwhile.
        rxq.set_desc(0, 0x200000, 1526, F_WRITE, 0);
        rxq.push_avail(0);
        backend.inject(b"first");
        backend.inject(b"second");
        assert!(wait_for(|| rxq.used_idx() == 1));
        assert!(wait_for(|| t.irqfd().read().is_ok()));
        assert!(wait_for(|| rxq.avail_event() == 1));
        let recvs = backend.recvs.load(Ordering::SeqCst);
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(backend.recvs.load(Ordering::SeqCst), recvs);
        assert!(
            t.irqfd().read().is_err(),
            "no interrupt but the first frame's"
        );

        // The buffer comes with a notification, as avail_event asked.
        rxq.set_desc(1, 0x201000, 1526, F_WRITE, 0);
        rxq.push_avail(1);
        rxq.set_used_event(1);
        t.write(mmio::NOTIFY_OFFSET, &0u32.to_le_bytes());
        assert!(wait_for(|| rxq.used_idx() == 2));
        assert!(wait_for(|| t.irqfd().read().is_ok()));
        t.shutdown();
    }

    #[test]
    fn a_state_saved_before_event_idx_was_offered_loads_and_keeps_its_features() {
        use crate::devices::BusDevice;
        use testutil::{TestQueue, driver_start, test_memory};

        let mem = test_memory();
        let new_net = || {
            MmioTransport::new(
                Box::new(Net::new(
                    "net0".into(),
                    net::default_mac(0),
                    Box::new(MockBackend::new()),
                )),
                mem.clone(),
            )
            .unwrap()
        };
        let _rxq = TestQueue::at(&mem, 256, 0x10000);
        let _txq = TestQueue::at(&mem, 256, 0x20000);
        let mut a = new_net();
        let features = F_VERSION_1 | 1 << 5 | 1 << 16;
        driver_start(&mut a, features, &[(256, 0x10000), (256, 0x20000)]);
        a.pause();
        // As an earlier twinvm saved it: EVENT_IDX not offered.
        let mut old = a.state();
        assert_ne!(old.avail_features & F_EVENT_IDX, 0);
        old.avail_features &= !F_EVENT_IDX;

        let mut b = new_net();
        b.load_state(&old).unwrap();
        assert_eq!(b.state(), old);
        let mut word = [0u8; 4];
        b.write(0x14, &0u32.to_le_bytes());
        b.read(0x10, &mut word);
        assert_eq!(u32::from_le_bytes(word) & (1 << 29), 0, "still not offered");
        b.resume();
        assert!(b.is_running());
        b.shutdown();

        // Other differences in the offered features are still refused, and
        // so is a driver that accepted a feature the saved device did not
        // offer.
        let mut other = old.clone();
        other.avail_features &= !(1 << 16);
        assert!(new_net().load_state(&other).is_err());
        let mut greedy = old.clone();
        greedy.acked_features |= F_EVENT_IDX;
        let err = new_net().load_state(&greedy).unwrap_err().to_string();
        assert!(err.contains("does not offer"), "{err}");
    }

    #[test]
    fn block_device_runs_on_its_worker_thread() {
        use crate::devices::BusDevice;
        use std::io::Write;
        use testutil::{F_NEXT, F_WRITE, TestQueue, driver_start, test_memory, wait_for};
        use vm_memory::{Bytes, GuestAddress};

        let img = vmm_sys_util::tempfile::TempFile::new().unwrap();
        img.as_file().write_all(&[0x5a; 4096]).unwrap();
        let dev = Block::with_file(
            0,
            &crate::DiskConfig {
                path: img.as_path().to_path_buf(),
                readonly: false,
                serial: None,
            },
        )
        .unwrap();
        let mem = test_memory();
        let mut t = MmioTransport::new(Box::new(dev), mem.clone()).unwrap();
        let q = TestQueue::at(&mem, 256, 0x10000);
        driver_start(&mut t, F_VERSION_1 | 1 << 9, &[(256, 0x10000)]);
        assert!(t.is_running());
        let mut c = [0u8; 8];
        t.read(0x100, &mut c);
        assert_eq!(u64::from_le_bytes(c), 8);

        mem.write_obj(0u32, GuestAddress(0x100000)).unwrap();
        mem.write_obj(1u64, GuestAddress(0x100008)).unwrap();
        q.set_desc(0, 0x100000, 16, F_NEXT, 1);
        q.set_desc(1, 0x200000, 512, F_WRITE | F_NEXT, 2);
        q.set_desc(2, 0x300000, 1, F_WRITE, 0);
        q.push_avail(0);
        mem.write_obj(0xffu8, GuestAddress(0x300000)).unwrap();
        t.write(mmio::NOTIFY_OFFSET, &0u32.to_le_bytes());
        assert!(wait_for(|| q.used_idx() == 1));
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x300000)).unwrap(), 0);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x2001ff)).unwrap(), 0x5a);
        t.shutdown();
        assert!(!t.is_running());
    }

    #[test]
    fn too_many_devices_is_an_error() {
        let disks = vec![
            crate::DiskConfig {
                path: "/nonexistent".into(),
                readonly: true,
                serial: None,
            };
            MAX_DEVICES + 1
        ];
        let err = open_devices(&[], &disks, Backends::Open).err().unwrap();
        assert!(err.to_string().contains("too many virtio devices"), "{err}");
    }

    #[test]
    fn a_back_end_moves_out_and_in_while_paused_and_a_held_frame_stays() {
        use crate::devices::BusDevice;
        use testutil::{F_WRITE, TestQueue, driver_start, test_memory, wait_for};
        use vm_memory::{Bytes, GuestAddress};

        let mem = test_memory();
        let a = MockBackend::new();
        let mut t = MmioTransport::new(
            Box::new(Net::new(
                "net0".into(),
                net::default_mac(0),
                Box::new(a.clone()),
            )),
            mem.clone(),
        )
        .unwrap();
        let rxq = TestQueue::at(&mem, 256, 0x10000);
        let txq = TestQueue::at(&mem, 256, 0x20000);
        driver_start(
            &mut t,
            F_VERSION_1 | 1 << 5 | 1 << 16,
            &[(256, 0x10000), (256, 0x20000)],
        );
        // One receive buffer, two frames: the second waits in the device.
        rxq.set_desc(0, 0x200000, 1526, F_WRITE, 0);
        rxq.push_avail(0);
        t.write(mmio::NOTIFY_OFFSET, &0u32.to_le_bytes());
        a.inject(b"first");
        a.inject(b"second, held");
        assert!(wait_for(|| rxq.used_idx() == 1));
        assert!(wait_for(|| a.inbox.lock().unwrap().is_empty()));

        // While the worker runs, the back end stays where it is.
        assert!(t.has_backend());
        assert!(t.take_backend().is_none());
        let err = t
            .set_backend(Backend::Net(Box::new(MockBackend::new())))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("virtio device net0") && err.contains("running"),
            "{err}"
        );

        t.pause();
        let saved = t.state();
        let taken = t.take_backend();
        assert!(matches!(taken, Some(Backend::Net(_))));
        assert!(!t.has_backend());
        assert_eq!(t.state(), saved, "the held frame stays in the device");
        drop(taken);

        // Another back end; the held frame goes first, then the new back
        // end's frames, and the guest's frames go to it.
        let b = MockBackend::new();
        t.set_backend(Backend::Net(Box::new(b.clone()))).unwrap();
        assert!(t.has_backend());
        t.resume();
        assert!(t.is_running());
        rxq.set_desc(1, 0x201000, 1526, F_WRITE, 0);
        rxq.set_desc(2, 0x202000, 1526, F_WRITE, 0);
        rxq.push_avail(1);
        rxq.push_avail(2);
        t.write(mmio::NOTIFY_OFFSET, &0u32.to_le_bytes());
        b.inject(b"from the new back end");
        assert!(wait_for(|| rxq.used_idx() == 3));
        let mut got = [0u8; 12];
        mem.read_slice(&mut got, GuestAddress(0x201000 + 12))
            .unwrap();
        assert_eq!(&got, b"second, held");
        let mut got = [0u8; 21];
        mem.read_slice(&mut got, GuestAddress(0x202000 + 12))
            .unwrap();
        assert_eq!(&got, b"from the new back end");
        mem.write_slice(&[0u8; 12], GuestAddress(0x100000)).unwrap();
        mem.write_slice(b"out", GuestAddress(0x10000c)).unwrap();
        txq.set_desc(0, 0x100000, 15, 0, 0);
        txq.push_avail(0);
        t.write(mmio::NOTIFY_OFFSET, &1u32.to_le_bytes());
        assert!(wait_for(|| b.sent.lock().unwrap().len() == 1));
        assert!(a.sent.lock().unwrap().is_empty());
        t.shutdown();
    }

    #[test]
    fn a_device_without_a_back_end_does_not_start() {
        use testutil::{TestQueue, driver_start, test_memory};

        let mem = test_memory();
        let config = crate::NetConfig {
            tap: "tvnonexist0".into(),
            mac: None,
        };
        let mut t =
            MmioTransport::new(Box::new(Net::detached(0, &config).unwrap()), mem.clone()).unwrap();
        assert!(!t.has_backend());
        let _rxq = TestQueue::at(&mem, 256, 0x10000);
        let _txq = TestQueue::at(&mem, 256, 0x20000);
        driver_start(
            &mut t,
            F_VERSION_1 | 1 << 5 | 1 << 16,
            &[(256, 0x10000), (256, 0x20000)],
        );
        // The driver sees a device that needs a reset, no worker runs.
        assert!(!t.is_running());
        assert_ne!(
            t.state().status & virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET,
            0
        );
    }

    #[test]
    fn deferred_devices_open_nothing() {
        let img = vmm_sys_util::tempfile::TempFile::new().unwrap();
        img.as_file().set_len(4096).unwrap();
        let disks = vec![crate::DiskConfig {
            path: img.as_path().to_path_buf(),
            readonly: false,
            serial: None,
        }];
        let net = vec![crate::NetConfig {
            tap: "tvnonexist0".into(),
            mac: None,
        }];
        let devices = open_devices(&net, &disks, Backends::Deferred).unwrap();
        assert_eq!(devices.len(), 2);
        assert!(devices.iter().all(|d| !d.has_backend()));
        // The image is not locked.
        let _held = RawFile::open(img.as_path(), false).unwrap();
        // The missing tap is found once back ends are opened.
        let configs: Vec<_> = device_configs(&net, &disks).collect();
        assert!(matches!(
            configs[0].open_backend(),
            Err(Error::TapMissing { .. })
        ));
        assert!(matches!(
            configs[1].open_backend(),
            Err(Error::DiskLocked { .. })
        ));
        let err = open_devices(&net, &disks, Backends::Open).err().unwrap();
        assert!(matches!(err, Error::TapMissing { .. }), "{err}");
    }
}
