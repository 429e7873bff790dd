//! virtio devices in a real KVM VM: the guest's QueueNotify write reaches
//! the device's worker through the ioeventfd KVM signals (no vCPU exit),
//! the worker's writes into guest memory show in the VM's dirty log, and
//! the device's interrupt is raised through its irqfd.
//!
//! The guest is a few instructions in a hand-made ELF image; the host plays
//! the driver's setup part through the transport's registers before the
//! guest runs.

use std::io::Write;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};

use super::testutil::{F_NEXT, F_WRITE, TestQueue, driver_start, wait_for};
use super::{F_VERSION_1, INT_VRING, cmdline_word};
use crate::arch::x86_64::layout::CMDLINE_START;
use crate::devices::{BusDevice, lock};
use crate::testing::{elf, kvm_available};
use crate::{Console, DiskConfig, KernelSource, Vm, VmConfig, VmEvent, VmExit};

/// Guest code: notify queue 0 of the first virtio device with a 32-bit
/// write, then spin.
const NOTIFY_AND_SPIN: &[u8] = &[
    0xb8, 0x50, 0x00, 0x00, 0xd0, // mov eax, 0xd0000050 (QueueNotify)
    0x31, 0xc9, // xor ecx, ecx (queue 0)
    0x89, 0x08, // mov [rax], ecx
    0xeb, 0xfe, // jmp $
];

#[test]
fn a_guest_notification_reaches_the_disk_worker_through_kvm() {
    if !kvm_available() {
        return;
    }
    let img = vmm_sys_util::tempfile::TempFile::new().unwrap();
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 13 + 5) as u8).collect();
    img.as_file().write_all(&data).unwrap();
    let kernel: &'static [u8] = Box::leak(elf(NOTIFY_AND_SPIN).into_boxed_slice());
    let config = VmConfig {
        memory_bytes: 64 << 20,
        vcpus: 1,
        kernel: KernelSource::Bytes(kernel),
        initrd: None,
        cmdline: "quiet".into(),
        net: Vec::new(),
        disks: vec![DiskConfig {
            path: img.as_path().to_path_buf(),
            readonly: false,
            serial: Some("kvm-disk".into()),
        }],
        prefault: false,
    };
    let console = Console {
        output: Box::new(std::io::sink()),
        input: None,
    };
    let vm = Vm::new(&config, console).unwrap();
    let mem = vm.memory().clone();

    // The device is announced on the command line, before the user's words.
    let mut cmdline = vec![0u8; 64];
    mem.read_slice(&mut cmdline, GuestAddress(CMDLINE_START))
        .unwrap();
    let want = format!("{} quiet\0", cmdline_word(0));
    assert_eq!(&cmdline[..want.len()], want.as_bytes());

    // The driver's part, played by the host: a GET_ID request queued, then
    // the device set up. The worker starts by processing what is queued.
    let dev = vm.virtio_devices()[0].clone();
    let q = TestQueue::at(&mem, 256, 0x20_0000);
    mem.write_obj(8u32, GuestAddress(0x30_0100)).unwrap();
    q.set_desc(3, 0x30_0100, 16, F_NEXT, 4);
    q.set_desc(4, 0x33_0000, 20, F_WRITE | F_NEXT, 5);
    q.set_desc(5, 0x32_0001, 1, F_WRITE, 0);
    q.push_avail(3);
    driver_start(&mut lock(&dev), F_VERSION_1, &[(256, 0x20_0000)]);
    assert!(lock(&dev).is_running());
    assert!(wait_for(|| q.used_idx() == 1), "GET_ID not completed");
    let mut id = [0u8; 20];
    mem.read_slice(&mut id, GuestAddress(0x33_0000)).unwrap();
    assert_eq!(&id[..9], b"kvm-disk\0");
    // Let the worker settle in its epoll wait, then queue a read of
    // sector 3 (1 KiB) without notifying: nothing happens.
    std::thread::sleep(Duration::from_millis(20));
    mem.write_obj(0u32, GuestAddress(0x30_0000)).unwrap();
    mem.write_obj(3u64, GuestAddress(0x30_0008)).unwrap();
    q.set_desc(0, 0x30_0000, 16, F_NEXT, 1);
    q.set_desc(1, 0x31_0000, 1024, F_WRITE | F_NEXT, 2);
    q.set_desc(2, 0x32_0000, 1, F_WRITE, 0);
    q.push_avail(0);
    mem.write_obj(0xffu8, GuestAddress(0x32_0000)).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(q.used_idx(), 1, "the worker ran without a notification");
    vm.take_dirty().unwrap();

    // The guest's notify write goes to the ioeventfd, not to userspace.
    vm.start().unwrap();
    assert!(wait_for(|| q.used_idx() == 2), "no completion");
    assert_eq!(q.used_elem(1), (0, 1025));
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x32_0000)).unwrap(), 0);
    let mut got = vec![0u8; 1024];
    mem.read_slice(&mut got, GuestAddress(0x31_0000)).unwrap();
    assert_eq!(got, data[3 * 512..5 * 512]);

    // The worker's writes are in the VM's dirty log.
    let dirty = vm.take_dirty().unwrap();
    for page in [0x20_4000, 0x31_0000, 0x32_0000] {
        assert!(
            dirty.contains(GuestAddress(page)),
            "page {page:#x} not dirty"
        );
    }
    // KVM swallowed the write: it never reached the transport.
    assert_eq!(lock(&dev).forwarded_notifies, 0);
    // And the interrupt was raised.
    let mut isr = [0u8; 4];
    lock(&dev).read(0x60, &mut isr);
    assert_eq!(u32::from_le_bytes(isr) & INT_VRING, INT_VRING);

    // A paused VM's devices write nothing, even when notified; resume
    // catches up.
    vm.pause().unwrap();
    assert!(!lock(&dev).is_running());
    vm.take_dirty().unwrap();
    q.set_desc(6, 0x30_0000, 16, F_NEXT, 7);
    q.set_desc(7, 0x34_0000, 512, F_WRITE | F_NEXT, 8);
    q.set_desc(8, 0x32_0002, 1, F_WRITE, 0);
    q.push_avail(6);
    lock(&dev).queue_evts()[0].write(1).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(q.used_idx(), 2);
    let dirty = vm.take_dirty().unwrap();
    assert!(!dirty.contains(GuestAddress(0x34_0000)));
    assert!(!dirty.contains(GuestAddress(0x20_4000)));
    vm.resume().unwrap();
    assert!(lock(&dev).is_running());
    assert!(wait_for(|| q.used_idx() == 3), "no completion after resume");

    vm.event_sender().send(VmEvent::PowerOff).unwrap();
    assert_eq!(vm.wait().unwrap(), VmExit::PowerOff);
    assert!(!lock(&dev).is_running());
}

#[test]
fn a_missing_disk_fails_before_kvm_is_touched() {
    let config = VmConfig {
        memory_bytes: 64 << 20,
        vcpus: 1,
        kernel: KernelSource::Bytes(&[]),
        initrd: None,
        cmdline: String::new(),
        net: Vec::new(),
        disks: vec![DiskConfig {
            path: "/nonexistent/disk.img".into(),
            readonly: false,
            serial: None,
        }],
        prefault: false,
    };
    let console = Console {
        output: Box::new(std::io::sink()),
        input: None,
    };
    let err = Vm::new(&config, console).err().unwrap().to_string();
    assert_eq!(err, "disk /nonexistent/disk.img does not exist");
}
