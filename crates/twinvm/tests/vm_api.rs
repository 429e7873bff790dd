//! The VM library driven directly, booting the bundled test guest: pause and
//! resume, and the dirty log seeing every page the guest writes.

mod common;

use std::io::Write;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::{Duration, Instant};

use vmm::{Console, KernelSource, Vm, VmConfig, VmExit};

const ELF: &[u8] = include_bytes!(env!("TWINVM_TESTGUEST_ELF"));

/// Serial output split into lines and sent over a channel.
struct LineSink {
    partial: Vec<u8>,
    lines: Sender<String>,
}

impl Write for LineSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for &b in buf {
            if b == b'\n' {
                let line = String::from_utf8_lossy(&self.partial)
                    .trim_end()
                    .to_string();
                self.partial.clear();
                let _ = self.lines.send(line);
            } else {
                self.partial.push(b);
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn boot(cmdline: &str) -> (Vm, Receiver<String>) {
    let (tx, rx) = channel();
    let config = VmConfig {
        memory_bytes: 128 << 20,
        vcpus: 1,
        kernel: KernelSource::Bytes(ELF),
        initrd: None,
        cmdline: cmdline.into(),
        net: Vec::new(),
        disks: Vec::new(),
    };
    let console = Console {
        output: Box::new(LineSink {
            partial: Vec::new(),
            lines: tx,
        }),
        input: None,
    };
    let vm = Vm::new(&config, console).expect("build VM");
    vm.start().expect("start VM");
    (vm, rx)
}

fn wait_line(rx: &Receiver<String>, pred: impl Fn(&str) -> bool, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if pred(&line) => return line,
            Ok(line) => seen.push(line),
            Err(_) => panic!("no matching console line within {timeout:?}; got {seen:#?}"),
        }
    }
}

/// The `counter=<n>` value of a counter line.
fn counter_of(line: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("counter="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no counter in {line:?}"))
}

fn power_off(vm: Vm) {
    assert_eq!(
        vm.send_console_input(b"poweroff\n", Duration::from_secs(10)),
        9
    );
    assert_eq!(vm.wait().expect("clean exit"), VmExit::PowerOff);
}

#[test]
fn dirty_log_sees_the_guest_workload() {
    if !common::kvm_available() {
        return;
    }
    let (vm, rx) = boot("dirty_rate=2000 dirty_mb=32");
    wait_line(
        &rx,
        |l| l == "TWINVM TESTGUEST READY",
        Duration::from_secs(30),
    );
    wait_line(&rx, |l| l.starts_with("counter="), Duration::from_secs(30));
    vm.take_dirty().expect("dirty log");
    // The guest writes 2000 pages/s into its 32 MiB work area; half a
    // second of that is ~1000 pages, well above what an idle guest touches.
    let start = Instant::now();
    wait_line(&rx, |l| l.starts_with("counter="), Duration::from_secs(30));
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
    let (vm, rx) = boot("dirty_rate=2000 dirty_mb=16");
    wait_line(
        &rx,
        |l| l == "TWINVM TESTGUEST READY",
        Duration::from_secs(30),
    );
    let before = counter_of(&wait_line(
        &rx,
        |l| l.starts_with("counter="),
        Duration::from_secs(30),
    ));

    vm.pause().expect("pause");
    vm.take_dirty().expect("dirty log");
    while rx.try_recv().is_ok() {}
    std::thread::sleep(Duration::from_millis(1500));
    let dirty = vm.take_dirty().expect("dirty log");
    assert_eq!(dirty.count(), 0, "a paused guest wrote memory");
    assert!(rx.try_recv().is_err(), "a paused guest printed");

    vm.resume().expect("resume");
    let after = counter_of(&wait_line(
        &rx,
        |l| l.starts_with("counter="),
        Duration::from_secs(30),
    ));
    assert!(after > before, "counter went from {before} to {after}");
    assert!(vm.take_dirty().expect("dirty log").count() > 0);
    power_off(vm);
}

#[test]
fn vmm_writes_into_guest_memory_are_dirty() {
    if !common::kvm_available() {
        return;
    }
    let (vm, rx) = boot("");
    wait_line(
        &rx,
        |l| l == "TWINVM TESTGUEST READY",
        Duration::from_secs(30),
    );
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

/// A copy of all guest RAM, region by region.
fn copy_ram(vm: &Vm) -> Vec<(vm_memory::GuestAddress, Vec<u8>)> {
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};
    vm.memory()
        .iter()
        .map(|r| {
            let mut buf = vec![0u8; r.len() as usize];
            vm.memory()
                .read_slice(&mut buf, r.start_addr())
                .expect("read RAM");
            (r.start_addr(), buf)
        })
        .collect()
}

fn write_ram(vm: &Vm, ram: &[(vm_memory::GuestAddress, Vec<u8>)]) {
    use vm_memory::Bytes;
    for (addr, bytes) in ram {
        vm.memory().write_slice(bytes, *addr).expect("write RAM");
    }
}

/// The last `counter=` value printed before now (draining the console).
fn last_counter(rx: &Receiver<String>) -> Option<u64> {
    rx.try_iter()
        .filter(|l| l.starts_with("counter="))
        .map(|l| counter_of(&l))
        .last()
}

#[test]
fn machine_state_loads_again_and_again_into_the_same_vm() {
    if !common::kvm_available() {
        return;
    }
    let (vm, rx) = boot("dirty_rate=500");
    wait_line(
        &rx,
        |l| l == "TWINVM TESTGUEST READY",
        Duration::from_secs(30),
    );
    let mut seen_a = counter_of(&wait_line(
        &rx,
        |l| l.starts_with("counter="),
        Duration::from_secs(30),
    ));

    // State A: machine state and RAM.
    vm.pause().expect("pause");
    seen_a = last_counter(&rx).unwrap_or(seen_a);
    let state_a = vm.save_machine_state().expect("save A");
    assert_eq!(state_a.vcpus.len(), 1);
    let ram_a = copy_ram(&vm);
    vm.resume().expect("resume");

    // Let the guest run on for at least 3 more counter lines.
    for _ in 0..3 {
        wait_line(&rx, |l| l.starts_with("counter="), Duration::from_secs(30));
    }
    vm.pause().expect("pause");
    let seen_b = last_counter(&rx).unwrap_or(0).max(seen_a + 300);
    let state_b = vm.save_machine_state().expect("save B");
    let ram_b = copy_ram(&vm);
    // Saving is repeatable: the same paused VM gives the same registers.
    let again = vm.save_machine_state().expect("save B again");
    assert_eq!(again.vcpus[0].regs.rip, state_b.vcpus[0].regs.rip);

    // Back to A: the guest continues from A's counter, not B's.
    write_ram(&vm, &ram_a);
    vm.load_machine_state(state_a).expect("load A");
    vm.resume().expect("resume");
    let after_a = counter_of(&wait_line(
        &rx,
        |l| l.starts_with("counter="),
        Duration::from_secs(30),
    ));
    assert!(
        after_a > seen_a && after_a <= seen_a + 200 && after_a < seen_b,
        "after loading A (last seen {seen_a}) the guest printed {after_a}; B was at {seen_b}"
    );

    // Forward to B, into the same VM objects again.
    vm.pause().expect("pause");
    while rx.try_recv().is_ok() {}
    write_ram(&vm, &ram_b);
    vm.load_machine_state(state_b).expect("load B");
    vm.resume().expect("resume");
    let after_b = counter_of(&wait_line(
        &rx,
        |l| l.starts_with("counter="),
        Duration::from_secs(30),
    ));
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
    let (vm, rx) = boot("");
    wait_line(
        &rx,
        |l| l == "TWINVM TESTGUEST READY",
        Duration::from_secs(30),
    );
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
