//! Snapshots and state loads with the bundled test guest: a snapshot
//! restored into a new VM continues the guest's counter and clock; a disk
//! workload in flight survives a snapshot, and state loads again and again
//! into the same VM objects; a TCP connection to the guest survives a
//! snapshot and a restore on the same tap; bad snapshot files get clear
//! errors.

mod common;

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use common::TempDir;
use common::guest::{
    Lines, T, boot, build, copy_ram, guest_config, last_counter, power_off, write_ram,
};
use vmm::{DiskConfig, VmConfig};

const MEMORY: u64 = 128 << 20;
/// IA32_TSC.
const MSR_TSC: u32 = 0x10;

fn config(cmdline: &str, disk: Option<&Path>) -> VmConfig {
    VmConfig {
        disks: disk
            .map(|p| DiskConfig {
                path: p.to_path_buf(),
                readonly: false,
                serial: None,
            })
            .into_iter()
            .collect(),
        ..guest_config(MEMORY, cmdline)
    }
}

fn tsc(state: &vmm::MachineState) -> u64 {
    state.vcpus[0]
        .msrs
        .iter()
        .find(|m| m.index == MSR_TSC)
        .expect("the TSC is among the saved MSRs")
        .data
}

/// `err` and its sources on one line, as twinvm prints errors.
fn chain(err: &dyn std::error::Error) -> String {
    let mut msg = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

#[test]
fn restored_guest_continues_its_counter_and_clock() {
    if !common::kvm_available() {
        return;
    }
    let dir = TempDir::new("snapshot-counter");
    let snap = dir.path().join("snap");
    let config = config("dirty_rate=500", None);
    let (vm, lines) = boot(&config);
    let mut last = lines.wait_counter();
    last = lines.wait_counter().max(last);

    vm.pause().expect("pause");
    last = last_counter(&lines.drain()).unwrap_or(last);
    let before = vm.save_machine_state().expect("state");
    let identity = vm.identity();
    vm.snapshot_to(&snap).expect("snapshot");
    // Taking a snapshot leaves the VM paused and its state as it was.
    assert!(vm.is_paused());
    assert_eq!(
        vm.save_machine_state().unwrap().vcpus[0].regs.rip,
        before.vcpus[0].regs.rip
    );

    // The directory: the two files, nothing else; the memory file sparse.
    let mut names: Vec<String> = std::fs::read_dir(&snap)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["memory.bin", "state.bin"]);
    let meta = std::fs::metadata(snap.join("memory.bin")).unwrap();
    assert_eq!(meta.len(), MEMORY);
    use std::os::unix::fs::MetadataExt;
    assert!(
        meta.blocks() * 512 < MEMORY / 2,
        "memory.bin occupies {} bytes: zero pages were written",
        meta.blocks() * 512
    );

    let partial = lines.partial.lock().unwrap().clone();
    drop(vm);

    // A new VM with the same configuration, restored from the directory.
    let (vm, lines) = build(&config, partial);
    assert_ne!(vm.identity(), identity);
    vm.restore_from(&snap).expect("restore");
    assert_eq!(vm.identity(), identity, "a restored VM keeps its identity");
    let restored = vm.save_machine_state().expect("state");
    assert!(
        restored.arch.clock.clock >= before.arch.clock.clock,
        "kvmclock went back from {} to {}",
        before.arch.clock.clock,
        restored.arch.clock.clock
    );
    assert!(
        tsc(&restored) >= tsc(&before),
        "the TSC went back from {} to {}",
        tsc(&before),
        tsc(&restored)
    );
    assert_eq!(restored.vcpus[0].regs.rip, before.vcpus[0].regs.rip);

    vm.start().expect("start");
    let first = lines.wait_counter();
    assert_eq!(
        first,
        last + 100,
        "the last counter before the snapshot was {last}; the restored guest printed {first} first"
    );
    assert_eq!(lines.wait_counter(), last + 200);
    assert!(
        !lines.drain().iter().any(|l| l.contains("READY")),
        "the guest booted again"
    );
    power_off(vm);
}

const RECORDS: u64 = 64;
/// Records at 10 a second: more than six seconds of disk writes.
const DISK_WORKLOAD: &str = "disk=records disk_records=64 disk_rate=10 disk_verify=1";

fn disk_image(dir: &TempDir) -> std::path::PathBuf {
    let image = dir.path().join("disk.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    image
}

/// Waits for the guest to write and verify all its records.
fn records_complete(lines: &Lines) {
    lines.wait(|l| l == format!("disk wrote {RECORDS} records"));
    lines.wait(|l| l == format!("disk verified {RECORDS} records"));
}

#[test]
fn a_disk_workload_in_flight_survives_snapshot_and_restore() {
    if !common::kvm_available() {
        return;
    }
    let dir = TempDir::new("snapshot-disk");
    let image = disk_image(&dir);
    let snap = dir.path().join("snap");
    let config = config(DISK_WORKLOAD, Some(&image));
    let (vm, lines) = boot(&config);
    lines.wait(|l| l.starts_with("disk0 capacity=2048"));
    lines.wait_counter();

    vm.pause().expect("pause");
    let seen = lines.drain();
    assert!(
        !seen.iter().any(|l| l.starts_with("disk wrote")),
        "the workload ended before the snapshot: {seen:?}"
    );
    let saved = vm.save_state().expect("state");
    let disk = &saved.devices.virtio[0];
    assert_eq!(disk.status, 15, "the disk is running (DRIVER_OK)");
    assert!(
        disk.queues[0].next_used > 2,
        "records were being written: {:?}",
        disk.queues[0]
    );
    vm.snapshot_to(&snap).expect("snapshot");
    let partial = lines.partial.lock().unwrap().clone();
    // The original stops here; its disk image stays as at the snapshot.
    drop(vm);

    let (vm, lines) = build(&config, partial);
    vm.restore_from(&snap).expect("restore");
    // The devices are exactly as saved.
    assert_eq!(vm.save_state().expect("state").devices, saved.devices);
    vm.start().expect("start");
    records_complete(&lines);
    let after = lines.drain();
    assert!(
        !after.iter().any(|l| l.starts_with("disk0 capacity")),
        "the guest set its disk up again: {after:?}"
    );
    power_off(vm);
}

#[test]
fn state_loads_again_and_again_into_the_same_vm_with_its_disk() {
    if !common::kvm_available() {
        return;
    }
    let dir = TempDir::new("snapshot-reload");
    let image = disk_image(&dir);
    let (vm, lines) = boot(&config(DISK_WORKLOAD, Some(&image)));
    lines.wait(|l| l.starts_with("disk0 capacity=2048"));
    let mut seen_a = lines.wait_counter();

    // State A, encoded, and RAM.
    vm.pause().expect("pause");
    seen_a = last_counter(&lines.drain()).unwrap_or(seen_a);
    let state_a = vm.save_state_bytes().expect("save A");
    let ram_a = copy_ram(&vm);
    let used_a = vm.save_state().unwrap().devices.virtio[0].queues[0].next_used;
    vm.resume().expect("resume");

    for _ in 0..2 {
        lines.wait_counter();
    }
    vm.pause().expect("pause");
    let seen_b = last_counter(&lines.drain()).unwrap_or(0).max(seen_a + 200);
    let state_b = vm.save_state_bytes().expect("save B");
    let ram_b = copy_ram(&vm);
    let used_b = vm.save_state().unwrap().devices.virtio[0].queues[0].next_used;
    assert!(
        used_b > used_a,
        "no disk progress between A ({used_a}) and B ({used_b})"
    );

    // State of another VM is refused, and the VM is untouched.
    let other = vmm::VmId([0x42; 16]);
    let err = vm.load_state_bytes(&state_a, Some(other)).unwrap_err();
    assert!(chain(&err).contains("belongs to VM"), "{}", chain(&err));

    // Back to A: the guest continues from A's counter, its disk from A's
    // queue position.
    write_ram(&vm, &ram_a);
    vm.load_state_bytes(&state_a, Some(vm.identity()))
        .expect("load A");
    assert_eq!(
        vm.save_state().unwrap().devices.virtio[0].queues[0].next_used,
        used_a
    );
    vm.resume().expect("resume");
    let after_a = lines.wait_counter();
    assert!(
        after_a > seen_a && after_a <= seen_a + 100 && after_a < seen_b,
        "after loading A (last seen {seen_a}) the guest printed {after_a}; B was at {seen_b}"
    );

    // Forward to B, into the same VM objects again.
    vm.pause().expect("pause");
    lines.drain();
    write_ram(&vm, &ram_b);
    vm.load_state_bytes(&state_b, None).expect("load B");
    vm.resume().expect("resume");
    let after_b = lines.wait_counter();
    assert!(
        after_b > seen_b - 100 && after_b <= seen_b + 100,
        "after loading B (at {seen_b}) the guest printed {after_b}"
    );
    // The workload finishes from B and every record verifies.
    records_complete(&lines);
    power_off(vm);
}

/// The COLO secondary's pattern: one state loaded into the same VM again
/// and again, the guest running a little in between. After every load the
/// guest's timer still runs: it answers a command on the serial port, which
/// it reads on timer ticks.
#[test]
fn state_loads_many_times_in_a_row_and_the_timer_keeps_running() {
    if !common::kvm_available() {
        return;
    }
    let config = VmConfig {
        memory_bytes: 32 << 20,
        ..config("", None)
    };
    let (vm, lines) = boot(&config);
    lines.wait_counter();
    vm.pause().expect("pause");
    let state = vm.save_state_bytes().expect("save");
    let ram = copy_ram(&vm);
    vm.resume().expect("resume");
    for round in 0..LOAD_ROUNDS {
        vm.pause().expect("pause");
        lines.drain();
        write_ram(&vm, &ram);
        vm.load_state_bytes(&state, Some(vm.identity()))
            .expect("load");
        vm.resume().expect("resume");
        assert_eq!(
            vm.send_console_input(b"counter\n", Duration::from_secs(10)),
            8,
            "round {round}"
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.rx.recv_timeout(left) {
                Ok(l) if l.starts_with("counter=") => break,
                Ok(_) => {}
                Err(_) => panic!("round {round}: the guest stopped answering after a load"),
            }
        }
    }
    power_off(vm);
}

/// Loads in [`state_loads_many_times_in_a_row_and_the_timer_keeps_running`].
const LOAD_ROUNDS: usize = 150;

/// Changes the contents of `state.bin` and `memory.bin`.
type Edit = Box<dyn FnOnce(&mut Vec<u8>, &mut Vec<u8>)>;

/// Copies a snapshot directory, changing its files with `edit`.
fn altered(from: &Path, to: &Path, edit: Edit) {
    std::fs::create_dir_all(to).unwrap();
    let mut state = std::fs::read(from.join("state.bin")).unwrap();
    let mut memory = std::fs::read(from.join("memory.bin")).unwrap();
    edit(&mut state, &mut memory);
    std::fs::write(to.join("state.bin"), state).unwrap();
    std::fs::write(to.join("memory.bin"), memory).unwrap();
}

#[test]
fn bad_snapshots_are_refused_with_clear_errors() {
    if !common::kvm_available() {
        return;
    }
    let dir = TempDir::new("snapshot-bad");
    let good = dir.path().join("good");
    // Small, as every case copies the memory file.
    let config = VmConfig {
        memory_bytes: 32 << 20,
        ..config("", None)
    };
    let (vm, lines) = boot(&config);
    vm.pause().expect("pause");
    vm.snapshot_to(&good).expect("snapshot");
    drop(vm);
    drop(lines);

    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "truncated",
            Box::new(|s, _| s.truncate(s.len() / 2)),
            "the state is truncated",
        ),
        (
            "flipped",
            Box::new(|s, _| {
                let at = s.len() - 100;
                s[at] ^= 0x04;
            }),
            "the state is corrupt (CRC32",
        ),
        (
            "version",
            Box::new(|s, _| s[8..12].copy_from_slice(&2u32.to_le_bytes())),
            "the state is in format version 2, this twinvm reads version 1 only",
        ),
        (
            "garbage",
            Box::new(|s, _| s.extend_from_slice(b"\n")),
            "1 bytes of trailing garbage",
        ),
        (
            "not-state",
            Box::new(|s, _| *s = b"{\"state\": 1}".to_vec()),
            "not twinvm state",
        ),
        (
            "short-memory",
            Box::new(|_, m| m.truncate(m.len() - 4096)),
            "memory.bin is 33550336 bytes long, the snapshot's guest memory is 33554432 bytes",
        ),
        (
            "flipped-memory",
            Box::new(|_, m| m[0x20_0000] ^= 1),
            "memory.bin is corrupt or from another snapshot",
        ),
    ];
    let (vm, lines) = build(&config, Vec::new());
    for (name, edit, want) in cases {
        let bad = dir.path().join(name);
        altered(&good, &bad, edit);
        let err = chain(&vm.restore_from(&bad).unwrap_err());
        std::fs::remove_dir_all(&bad).unwrap();
        assert!(err.contains(want), "{name}: {err}");
        if !name.ends_with("memory") {
            assert!(
                err.starts_with(&format!(
                    "cannot restore from {}",
                    bad.join("state.bin").display()
                )),
                "{name}: {err}"
            );
        }
    }
    let err = chain(&vm.restore_from(&dir.path().join("nothing")).unwrap_err());
    assert!(err.contains("holds no complete snapshot"), "{err}");

    // A VM of another size.
    let (small, _small_lines) = build(
        &VmConfig {
            memory_bytes: 16 << 20,
            ..config.clone()
        },
        Vec::new(),
    );
    let err = chain(&small.restore_from(&good).unwrap_err());
    assert!(
        err.contains("the state is of a VM with 33554432 bytes of memory, this VM has 16777216"),
        "{err}"
    );
    drop(small);

    // After all that, the good snapshot restores and the guest runs.
    vm.restore_from(&good).expect("restore");
    vm.start().expect("start");
    assert_eq!(
        vm.send_console_input(b"counter\n", Duration::from_secs(10)),
        8
    );
    lines.wait(|l| l.starts_with("counter="));
    power_off(vm);
}

#[test]
fn a_tcp_connection_survives_snapshot_and_restore_on_the_same_tap() {
    use std::io::{BufRead, BufReader};
    use std::net::TcpStream;

    if !common::kvm_available() || !common::netns_available() {
        return;
    }
    let ns = common::NetNs::new("snap");
    let dir = TempDir::new("snapshot-net");
    let snap = dir.path().join("snap");
    let config = VmConfig {
        net: vec![vmm::NetConfig {
            tap: ns.tap.clone(),
            mac: None,
        }],
        ..config(&format!("ip={}/24", common::GUEST_IP), None)
    };
    // Everything runs inside the namespace: the tap is there, and so is
    // the host's end of the connection.
    ns.run_in(move || {
        let (vm, lines) = boot(&config);
        lines.wait(|l| l.starts_with("net0 "));
        let guest = format!("{}:8000", common::GUEST_IP);
        let stream = TcpStream::connect_timeout(&guest.parse().unwrap(), T).expect("connect");
        stream.set_read_timeout(Some(T)).unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut writer = stream;
        let mut ask = |n: u64| {
            writeln!(writer, "{n}").unwrap();
            let mut line = String::new();
            reader.read_line(&mut line).expect("reply");
            line
        };
        assert_eq!(ask(1), "2 1\n");
        assert_eq!(ask(41), "42 2\n");

        vm.pause().expect("pause");
        vm.snapshot_to(&snap).expect("snapshot");
        let partial = lines.partial.lock().unwrap().clone();
        drop(vm);

        // The same tap, a new VM: the guest's end of the connection is
        // where it was, and so is its request count.
        let (vm, lines) = build(&config, partial);
        vm.restore_from(&snap).expect("restore");
        vm.start().expect("start");
        assert_eq!(ask(99), "100 3\n");
        // New connections work too.
        let again = TcpStream::connect_timeout(&guest.parse().unwrap(), T).expect("connect again");
        again.set_read_timeout(Some(T)).unwrap();
        let mut r2 = BufReader::new(again.try_clone().unwrap());
        let mut w2 = again;
        writeln!(w2, "7").unwrap();
        let mut line = String::new();
        r2.read_line(&mut line).expect("reply");
        assert_eq!(line, "8 4\n");
        assert_eq!(ask(100), "101 5\n");
        drop(lines);
        power_off(vm);
    });
}
