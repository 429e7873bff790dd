//! Booting the bundled test guest with the real `twinvm` binary: banner,
//! counter progress, console input, clean power-off and reboot, and the
//! crash paths (guest panic, instruction KVM cannot execute).

mod common;

use std::time::Duration;

use common::Twinvm;
use common::{BANNER, counter_of, is_counter};

const T: Duration = Duration::from_secs(60);

#[test]
fn default_guest_boots_counts_and_powers_off() {
    if !common::kvm_available() {
        return;
    }
    let mut vm = Twinvm::spawn(&["run"]);
    vm.wait_for_line(|l| l == BANNER, T).unwrap();
    let first = counter_of(&vm.wait_for_line(is_counter, T).unwrap());
    let second = counter_of(&vm.wait_for_line(is_counter, T).unwrap());
    assert!(
        second > first,
        "counter did not advance: {first} then {second}"
    );
    vm.send_line("poweroff");
    let status = vm.wait_exit(T).unwrap();
    assert_eq!(status.code(), Some(0), "stderr: {}", vm.stderr());
}

#[test]
fn config_file_sets_the_vm_and_guest_reboot_exits_zero() {
    if !common::kvm_available() {
        return;
    }
    let dir = common::TempDir::new("config");
    let cfg = dir.write(
        "vm.toml",
        "[vm]\nmemory = \"64M\"\ncpus = 2\ncmdline = \"dirty_rate=100\"\n",
    );
    let mut vm = Twinvm::spawn(&["run", "--config", cfg.to_str().unwrap()]);
    vm.wait_for_line(|l| l == BANNER, T).unwrap();
    vm.wait_for_line(|l| l.contains("dirty_rate=100"), T)
        .unwrap();
    vm.wait_for_line(is_counter, T).unwrap();
    vm.send_line("reboot");
    assert_eq!(vm.wait_exit(T).unwrap().code(), Some(0));
}

#[test]
fn guest_powers_off_by_itself() {
    if !common::kvm_available() {
        return;
    }
    let mut vm = Twinvm::spawn(&["run", "--cmdline", "poweroff_after=1"]);
    vm.wait_for_line(|l| l == BANNER, T).unwrap();
    assert_eq!(vm.wait_exit(T).unwrap().code(), Some(0));
}

#[test]
fn guest_panic_is_a_failure_with_a_message() {
    if !common::kvm_available() {
        return;
    }
    let mut vm = Twinvm::spawn(&["run"]);
    vm.wait_for_line(|l| l == BANNER, T).unwrap();
    vm.send_line("panic");
    let status = vm.wait_exit(T).unwrap();
    assert_ne!(status.code(), Some(0));
    let err = vm.stderr();
    assert!(err.contains("panic"), "stderr: {err}");
    assert!(!err.contains("panicked"), "twinvm itself panicked: {err}");
}

/// A minimal ELF64 executable: `code` loaded and entered at 1 MiB + 0x78.
fn tiny_elf(code: &[u8]) -> Vec<u8> {
    const BASE: u64 = 0x10_0000;
    const HDRS: u64 = 64 + 56;
    let total = HDRS + code.len() as u64;
    let mut e = Vec::new();
    e.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    e.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    e.extend_from_slice(&1u32.to_le_bytes());
    e.extend_from_slice(&(BASE + HDRS).to_le_bytes()); // entry
    e.extend_from_slice(&64u64.to_le_bytes()); // phoff
    e.extend_from_slice(&0u64.to_le_bytes()); // shoff
    e.extend_from_slice(&0u32.to_le_bytes()); // flags
    for v in [64u16, 56, 1, 64, 0, 0] {
        e.extend_from_slice(&v.to_le_bytes());
    }
    e.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    e.extend_from_slice(&7u32.to_le_bytes()); // RWX
    for v in [0, BASE, BASE, total, total, 0x1000] {
        e.extend_from_slice(&v.to_le_bytes());
    }
    e.extend_from_slice(code);
    e
}

#[test]
fn an_instruction_kvm_cannot_run_stops_the_vm_naming_its_address() {
    if !common::kvm_available() {
        return;
    }
    let dir = common::TempDir::new("int3");
    // mov dx, 0x3f8; mov al, 'X'; out dx, al; int3
    let kernel = dir.write(
        "int3.elf",
        tiny_elf(&[0x66, 0xba, 0xf8, 0x03, 0xb0, b'X', 0xee, 0xcc]),
    );
    let (status, stdout, stderr) =
        common::run_to_exit(&["run", "--kernel", kernel.to_str().unwrap()], T);
    assert_eq!(stdout, "X");
    assert_ne!(status.code(), Some(0));
    // Under KVM's instruction emulator: an emulation failure; with hardware
    // virtualization: #BP without an IDT, a triple fault. Both name the
    // instruction's address.
    assert!(
        stderr.contains("rip 0x10007f"),
        "stderr does not name the instruction address: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}
