//! The virtio-mmio transport, version 2 ("modern" register layout): the
//! device's registers on the MMIO bus, the status state machine, feature
//! negotiation and queue setup. When the driver sets DRIVER_OK the device
//! starts its worker thread with the queues; a reset (status 0) stops it
//! and takes the queues back.
//!
//! Register accesses below the configuration space must be 32 bits wide;
//! other widths are ignored (reads return 0). The configuration space, from
//! offset 0x100, may be accessed with any width.

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio::*;
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::EventFd;

use super::queue::QueueState;
use super::{
    ActivateError, Activation, Backend, Error, F_EVENT_IDX, F_VERSION_1, Interrupt, StateError,
    VirtioDevice, VirtioState, WarnLimit, read_config,
};
use crate::devices::BusDevice;
use crate::memory::GuestMemoryMmap;

/// "virt" in little-endian: the MagicValue register.
pub const MAGIC_VALUE: u32 = 0x7472_6976;
/// The transport version twinvm implements.
pub const VERSION: u32 = 2;
/// twinvm's VendorID: "TWVM" in little-endian.
pub const VENDOR_ID: u32 = 0x4d56_5754;
/// Offset of QueueNotify, where ioeventfds are registered.
pub const NOTIFY_OFFSET: u64 = VIRTIO_MMIO_QUEUE_NOTIFY as u64;
/// Offset of the configuration space.
pub const CONFIG_OFFSET: u64 = VIRTIO_MMIO_CONFIG as u64;

const ACKNOWLEDGE: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
const DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
const FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
const DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
const FAILED: u32 = VIRTIO_CONFIG_S_FAILED;
const NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;

/// Features twinvm's devices came to offer after their state was first
/// saved. A saved state without them still loads: the device then goes on
/// offering what the saved one did, so that the driver sees no change.
const LATER_FEATURES: u64 = F_EVENT_IDX;

/// A virtio device on the MMIO bus.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Interrupt,
    queue_evts: Vec<EventFd>,
    /// The features offered to the driver: the device's, or those of a
    /// loaded state saved by a twinvm that offered fewer
    /// ([`LATER_FEATURES`]).
    offered: u64,
    /// The queues while the device is not running (while it runs, its
    /// worker owns them).
    queues: Vec<QueueState>,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    /// The worker thread runs.
    running: bool,
    /// Paused by the VMM with DRIVER_OK set: resume restarts the worker.
    paused: bool,
    /// QueueNotify writes that reached the transport instead of an
    /// ioeventfd.
    pub(crate) forwarded_notifies: u64,
    warn: WarnLimit,
}

impl MmioTransport {
    /// Puts `device` behind a transport, with one eventfd per queue (for
    /// ioeventfds) and one for its interrupt (for an irqfd).
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap) -> Result<Self, Error> {
        let evt_error = |source| Error::EventFd {
            device: device.name().to_string(),
            source,
        };
        let queue_evts = device
            .queue_max_sizes()
            .iter()
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(evt_error)?;
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(evt_error)?;
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| QueueState::new(max))
            .collect();
        Ok(MmioTransport {
            offered: device.avail_features(),
            device,
            mem,
            interrupt: Interrupt::new(irq),
            queue_evts,
            queues,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            running: false,
            paused: false,
            forwarded_notifies: 0,
            warn: WarnLimit::new(),
        })
    }

    /// The device's name, for messages.
    pub fn name(&self) -> &str {
        self.device.name()
    }

    /// One eventfd per queue: register each as an ioeventfd on QueueNotify
    /// with the queue's index as data.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The interrupt eventfd: register it as the device's irqfd.
    pub fn irqfd(&self) -> &EventFd {
        self.interrupt.irqfd()
    }

    /// Whether the worker thread runs.
    pub fn is_running(&self) -> bool {
        self.running
    }

    /// The device's state. While the worker runs, the queues' indexes are
    /// those of the last [`Self::pause`]; pause first for an exact state.
    pub fn state(&self) -> VirtioState {
        VirtioState {
            device_type: self.device.device_type(),
            avail_features: self.offered,
            acked_features: self.acked_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            status: self.status,
            interrupt_status: self.interrupt.status(),
            config_generation: self.config_generation,
            config: self.device.config_space(),
            queues: self.queues.clone(),
            device: self.device.device_state(),
        }
    }

    /// The virtio device type.
    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    /// Checks, without changing anything, that `state` fits this device:
    /// the same kind of device, offering the same features, with the same
    /// configuration space (MAC address, disk size), queues the device
    /// could have, and — for a device the driver had started — queues that
    /// can run in this guest memory.
    pub fn check_state(&self, state: &VirtioState) -> Result<(), StateError> {
        let fail = |why: String| StateError {
            device: self.device.name().to_string(),
            why,
        };
        let here = self.device.device_type();
        if state.device_type != here {
            return Err(fail(format!(
                "it is saved as device type {}, this device is of type {here}",
                state.device_type
            )));
        }
        let avail = self.device.avail_features();
        let fewer = state.avail_features & !avail == 0
            && (state.avail_features ^ avail) & !LATER_FEATURES == 0;
        if !fewer {
            return Err(fail(format!(
                "the saved device offered features {:#x}, this one offers {avail:#x} (is one of them a read-only disk?)",
                state.avail_features
            )));
        }
        let config = self.device.config_space();
        if state.config != config {
            return Err(fail(format!(
                "its saved configuration space ({}) differs from this device's ({}): another MAC address or disk size",
                hex(&state.config),
                hex(&config)
            )));
        }
        if state.acked_features & !state.avail_features != 0 {
            return Err(fail(format!(
                "the saved driver features {:#x} include some the device does not offer ({:#x})",
                state.acked_features, state.avail_features
            )));
        }
        let known = ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK | FAILED | NEEDS_RESET;
        if state.status & !known != 0 {
            return Err(fail(format!(
                "the saved device status {:#x} has unknown bits",
                state.status
            )));
        }
        let int_bits = super::INT_VRING | super::INT_CONFIG;
        if state.interrupt_status & !int_bits != 0 {
            return Err(fail(format!(
                "the saved interrupt status {:#x} has unknown bits",
                state.interrupt_status
            )));
        }
        let sizes = self.device.queue_max_sizes();
        if state.queues.len() != sizes.len() {
            return Err(fail(format!(
                "it is saved with {} queues, this device has {}",
                state.queues.len(),
                sizes.len()
            )));
        }
        let started = state.status & DRIVER_OK != 0 && state.status & NEEDS_RESET == 0;
        for (index, (q, &max)) in state.queues.iter().zip(sizes).enumerate() {
            if q.max_size != max || q.size == 0 || q.size > max {
                return Err(fail(format!(
                    "saved queue {index} has size {} of at most {}, this device's queue holds {max}",
                    q.size, q.max_size
                )));
            }
            if started {
                let queue = q
                    .to_queue()
                    .map_err(|e| fail(format!("saved queue {index} of the running device: {e}")))?;
                if !q.ready || !queue.is_valid(&self.mem) {
                    return Err(fail(format!(
                        "saved queue {index} of the running device is not ready or not in guest memory"
                    )));
                }
            }
        }
        self.device.check_device_state(&state.device).map_err(fail)
    }

    /// Replaces the device's state with `state` (checked first; nothing
    /// changes if it does not fit). The device must be paused: a device
    /// the driver had started comes back with the next [`Self::resume`],
    /// its worker taking the queues from the saved indexes and first
    /// processing whatever the driver made available.
    pub fn load_state(&mut self, state: &VirtioState) -> Result<(), StateError> {
        self.check_state(state)?;
        self.stop_worker();
        self.device.reset();
        self.device.load_device_state(&state.device);
        self.offered = state.avail_features;
        self.queues.clone_from(&state.queues);
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.acked_features = state.acked_features;
        self.queue_sel = state.queue_sel;
        self.status = state.status;
        self.config_generation = state.config_generation;
        self.interrupt.set_status(state.interrupt_status);
        for evt in &self.queue_evts {
            // Notifications of the replaced state; the worker looks at the
            // whole available ring when it starts anyway.
            let _ = evt.read();
        }
        self.paused = state.status & DRIVER_OK != 0 && state.status & NEEDS_RESET == 0;
        Ok(())
    }

    /// Makes what the device wrote to its back end durable (syncs a disk
    /// image). The device should be paused.
    pub fn sync_backend(&mut self) -> std::io::Result<()> {
        self.device.sync_backend()
    }

    /// Whether the device has its back end.
    pub fn has_backend(&self) -> bool {
        self.device.has_backend()
    }

    /// Takes the device's back end away (closing a tap or releasing an
    /// image's lock is then up to the caller, by dropping it). Only while
    /// the worker is stopped (the VM paused): `None` while it runs, or if
    /// the device has none.
    pub fn take_backend(&mut self) -> Option<Backend> {
        if self.running {
            return None;
        }
        self.device.take_backend()
    }

    /// Gives the device a back end, which it must lack. Only while the
    /// worker is stopped (the VM paused).
    pub fn set_backend(&mut self, backend: Backend) -> Result<(), Error> {
        let result = if self.running {
            Err("the device is running (pause the VM first)".to_string())
        } else {
            self.device.set_backend(backend)
        };
        result.map_err(|why| Error::Backend {
            device: self.device.name().to_string(),
            why,
        })
    }

    /// Stops the worker thread (if it runs) and takes the queues back; the
    /// device writes nothing into guest memory until [`Self::resume`].
    pub fn pause(&mut self) {
        if self.running {
            self.stop_worker();
            self.paused = self.status & DRIVER_OK != 0;
        }
    }

    /// Restarts the worker thread after [`Self::pause`].
    pub fn resume(&mut self) {
        if self.paused {
            self.paused = false;
            self.activate();
        }
    }

    /// Stops the worker thread for good (the VM is ending).
    pub fn shutdown(&mut self) {
        self.stop_worker();
        self.paused = false;
    }

    fn stop_worker(&mut self) {
        if !self.running {
            return;
        }
        self.running = false;
        match self.device.deactivate() {
            Some(queues) => {
                for (state, queue) in self.queues.iter_mut().zip(&queues) {
                    *state = QueueState::from_queue(queue);
                }
            }
            None => {
                tracing::error!(
                    "{}: its worker thread failed; the device needs a reset",
                    self.device.name()
                );
                self.status |= NEEDS_RESET;
            }
        }
    }

    fn selected_queue(&mut self) -> Option<&mut QueueState> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue registers may change only between FEATURES_OK and DRIVER_OK.
    fn queue_config_allowed(&self) -> bool {
        self.status & (FEATURES_OK | DRIVER_OK | FAILED) == FEATURES_OK
    }

    fn reset(&mut self) {
        self.stop_worker();
        self.paused = false;
        self.device.reset();
        for q in &mut self.queues {
            *q = QueueState::new(q.max_size);
        }
        for evt in &self.queue_evts {
            // Drop notifications of the previous driver.
            let _ = evt.read();
        }
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.interrupt.set_status(0);
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        let known = ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK | FAILED;
        // NEEDS_RESET is the device's bit: the driver echoes it back.
        let value = value & !NEEDS_RESET;
        let old_driver_bits = old & !NEEDS_RESET;
        if value & !known != 0 {
            self.bad_access(format_args!("unknown device status bits {value:#x}"));
            return;
        }
        if value & FAILED != 0 {
            // The driver gave up; some write FAILED alone. Keep what was
            // set so the state stays readable; the device keeps running
            // until a reset.
            if old & FAILED == 0 {
                tracing::warn!("{}: the driver gave up on the device", self.device.name());
            }
            self.status = old | FAILED;
            return;
        }
        if value & old_driver_bits != old_driver_bits {
            self.bad_access(format_args!(
                "device status {value:#x} clears bits of {old:#x} without a reset"
            ));
            return;
        }
        let added = value & !old_driver_bits;
        let requires = [
            (DRIVER, ACKNOWLEDGE),
            (FEATURES_OK, DRIVER),
            (DRIVER_OK, FEATURES_OK),
        ];
        for (bit, needed) in requires {
            if added & bit != 0 && value & needed == 0 {
                self.bad_access(format_args!(
                    "device status {value:#x} sets {bit:#x} before {needed:#x}"
                ));
                return;
            }
        }
        let mut value = value;
        if added & FEATURES_OK != 0 && !self.features_acceptable() {
            // The driver reads the status back and sees FEATURES_OK unset.
            tracing::warn!(
                "{}: refusing driver features {:#x} (device offers {:#x}, VERSION_1 required)",
                self.device.name(),
                self.acked_features,
                self.offered
            );
            value &= !FEATURES_OK;
            if value & DRIVER_OK != 0 {
                value &= !DRIVER_OK;
            }
        }
        self.status = value | (old & NEEDS_RESET);
        if value & DRIVER_OK != 0 && added & DRIVER_OK != 0 {
            self.activate();
        }
    }

    fn features_acceptable(&self) -> bool {
        self.acked_features & !self.offered == 0 && self.acked_features & F_VERSION_1 != 0
    }

    /// Starts the device's worker with the queues, or flags NEEDS_RESET.
    fn activate(&mut self) {
        if self.running || self.status & NEEDS_RESET != 0 {
            return;
        }
        match self.try_activate() {
            Ok(()) => self.running = true,
            Err(e) => {
                tracing::warn!(
                    "{}: cannot start the device: {e}; it needs a reset",
                    self.device.name()
                );
                self.status |= NEEDS_RESET;
                self.interrupt.signal(super::INT_CONFIG);
            }
        }
    }

    fn try_activate(&mut self) -> Result<(), ActivateError> {
        let mut queues = Vec::with_capacity(self.queues.len());
        for (index, state) in self.queues.iter().enumerate() {
            let invalid = |why: String| ActivateError::InvalidQueue { index, why };
            if !state.ready {
                return Err(invalid("not ready".into()));
            }
            let mut queue = state.to_queue().map_err(|e| invalid(e.to_string()))?;
            queue.set_event_idx(self.acked_features & F_EVENT_IDX != 0);
            if !queue.is_valid(&self.mem) {
                return Err(invalid(format!(
                    "its rings (descriptors {:#x}, driver {:#x}, device {:#x}, size {}) are not in guest memory",
                    state.desc_table, state.avail_ring, state.used_ring, state.size
                )));
            }
            queues.push(queue);
        }
        let queue_evts = self
            .queue_evts
            .iter()
            .map(EventFd::try_clone)
            .collect::<Result<Vec<_>, _>>()
            .map_err(ActivateError::Worker)?;
        self.device.activate(Activation {
            mem: self.mem.clone(),
            queues,
            queue_evts,
            interrupt: self.interrupt.clone(),
            acked_features: self.acked_features,
        })
    }

    fn bad_access(&mut self, msg: std::fmt::Arguments<'_>) {
        let name = self.device.name().to_string();
        self.warn.warn(&name, msg);
    }

    fn read_register(&mut self, offset: u32) -> u32 {
        let queue = self.queues.get(self.queue_sel as usize).copied();
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC_VALUE,
            VIRTIO_MMIO_VERSION => VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.offered as u32,
                1 => (self.offered >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size)),
            VIRTIO_MMIO_QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready)),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            VIRTIO_MMIO_STATUS => self.status,
            VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            // No shared memory regions: their length reads as all ones.
            VIRTIO_MMIO_SHM_LEN_LOW | VIRTIO_MMIO_SHM_LEN_HIGH => u32::MAX,
            VIRTIO_MMIO_SHM_BASE_LOW | VIRTIO_MMIO_SHM_BASE_HIGH => u32::MAX,
            _ => {
                self.bad_access(format_args!("read of register {offset:#x}"));
                0
            }
        }
    }

    fn write_register(&mut self, offset: u32, value: u32) {
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES => {
                let status = self.status;
                if status & (DRIVER | FEATURES_OK | FAILED) != DRIVER {
                    self.bad_access(format_args!(
                        "driver features written in device status {status:#x}"
                    ));
                    return;
                }
                match self.driver_features_sel {
                    0 => {
                        self.acked_features =
                            (self.acked_features & !0xffff_ffff) | u64::from(value)
                    }
                    1 => {
                        self.acked_features =
                            (self.acked_features & 0xffff_ffff) | (u64::from(value) << 32)
                    }
                    sel => {
                        if value != 0 {
                            self.bad_access(format_args!(
                                "driver features {value:#x} for unknown word {sel}"
                            ));
                        }
                    }
                }
            }
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = value,
            VIRTIO_MMIO_QUEUE_NUM
            | VIRTIO_MMIO_QUEUE_READY
            | VIRTIO_MMIO_QUEUE_DESC_LOW
            | VIRTIO_MMIO_QUEUE_DESC_HIGH
            | VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | VIRTIO_MMIO_QUEUE_USED_LOW
            | VIRTIO_MMIO_QUEUE_USED_HIGH => self.write_queue_register(offset, value),
            VIRTIO_MMIO_QUEUE_NOTIFY => {
                // KVM normally swallows these through the ioeventfds; one
                // that gets here (no ioeventfd) is forwarded the same way.
                self.forwarded_notifies += 1;
                match self.queue_evts.get(value as usize) {
                    Some(evt) => {
                        if let Err(e) = evt.write(1) {
                            tracing::warn!("{}: cannot forward a notification: {e}", self.name());
                        }
                    }
                    None => self.bad_access(format_args!("notification of unknown queue {value}")),
                }
            }
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.ack(value),
            VIRTIO_MMIO_STATUS => self.set_status(value),
            _ => self.bad_access(format_args!("write of {value:#x} to register {offset:#x}")),
        }
    }

    fn write_queue_register(&mut self, offset: u32, value: u32) {
        if !self.queue_config_allowed() {
            let status = self.status;
            self.bad_access(format_args!(
                "queue register {offset:#x} written in device status {status:#x}"
            ));
            return;
        }
        let sel = self.queue_sel;
        let Some(q) = self.selected_queue() else {
            self.bad_access(format_args!(
                "queue register {offset:#x} of unknown queue {sel}"
            ));
            return;
        };
        let low = |old: u64| (old & !0xffff_ffff) | u64::from(value);
        let high = |old: u64| (old & 0xffff_ffff) | (u64::from(value) << 32);
        match offset {
            VIRTIO_MMIO_QUEUE_NUM => match u16::try_from(value) {
                Ok(size) if size != 0 && size <= q.max_size => q.size = size,
                _ => {
                    let max = q.max_size;
                    self.bad_access(format_args!(
                        "queue {sel} size {value} (the maximum is {max})"
                    ))
                }
            },
            VIRTIO_MMIO_QUEUE_READY => q.ready = value == 1,
            VIRTIO_MMIO_QUEUE_DESC_LOW => q.desc_table = low(q.desc_table),
            VIRTIO_MMIO_QUEUE_DESC_HIGH => q.desc_table = high(q.desc_table),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => q.avail_ring = low(q.avail_ring),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => q.avail_ring = high(q.avail_ring),
            VIRTIO_MMIO_QUEUE_USED_LOW => q.used_ring = low(q.used_ring),
            VIRTIO_MMIO_QUEUE_USED_HIGH => q.used_ring = high(q.used_ring),
            _ => {}
        }
    }
}

/// `bytes` as hex digits, for messages.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            read_config(&self.device.config_space(), offset - CONFIG_OFFSET, data);
            return;
        }
        let Ok(bytes) = <&mut [u8; 4]>::try_from(&mut *data) else {
            self.bad_access(format_args!(
                "{}-byte read of register {offset:#x}",
                data.len()
            ));
            data.fill(0);
            return;
        };
        *bytes = self.read_register(offset as u32).to_le_bytes();
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            self.device.write_config(offset - CONFIG_OFFSET, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.bad_access(format_args!(
                "{}-byte write to register {offset:#x}",
                data.len()
            ));
            return;
        };
        self.write_register(offset as u32, u32::from_le_bytes(bytes));
    }
}

impl Drop for MmioTransport {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::testutil::{TestQueue, test_memory};
    use std::sync::{Arc, Mutex};
    use virtio_queue::Queue;

    /// A device that records what the transport does to it.
    #[derive(Default)]
    struct Record {
        activations: Vec<(u64, Vec<QueueState>)>,
        deactivations: usize,
        resets: usize,
        config_writes: Vec<(u64, Vec<u8>)>,
    }

    struct Mock {
        record: Arc<Mutex<Record>>,
        queues: Option<Vec<Queue>>,
        sizes: Vec<u16>,
    }

    impl VirtioDevice for Mock {
        fn device_type(&self) -> u32 {
            42
        }
        fn name(&self) -> &str {
            "mock"
        }
        fn avail_features(&self) -> u64 {
            F_VERSION_1 | 0b101
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &self.sizes
        }
        fn config_space(&self) -> Vec<u8> {
            vec![1, 2, 3, 4, 5, 6, 7, 8]
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            self.record
                .lock()
                .unwrap()
                .config_writes
                .push((offset, data.to_vec()));
        }
        fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
            self.record.lock().unwrap().activations.push((
                a.acked_features,
                a.queues.iter().map(QueueState::from_queue).collect(),
            ));
            self.queues = Some(a.queues);
            Ok(())
        }
        fn deactivate(&mut self) -> Option<Vec<Queue>> {
            self.record.lock().unwrap().deactivations += 1;
            self.queues.take()
        }
        fn reset(&mut self) {
            self.record.lock().unwrap().resets += 1;
        }
    }

    fn transport() -> (MmioTransport, Arc<Mutex<Record>>, GuestMemoryMmap) {
        let record = Arc::new(Mutex::new(Record::default()));
        let mem = test_memory();
        let dev = Mock {
            record: record.clone(),
            queues: None,
            sizes: vec![256, 16],
        };
        (
            MmioTransport::new(Box::new(dev), mem.clone()).unwrap(),
            record,
            mem,
        )
    }

    fn r(t: &mut MmioTransport, offset: u32) -> u32 {
        let mut b = [0u8; 4];
        t.read(u64::from(offset), &mut b);
        u32::from_le_bytes(b)
    }

    fn w(t: &mut MmioTransport, offset: u32, value: u32) {
        t.write(u64::from(offset), &value.to_le_bytes());
    }

    /// Sets queue `sel` up at `base` the way a driver does.
    fn setup_queue(t: &mut MmioTransport, sel: u32, size: u32, base: u64) {
        w(t, VIRTIO_MMIO_QUEUE_SEL, sel);
        w(t, VIRTIO_MMIO_QUEUE_NUM, size);
        w(t, VIRTIO_MMIO_QUEUE_DESC_LOW, base as u32);
        w(t, VIRTIO_MMIO_QUEUE_DESC_HIGH, 0);
        w(t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, base as u32 + 0x2000);
        w(t, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, 0);
        w(t, VIRTIO_MMIO_QUEUE_USED_LOW, base as u32 + 0x4000);
        w(t, VIRTIO_MMIO_QUEUE_USED_HIGH, 0);
        w(t, VIRTIO_MMIO_QUEUE_READY, 1);
    }

    /// ACKNOWLEDGE, DRIVER, features, FEATURES_OK.
    fn negotiate(t: &mut MmioTransport, features: u64) {
        w(t, VIRTIO_MMIO_STATUS, ACKNOWLEDGE);
        w(t, VIRTIO_MMIO_STATUS, ACKNOWLEDGE | DRIVER);
        w(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        w(t, VIRTIO_MMIO_DRIVER_FEATURES, features as u32);
        w(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        w(t, VIRTIO_MMIO_DRIVER_FEATURES, (features >> 32) as u32);
        w(t, VIRTIO_MMIO_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    }

    #[test]
    fn identification_registers() {
        let (mut t, _, _) = transport();
        assert_eq!(r(&mut t, VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(r(&mut t, VIRTIO_MMIO_VERSION), 2);
        assert_eq!(r(&mut t, VIRTIO_MMIO_DEVICE_ID), 42);
        assert_eq!(r(&mut t, VIRTIO_MMIO_VENDOR_ID), VENDOR_ID);
        w(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        assert_eq!(r(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), 0b101);
        w(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), 1);
        w(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 2);
        assert_eq!(r(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), 0);
        w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 1);
        assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 16);
        w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 2);
        assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
        assert_eq!(r(&mut t, VIRTIO_MMIO_CONFIG_GENERATION), 0);
        assert_eq!(r(&mut t, VIRTIO_MMIO_SHM_LEN_LOW), u32::MAX);
        // Narrow register accesses are ignored and read 0.
        let mut b = [0xffu8; 2];
        t.read(0, &mut b);
        assert_eq!(b, [0, 0]);
    }

    #[test]
    fn config_space_takes_any_width() {
        let (mut t, record, _) = transport();
        let mut b = [0u8; 1];
        t.read(0x102, &mut b);
        assert_eq!(b, [3]);
        let mut b = [0u8; 8];
        t.read(0x100, &mut b);
        assert_eq!(b, [1, 2, 3, 4, 5, 6, 7, 8]);
        let mut b = [0xffu8; 4];
        t.read(0x106, &mut b);
        assert_eq!(b, [7, 8, 0, 0]);
        t.write(0x101, &[9, 9]);
        assert_eq!(record.lock().unwrap().config_writes, vec![(1, vec![9, 9])]);
    }

    #[test]
    fn full_handshake_activates_with_the_queues() {
        let (mut t, record, mem) = transport();
        let q0 = TestQueue::at(&mem, 256, 0x10000);
        let q1 = TestQueue::at(&mem, 16, 0x20000);
        negotiate(&mut t, F_VERSION_1 | 1);
        assert_eq!(
            r(&mut t, VIRTIO_MMIO_STATUS),
            ACKNOWLEDGE | DRIVER | FEATURES_OK
        );
        setup_queue(&mut t, 0, 256, q0.desc.0);
        setup_queue(&mut t, 1, 16, q1.desc.0);
        assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_READY), 1);
        assert!(record.lock().unwrap().activations.is_empty());
        w(
            &mut t,
            VIRTIO_MMIO_STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert!(t.is_running());
        let rec = record.lock().unwrap();
        assert_eq!(rec.activations.len(), 1);
        let (features, queues) = &rec.activations[0];
        assert_eq!(*features, F_VERSION_1 | 1);
        assert_eq!(queues[0].desc_table, 0x10000);
        assert_eq!(queues[0].avail_ring, 0x12000);
        assert_eq!(queues[0].used_ring, 0x14000);
        assert_eq!(queues[1].size, 16);
        drop(rec);
        // Queue registers are frozen once the device runs.
        w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
        w(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x5000);
        t.pause();
        assert_eq!(t.state().queues[0].desc_table, 0x10000);
        t.resume();
        assert!(t.is_running());
        assert_eq!(record.lock().unwrap().activations.len(), 2);
    }

    #[test]
    fn reset_stops_the_device_and_clears_everything() {
        let (mut t, record, mem) = transport();
        let q0 = TestQueue::at(&mem, 256, 0x10000);
        let q1 = TestQueue::at(&mem, 16, 0x20000);
        negotiate(&mut t, F_VERSION_1);
        setup_queue(&mut t, 0, 256, q0.desc.0);
        setup_queue(&mut t, 1, 16, q1.desc.0);
        w(
            &mut t,
            VIRTIO_MMIO_STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        t.interrupt.signal_used();
        assert_eq!(r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 1);
        w(&mut t, VIRTIO_MMIO_STATUS, 0);
        assert!(!t.is_running());
        let rec = record.lock().unwrap();
        assert_eq!((rec.deactivations, rec.resets), (1, 1));
        drop(rec);
        let s = t.state();
        assert_eq!(s.status, 0);
        assert_eq!(s.acked_features, 0);
        assert_eq!(s.interrupt_status, 0);
        assert_eq!(s.queues[0], QueueState::new(256));
        assert_eq!(s.queues[1], QueueState::new(16));
    }

    #[test]
    fn interrupt_ack_clears_status_bits() {
        let (mut t, _, _) = transport();
        t.interrupt
            .signal(super::super::INT_VRING | super::super::INT_CONFIG);
        w(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, super::super::INT_VRING);
        assert_eq!(
            r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS),
            super::super::INT_CONFIG
        );
    }

    #[test]
    fn out_of_order_status_and_writes_are_ignored() {
        let (mut t, record, _) = transport();
        // DRIVER before ACKNOWLEDGE; FEATURES_OK before DRIVER; unknown bits.
        w(&mut t, VIRTIO_MMIO_STATUS, DRIVER);
        assert_eq!(t.state().status, 0);
        w(&mut t, VIRTIO_MMIO_STATUS, ACKNOWLEDGE | FEATURES_OK);
        assert_eq!(t.state().status, 0);
        w(&mut t, VIRTIO_MMIO_STATUS, 0x100);
        assert_eq!(t.state().status, 0);
        // Features before DRIVER are ignored.
        w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
        assert_eq!(t.state().acked_features, 0);
        w(&mut t, VIRTIO_MMIO_STATUS, ACKNOWLEDGE);
        // Queue setup before FEATURES_OK is ignored.
        w(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1000);
        assert_eq!(t.state().queues[0].desc_table, 0);
        // Clearing a bit without reset is ignored.
        w(&mut t, VIRTIO_MMIO_STATUS, ACKNOWLEDGE | DRIVER);
        w(&mut t, VIRTIO_MMIO_STATUS, ACKNOWLEDGE);
        assert_eq!(t.state().status, ACKNOWLEDGE | DRIVER);
        // DRIVER_OK without FEATURES_OK does not start anything.
        w(&mut t, VIRTIO_MMIO_STATUS, ACKNOWLEDGE | DRIVER | DRIVER_OK);
        assert!(!t.is_running());
        assert!(record.lock().unwrap().activations.is_empty());
        // FAILED, even alone, is added to what is set; then only a reset
        // counts.
        w(&mut t, VIRTIO_MMIO_STATUS, FAILED);
        assert_eq!(t.state().status, ACKNOWLEDGE | DRIVER | FAILED);
        w(
            &mut t,
            VIRTIO_MMIO_STATUS,
            ACKNOWLEDGE | DRIVER | FAILED | FEATURES_OK,
        );
        assert_eq!(t.state().status, ACKNOWLEDGE | DRIVER | FAILED);
        w(&mut t, VIRTIO_MMIO_STATUS, 0);
        w(&mut t, VIRTIO_MMIO_STATUS, ACKNOWLEDGE | DRIVER);
        // Narrow and unknown register writes are ignored.
        t.write(VIRTIO_MMIO_STATUS as u64, &[0]);
        assert_eq!(t.state().status, ACKNOWLEDGE | DRIVER);
        w(&mut t, 0x28, 4096);
    }

    #[test]
    fn unsupported_features_are_refused() {
        let (mut t, _, _) = transport();
        // Without VERSION_1 (a legacy driver).
        negotiate(&mut t, 1);
        assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), ACKNOWLEDGE | DRIVER);
        w(&mut t, VIRTIO_MMIO_STATUS, 0);
        // A feature the device does not offer.
        negotiate(&mut t, F_VERSION_1 | 0b10);
        assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), ACKNOWLEDGE | DRIVER);
        w(&mut t, VIRTIO_MMIO_STATUS, 0);
        negotiate(&mut t, F_VERSION_1 | 0b100);
        assert_eq!(
            r(&mut t, VIRTIO_MMIO_STATUS),
            ACKNOWLEDGE | DRIVER | FEATURES_OK
        );
        // No feature changes after FEATURES_OK.
        w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 0);
        assert_eq!(t.state().acked_features, F_VERSION_1 | 0b100);
    }

    #[test]
    fn bad_queues_set_needs_reset_instead_of_activating() {
        let (mut t, record, mem) = transport();
        negotiate(&mut t, F_VERSION_1);
        let q0 = TestQueue::at(&mem, 256, 0x10000);
        setup_queue(&mut t, 0, 256, q0.desc.0);
        // Queue 1's rings beyond guest memory.
        setup_queue(&mut t, 1, 16, 0x7000_0000);
        // A size above the maximum is refused and the old one kept.
        w(&mut t, VIRTIO_MMIO_QUEUE_NUM, 32);
        assert_eq!(t.state().queues[1].size, 16);
        w(
            &mut t,
            VIRTIO_MMIO_STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert!(!t.is_running());
        assert!(record.lock().unwrap().activations.is_empty());
        assert_ne!(r(&mut t, VIRTIO_MMIO_STATUS) & NEEDS_RESET, 0);
        assert_ne!(
            r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS) & super::super::INT_CONFIG,
            0
        );
        // A reset recovers.
        w(&mut t, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), 0);
        // A queue left unready also refuses activation; misaligned rings too.
        negotiate(&mut t, F_VERSION_1);
        setup_queue(&mut t, 0, 256, q0.desc.0);
        setup_queue(&mut t, 1, 16, 0x20001);
        w(
            &mut t,
            VIRTIO_MMIO_STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert!(!t.is_running());
        assert_ne!(r(&mut t, VIRTIO_MMIO_STATUS) & NEEDS_RESET, 0);
    }

    #[test]
    fn notify_writes_reach_the_queue_eventfd() {
        let (mut t, _, _) = transport();
        w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 1);
        assert_eq!(t.queue_evts()[1].read().unwrap(), 1);
        assert!(t.queue_evts()[0].read().is_err());
        w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 7);
    }

    /// A running device: features negotiated, both queues set up,
    /// DRIVER_OK.
    fn started(t: &mut MmioTransport, mem: &GuestMemoryMmap) {
        let q0 = TestQueue::at(mem, 256, 0x10000);
        let q1 = TestQueue::at(mem, 16, 0x20000);
        negotiate(t, F_VERSION_1 | 1);
        setup_queue(t, 0, 256, q0.desc.0);
        setup_queue(t, 1, 16, q1.desc.0);
        w(
            t,
            VIRTIO_MMIO_STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert!(t.is_running());
    }

    #[test]
    fn state_loads_into_another_transport_and_resumes_there() {
        let (mut a, _, mem) = transport();
        started(&mut a, &mem);
        a.interrupt.signal_used();
        w(&mut a, VIRTIO_MMIO_QUEUE_SEL, 1);
        a.pause();
        let mut saved = a.state();
        saved.queues[0].next_avail = 41;
        saved.queues[0].next_used = 40;

        // A transport that has never been set up (a restore).
        let record = Arc::new(Mutex::new(Record::default()));
        let mut b = MmioTransport::new(
            Box::new(Mock {
                record: record.clone(),
                queues: None,
                sizes: vec![256, 16],
            }),
            mem.clone(),
        )
        .unwrap();
        b.queue_evts()[0].write(3).unwrap();
        b.load_state(&saved).unwrap();
        assert_eq!(b.state(), saved);
        assert!(!b.is_running(), "a loaded device waits for resume");
        assert!(b.queue_evts()[0].read().is_err(), "stale notifications");
        assert_eq!(r(&mut b, VIRTIO_MMIO_STATUS), 15);
        assert_eq!(r(&mut b, VIRTIO_MMIO_INTERRUPT_STATUS), 1);
        assert_eq!(r(&mut b, VIRTIO_MMIO_QUEUE_NUM_MAX), 16, "QueueSel kept");
        b.resume();
        assert!(b.is_running());
        let rec = record.lock().unwrap();
        assert_eq!(rec.activations.len(), 1);
        assert_eq!(rec.activations[0].0, F_VERSION_1 | 1);
        assert_eq!(rec.activations[0].1, saved.queues);
    }

    #[test]
    fn state_loads_again_and_again_into_the_same_transport() {
        let (mut t, record, mem) = transport();
        let fresh = t.state();
        started(&mut t, &mem);
        t.pause();
        let running = t.state();
        // Back to the state before the driver came, then forward again.
        t.load_state(&fresh).unwrap();
        t.resume();
        assert!(!t.is_running());
        assert_eq!(t.state(), fresh);
        t.load_state(&running).unwrap();
        t.resume();
        assert!(t.is_running());
        // Loading into a running transport stops its worker first.
        t.load_state(&fresh).unwrap();
        assert!(!t.is_running());
        let rec = record.lock().unwrap();
        assert_eq!(rec.activations.len(), 2);
        assert_eq!(rec.deactivations, 2);
    }

    #[test]
    fn states_that_do_not_fit_are_refused_and_change_nothing() {
        let (mut t, _, mem) = transport();
        started(&mut t, &mem);
        t.pause();
        let good = t.state();
        let before = t.state();
        let cases: Vec<(VirtioState, &str)> = vec![
            (
                VirtioState {
                    device_type: 2,
                    ..good.clone()
                },
                "device type 2",
            ),
            (
                VirtioState {
                    avail_features: F_VERSION_1,
                    ..good.clone()
                },
                "offered features",
            ),
            (
                VirtioState {
                    config: vec![1, 2, 3],
                    ..good.clone()
                },
                "configuration space (010203)",
            ),
            (
                VirtioState {
                    acked_features: F_VERSION_1 | 0b10,
                    ..good.clone()
                },
                "does not offer",
            ),
            (
                VirtioState {
                    status: 0x300,
                    ..good.clone()
                },
                "unknown bits",
            ),
            (
                VirtioState {
                    interrupt_status: 4,
                    ..good.clone()
                },
                "interrupt status",
            ),
            (
                VirtioState {
                    queues: good.queues[..1].to_vec(),
                    ..good.clone()
                },
                "1 queues",
            ),
            (
                VirtioState {
                    device: super::super::DeviceSpecific::Net { pending_rx: None },
                    ..good.clone()
                },
                "another device kind",
            ),
        ];
        let mut far = good.clone();
        far.queues[1].desc_table = 0x7000_0000;
        let mut big = good.clone();
        big.queues[1].size = 32;
        let mut odd = good.clone();
        odd.queues[0].size = 100;
        let mut cases = cases;
        cases.push((far, "not in guest memory"));
        cases.push((big, "size 32"));
        cases.push((odd, "queue 0 of the running device"));
        for (state, want) in cases {
            let err = t.load_state(&state).unwrap_err().to_string();
            assert!(err.starts_with("cannot load the saved state of virtio device mock: "));
            assert!(err.contains(want), "{err} (wanted {want:?})");
            assert_eq!(t.state(), before);
        }
        // A device not yet started may hold a queue it could not run.
        let mut setting_up = good.clone();
        setting_up.status = ACKNOWLEDGE | DRIVER | FEATURES_OK;
        setting_up.queues[0].size = 100;
        t.load_state(&setting_up).unwrap();
        t.resume();
        assert!(!t.is_running());
    }
}
