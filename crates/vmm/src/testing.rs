//! Helpers for tests that build real VMs under KVM.

use crate::{Console, DiskConfig, KernelSource, NetConfig, VmConfig};

/// Whether KVM tests run: `/dev/kvm` usable, or skipped on purpose with
/// `TWINVM_TESTS_SKIP_KVM=1`; otherwise the test fails loudly.
pub(crate) fn kvm_available() -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) if std::env::var("TWINVM_TESTS_SKIP_KVM").as_deref() == Ok("1") => {
            eprintln!("SKIPPED: /dev/kvm is not usable: {e}");
            false
        }
        Err(e) => panic!("/dev/kvm is not usable: {e}; set TWINVM_TESTS_SKIP_KVM=1 to skip"),
    }
}

/// An x86_64 ELF executable whose only segment, `code`, is loaded and
/// entered at 1 MiB.
pub(crate) fn elf(code: &[u8]) -> Vec<u8> {
    const LOAD: u64 = 0x10_0000;
    const CODE_OFFSET: usize = 0x1000;
    let mut f = Vec::new();
    f.extend_from_slice(b"\x7fELF\x02\x01\x01\0");
    f.resize(16, 0);
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&0x3eu16.to_le_bytes()); // EM_X86_64
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&LOAD.to_le_bytes()); // e_entry
    f.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    f.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    for v in [64u16, 56, 1, 64, 0, 0] {
        // e_ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx
        f.extend_from_slice(&v.to_le_bytes());
    }
    f.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    f.extend_from_slice(&5u32.to_le_bytes()); // R X
    for v in [
        CODE_OFFSET as u64,
        LOAD,
        LOAD,
        code.len() as u64,
        code.len() as u64,
        0x1000,
    ] {
        // p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align
        f.extend_from_slice(&v.to_le_bytes());
    }
    f.resize(CODE_OFFSET, 0);
    f.extend_from_slice(code);
    f
}

/// Guest code that spins: `jmp $`.
pub(crate) const SPIN: &[u8] = &[0xeb, 0xfe];

/// A console that drops the guest's output and gives it no input.
pub(crate) fn quiet() -> Console {
    Console {
        output: Box::new(std::io::sink()),
        input: None,
    }
}

/// A VM of `memory_bytes` with one vCPU running `code` (see [`elf`]), on
/// `net` and `disks`.
pub(crate) fn config(
    code: &[u8],
    memory_bytes: u64,
    net: Vec<NetConfig>,
    disks: Vec<DiskConfig>,
) -> VmConfig {
    let kernel: &'static [u8] = Box::leak(elf(code).into_boxed_slice());
    VmConfig {
        memory_bytes,
        vcpus: 1,
        kernel: KernelSource::Bytes(kernel),
        initrd: None,
        cmdline: String::new(),
        net,
        disks,
        prefault: false,
    }
}

/// Whether the host gives anonymous memory transparent huge pages unasked
/// (then touching one page may populate its whole 2 MiB).
pub(crate) fn thp_always() -> bool {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .is_ok_and(|s| s.contains("[always]"))
}

/// Resident pages of this process (`/proc/self/statm`).
pub(crate) fn resident_pages() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse().ok())
        .expect("cannot read /proc/self/statm")
}
