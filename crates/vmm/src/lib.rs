//! The twinvm virtual machine: a KVM VM with guest memory, vCPU threads,
//! an in-kernel irqchip and PIT, legacy devices, and a boot path for Linux
//! bzImages and ELF kernels.

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
}

/// Why a VM ended without error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest powered off.
    PowerOff,
    /// The guest asked for a reset (reboot).
    Reset,
}

/// Errors that end a VM (placeholder until the VM module lands).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not yet implemented.
    #[error("not implemented")]
    Unimplemented,
}

/// Builds the VM described by `config`, boots it with the serial console on
/// stdin/stdout, and runs it until the guest powers off, resets or fails.
pub fn run(config: VmConfig) -> Result<VmExit, Error> {
    let _ = config;
    Err(Error::Unimplemented)
}
