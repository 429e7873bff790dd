//! vCPU register state at entry: 64-bit long mode with identity-mapped
//! paging, flat segments, and the local APIC's LINT pins wired for the
//! legacy PIC — the state the 64-bit Linux boot protocol specifies.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

use super::layout::{
    BOOT_STACK_POINTER, GDT_START, IDT_START, MAX_IDENTITY_MAPPED_GIB, PDE_START, PDPTE_START,
    PML4_START, ZERO_PAGE_START,
};

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_MP: u64 = 1 << 1;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_NE: u64 = 1 << 5;
const X86_CR0_WP: u64 = 1 << 16;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const X86_CR4_OSFXSR: u64 = 1 << 9;
const X86_CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Selector of the 64-bit code segment.
pub const CODE_SELECTOR: u16 = 0x08;
/// Selector of the data segment.
pub const DATA_SELECTOR: u16 = 0x10;
const TSS_SELECTOR: u16 = 0x18;

/// Errors while setting up vCPU registers.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// A boot structure could not be written to guest memory.
    #[error("cannot write the boot {0} to guest memory")]
    Write(&'static str, #[source] vm_memory::GuestMemoryError),
    /// KVM refused a register write.
    #[error("cannot set vCPU {0}")]
    Set(&'static str, #[source] kvm_ioctls::Error),
}

/// Builds a GDT entry from its flags (upper nibble of byte 6 and access byte
/// packed as `0xF0AA`), base and limit.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << 32)
        | ((u64::from(flags) & 0xf0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << 32)
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

/// The KVM segment register matching a GDT entry.
pub fn segment_from_gdt(entry: u64, selector: u16) -> kvm_segment {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24),
        limit: {
            let raw = (((entry >> 48) & 0xf) << 16 | (entry & 0xffff)) as u32;
            if bit(55) == 1 {
                (raw << 12) | 0xfff
            } else {
                raw
            }
        },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: bit(47),
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: bit(55),
        avl: bit(52),
        unusable: u8::from(bit(47) == 0),
        padding: 0,
    }
}

/// The boot GDT: null, 64-bit code, data, TSS.
pub fn boot_gdt() -> [u64; 4] {
    [
        0,
        gdt_entry(0xa09b, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
    ]
}

/// Number of GiB the boot page tables map: all RAM, at least the first 4 GiB
/// (so the MMIO hole is reachable), at most [`MAX_IDENTITY_MAPPED_GIB`].
pub fn identity_mapped_gib(ram_end: u64) -> u64 {
    ram_end.div_ceil(1 << 30).clamp(4, MAX_IDENTITY_MAPPED_GIB)
}

/// Writes identity-mapping page tables (2 MiB pages) covering
/// [`identity_mapped_gib`] of the address space.
pub fn setup_page_tables<M: GuestMemory>(mem: &M, ram_end: u64) -> Result<(), RegsError> {
    let gib = identity_mapped_gib(ram_end);
    let write = |addr: u64, val: u64| {
        mem.write_obj(val, GuestAddress(addr))
            .map_err(|e| RegsError::Write("page tables", e))
    };
    write(PML4_START, PDPTE_START | 0x3)?;
    for g in 0..gib {
        let pd = PDE_START + g * 0x1000;
        write(PDPTE_START + g * 8, pd | 0x3)?;
        for i in 0..512u64 {
            // Present, writable, page size (2 MiB).
            write(pd + i * 8, ((g << 30) + (i << 21)) | 0x83)?;
        }
    }
    Ok(())
}

/// Writes the GDT and an empty IDT, and returns the special registers for
/// 64-bit mode with paging rooted at [`PML4_START`].
pub fn long_mode_sregs<M: GuestMemory>(
    mem: &M,
    mut sregs: kvm_sregs,
) -> Result<kvm_sregs, RegsError> {
    let gdt = boot_gdt();
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_START).unchecked_add(i as u64 * 8))
            .map_err(|e| RegsError::Write("GDT", e))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_START))
        .map_err(|e| RegsError::Write("IDT", e))?;
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = IDT_START;
    sregs.idt.limit = 7;

    let code = segment_from_gdt(gdt[1], CODE_SELECTOR);
    let data = segment_from_gdt(gdt[2], DATA_SELECTOR);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(gdt[3], TSS_SELECTOR);

    sregs.cr3 = PML4_START;
    sregs.cr4 = X86_CR4_PAE | X86_CR4_OSFXSR | X86_CR4_OSXMMEXCPT;
    sregs.cr0 = X86_CR0_PE | X86_CR0_MP | X86_CR0_ET | X86_CR0_NE | X86_CR0_WP | X86_CR0_PG;
    sregs.efer = EFER_LME | EFER_LMA;
    Ok(sregs)
}

/// General registers at entry: `RIP` at the kernel entry, `RSI` at the zero
/// page (64-bit boot protocol), a small boot stack.
pub fn boot_regs(entry: GuestAddress) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry.raw_value(),
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    }
}

/// The x87/SSE state at reset: FCW 0x37f, MXCSR 0x1f80.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn set_lvt_mode(lapic: &mut kvm_lapic_state, offset: usize, mode: u32) {
    let reg = &mut lapic.regs[offset..offset + 4];
    let mut val = u32::from_le_bytes([reg[0] as u8, reg[1] as u8, reg[2] as u8, reg[3] as u8]);
    val = (val & !0x700) | (mode << 8);
    for (dst, src) in reg.iter_mut().zip(val.to_le_bytes()) {
        *dst = src as _;
    }
}

/// Wires LINT0 to the 8259 PIC (ExtINT) and LINT1 to NMI, as firmware does.
pub fn setup_lint(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut lapic = vcpu
        .get_lapic()
        .map_err(|e| RegsError::Set("local APIC", e))?;
    set_lvt_mode(&mut lapic, APIC_LVT0, APIC_MODE_EXTINT);
    set_lvt_mode(&mut lapic, APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic)
        .map_err(|e| RegsError::Set("local APIC", e))
}

/// Puts the boot vCPU into 64-bit mode at `entry`.
pub fn setup_boot_vcpu<M: GuestMemory>(
    vcpu: &VcpuFd,
    mem: &M,
    entry: GuestAddress,
) -> Result<(), RegsError> {
    let sregs = vcpu
        .get_sregs()
        .map_err(|e| RegsError::Set("special registers", e))?;
    let sregs = long_mode_sregs(mem, sregs)?;
    vcpu.set_sregs(&sregs)
        .map_err(|e| RegsError::Set("special registers", e))?;
    vcpu.set_regs(&boot_regs(entry))
        .map_err(|e| RegsError::Set("registers", e))?;
    vcpu.set_fpu(&boot_fpu())
        .map_err(|e| RegsError::Set("FPU", e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let gdt = boot_gdt();
        let code = segment_from_gdt(gdt[1], CODE_SELECTOR);
        assert_eq!(
            (code.base, code.limit, code.l, code.db, code.type_),
            (0, 0xffff_ffff, 1, 0, 0xb)
        );
        assert_eq!((code.present, code.s, code.g, code.unusable), (1, 1, 1, 0));
        let data = segment_from_gdt(gdt[2], DATA_SELECTOR);
        assert_eq!((data.l, data.db, data.type_), (0, 1, 0x3));
        assert_eq!(gdt[1], 0x00af_9b00_0000_ffff);
        assert_eq!(gdt[2], 0x00cf_9300_0000_ffff);
        assert_eq!(segment_from_gdt(0, 0).unusable, 1);
    }

    #[test]
    fn page_tables_identity_map_the_first_gib() {
        let m = mem();
        setup_page_tables(&m, 256 << 20).unwrap();
        let pml4: u64 = m.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPTE_START | 3);
        for g in 0..4 {
            let pdpte: u64 = m.read_obj(GuestAddress(PDPTE_START + g * 8)).unwrap();
            assert_eq!(pdpte, (PDE_START + g * 0x1000) | 3);
        }
        let last: u64 = m
            .read_obj(GuestAddress(PDE_START + 3 * 0x1000 + 511 * 8))
            .unwrap();
        assert_eq!(last, ((4u64 << 30) - (2 << 20)) | 0x83);
        let beyond: u64 = m.read_obj(GuestAddress(PDPTE_START + 4 * 8)).unwrap();
        assert_eq!(beyond, 0);
    }

    #[test]
    fn mapped_size_grows_with_ram_and_is_capped() {
        assert_eq!(identity_mapped_gib(128 << 20), 4);
        assert_eq!(identity_mapped_gib(5 << 30), 5);
        assert_eq!(identity_mapped_gib((5 << 30) + 1), 6);
        assert_eq!(identity_mapped_gib(1 << 40), MAX_IDENTITY_MAPPED_GIB);
    }

    #[test]
    fn long_mode_sregs_enable_paging() {
        let m = mem();
        let s = long_mode_sregs(&m, kvm_sregs::default()).unwrap();
        assert_eq!(s.cr0 & (X86_CR0_PE | X86_CR0_PG), X86_CR0_PE | X86_CR0_PG);
        assert_eq!(s.efer, EFER_LME | EFER_LMA);
        assert_eq!(s.cr3, PML4_START);
        let gdt0: u64 = m.read_obj(GuestAddress(GDT_START + 8)).unwrap();
        assert_eq!(gdt0, boot_gdt()[1]);
    }

    #[test]
    fn lvt_mode_changes_only_delivery_bits() {
        let mut l = kvm_lapic_state::default();
        l.regs[APIC_LVT0] = 0x10u8 as _;
        l.regs[APIC_LVT0 + 2] = 0x1u8 as _; // masked
        set_lvt_mode(&mut l, APIC_LVT0, APIC_MODE_EXTINT);
        assert_eq!(l.regs[APIC_LVT0] as u8, 0x10);
        assert_eq!(l.regs[APIC_LVT0 + 1] as u8, 0x7);
        assert_eq!(l.regs[APIC_LVT0 + 2] as u8, 0x1);
    }
}
