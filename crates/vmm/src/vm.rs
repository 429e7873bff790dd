//! The VM: KVM objects, guest RAM, devices and vCPU threads, built from a
//! [`VmConfig`] and driven through pause, resume and dirty-page collection.

use std::fs::File;
use std::io::{Cursor, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::state::{self, VcpuSnapshot, VmArchSnapshot};
use crate::arch::x86_64::{boot, cpuid, mptable, msr, regs};
use crate::devices::legacy::{
    I8042, I8042_BASE, I8042_LEN, SERIAL_IRQ, SERIAL_PORT_BASE, SERIAL_PORT_LEN, SYSCTL_PORT,
    SerialDevice, SerialSnapshot, SerialStateError, SystemControl,
};
use crate::devices::virtio::{
    self, Backend, Backends, MmioTransport, NetBackend, VirtioDevice, VirtioState,
};
use crate::devices::{Bus, BusError, lock};
use crate::digest::StateDigest;
use crate::memory::{DirtyBitmap, GuestMemoryMmap, GuestRam, MMIO_HOLE_START, MemoryError};
use crate::snapshot::dir::SnapshotError;
use crate::snapshot::{ConfigFingerprint, Expected, FormatError, VmId};
use crate::vcpu::{Vcpu, VcpuCommand, VcpuError, VcpuHandle, VcpuReply, VcpuRequest, VcpuState};
use crate::{DiskConfig, KernelSource, NetConfig, VmConfig, VmEvent, VmExit};

/// Where KVM's real-mode TSS goes (three pages just below the IOAPIC area).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// Errors while building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `/dev/kvm` does not exist.
    #[error("/dev/kvm not found: this host does not provide KVM (is the kvm module loaded?)")]
    KvmMissing,
    /// `/dev/kvm` exists but may not be opened.
    #[error("permission denied opening /dev/kvm (run as root or join the kvm group)")]
    KvmPermission,
    /// `/dev/kvm` could not be opened for another reason.
    #[error("cannot open /dev/kvm")]
    KvmOpen(#[source] kvm_ioctls::Error),
    /// KVM lacks a capability twinvm needs.
    #[error("KVM on this host lacks the {0} capability twinvm needs")]
    KvmCapability(&'static str),
    /// A KVM VM-level call failed.
    #[error("cannot {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// More vCPUs than KVM (or the MP table) allows.
    #[error("--cpus {asked} exceeds this host's limit of {limit} vCPUs")]
    TooManyCpus {
        /// vCPUs asked for.
        asked: u8,
        /// The limit.
        limit: usize,
    },
    /// Zero vCPUs.
    #[error("--cpus must be at least 1")]
    NoCpus,
    /// More memory than the host has.
    #[error("guest memory of {asked} bytes exceeds the host's {host} bytes of memory")]
    MemoryExceedsHost {
        /// Bytes asked for.
        asked: u64,
        /// The host's RAM plus swap.
        host: u64,
    },
    /// Guest memory setup failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Loading the kernel, initrd or boot parameters failed.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// The MP table could not be written.
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    /// Register setup failed.
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    /// MSR setup failed.
    #[error(transparent)]
    Msr(#[from] msr::MsrError),
    /// A device could not be placed on its bus.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// A network device or disk could not be set up.
    #[error(transparent)]
    Virtio(#[from] virtio::Error),
    /// An eventfd could not be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// A vCPU thread failed.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The guest reported a panic.
    #[error("the guest reported a panic (see its console output)")]
    GuestPanic,
    /// The guest stopped in a way it cannot continue from.
    #[error("guest crashed: {0}")]
    GuestCrash(String),
    /// Machine state can only be read or written while the VM is paused.
    #[error("the VM must be paused to read or write its machine state")]
    NotPaused,
    /// A machine state of a VM with another vCPU count.
    #[error("the saved state has {saved} vCPUs, this VM has {here}")]
    VcpuCountMismatch {
        /// vCPUs in the state.
        saved: usize,
        /// vCPUs here.
        here: usize,
    },
    /// Reading or writing machine state failed (vCPU index, or 255 for the
    /// VM-wide part).
    #[error("machine state of {}", if *.0 == u8::MAX { "the VM".to_string() } else { format!("vCPU {}", .0) })]
    State(u8, #[source] state::StateError),
    /// A state of a VM with other virtio devices.
    #[error("the saved state has {saved} virtio devices, this VM has {here}")]
    DeviceCountMismatch {
        /// Devices in the state.
        saved: usize,
        /// Devices here.
        here: usize,
    },
    /// A saved virtio device state does not fit its device.
    #[error(transparent)]
    VirtioState(#[from] virtio::StateError),
    /// A saved serial port state cannot be loaded.
    #[error(transparent)]
    SerialState(#[from] SerialStateError),
    /// State bytes are malformed, corrupt, or of another VM.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// A snapshot directory could not be written or read.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// No identity could be generated for the VM.
    #[error("cannot generate the VM's identity")]
    Identity(#[source] std::io::Error),
    /// A vCPU thread answered out of turn (internal error).
    #[error("unexpected vCPU reply {0}")]
    UnexpectedReply(String),
    /// A device lacks its back end, so the VM may not run.
    #[error(
        "the VM's device back ends are not attached (e.g. during an incoming migration): attach them before starting or resuming it"
    )]
    BackendsDetached,
    /// A disk could not be synced before its back end was released.
    #[error("cannot sync the back end of virtio device {device}")]
    BackendSync {
        /// The device.
        device: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A network device index the VM does not have.
    #[error("the VM has no network device {index} (it has {count})")]
    NoSuchNetDevice {
        /// The index asked for.
        index: usize,
        /// The VM's network devices.
        count: usize,
    },
    /// All event senders are gone (internal error).
    #[error("the VM's event channel closed unexpectedly")]
    EventsClosed,
}

/// The machine state KVM holds for a VM: VM-wide in-kernel devices and
/// clock, then each vCPU in index order.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct MachineState {
    /// PIC, IOAPIC, PIT and kvmclock.
    pub arch: VmArchSnapshot,
    /// One entry per vCPU.
    #[serde(with = "crate::snapshot::codec::seq")]
    pub vcpus: Vec<VcpuSnapshot>,
}

/// The state of the VMM's devices. The i8042 and the system control port
/// have none.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceStates {
    /// The console UART.
    pub serial: SerialSnapshot,
    /// The virtio devices in guest order (network devices, then disks).
    #[serde(with = "crate::snapshot::codec::seq")]
    pub virtio: Vec<VirtioState>,
}

/// Everything a paused VM is, except its RAM: what KVM holds and what the
/// VMM's devices hold.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct VmState {
    /// vCPUs, interrupt controllers, PIT, clock.
    pub machine: MachineState,
    /// Serial port and virtio devices.
    pub devices: DeviceStates,
}

/// Where the serial console's bytes go and come from.
pub struct Console {
    /// Receives what the guest transmits.
    pub output: Box<dyn Write + Send>,
    /// Supplies what the guest receives, if anything.
    pub input: Option<Box<dyn Read + Send>>,
}

impl Console {
    /// The process's stdout and stdin.
    pub fn stdio() -> Self {
        Console {
            output: Box::new(std::io::stdout()),
            input: Some(Box::new(std::io::stdin())),
        }
    }
}

/// Opens KVM with errors that say what to do.
fn open_kvm() -> Result<Kvm, Error> {
    Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT | libc::ENODEV | libc::ENXIO => Error::KvmMissing,
        libc::EACCES | libc::EPERM => Error::KvmPermission,
        _ => Error::KvmOpen(e),
    })
}

/// Host RAM plus swap, in bytes.
fn host_memory() -> Option<u64> {
    // SAFETY: sysinfo only writes into the zeroed struct we pass.
    let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid, writable sysinfo struct.
    if unsafe { libc::sysinfo(&mut info) } != 0 {
        return None;
    }
    let unit = u64::from(info.mem_unit.max(1));
    Some((info.totalram as u64 + info.totalswap as u64) * unit)
}

/// A built VM.
pub struct Vm {
    // Field order is drop order: vCPU threads end before the VM fd closes,
    // and the VM fd closes before guest RAM is unmapped.
    vcpus: Mutex<Vec<VcpuHandle>>,
    paused: AtomicBool,
    // Device worker threads stop after the vCPUs (which reach the
    // transports through the MMIO bus) and before the VM fd closes.
    virtio: Vec<Arc<Mutex<MmioTransport>>>,
    serial: Arc<Mutex<SerialDevice>>,
    identity: Mutex<VmId>,
    /// The configurations the devices' back ends are opened from.
    net: Vec<NetConfig>,
    disks: Vec<DiskConfig>,
    /// Held across pause, resume and back-end changes, so that none of
    /// them sees the other half done.
    control: Mutex<()>,
    events_tx: Sender<VmEvent>,
    events: Mutex<Receiver<VmEvent>>,
    vm_fd: VmFd,
    ram: GuestRam,
    _kvm: Kvm,
}

impl Vm {
    /// Builds the VM: KVM objects, RAM, devices, the loaded kernel and
    /// vCPUs set to boot. Nothing runs until [`Vm::start`].
    pub fn new(config: &VmConfig, console: Console) -> Result<Vm, Error> {
        Self::build(config, console, Backends::Open)
    }

    /// Builds the VM exactly like [`Vm::new`], but opens no tap and no disk
    /// image: tap names are checked, disk images must exist and be regular
    /// files or block devices, and each disk's capacity comes from its
    /// image's size, read without opening it for writing or locking it.
    /// The devices have no back end until [`Vm::attach_backends`]; until
    /// then the VM refuses to start ([`Error::BackendsDetached`]).
    ///
    /// This is the destination of a migration: on the same host, its
    /// source still holds the taps (single-queue: one user at a time) and
    /// the images (locked) until it releases them
    /// ([`Vm::release_backends`]).
    pub fn new_incoming(config: &VmConfig, console: Console) -> Result<Vm, Error> {
        Self::build(config, console, Backends::Deferred)
    }

    fn build(config: &VmConfig, console: Console, backends: Backends) -> Result<Vm, Error> {
        if config.vcpus == 0 {
            return Err(Error::NoCpus);
        }
        if let Some(host) = host_memory()
            && config.memory_bytes > host
        {
            return Err(Error::MemoryExceedsHost {
                asked: config.memory_bytes,
                host,
            });
        }
        // Taps and disk images first: bad configuration is reported before
        // anything is built.
        let devices = virtio::open_devices(&config.net, &config.disks, backends)?;
        let identity = VmId::random().map_err(Error::Identity)?;
        let kvm = open_kvm()?;
        for (cap, name) in [
            (Cap::Irqchip, "in-kernel irqchip"),
            (Cap::Pit2, "PIT2"),
            (Cap::Irqfd, "irqfd"),
            (Cap::Ioeventfd, "ioeventfd"),
            (Cap::UserMemory, "user memory"),
            (Cap::ImmediateExit, "immediate exit"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(Error::KvmCapability(name));
            }
        }
        let limit = kvm.get_max_vcpus().min(usize::from(mptable::MAX_CPUS));
        if usize::from(config.vcpus) > limit {
            return Err(Error::TooManyCpus {
                asked: config.vcpus,
                limit,
            });
        }

        let vm_fd = kvm.create_vm().map_err(|e| Error::Kvm("create a VM", e))?;
        vm_fd
            .set_tss_address(KVM_TSS_ADDRESS)
            .map_err(|e| Error::Kvm("set the TSS address", e))?;
        vm_fd
            .create_irq_chip()
            .map_err(|e| Error::Kvm("create the in-kernel irqchip", e))?;
        vm_fd
            .create_pit2(kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            })
            .map_err(|e| Error::Kvm("create the in-kernel PIT", e))?;

        let ram = GuestRam::new(&vm_fd, config.memory_bytes)?;
        if config.prefault {
            ram.prefault()?;
        }
        let mem = ram.memory();
        let kernel = load_kernel(mem, &config.kernel)?;
        let low_ram_end = config.memory_bytes.min(MMIO_HOLE_START);
        let initrd = config
            .initrd
            .as_deref()
            .map(|p| boot::load_initrd(mem, p, &kernel, low_ram_end))
            .transpose()?;
        let device_words: Vec<String> = (0..devices.len()).map(virtio::cmdline_word).collect();
        let cmdline =
            boot::build_cmdline_with_devices(kernel.format, &device_words, &config.cmdline)?;
        boot::write_boot_params(
            mem,
            &boot::BootInfo {
                kernel: &kernel,
                cmdline: &cmdline,
                initrd,
                ram_size: config.memory_bytes,
            },
        )?;
        mptable::setup_mptable(mem, config.vcpus)?;
        regs::setup_page_tables(mem, ram_end(config.memory_bytes))?;

        let (events_tx, events) = channel();
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
        vm_fd
            .register_irqfd(&serial_irq, SERIAL_IRQ)
            .map_err(|e| Error::Kvm("register the serial port's irqfd", e))?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(serial_irq, console.output)));
        let mut pio = Bus::new();
        pio.insert(serial.clone(), SERIAL_PORT_BASE, SERIAL_PORT_LEN)?;
        pio.insert(
            Arc::new(Mutex::new(I8042::new(events_tx.clone()))),
            I8042_BASE,
            I8042_LEN,
        )?;
        pio.insert(
            Arc::new(Mutex::new(SystemControl::new(events_tx.clone()))),
            SYSCTL_PORT,
            1,
        )?;
        let pio = Arc::new(pio);
        let mut mmio = Bus::new();
        let virtio = attach_virtio(&vm_fd, &mut mmio, mem, devices)?;
        let mmio = Arc::new(mmio);

        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| Error::Kvm("read KVM's supported CPUID", e))?;
        let msr_candidates = kvm
            .get_msr_index_list()
            .map_err(|e| Error::Kvm("read KVM's MSR list", e))?;
        let mut msr_list = None;
        let mut vcpus = Vec::new();
        let mut handles = Vec::new();
        for index in 0..config.vcpus {
            let fd = vm_fd
                .create_vcpu(u64::from(index))
                .map_err(|e| Error::Kvm("create a vCPU", e))?;
            let mut cpuid = supported.clone();
            cpuid::adjust_for_vcpu(&mut cpuid, index, config.vcpus);
            fd.set_cpuid2(&cpuid)
                .map_err(|e| Error::Kvm("set a vCPU's CPUID", e))?;
            msr::setup_msrs(&fd)?;
            regs::setup_lint(&fd)?;
            if index == 0 {
                regs::setup_boot_vcpu(&fd, mem, kernel.entry)?;
            }
            // Every vCPU has the same CPUID features, so the MSRs readable
            // on the first are readable on all.
            let msrs = msr_list
                .get_or_insert_with(|| state::readable_msrs(&fd, msr_candidates.as_slice()))
                .clone();
            vcpus.push(Vcpu::new(
                index,
                fd,
                pio.clone(),
                mmio.clone(),
                mem.clone(),
                events_tx.clone(),
                msrs,
            ));
        }
        for vcpu in vcpus {
            handles.push(vcpu.start(VcpuState::Paused)?);
        }
        if let Some(input) = console.input {
            spawn_console_input(input, serial.clone());
        }
        Ok(Vm {
            vcpus: Mutex::new(handles),
            paused: AtomicBool::new(true),
            virtio,
            serial,
            identity: Mutex::new(identity),
            net: config.net.clone(),
            disks: config.disks.clone(),
            control: Mutex::new(()),
            events_tx,
            events: Mutex::new(events),
            vm_fd,
            ram,
            _kvm: kvm,
        })
    }

    fn command_all(&self, command: VcpuCommand) -> Result<(), Error> {
        let vcpus = lock(&self.vcpus);
        for v in vcpus.iter() {
            v.send(VcpuRequest::Command(command))?;
        }
        for v in vcpus.iter() {
            v.wait_reply("state change")?;
        }
        Ok(())
    }

    /// Whether the VM is paused (or not yet started).
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// Reads the machine state KVM holds — every vCPU, the in-kernel
    /// interrupt controllers, PIT and clock. The VM must be paused.
    pub fn save_machine_state(&self) -> Result<MachineState, Error> {
        if !self.is_paused() {
            return Err(Error::NotPaused);
        }
        let arch = state::save_vm(&self.vm_fd).map_err(|e| Error::State(u8::MAX, e))?;
        let mut vcpus = Vec::new();
        for v in lock(&self.vcpus).iter() {
            match v.request(VcpuRequest::SaveState)? {
                VcpuReply::Saved(s) => vcpus.push(*s),
                VcpuReply::Failed(e) => return Err(Error::State(v.index(), e)),
                other => return Err(Error::UnexpectedReply(format!("{other:?}"))),
            }
        }
        Ok(MachineState { arch, vcpus })
    }

    /// Writes a machine state into this VM's existing KVM objects. The VM
    /// must be paused, and the state must come from a VM with as many
    /// vCPUs.
    pub fn load_machine_state(&self, state: MachineState) -> Result<(), Error> {
        if !self.is_paused() {
            return Err(Error::NotPaused);
        }
        let vcpus = lock(&self.vcpus);
        if state.vcpus.len() != vcpus.len() {
            return Err(Error::VcpuCountMismatch {
                saved: state.vcpus.len(),
                here: vcpus.len(),
            });
        }
        state::load_vm(&self.vm_fd, &state.arch).map_err(|e| Error::State(u8::MAX, e))?;
        for (v, s) in vcpus.iter().zip(state.vcpus) {
            match v.request(VcpuRequest::LoadState(Box::new(s)))? {
                VcpuReply::Loaded => {}
                VcpuReply::Failed(e) => return Err(Error::State(v.index(), e)),
                other => return Err(Error::UnexpectedReply(format!("{other:?}"))),
            }
        }
        Ok(())
    }

    /// The VM's identity: random at creation, or adopted from the state of
    /// another VM ([`Vm::set_identity`], [`Vm::restore_from`]).
    pub fn identity(&self) -> VmId {
        *lock(&self.identity)
    }

    /// Adopts `id`, e.g. the identity of the VM a migration or checkpoint
    /// stream comes from.
    pub fn set_identity(&self, id: VmId) {
        *lock(&self.identity) = id;
    }

    /// The shape state must have to load into this VM: memory size, vCPU
    /// count, virtio device types.
    pub fn fingerprint(&self) -> ConfigFingerprint {
        ConfigFingerprint {
            memory_bytes: self.ram.size(),
            vcpus: self.vcpu_count() as u32,
            devices: self.virtio.iter().map(|d| lock(d).device_type()).collect(),
        }
    }

    /// Reads the whole state of the paused VM except RAM: the machine state
    /// ([`Vm::save_machine_state`]), the serial port, and every virtio
    /// device (registers, queues, in-flight work).
    pub fn save_state(&self) -> Result<VmState, Error> {
        let machine = self.save_machine_state()?;
        let serial = lock(&self.serial).save_state();
        let virtio = self.virtio.iter().map(|d| lock(d).state()).collect();
        Ok(VmState {
            machine,
            devices: DeviceStates { serial, virtio },
        })
    }

    /// Loads `state` into this paused VM's existing objects (its RAM must
    /// already hold the matching contents). Everything is checked before
    /// anything is written: a state of a VM of another shape, or with
    /// device states that do not fit these devices, is refused and the VM
    /// is left as it was. Then the machine state, the serial port and the
    /// virtio devices are loaded; devices the driver had started resume
    /// with the VM.
    pub fn load_state(&self, state: VmState) -> Result<(), Error> {
        if !self.is_paused() {
            return Err(Error::NotPaused);
        }
        self.check_state(&state)?;
        self.load_machine_state(state.machine)?;
        lock(&self.serial).load_state(&state.devices.serial)?;
        for (d, s) in self.virtio.iter().zip(&state.devices.virtio) {
            lock(d).load_state(s)?;
        }
        Ok(())
    }

    /// Checks, without changing anything, that `state` fits this VM: as
    /// many vCPUs and virtio devices, and device states these devices can
    /// take ([`MmioTransport::check_state`]).
    pub fn check_state(&self, state: &VmState) -> Result<(), Error> {
        let here = self.vcpu_count();
        if state.machine.vcpus.len() != here {
            return Err(Error::VcpuCountMismatch {
                saved: state.machine.vcpus.len(),
                here,
            });
        }
        if state.devices.virtio.len() != self.virtio.len() {
            return Err(Error::DeviceCountMismatch {
                saved: state.devices.virtio.len(),
                here: self.virtio.len(),
            });
        }
        for (d, s) in self.virtio.iter().zip(&state.devices.virtio) {
            lock(d).check_state(s)?;
        }
        SerialDevice::check_state(&state.devices.serial)?;
        Ok(())
    }

    /// [`Vm::save_state`], encoded in twinvm's state format with this VM's
    /// identity and fingerprint.
    pub fn save_state_bytes(&self) -> Result<Vec<u8>, Error> {
        let state = self.save_state()?;
        Ok(crate::snapshot::encode(
            self.identity(),
            &self.fingerprint(),
            &state,
        )?)
    }

    /// Decodes `bytes` (a state of this VM's shape, and of the VM
    /// `identity` if given) and loads it with [`Vm::load_state`].
    pub fn load_state_bytes(&self, bytes: &[u8], identity: Option<VmId>) -> Result<(), Error> {
        let fingerprint = self.fingerprint();
        let (_, state) = crate::snapshot::decode::<VmState>(
            bytes,
            &Expected {
                identity,
                fingerprint: Some(&fingerprint),
            },
        )?;
        self.load_state(state)
    }

    /// Writes a snapshot of the paused VM into `dir` (created if needed):
    /// `memory.bin` (guest RAM) and `state.bin` (the state, in twinvm's
    /// format). See [`crate::snapshot::dir`].
    pub fn snapshot_to(&self, dir: &std::path::Path) -> Result<(), Error> {
        crate::snapshot::dir::snapshot_to(self, dir)
    }

    /// Loads the snapshot in `dir` into this paused VM, built with the same
    /// configuration as the snapshotted one: RAM, then the state; the VM
    /// adopts the snapshot's identity. Start it to continue the guest.
    pub fn restore_from(&self, dir: &std::path::Path) -> Result<(), Error> {
        crate::snapshot::dir::restore_from(self, dir)
    }

    /// Syncs the back ends of the (paused) virtio devices: disk images are
    /// made durable.
    pub(crate) fn sync_devices(&self) -> Result<(), SnapshotError> {
        for d in &self.virtio {
            let mut d = lock(d);
            d.sync_backend().map_err(|source| SnapshotError::Sync {
                device: d.name().to_string(),
                source,
            })?;
        }
        Ok(())
    }

    /// Starts (or resumes) every vCPU and device worker thread. Refused,
    /// with nothing started, while a device lacks its back end
    /// ([`Error::BackendsDetached`]).
    pub fn resume(&self) -> Result<(), Error> {
        let _control = lock(&self.control);
        if !self.backends_attached() {
            return Err(Error::BackendsDetached);
        }
        for d in &self.virtio {
            lock(d).resume();
        }
        self.command_all(VcpuCommand::Resume)?;
        self.paused.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// Starts the guest. Same as [`Vm::resume`].
    pub fn start(&self) -> Result<(), Error> {
        self.resume()
    }

    /// Freezes every vCPU and device worker thread; returns once none of
    /// them runs guest code or writes guest memory.
    pub fn pause(&self) -> Result<(), Error> {
        let _control = lock(&self.control);
        self.command_all(VcpuCommand::Pause)?;
        // Device workers stop too: nothing changes guest memory (a frame
        // arriving waits in its back end) until resume.
        for d in &self.virtio {
            lock(d).pause();
        }
        self.paused.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Whether every virtio device has its back end (its tap or disk
    /// image).
    pub fn backends_attached(&self) -> bool {
        self.virtio.iter().all(|d| lock(d).has_backend())
    }

    /// Opens the back end of every device that lacks one — attaches to its
    /// tap, opens and locks its disk image — from the VM's configuration,
    /// and gives it to the device. The VM must be paused. All or nothing:
    /// if one cannot be opened (e.g. [`virtio::Error::TapBusy`],
    /// [`virtio::Error::DiskLocked`] while another VM still holds it) or
    /// does not fit (a disk image whose size differs from the disk's
    /// capacity), the back ends this call attached are released again and
    /// the error returned. Devices that have their back end keep it.
    pub fn attach_backends(&self) -> Result<(), Error> {
        let _control = lock(&self.control);
        if !self.is_paused() {
            return Err(Error::NotPaused);
        }
        let configs = virtio::device_configs(&self.net, &self.disks);
        let mut attached: Vec<&Arc<Mutex<MmioTransport>>> = Vec::new();
        for (device, config) in self.virtio.iter().zip(configs) {
            if lock(device).has_backend() {
                continue;
            }
            let result = config
                .open_backend()
                .and_then(|backend| lock(device).set_backend(backend));
            if let Err(e) = result {
                for device in attached {
                    drop(lock(device).take_backend());
                }
                return Err(e.into());
            }
            attached.push(device);
        }
        Ok(())
    }

    /// Gives network device `index` (0 for the first configured network
    /// device; disks do not count) `backend` in place of the one it has,
    /// if any, which is dropped (a tap is closed). The VM must be paused.
    /// The device keeps it until [`Vm::release_backends`] or the next
    /// call; [`Vm::attach_backends`] leaves it alone. E.g. a
    /// [`virtio::DiscardNet`] for a COLO secondary whose guest must not
    /// reach the network.
    pub fn set_net_backend(&self, index: usize, backend: Box<dyn NetBackend>) -> Result<(), Error> {
        let _control = lock(&self.control);
        if !self.is_paused() {
            return Err(Error::NotPaused);
        }
        // Network devices come first in guest order.
        let device = self
            .virtio
            .get(index)
            .filter(|_| index < self.net.len())
            .ok_or(Error::NoSuchNetDevice {
                index,
                count: self.net.len(),
            })?;
        let mut device = lock(device);
        drop(device.take_backend());
        device.set_backend(Backend::Net(backend))?;
        Ok(())
    }

    /// Number of network devices (the first virtio devices in guest
    /// order).
    pub fn net_count(&self) -> usize {
        self.net.len()
    }

    /// Syncs every disk, then drops every device's back end: taps are
    /// closed and disk images unlocked, so that another process (the
    /// destination of a migration) can open them. The VM must be paused,
    /// and cannot run again until [`Vm::attach_backends`]. If a disk cannot
    /// be synced, nothing is released and the error returned. Releasing
    /// what is released already does nothing.
    ///
    /// A frame a network device took from its tap but could not deliver
    /// yet stays in the device (and in its state).
    pub fn release_backends(&self) -> Result<(), Error> {
        let _control = lock(&self.control);
        if !self.is_paused() {
            return Err(Error::NotPaused);
        }
        for d in &self.virtio {
            let mut d = lock(d);
            d.sync_backend().map_err(|source| Error::BackendSync {
                device: d.name().to_string(),
                source,
            })?;
        }
        for d in &self.virtio {
            drop(lock(d).take_backend());
        }
        Ok(())
    }

    /// The pages written since the last call (by the guest or the VMM).
    pub fn take_dirty(&self) -> Result<DirtyBitmap, Error> {
        Ok(self.ram.take_dirty(&self.vm_fd)?)
    }

    /// Returns all of guest RAM to untouched zero pages, giving its memory
    /// back to the host, and clears the VMM-side dirty bitmap
    /// ([`GuestRam::discard`]). The VM must be paused. The destination of a
    /// migration does this before pages arrive: its RAM holds the kernel it
    /// loaded when it was built.
    pub fn discard_ram(&self) -> Result<(), Error> {
        let _control = lock(&self.control);
        if !self.is_paused() {
            return Err(Error::NotPaused);
        }
        Ok(self.ram.discard()?)
    }

    /// Whether all of guest RAM was allocated when the VM was built
    /// ([`VmConfig::prefault`]).
    pub fn ram_prefaulted(&self) -> bool {
        self.ram.is_prefaulted()
    }

    /// The pages of guest RAM that may hold something other than zeros:
    /// those present in this process's page tables or in swap, read from
    /// `/proc/self/pagemap` ([`crate::memory::populated_pages`]). Pages
    /// never touched are zeros for certain. If pagemap cannot be read,
    /// every page (a warning is logged once). One slot per memory slot, as
    /// [`Vm::take_dirty`] returns. On a running VM, a snapshot of a moving
    /// set.
    pub fn populated_pages(&self) -> Result<DirtyBitmap, Error> {
        Ok(self.ram.populated_pages())
    }

    /// A digest of the paused VM: its RAM (per 2 MiB chunk), its device
    /// states and its vCPUs' general and special registers; see
    /// [`crate::digest`] for exactly what it covers. Two VMs with equal
    /// digests hold the same guest state, e.g. the source and destination
    /// of a migration.
    pub fn digest(&self) -> Result<StateDigest, Error> {
        self.digest_at(crate::digest::CHUNK_SIZE)
    }

    /// [`Vm::digest`] per 4 KiB page of RAM: it lists only the pages that
    /// are not all zeros, and [`StateDigest::first_difference`] names the
    /// first page that differs. Comparable only with other page digests
    /// (another granularity differs in layout).
    pub fn page_digest(&self) -> Result<StateDigest, Error> {
        self.digest_at(crate::memory::PAGE_SIZE)
    }

    fn digest_at(&self, chunk_size: u64) -> Result<StateDigest, Error> {
        let _control = lock(&self.control);
        if !self.is_paused() {
            return Err(Error::NotPaused);
        }
        let state = self.save_state()?;
        let populated = self.ram.populated_pages();
        crate::digest::compute(
            self.ram.memory(),
            &populated,
            chunk_size,
            &state.devices,
            &state.machine.vcpus,
        )
    }

    /// Ends the VM as migrated: [`Vm::wait`] returns
    /// [`VmExit::Migrated`]. For the source of a migration, once the guest
    /// lives on at the destination.
    pub fn end_migrated(&self) {
        // The receiver lives in `self`: the send cannot fail.
        let _ = self.events_tx.send(VmEvent::Migrated);
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        self.ram.memory()
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> usize {
        lock(&self.vcpus).len()
    }

    /// Queues bytes for the guest's serial port, waiting (bounded by
    /// `timeout`) while its receive FIFO is full. Returns the bytes queued.
    pub fn send_console_input(&self, bytes: &[u8], timeout: Duration) -> usize {
        feed_serial(&self.serial, bytes, Some(timeout))
    }

    /// A sender for VM events, so that other parts (e.g. an API) can end the
    /// VM.
    pub fn event_sender(&self) -> Sender<VmEvent> {
        self.events_tx.clone()
    }

    /// The virtio devices, in guest order (network devices, then disks).
    pub fn virtio_devices(&self) -> &[Arc<Mutex<MmioTransport>>] {
        &self.virtio
    }

    /// Waits until the guest ends or fails, or the VM is ended as migrated
    /// ([`Vm::end_migrated`]); stops every vCPU and device worker thread.
    /// The VM cannot run again afterwards.
    pub fn wait(&self) -> Result<VmExit, Error> {
        let event = lock(&self.events).recv().map_err(|_| Error::EventsClosed)?;
        for v in lock(&self.vcpus).iter_mut() {
            v.exit();
        }
        for d in &self.virtio {
            lock(d).shutdown();
        }
        match event {
            VmEvent::PowerOff => Ok(VmExit::PowerOff),
            VmEvent::Reset => Ok(VmExit::Reset),
            VmEvent::Migrated => Ok(VmExit::Migrated),
            VmEvent::GuestPanic => Err(Error::GuestPanic),
            VmEvent::Crash(msg) => Err(Error::GuestCrash(msg)),
        }
    }
}

/// Puts each virtio device behind a transport on the MMIO bus at its
/// address, with an ioeventfd per queue on QueueNotify (data: the queue
/// index) and an irqfd on its GSI.
fn attach_virtio(
    vm_fd: &VmFd,
    bus: &mut Bus,
    mem: &GuestMemoryMmap,
    devices: Vec<Box<dyn VirtioDevice>>,
) -> Result<Vec<Arc<Mutex<MmioTransport>>>, Error> {
    let mut transports = Vec::with_capacity(devices.len());
    for (index, device) in devices.into_iter().enumerate() {
        let base = virtio::mmio_address(index);
        let transport = MmioTransport::new(device, mem.clone())?;
        let notify = IoEventAddress::Mmio(base + virtio::mmio::NOTIFY_OFFSET);
        for (queue, evt) in transport.queue_evts().iter().enumerate() {
            vm_fd
                .register_ioevent(evt, &notify, queue as u32)
                .map_err(|e| Error::Kvm("register a virtio queue's ioeventfd", e))?;
        }
        vm_fd
            .register_irqfd(transport.irqfd(), virtio::gsi(index))
            .map_err(|e| Error::Kvm("register a virtio device's irqfd", e))?;
        let transport = Arc::new(Mutex::new(transport));
        bus.insert(transport.clone(), base, virtio::MMIO_SIZE)?;
        transports.push(transport);
    }
    Ok(transports)
}

/// One past the last guest-physical RAM address.
fn ram_end(size: u64) -> u64 {
    crate::memory::ram_ranges(size)
        .ok()
        .and_then(|r| r.last().map(|(a, l)| a.0 + l))
        .unwrap_or(size)
}

fn load_kernel(mem: &GuestMemoryMmap, source: &KernelSource) -> Result<boot::LoadedKernel, Error> {
    Ok(match source {
        KernelSource::File(path) => {
            let mut file: File = boot::open_kernel(path)?;
            boot::load_kernel(mem, &path.display().to_string(), &mut file)?
        }
        KernelSource::Bytes(bytes) => {
            boot::load_kernel(mem, "the bundled test guest", &mut Cursor::new(*bytes))?
        }
    })
}

/// Moves `bytes` into the serial receive FIFO as room frees up. With a
/// timeout, gives up after it; returns the bytes queued.
fn feed_serial(serial: &Mutex<SerialDevice>, bytes: &[u8], timeout: Option<Duration>) -> usize {
    let start = std::time::Instant::now();
    let mut done = 0;
    while done < bytes.len() {
        let n = {
            let mut s = lock(serial);
            if s.input_capacity() == 0 {
                0
            } else {
                s.enqueue_input(&bytes[done..])
            }
        };
        done += n;
        if n == 0 {
            if timeout.is_some_and(|t| start.elapsed() >= t) {
                break;
            }
            // The guest drains the FIFO at its own pace; poll gently.
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    done
}

/// Copies console input into the serial port on a thread of its own.
fn spawn_console_input(mut input: Box<dyn Read + Send>, serial: Arc<Mutex<SerialDevice>>) {
    let spawned = std::thread::Builder::new()
        .name("console-in".into())
        .spawn(move || {
            let mut buf = [0u8; 64];
            loop {
                match input.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        feed_serial(&serial, &buf[..n], None);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("console input disabled: cannot start its thread: {e}");
    }
}

/// Builds the VM described by `config` with its console on stdin/stdout,
/// runs it until the guest powers off, resets or fails.
pub fn run(config: VmConfig) -> Result<VmExit, Error> {
    let vm = Vm::new(&config, Console::stdio())?;
    vm.start()?;
    vm.wait()
}

#[cfg(test)]
mod tests {
    #[test]
    fn vm_can_be_shared_between_threads() {
        fn shareable<T: Send + Sync>() {}
        shareable::<super::Vm>();
    }
}
