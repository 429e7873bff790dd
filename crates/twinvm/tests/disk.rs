//! The guest's disk through virtio-blk on a real image file: records written
//! and flushed by one twinvm process are read back and verified by a new
//! one, a read-only disk refuses writes, and the host checks the records in
//! the image file itself.

mod common;

use std::time::Duration;

use common::{BANNER, TempDir, Twinvm};

const T: Duration = Duration::from_secs(60);
const RECORDS: u64 = 64;

/// CRC-32 (IEEE, as zlib's crc32).
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// The record the guest writes to sector `k` (docs/test-guest.md).
fn expected_record(k: u64) -> [u8; 512] {
    let mut r = [0u8; 512];
    r[..8].copy_from_slice(b"TVMREC01");
    r[8..16].copy_from_slice(&k.to_le_bytes());
    let mut x = k ^ 0x7477_696e_766d_6469;
    if x == 0 {
        x = 0x2545_f491_4f6c_dd1d;
    }
    let mut payload = Vec::with_capacity(496);
    while payload.len() < 492 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        payload.extend_from_slice(&x.to_le_bytes());
    }
    r[16..508].copy_from_slice(&payload[..492]);
    let crc = crc32(&r[..508]);
    r[508..].copy_from_slice(&crc.to_le_bytes());
    r
}

fn boot(disk_arg: &str, cmdline: &str) -> Twinvm {
    let mut vm = Twinvm::spawn(&["run", "--disk", disk_arg, "--cmdline", cmdline]);
    vm.wait_for_line(|l| l == BANNER, T).unwrap();
    vm
}

fn power_off(mut vm: Twinvm) {
    vm.send_line("poweroff");
    assert_eq!(
        vm.wait_exit(T).unwrap().code(),
        Some(0),
        "{}",
        vm.transcript()
    );
}

#[test]
fn records_survive_a_restart_and_readonly_refuses_writes() {
    if !common::kvm_available() {
        return;
    }
    let dir = TempDir::new("disk");
    let image = dir.path().join("data.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let img = image.to_str().unwrap();
    let workload = format!("disk=records disk_records={RECORDS}");

    // First process: write and flush.
    let mut vm = boot(&format!("{img},serial=records-test"), &workload);
    let id = vm.wait_for_line(|l| l.starts_with("disk0 "), T).unwrap();
    assert_eq!(id, "disk0 capacity=2048 serial=records-test ro=0");
    vm.wait_for_line(|l| l == format!("disk wrote {RECORDS} records"), T)
        .unwrap();
    power_off(vm);

    // The host sees every record in the image file.
    let bytes = std::fs::read(&image).unwrap();
    for k in 0..RECORDS {
        let at = (k * 512) as usize;
        assert!(
            bytes[at..at + 512] == expected_record(k),
            "record {k} in the image differs from what the guest should have written"
        );
    }
    assert!(bytes[(RECORDS * 512) as usize..].iter().all(|&b| b == 0));

    // Second process, read-only: writes are refused, the records verify.
    let mut vm = boot(
        &format!("{img},readonly"),
        &format!("{workload} disk_verify=1"),
    );
    let id = vm.wait_for_line(|l| l.starts_with("disk0 "), T).unwrap();
    assert!(id.ends_with("ro=1"), "{id}");
    vm.wait_for_line(|l| l == "disk write refused (read-only)", T)
        .unwrap();
    vm.wait_for_line(|l| l == format!("disk verified {RECORDS} records"), T)
        .unwrap();
    power_off(vm);
    assert_eq!(
        std::fs::read(&image).unwrap(),
        bytes,
        "a read-only disk changed"
    );
}

#[test]
fn corrupted_record_is_detected() {
    if !common::kvm_available() {
        return;
    }
    let dir = TempDir::new("disk-corrupt");
    let image = dir.path().join("data.img");
    let mut bytes = vec![0u8; 64 * 1024];
    for k in 0..8u64 {
        bytes[(k * 512) as usize..][..512].copy_from_slice(&expected_record(k));
    }
    bytes[5 * 512 + 100] ^= 0x40;
    std::fs::write(&image, &bytes).unwrap();
    let mut vm = boot(
        &format!("{},readonly", image.display()),
        "disk=records disk_records=8 disk_verify=1",
    );
    vm.wait_for_line(|l| l.starts_with("disk error at record 5"), T)
        .unwrap();
    power_off(vm);
}
