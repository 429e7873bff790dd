//! The twinvm virtual machine: a KVM VM with guest memory, vCPU threads,
//! an in-kernel irqchip and PIT, legacy devices, and a boot path for Linux
//! bzImages and ELF kernels.

pub mod arch;
pub mod devices;
pub mod digest;
pub mod memory;
mod page_bitmap;
pub mod snapshot;
#[cfg(test)]
pub(crate) mod testing;
pub mod vcpu;
pub mod vm;
#[cfg(test)]
mod vm_tests;

pub use devices::virtio::{Backend, Backends, DiscardNet, NetBackend};
pub use digest::{DigestDifference, StateDigest};
pub use snapshot::VmId;
pub use vm::{Console, DeviceStates, Error, MachineState, Vm, VmState, run};

use std::path::PathBuf;

/// Where the guest kernel comes from.
#[derive(Clone, Debug)]
pub enum KernelSource {
    /// A file on the host: a Linux bzImage or an x86_64 ELF image.
    File(PathBuf),
    /// An image already in memory (the bundled test guest).
    Bytes(&'static [u8]),
}

/// Everything needed to build and boot a VM.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// The kernel image.
    pub kernel: KernelSource,
    /// An initramfs for a Linux kernel.
    pub initrd: Option<PathBuf>,
    /// Extra kernel command line, appended to twinvm's defaults.
    pub cmdline: String,
    /// Network devices, in the order the guest sees them.
    pub net: Vec<NetConfig>,
    /// Block devices, in the order the guest sees them.
    pub disks: Vec<DiskConfig>,
    /// Allocate all of guest RAM when the VM is built instead of page by
    /// page as it is first touched ([`memory::GuestRam::prefault`]).
    pub prefault: bool,
}

/// A virtio-net device backed by a host tap device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// Name of an existing tap device on the host.
    pub tap: String,
    /// The guest's MAC address; twinvm picks a locally administered one if
    /// absent.
    pub mac: Option<[u8; 6]>,
}

/// A virtio-blk device backed by a raw image file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    /// The image file.
    pub path: PathBuf,
    /// Refuse guest writes.
    pub readonly: bool,
    /// The ID the guest reads (VIRTIO_BLK_T_GET_ID, up to 20 bytes); twinvm
    /// derives one from the device index if absent.
    pub serial: Option<String>,
}

/// Why a VM ended without error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest powered off.
    PowerOff,
    /// The guest asked for a reset (reboot).
    Reset,
    /// The VM was migrated: it lives on elsewhere ([`Vm::end_migrated`]).
    Migrated,
}

/// Something that ends the VM, reported by a vCPU or a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmEvent {
    /// The guest powered off.
    PowerOff,
    /// The guest asked for a reset.
    Reset,
    /// The VM was migrated and lives on elsewhere.
    Migrated,
    /// The guest reported a panic.
    GuestPanic,
    /// The guest stopped in a way it cannot continue from.
    Crash(String),
}
