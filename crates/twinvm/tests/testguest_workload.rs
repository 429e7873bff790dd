//! The test guest's workloads under real KVM: memory dirtied at the
//! requested rate on pseudo-random pages spread over all of guest RAM (the
//! pages the dirty log sees are the ones docs/test-guest.md says), and the
//! disk stream appending checksummed records without end while the guest
//! dirties memory.

mod common;

use std::time::Duration;

use common::guest::{Lines, boot, guest_config, power_off};
use common::{BANNER, TempDir, Twinvm};
use vm_memory::{Bytes, GuestAddress};

const T: Duration = Duration::from_secs(60);
const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;

/// The value of `key=<n>` (decimal, or hex with `0x`) in a console line.
fn field(line: &str, key: &str) -> u64 {
    let value = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"));
    match value.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => value.parse(),
    }
    .unwrap_or_else(|e| panic!("bad {key}= in {line:?}: {e}"))
}

/// The page sequence of docs/test-guest.md for a work area of one range:
/// page `i` is the high 64 bits of the (i+1)-th LCG state from the fixed
/// seed times the number of pages.
struct PageSequence {
    state: u64,
    base: u64,
    pages: u64,
}

impl PageSequence {
    fn new(base: u64, pages: u64) -> Self {
        Self {
            state: 0x2545_f491_4f6c_dd1d,
            base,
            pages,
        }
    }
}

impl Iterator for PageSequence {
    type Item = u64;
    fn next(&mut self) -> Option<u64> {
        self.state = self
            .state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let page = ((u128::from(self.state) * u128::from(self.pages)) >> 64) as u64;
        Some(self.base + page * PAGE)
    }
}

/// Waits for a counter line, pauses the VM, and returns the `dirtied=` of
/// the last counter line it printed. The guest has written fewer than
/// `2 * rate` pages more than that: less than 100 ticks' worth, plus one
/// more second if it was paused in the middle of printing the next line.
fn pause_after_counter(vm: &vmm::Vm, lines: &Lines) -> u64 {
    let seen = lines.wait(common::is_counter);
    vm.pause().expect("pause");
    let drained = lines.drain();
    let last = drained
        .iter()
        .rev()
        .find(|l| common::is_counter(l))
        .unwrap_or(&seen);
    field(last, "dirtied")
}

#[test]
fn dirtying_spreads_over_all_of_ram_at_the_requested_rate() {
    if !common::kvm_available() {
        return;
    }
    const RATE: u64 = 5120;
    let memory = 64 * MIB;
    let (vm, lines) = boot(&guest_config(memory, &format!("dirty_rate={RATE}")));

    // The work area is all RAM above the guest's image: one range up to
    // the end of its 64 MiB.
    let config = lines.wait(|l| l.starts_with("config "));
    let (area, base, end) = (
        field(&config, "dirty_area"),
        field(&config, "dirty_base"),
        field(&config, "dirty_end"),
    );
    assert_eq!(end, memory, "{config}");
    assert!((MIB..4 * MIB).contains(&base), "{config}");
    assert_eq!(area, end - base, "{config}");
    assert_eq!(base % PAGE, 0);

    // The rate is exact: RATE pages per 100 ticks.
    let first = lines.wait(common::is_counter);
    let second = lines.wait(common::is_counter);
    assert_eq!(
        field(&second, "dirtied") - field(&first, "dirtied"),
        RATE * (field(&second, "counter") - field(&first, "counter")) / 100,
        "{first} / {second}"
    );

    // Clear the dirty log at a counter line, let the guest run four more
    // seconds, and read the dirty log again.
    let at_clear = pause_after_counter(&vm, &lines);
    vm.take_dirty().expect("dirty log");
    vm.resume().expect("resume");
    for _ in 0..3 {
        lines.wait(common::is_counter);
    }
    let at_read = pause_after_counter(&vm, &lines);
    let dirty = vm.take_dirty().expect("dirty log");
    assert!(at_read >= at_clear + 4 * RATE, "{at_clear} → {at_read}");

    // Every page the sequence wrote in between is dirty and holds a counter
    // value the guest stored (a tick number, not zero).
    let written: Vec<u64> = PageSequence::new(base, area / PAGE)
        .skip((at_clear + 2 * RATE) as usize)
        .take((at_read - at_clear - 2 * RATE) as usize)
        .collect();
    for &page in &written {
        assert!(
            dirty.contains(GuestAddress(page)),
            "page {page:#x} of the sequence is not dirty ({} dirty pages)",
            dirty.count()
        );
        let value: u64 = vm.memory().read_obj(GuestAddress(page)).expect("read");
        assert!(
            value > 0 && value < 1_000_000,
            "page {page:#x} holds {value}"
        );
    }
    // They are spread over the whole area: every 4 MiB slice of it has its
    // share (about 1/16 of them; at least a third of that).
    let slices = (area / (4 * MIB)) as usize;
    let mut per_slice = vec![0usize; slices + 1];
    for &page in &written {
        per_slice[((page - base) / (4 * MIB)) as usize] += 1;
    }
    let share = written.len() / slices;
    assert!(
        per_slice[..slices].iter().all(|&n| n > share / 3),
        "pages per 4 MiB slice: {per_slice:?}"
    );
    // And the dirty log agrees: the guest's writes reach the top of RAM.
    assert!(dirty.pages().any(|a| a.0 >= memory - 4 * MIB));
    assert!(dirty.pages().all(|a| a.0 < memory));

    vm.resume().expect("resume");
    power_off(vm);
}

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

/// Record `k` as the guest writes it (docs/test-guest.md).
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

#[test]
fn disk_stream_keeps_writing_records_while_memory_is_dirtied() {
    if !common::kvm_available() {
        return;
    }
    const SECTORS: u64 = 64;
    let dir = TempDir::new("workload");
    let image = dir.path().join("stream.img");
    std::fs::write(&image, vec![0u8; (SECTORS * 512) as usize]).unwrap();
    let mut vm = Twinvm::spawn(&[
        "run",
        "--memory",
        "64M",
        "--disk",
        common::path_str(&image),
        "--cmdline",
        "dirty_rate=5120 disk=stream disk_rate=40 disk_flush_every=4",
    ]);
    vm.wait_for_line(|l| l == BANNER, T).unwrap();
    vm.wait_for_line(
        |l| l == format!("disk stream start sectors={SECTORS} rate=40 flush_every=4"),
        T,
    )
    .unwrap();

    // Counter lines carry the records written: they keep coming, never
    // more than 40 per 100 ticks, past the end of the disk and around again.
    let mut last: Option<u64> = None;
    loop {
        let line = vm.wait_for_line(common::is_counter, T).unwrap();
        let (counter, dirtied, records) = (
            field(&line, "counter"),
            field(&line, "dirtied"),
            field(&line, "records"),
        );
        assert_eq!(dirtied, counter / 100 * 5120, "{line}");
        assert!(records <= counter / 100 * 40, "{line}");
        assert!(last.is_none_or(|r| records >= r), "{line}");
        last = Some(records);
        if records > 2 * SECTORS + 10 {
            break;
        }
    }
    vm.send_line("disk");
    let progress = vm
        .wait_for_line(|l| l.starts_with("disk0 stream "), T)
        .unwrap();
    let (written, flushed) = (field(&progress, "written"), field(&progress, "flushed"));
    assert!(written > 2 * SECTORS, "{progress}");
    assert!(flushed <= written && written - flushed <= 4, "{progress}");
    assert_eq!(flushed % 4, 0, "{progress}");

    vm.send_line("poweroff");
    assert_eq!(
        vm.wait_exit(T).unwrap().code(),
        Some(0),
        "{}",
        vm.transcript()
    );
    assert!(
        !vm.transcript().contains("disk error"),
        "{}",
        vm.transcript()
    );

    // Sector s holds the latest record k with k mod SECTORS == s: the
    // records in the image are the last SECTORS ones written, each intact.
    let bytes = std::fs::read(&image).unwrap();
    let numbers: Vec<u64> = bytes
        .chunks(512)
        .map(|r| u64::from_le_bytes(r[8..16].try_into().unwrap()))
        .collect();
    let newest = *numbers.iter().max().unwrap();
    assert!(newest + 1 >= written, "newest record {newest}, {progress}");
    for (sector, (record, &k)) in bytes.chunks(512).zip(&numbers).enumerate() {
        assert_eq!(
            k % SECTORS,
            sector as u64,
            "sector {sector} holds record {k}"
        );
        assert!(
            k + SECTORS > newest,
            "sector {sector} holds the old record {k}"
        );
        assert!(
            record == expected_record(k),
            "record {k} in sector {sector} differs from what the guest should have written"
        );
    }
}
