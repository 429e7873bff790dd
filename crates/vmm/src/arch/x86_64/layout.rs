//! Where twinvm places its boot structures in low guest memory.
//!
//! ```text
//! 0x0000_0500  GDT (4 entries)           0x0000_0520  IDT (empty)
//! 0x0000_7000  boot_params (zero page)   0x0000_8ff0  initial stack top
//! 0x0000_9000  PML4                      0x0000_a000  PDPT
//! 0x0001_0000  page directories, one per GiB identity mapped (up to 64)
//! 0x0005_0000  kernel command line       0x0009_fc00  MP table (to 640 KiB)
//! 0x0010_0000  kernel (1 MiB)            initrd: top of RAM below 3 GiB
//! 0xc000_0000  MMIO hole: devices, IOAPIC (0xfec0_0000), LAPIC (0xfee0_0000)
//! ```

/// Global descriptor table.
pub const GDT_START: u64 = 0x500;
/// Interrupt descriptor table (left empty; the guest loads its own).
pub const IDT_START: u64 = 0x520;
/// The Linux boot parameters ("zero page"); `RSI` points here at entry.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Top-level page table.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// First page directory (2 MiB pages); one per GiB mapped.
pub const PDE_START: u64 = 0x1_0000;
/// Most GiB the boot page tables identity map.
pub const MAX_IDENTITY_MAPPED_GIB: u64 = 64;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x5_0000;
/// Longest command line accepted, including the terminating NUL.
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// End of conventional memory; [640 KiB, 1 MiB) is the legacy hole.
pub const EBDA_START: u64 = 0x9_fc00;
/// Where kernels are loaded.
pub const HIMEM_START: u64 = 0x10_0000;
/// The IOAPIC's MMIO base.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// The local APIC's MMIO base.
pub const APIC_ADDR: u64 = 0xfee0_0000;
