//! The building blocks of migration, on real VMs under KVM: handing the
//! devices' back ends from one VM to another, discarding RAM, the pages
//! RAM populates, the state digest, and ending a VM as migrated.
//!
//! The guest is a hand-made ELF image that spins ([`crate::testing`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::tempdir::TempDir;

use crate::devices::lock;
use crate::devices::virtio::{self, DiscardNet, NetBackend, RawFile};
use crate::digest::{CHUNK_SIZE, DigestDifference, StateDigest};
use crate::memory::PAGE_SIZE;
use crate::testing::{SPIN, config, kvm_available, quiet, resident_pages, thp_always};
use crate::vm::Error;
use crate::{DiskConfig, NetConfig, Vm, VmEvent, VmExit};

/// A 1 MiB disk image `name` in `dir`.
fn image(dir: &TempDir, name: &str) -> PathBuf {
    let path = dir.as_path().join(name);
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(1 << 20).unwrap();
    path
}

fn disk(path: &Path) -> DiskConfig {
    DiskConfig {
        path: path.to_path_buf(),
        readonly: false,
        serial: None,
    }
}

fn power_off(vm: &Vm) {
    vm.event_sender().send(VmEvent::PowerOff).unwrap();
    assert_eq!(vm.wait().unwrap(), VmExit::PowerOff);
}

#[test]
fn a_disk_moves_from_a_running_vm_to_an_incoming_one() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new().unwrap();
    let path = image(&dir, "disk.img");
    let cfg = config(SPIN, 64 << 20, Vec::new(), vec![disk(&path)]);
    let a = Vm::new(&cfg, quiet()).unwrap();
    a.start().unwrap();
    assert!(a.backends_attached());

    // The destination is built while the source holds the image.
    let b = Vm::new_incoming(&cfg, quiet()).unwrap();
    assert!(!b.backends_attached());
    assert_eq!(
        lock(&b.virtio_devices()[0]).state().config,
        lock(&a.virtio_devices()[0]).state().config,
        "same capacity"
    );
    let err = b.attach_backends().unwrap_err();
    assert!(
        matches!(err, Error::Virtio(virtio::Error::DiskLocked { .. })),
        "{err}"
    );
    assert!(!b.backends_attached());
    let err = b.resume().unwrap_err();
    assert!(matches!(err, Error::BackendsDetached), "{err}");
    assert!(
        err.to_string().contains("back ends are not attached"),
        "{err}"
    );
    assert!(b.is_paused());
    assert!(b.start().is_err());

    // A running VM keeps its back ends.
    assert!(matches!(a.release_backends(), Err(Error::NotPaused)));
    a.pause().unwrap();
    a.release_backends().unwrap();
    assert!(!a.backends_attached());
    a.release_backends().unwrap();
    assert!(matches!(a.resume(), Err(Error::BackendsDetached)));

    b.attach_backends().unwrap();
    assert!(b.backends_attached());
    // Attached devices are left alone.
    b.attach_backends().unwrap();
    let err = a.attach_backends().unwrap_err();
    assert!(
        matches!(err, Error::Virtio(virtio::Error::DiskLocked { .. })),
        "{err}"
    );
    assert!(!a.backends_attached());

    b.start().unwrap();
    assert!(matches!(b.attach_backends(), Err(Error::NotPaused)));
    assert!(matches!(b.release_backends(), Err(Error::NotPaused)));

    a.end_migrated();
    assert_eq!(a.wait().unwrap(), VmExit::Migrated);
    power_off(&b);
}

#[test]
fn attaching_back_ends_is_all_or_nothing() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new().unwrap();
    let first = image(&dir, "first.img");
    let second = image(&dir, "second.img");
    let cfg = config(
        SPIN,
        64 << 20,
        Vec::new(),
        vec![disk(&first), disk(&second)],
    );
    let vm = Vm::new_incoming(&cfg, quiet()).unwrap();

    // The second image is held elsewhere: the first is released again.
    let holder = RawFile::open(&second, false).unwrap();
    let err = vm.attach_backends().unwrap_err();
    match &err {
        Error::Virtio(virtio::Error::DiskLocked { path, .. }) => assert_eq!(path, &second),
        other => panic!("unexpected {other}"),
    }
    assert!(vm.virtio_devices().iter().all(|d| !lock(d).has_backend()));
    drop(RawFile::open(&first, false).unwrap());
    drop(holder);

    // An image that changed size is refused; nothing stays attached.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&second)
        .unwrap()
        .set_len(2 << 20)
        .unwrap();
    let err = vm.attach_backends().unwrap_err();
    assert!(
        matches!(err, Error::Virtio(virtio::Error::Backend { .. })),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("disk1") && msg.contains("changed size") && msg.contains("2048 sectors"),
        "{msg}"
    );
    assert!(!vm.backends_attached());
    drop(RawFile::open(&first, false).unwrap());

    std::fs::OpenOptions::new()
        .write(true)
        .open(&second)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    vm.attach_backends().unwrap();
    assert!(vm.backends_attached());
    assert!(RawFile::open(&first, false).is_err());
    vm.release_backends().unwrap();
    drop(RawFile::open(&first, false).unwrap());
    drop(RawFile::open(&second, false).unwrap());
}

#[test]
fn an_incoming_vm_checks_its_configuration_without_opening_anything() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new().unwrap();
    let path = image(&dir, "disk.img");
    let missing = dir.as_path().join("missing.img");
    let err = Vm::new_incoming(
        &config(SPIN, 64 << 20, Vec::new(), vec![disk(&missing)]),
        quiet(),
    )
    .err()
    .unwrap();
    assert!(
        matches!(err, Error::Virtio(virtio::Error::DiskMissing { .. })),
        "{err}"
    );
    let bad_tap = vec![NetConfig {
        tap: "no/such".into(),
        mac: None,
    }];
    let err = Vm::new_incoming(&config(SPIN, 64 << 20, bad_tap, Vec::new()), quiet())
        .err()
        .unwrap();
    assert!(
        matches!(err, Error::Virtio(virtio::Error::TapName { .. })),
        "{err}"
    );
    // A tap that does not exist (yet) is only looked for when attached.
    let later_tap = vec![NetConfig {
        tap: "tvnonexist0".into(),
        mac: None,
    }];
    let vm = Vm::new_incoming(
        &config(SPIN, 64 << 20, later_tap, vec![disk(&path)]),
        quiet(),
    )
    .unwrap();
    let err = vm.attach_backends().unwrap_err();
    assert!(
        matches!(err, Error::Virtio(virtio::Error::TapMissing { .. })),
        "{err}"
    );
    assert!(!vm.backends_attached());
}

/// Runs in a network namespace of its own with a tap created there: VM
/// A holds the tap, an incoming VM B gets it once A released it. Needs
/// CAP_SYS_ADMIN and CAP_NET_ADMIN (root); skipped without them.
#[test]
fn a_tap_moves_from_one_vm_to_another_in_a_private_netns() {
    use crate::devices::virtio::tap::tests::{private_netns_with_tap, set_persistent_tap};
    if !kvm_available() {
        return;
    }
    let outcome = std::thread::spawn(|| -> Result<(), String> {
        private_netns_with_tap("tvmig0")?;
        let net = vec![NetConfig {
            tap: "tvmig0".into(),
            mac: None,
        }];
        let cfg = config(SPIN, 64 << 20, net, Vec::new());
        let a = Vm::new(&cfg, quiet()).unwrap();
        a.start().unwrap();
        let b = Vm::new_incoming(&cfg, quiet()).unwrap();
        let err = b.attach_backends().unwrap_err();
        assert!(
            matches!(err, Error::Virtio(virtio::Error::TapBusy { .. })),
            "{err}"
        );
        assert!(matches!(b.start(), Err(Error::BackendsDetached)));
        a.pause().unwrap();
        a.release_backends().unwrap();
        b.attach_backends().unwrap();
        assert!(b.backends_attached());
        let err = a.attach_backends().unwrap_err();
        assert!(
            matches!(err, Error::Virtio(virtio::Error::TapBusy { .. })),
            "{err}"
        );
        b.start().unwrap();
        a.end_migrated();
        assert_eq!(a.wait().unwrap(), VmExit::Migrated);
        power_off(&b);
        drop(b);
        set_persistent_tap("tvmig0", false).unwrap();
        Ok(())
    })
    .join()
    .unwrap();
    if let Err(why) = outcome {
        eprintln!("SKIPPED: {why}");
    }
}

#[test]
fn discarded_ram_reads_zeros_and_returns_to_the_host() {
    if !kvm_available() {
        return;
    }
    let vm = Vm::new(&config(SPIN, 64 << 20, Vec::new(), Vec::new()), quiet()).unwrap();
    vm.start().unwrap();
    assert!(matches!(vm.discard_ram(), Err(Error::NotPaused)));
    vm.pause().unwrap();
    // What the guest wrote while it ran (KVM's log; discarding leaves it).
    vm.take_dirty().unwrap();
    let mem = vm.memory();
    // The kernel was loaded at 1 MiB.
    let mut code = [0u8; 2];
    mem.read_slice(&mut code, GuestAddress(0x10_0000)).unwrap();
    assert_eq!(code, SPIN);
    let pattern: Vec<u8> = (0..16 << 20).map(|i: u32| (i % 253) as u8 | 1).collect();
    mem.write_slice(&pattern, GuestAddress(32 << 20)).unwrap();
    let populated = vm.populated_pages().unwrap().count();
    assert!(populated >= 4096, "{populated}");
    let before = resident_pages();
    vm.discard_ram().unwrap();
    let after = resident_pages();
    assert!(
        before.saturating_sub(after) >= 3072,
        "resident pages {before} before, {after} after"
    );
    assert_eq!(vm.populated_pages().unwrap().count(), 0);
    // The VMM's writes of the pattern are forgotten too.
    assert_eq!(vm.take_dirty().unwrap().count(), 0);
    let mut all = vec![0xffu8; 64 << 20];
    mem.read_slice(&mut all, GuestAddress(0)).unwrap();
    assert!(all.iter().all(|&b| b == 0));
    // Not resumed: its code is gone.
    power_off(&vm);
}

#[test]
fn populated_pages_are_what_was_touched() {
    if !kvm_available() {
        return;
    }
    // Two memory slots: below the MMIO hole and from 4 GiB.
    let size = (3 << 30) + (64 << 20);
    let vm = Vm::new(&config(SPIN, size, Vec::new(), Vec::new()), quiet()).unwrap();
    let fresh = vm.populated_pages().unwrap();
    let dirty = vm.take_dirty().unwrap();
    // The shape of a dirty bitmap.
    assert_eq!(fresh.slots.len(), 2);
    for (p, d) in fresh.slots.iter().zip(&dirty.slots) {
        assert_eq!(p.0, d.0);
        assert_eq!(p.1.len(), d.1.len());
    }
    // Only what building the VM wrote: boot structures, page tables, the
    // kernel.
    assert!(fresh.count() < 64, "{} pages", fresh.count());
    for page in dirty.pages() {
        assert!(fresh.contains(page), "written page {page:?} not populated");
    }

    let touched: Vec<u64> = (0..10u64)
        .map(|i| (100 << 20) + i * (7 << 20) + i * PAGE_SIZE)
        .chain([1 << 32, (1 << 32) + (63 << 20)])
        .collect();
    for &addr in &touched {
        vm.memory().write_obj(1u8, GuestAddress(addr)).unwrap();
    }
    let now = vm.populated_pages().unwrap();
    let new: Vec<u64> = now
        .pages()
        .filter(|p| !fresh.contains(*p))
        .map(|p| p.0)
        .collect();
    if thp_always() {
        for t in &touched {
            assert!(new.contains(t), "{t:#x} not populated");
        }
        for n in &new {
            assert!(touched.iter().any(|t| t >> 21 == n >> 21), "{n:#x}");
        }
    } else {
        assert_eq!(new, touched);
    }

    // The guest's own writes count too.
    vm.start().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    vm.pause().unwrap();
    let stack_and_more = vm.populated_pages().unwrap();
    for page in now.pages() {
        assert!(stack_and_more.contains(page));
    }
    power_off(&vm);
}

#[test]
fn the_digest_of_a_paused_vm_is_stable_and_finds_a_changed_byte() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new().unwrap();
    let path = image(&dir, "disk.img");
    let vm = Vm::new(
        &config(SPIN, 64 << 20, Vec::new(), vec![disk(&path)]),
        quiet(),
    )
    .unwrap();
    vm.start().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert!(matches!(vm.digest(), Err(Error::NotPaused)));
    vm.pause().unwrap();
    let one = vm.digest().unwrap();
    let two = vm.digest().unwrap();
    assert_eq!(one, two);
    assert_eq!(one.hex(), two.hex());
    assert_eq!(one.chunks.len(), (64 << 20) / CHUNK_SIZE as usize);
    assert_eq!(one.chunks[1].0, CHUNK_SIZE);

    let gpa = 0x234_5678;
    vm.memory().write_obj(0x42u8, GuestAddress(gpa)).unwrap();
    let three = vm.digest().unwrap();
    assert_eq!(
        one.first_difference(&three),
        Some(DigestDifference::Ram {
            gpa: gpa & !(CHUNK_SIZE - 1)
        })
    );
    let changed: Vec<u64> = one
        .chunks
        .iter()
        .zip(&three.chunks)
        .filter(|(a, b)| a.1 != b.1)
        .map(|(a, _)| a.0)
        .collect();
    assert_eq!(changed, vec![gpa & !(CHUNK_SIZE - 1)]);
    assert_eq!((one.devices, one.vcpus), (three.devices, three.vcpus));
    assert_ne!(one.total(), three.total());

    let bytes = postcard::to_stdvec(&three).unwrap();
    let back: StateDigest = postcard::from_bytes(&bytes).unwrap();
    assert_eq!(back, three);
    assert_eq!(back.first_difference(&three), None);

    // Another VM's devices (a read-only disk) differ.
    let mut other_cfg = config(
        SPIN,
        64 << 20,
        Vec::new(),
        vec![disk(&image(&dir, "b.img"))],
    );
    other_cfg.disks[0].readonly = true;
    let other = Vm::new(&other_cfg, quiet()).unwrap();
    let d = other.digest().unwrap();
    assert_eq!(d.chunks.len(), one.chunks.len());
    assert_ne!(d.devices, one.devices);
    power_off(&vm);
}

#[test]
fn an_idle_large_vm_digests_quickly() {
    if !kvm_available() {
        return;
    }
    let size = (4 << 30) + (64 << 20);
    let vm = Vm::new(&config(SPIN, size, Vec::new(), Vec::new()), quiet()).unwrap();
    let start = std::time::Instant::now();
    let d = vm.digest().unwrap();
    let took = start.elapsed();
    assert_eq!(d.chunks.len() as u64, size / CHUNK_SIZE);
    assert_eq!(
        d.chunks.last().unwrap().0,
        (1 << 32) + (1 << 30) + (62 << 20)
    );
    // Only the few chunks building the VM wrote are read.
    assert!(took < Duration::from_secs(10), "{took:?}");
    // And per page, only the few pages.
    let pages = vm.page_digest().unwrap();
    assert!(pages.chunks.len() < 64, "{} pages", pages.chunks.len());
    assert!(
        crate::testing::resident_pages() < 256 << 10,
        "the digest must not read all of RAM"
    );
}

/// A network back end that records when it is dropped.
struct DropFlag(DiscardNet, std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.1.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl NetBackend for DropFlag {
    fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        self.0.send(frame)
    }
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.recv(buf)
    }
    fn ready_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.0.ready_fd()
    }
}

#[test]
fn an_incoming_vm_runs_with_a_discarding_network_back_end() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new().unwrap();
    let path = image(&dir, "disk.img");
    // The tap does not exist: only a network back end of its own lets the
    // VM attach its back ends.
    let net = vec![NetConfig {
        tap: "tvdiscard0".into(),
        mac: None,
    }];
    let vm = Vm::new_incoming(&config(SPIN, 64 << 20, net, vec![disk(&path)]), quiet()).unwrap();
    assert_eq!(vm.net_count(), 1);
    assert!(matches!(
        vm.attach_backends(),
        Err(Error::Virtio(virtio::Error::TapMissing { .. }))
    ));

    // Index 1 is the disk: not a network device.
    let err = vm
        .set_net_backend(1, Box::new(DiscardNet::new().unwrap()))
        .unwrap_err();
    assert!(
        matches!(err, Error::NoSuchNetDevice { index: 1, count: 1 }),
        "{err}"
    );
    assert!(err.to_string().contains("no network device 1"), "{err}");

    let dropped = Arc::new(AtomicBool::new(false));
    let first = DropFlag(DiscardNet::new().unwrap(), dropped.clone());
    vm.set_net_backend(0, Box::new(first)).unwrap();
    let devices = vm.virtio_devices();
    assert!(lock(&devices[0]).has_backend());
    assert!(!lock(&devices[1]).has_backend());
    // Only the disk is opened.
    vm.attach_backends().unwrap();
    assert!(vm.backends_attached());
    assert!(RawFile::open(&path, false).is_err(), "the disk is locked");
    assert!(!dropped.load(Ordering::SeqCst));

    vm.resume().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let discard = DiscardNet::new().unwrap();
    assert!(matches!(
        vm.set_net_backend(0, Box::new(discard.clone())),
        Err(Error::NotPaused)
    ));
    vm.pause().unwrap();
    // The back end the device had is dropped for the new one.
    vm.set_net_backend(0, Box::new(discard.clone())).unwrap();
    assert!(dropped.load(Ordering::SeqCst));
    vm.attach_backends().unwrap();
    vm.resume().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    // The guest drives no network device.
    assert_eq!(discard.frames_dropped(), 0);
    power_off(&vm);
}

#[test]
fn a_page_digest_names_the_written_page() {
    if !kvm_available() {
        return;
    }
    let vm = Vm::new(&config(SPIN, 64 << 20, Vec::new(), Vec::new()), quiet()).unwrap();
    vm.start().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert!(matches!(vm.page_digest(), Err(Error::NotPaused)));
    vm.pause().unwrap();
    let one = vm.page_digest().unwrap();
    assert_eq!(one, vm.page_digest().unwrap());
    assert_eq!(one.chunk_size, PAGE_SIZE);
    // Only what building the VM wrote, and the guest's stack, is listed:
    // the kernel at 1 MiB among it.
    assert!(one.chunks.len() < 64, "{} pages", one.chunks.len());
    assert!(one.chunks.iter().any(|c| c.0 == 0x10_0000));
    assert_eq!(
        vm.digest().unwrap().first_difference(&one),
        Some(DigestDifference::Layout)
    );

    // A byte in a page nothing had touched, then one in the kernel's page.
    let gpa = 0x234_5678;
    vm.memory().write_obj(0x42u8, GuestAddress(gpa)).unwrap();
    let two = vm.page_digest().unwrap();
    assert_eq!(
        one.first_difference(&two),
        Some(DigestDifference::Ram {
            gpa: gpa & !(PAGE_SIZE - 1)
        })
    );
    assert_eq!((one.devices, one.vcpus), (two.devices, two.vcpus));
    vm.memory()
        .write_obj(0x42u8, GuestAddress(0x10_0ff0))
        .unwrap();
    let three = vm.page_digest().unwrap();
    assert_eq!(
        two.first_difference(&three),
        Some(DigestDifference::Ram { gpa: 0x10_0000 })
    );
    // Back to zeros: the page is populated but equal to an absent one.
    vm.memory().write_obj(0u8, GuestAddress(gpa)).unwrap();
    assert_eq!(
        vm.page_digest().unwrap().first_difference(&three),
        Some(DigestDifference::Ram {
            gpa: gpa & !(PAGE_SIZE - 1)
        })
    );
    vm.memory().write_obj(0u8, GuestAddress(0x10_0ff0)).unwrap();
    let back = vm.page_digest().unwrap();
    assert_eq!(back.first_difference(&one), None);
    assert_eq!(back.hex(), one.hex());

    // Every page written: every page listed, in order (hashed on several
    // threads where the host has them).
    let pattern: Vec<u8> = (0..64u32 << 20).map(|i| (i % 251) as u8 | 1).collect();
    vm.memory().write_slice(&pattern, GuestAddress(0)).unwrap();
    let full = vm.page_digest().unwrap();
    assert_eq!(full.chunks.len(), (64 << 20) / PAGE_SIZE as usize);
    for (i, (gpa, d)) in full.chunks.iter().enumerate() {
        let at = i * PAGE_SIZE as usize;
        assert_eq!(*gpa, at as u64);
        if i % 1000 == 0 {
            let want: [u8; 32] =
                <sha2::Sha256 as sha2::Digest>::digest(&pattern[at..at + PAGE_SIZE as usize])
                    .into();
            assert_eq!(*d, want, "page {gpa:#x}");
        }
    }
    power_off(&vm);
}

/// Scheduling policy (0 normal, 1 FIFO) of this process's thread named
/// `name`, from /proc.
fn thread_policy(name: &str) -> Option<u32> {
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).ok()?;
        // Fields after the ")" that ends the command name; policy is the 41st.
        let rest = &stat[stat.rfind(')')? + 2..];
        return rest.split_whitespace().nth(38)?.parse().ok();
    }
    None
}

#[test]
fn a_realtime_controller_lends_its_priority_to_vcpus_only_while_they_are_paused() {
    if !kvm_available() {
        return;
    }
    let vm = Vm::new(&config(SPIN, 64 << 20, Vec::new(), Vec::new()), quiet()).unwrap();
    vm.start().unwrap();
    assert_eq!(thread_policy("vcpu0"), Some(0));
    let lent = std::thread::scope(|s| {
        s.spawn(|| {
            let param = libc::sched_param { sched_priority: 1 };
            // SAFETY: changes only this test thread's policy.
            if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } != 0 {
                return None;
            }
            vm.pause().unwrap();
            let paused = thread_policy("vcpu0");
            vm.resume().unwrap();
            Some(paused)
        })
        .join()
        .unwrap()
    });
    let Some(paused) = lent else {
        eprintln!("SKIPPED: no privilege for real-time priority");
        power_off(&vm);
        return;
    };
    assert_eq!(
        paused,
        Some(1),
        "the paused vCPU thread had the controller's priority"
    );
    // Back to guest code at normal priority.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while thread_policy("vcpu0") != Some(0) {
        assert!(std::time::Instant::now() < deadline, "vCPU still real-time");
        std::thread::sleep(Duration::from_millis(5));
    }
    power_off(&vm);
}
