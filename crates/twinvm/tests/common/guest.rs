//! Helpers for tests that drive the VM library in-process with the bundled
//! test guest: a console captured line by line, building and booting a VM,
//! reading counters, copying guest RAM.

use std::io::Write;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};
use vmm::{Console, KernelSource, Vm, VmConfig, VmExit};

/// The bundled test guest.
pub const ELF: &[u8] = include_bytes!(env!("TWINVM_TESTGUEST_ELF"));
/// How long a console wait may take.
pub const T: Duration = Duration::from_secs(60);

/// A one-vCPU configuration for the test guest with `memory` bytes of RAM
/// and no devices.
pub fn guest_config(memory: u64, cmdline: &str) -> VmConfig {
    VmConfig {
        memory_bytes: memory,
        vcpus: 1,
        kernel: KernelSource::Bytes(ELF),
        initrd: None,
        cmdline: cmdline.into(),
        net: Vec::new(),
        disks: Vec::new(),
        prefault: false,
    }
}

/// Serial output split into lines and sent over a channel; the line being
/// written is shared, so that a VM restored from a snapshot can finish the
/// line its original was in the middle of.
pub struct LineSink {
    /// The line being written.
    pub partial: Arc<Mutex<Vec<u8>>>,
    /// Where complete lines go.
    pub lines: Sender<String>,
}

impl Write for LineSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut partial = self.partial.lock().unwrap();
        for &b in buf {
            if b == b'\n' {
                let line = String::from_utf8_lossy(&partial).trim_end().to_string();
                partial.clear();
                let _ = self.lines.send(line);
            } else {
                partial.push(b);
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A VM's console: its lines, and the unfinished one.
pub struct Lines {
    /// Complete lines.
    pub rx: Receiver<String>,
    /// The line being written.
    pub partial: Arc<Mutex<Vec<u8>>>,
}

impl Lines {
    /// Waits (up to [`T`]) for a line satisfying `pred`.
    pub fn wait(&self, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + T;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) if pred(&line) => return line,
                Ok(line) => seen.push(line),
                Err(_) => panic!("no matching console line within {T:?}; got {seen:#?}"),
            }
        }
    }

    /// Waits for the next counter line; returns its value.
    pub fn wait_counter(&self) -> u64 {
        super::counter_of(&self.wait(super::is_counter))
    }

    /// The lines printed so far (draining them).
    pub fn drain(&self) -> Vec<String> {
        self.rx.try_iter().collect()
    }
}

/// Builds a VM (paused, not started) whose console starts with `partial`.
pub fn build(config: &VmConfig, partial: Vec<u8>) -> (Vm, Lines) {
    let (tx, rx) = channel();
    let partial = Arc::new(Mutex::new(partial));
    let console = Console {
        output: Box::new(LineSink {
            partial: partial.clone(),
            lines: tx,
        }),
        input: None,
    };
    let vm = Vm::new(config, console).expect("build VM");
    (vm, Lines { rx, partial })
}

/// Builds and starts a VM; returns once the guest's banner is printed.
pub fn boot(config: &VmConfig) -> (Vm, Lines) {
    let (vm, lines) = build(config, Vec::new());
    vm.start().expect("start VM");
    lines.wait(|l| l == super::BANNER);
    (vm, lines)
}

/// The last counter value among `lines`.
pub fn last_counter(lines: &[String]) -> Option<u64> {
    lines
        .iter()
        .rev()
        .find(|l| l.starts_with("counter="))
        .map(|l| super::counter_of(l))
}

/// Asks the guest to power off and checks that the VM ends cleanly.
pub fn power_off(vm: Vm) {
    assert_eq!(
        vm.send_console_input(b"poweroff\n", Duration::from_secs(10)),
        9
    );
    assert_eq!(vm.wait().expect("clean exit"), VmExit::PowerOff);
}

/// A copy of all guest RAM, region by region.
pub fn copy_ram(vm: &Vm) -> Vec<(vm_memory::GuestAddress, Vec<u8>)> {
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

/// Writes a copy made by [`copy_ram`] back.
pub fn write_ram(vm: &Vm, ram: &[(vm_memory::GuestAddress, Vec<u8>)]) {
    for (addr, bytes) in ram {
        vm.memory().write_slice(bytes, *addr).expect("write RAM");
    }
}
