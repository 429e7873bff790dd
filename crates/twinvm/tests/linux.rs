//! Booting a stock Debian kernel and initramfs (built from Debian packages by
//! scripts/build-linux-guest.sh). Slow and downloads packages, so it is opt-in:
//! `cargo nextest run -p twinvm --test linux --run-ignored only`.
//!
//! On a host with hardware virtualization the guest boots to its ready banner
//! and powers off. On KVM without it (instruction emulator) a stock kernel
//! cannot finish booting; there the test shows it starts executing: the
//! kernel prints its version, the command line twinvm gave it and the E820
//! map twinvm wrote (about 150 s here, most of it in the decompressor).

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::Twinvm;

fn hardware_virtualization() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| c.split_whitespace().any(|w| w == "vmx" || w == "svm"))
        .unwrap_or(false)
}

fn linux_guest() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = root.join("build/linux-guest");
    if !out.join("vmlinuz").exists() || !out.join("initramfs.cpio.gz").exists() {
        let status = Command::new(root.join("scripts/build-linux-guest.sh"))
            .arg(&out)
            .status()
            .expect("run scripts/build-linux-guest.sh");
        assert!(status.success(), "building the Linux guest failed");
    }
    out
}

#[test]
#[ignore = "slow: downloads Debian's cloud kernel; run with --run-ignored only"]
fn stock_debian_kernel_starts_under_twinvm() {
    if !common::kvm_available() {
        return;
    }
    let dir = linux_guest();
    let kernel = dir.join("vmlinuz");
    let initrd = dir.join("initramfs.cpio.gz");
    // KASLR makes the decompressor crawl under the instruction emulator; it
    // changes nothing twinvm does, so it is off for this test.
    let mut vm = Twinvm::spawn(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--memory",
        "512M",
        "--cmdline",
        "earlyprintk=ttyS0 nokaslr",
    ]);
    let t = Duration::from_secs(300);
    vm.wait_for_line(|l| l.contains("Linux version"), t)
        .unwrap();
    let cmdline = vm
        .wait_for_line(|l| l.contains("Command line:"), t)
        .unwrap();
    assert!(
        cmdline.contains("console=ttyS0 reboot=k panic=1") && cmdline.ends_with("nokaslr"),
        "{cmdline}"
    );
    vm.wait_for_line(
        |l| l.contains("BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable"),
        t,
    )
    .unwrap();
    if hardware_virtualization() {
        vm.wait_for_line(|l| l.contains("TWINVM LINUX GUEST READY"), t)
            .unwrap();
        vm.send_line("exit");
        assert_eq!(vm.wait_exit(t).unwrap().code(), Some(0));
    } else {
        // The kernel runs on: it takes its clock from KVM.
        vm.wait_for_line(|l| l.contains("Hypervisor detected: KVM"), t)
            .unwrap();
        vm.kill();
    }
}
