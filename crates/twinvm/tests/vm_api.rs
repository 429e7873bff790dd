//! The VM library driven directly, booting the bundled test guest: pause and
//! resume, and the dirty log seeing every page the guest writes.

mod common;

use std::time::{Duration, Instant};

use common::guest::{
    Lines, boot as boot_config, copy_ram, guest_config, last_counter, power_off, write_ram,
};
use vmm::Vm;

/// Boots the test guest (128 MiB) with `cmdline`; returns once its banner
/// is printed.
fn boot(cmdline: &str) -> (Vm, Lines) {
    boot_config(&guest_config(128 << 20, cmdline))
}

#[test]
fn dirty_log_sees_the_guest_workload() {
    if !common::kvm_available() {
        return;
    }
    let (vm, lines) = boot("dirty_rate=2000 dirty_mb=32");
    lines.wait(|l| l.starts_with("counter="));
    vm.take_dirty().expect("dirty log");
    // The guest writes 2000 pages/s into its 32 MiB work area; half a
    // second of that is ~1000 pages, well above what an idle guest touches.
    let start = Instant::now();
    lines.wait(|l| l.starts_with("counter="));
    let dirty = vm.take_dirty().expect("dirty log");
    let elapsed = start.elapsed().as_secs_f64();
    assert!(
        dirty.count() as f64 >= 2000.0 * elapsed * 0.5,
        "{} dirty pages after {elapsed:.2}s at 2000 pages/s",
        dirty.count()
    );
    // Every dirty page is inside guest RAM.
    let size = 128u64 << 20;
    assert!(dirty.pages().all(|a| a.0 < size));
    power_off(vm);
}

#[test]
fn paused_guest_dirties_nothing_and_resumes_where_it_was() {
    if !common::kvm_available() {
        return;
    }
    let (vm, lines) = boot("dirty_rate=2000 dirty_mb=16");
    let before = lines.wait_counter();

    vm.pause().expect("pause");
    vm.take_dirty().expect("dirty log");
    while lines.rx.try_recv().is_ok() {}
    std::thread::sleep(Duration::from_millis(1500));
    let dirty = vm.take_dirty().expect("dirty log");
    assert_eq!(dirty.count(), 0, "a paused guest wrote memory");
    assert!(lines.rx.try_recv().is_err(), "a paused guest printed");

    vm.resume().expect("resume");
    let after = lines.wait_counter();
    assert!(after > before, "counter went from {before} to {after}");
    assert!(vm.take_dirty().expect("dirty log").count() > 0);
    power_off(vm);
}

#[test]
fn vmm_writes_into_guest_memory_are_dirty() {
    if !common::kvm_available() {
        return;
    }
    let (vm, _console) = boot("");
    vm.pause().expect("pause");
    vm.take_dirty().expect("dirty log");
    use vm_memory::{Bytes, GuestAddress};
    let addr = GuestAddress(100 << 20);
    vm.memory().write_obj(0x5a5a_u64, addr).expect("write");
    let dirty = vm.take_dirty().expect("dirty log");
    assert!(dirty.contains(addr));
    assert_eq!(dirty.count(), 1);
    assert_eq!(vm.take_dirty().expect("dirty log").count(), 0);
    vm.resume().expect("resume");
    power_off(vm);
}

#[test]
fn machine_state_loads_again_and_again_into_the_same_vm() {
    if !common::kvm_available() {
        return;
    }
    let (vm, lines) = boot("dirty_rate=500");
    let mut seen_a = lines.wait_counter();

    // State A: machine state and RAM.
    vm.pause().expect("pause");
    seen_a = last_counter(&lines.drain()).unwrap_or(seen_a);
    let state_a = vm.save_machine_state().expect("save A");
    assert_eq!(state_a.vcpus.len(), 1);
    let ram_a = copy_ram(&vm);
    vm.resume().expect("resume");

    // Let the guest run on for at least 3 more counter lines.
    for _ in 0..3 {
        lines.wait(|l| l.starts_with("counter="));
    }
    vm.pause().expect("pause");
    let seen_b = last_counter(&lines.drain()).unwrap_or(0).max(seen_a + 300);
    let state_b = vm.save_machine_state().expect("save B");
    let ram_b = copy_ram(&vm);
    // Saving is repeatable: the same paused VM gives the same registers.
    let again = vm.save_machine_state().expect("save B again");
    assert_eq!(again.vcpus[0].regs.rip, state_b.vcpus[0].regs.rip);

    // Back to A: the guest continues from A's counter, not B's.
    write_ram(&vm, &ram_a);
    vm.load_machine_state(state_a).expect("load A");
    vm.resume().expect("resume");
    let after_a = lines.wait_counter();
    assert!(
        after_a > seen_a && after_a <= seen_a + 200 && after_a < seen_b,
        "after loading A (last seen {seen_a}) the guest printed {after_a}; B was at {seen_b}"
    );

    // Forward to B, into the same VM objects again.
    vm.pause().expect("pause");
    while lines.rx.try_recv().is_ok() {}
    write_ram(&vm, &ram_b);
    vm.load_machine_state(state_b).expect("load B");
    vm.resume().expect("resume");
    let after_b = lines.wait_counter();
    assert!(
        after_b > seen_b - 100 && after_b <= seen_b + 200,
        "after loading B (at {seen_b}) the guest printed {after_b}"
    );
    power_off(vm);
}

#[test]
fn machine_state_needs_a_paused_vm() {
    if !common::kvm_available() {
        return;
    }
    let (vm, _console) = boot("");
    assert!(matches!(
        vm.save_machine_state(),
        Err(vmm::Error::NotPaused)
    ));
    vm.pause().expect("pause");
    let state = vm.save_machine_state().expect("save");
    vm.resume().expect("resume");
    assert!(matches!(
        vm.load_machine_state(state),
        Err(vmm::Error::NotPaused)
    ));
    power_off(vm);
}
