//! The state format without KVM: layout, round trips, every error, and a
//! bounded fuzz-style loop over random, truncated and mutated inputs.

use super::*;
use crate::arch::x86_64::state::{VcpuSnapshot, VmArchSnapshot};
use crate::devices::legacy::SerialSnapshot;
use crate::devices::virtio::{DeviceSpecific, QueueState, VirtioState};
use crate::vm::{DeviceStates, MachineState, VmState};

const ID: VmId = VmId([7; 16]);

fn vcpu(i: u32) -> VcpuSnapshot {
    VcpuSnapshot {
        cpuid: (0..4)
            .map(|f| kvm_bindings::kvm_cpuid_entry2 {
                function: f,
                eax: i,
                ..Default::default()
            })
            .collect(),
        mp_state: Default::default(),
        regs: kvm_bindings::kvm_regs {
            rip: 0x10_0000 + u64::from(i),
            ..Default::default()
        },
        sregs: Default::default(),
        xsave: Default::default(),
        xcrs: Default::default(),
        debug_regs: Default::default(),
        lapic: Default::default(),
        msrs: vec![kvm_bindings::kvm_msr_entry {
            index: 0x10,
            data: 12345,
            ..Default::default()
        }],
        events: Default::default(),
    }
}

fn virtio(device_type: u32) -> VirtioState {
    VirtioState {
        device_type,
        avail_features: 1 << 32 | 1 << 5,
        acked_features: 1 << 32,
        status: 15,
        interrupt_status: 1,
        config: vec![0x52, 0x54, 0, 0x12, 0x34, 0x56, 1, 0, 1, 0],
        queues: vec![
            QueueState {
                max_size: 256,
                size: 64,
                ready: true,
                desc_table: 0x1000,
                avail_ring: 0x2000,
                used_ring: 0x3000,
                next_avail: 700,
                next_used: 699,
            };
            2
        ],
        device: if device_type == 1 {
            DeviceSpecific::Net {
                pending_rx: Some(vec![0xab; 60]),
            }
        } else {
            DeviceSpecific::None
        },
        ..Default::default()
    }
}

fn state(vcpus: u32) -> VmState {
    VmState {
        machine: MachineState {
            arch: VmArchSnapshot {
                clock: kvm_bindings::kvm_clock_data {
                    clock: 5_000_000_000,
                    ..Default::default()
                },
                pit: Default::default(),
                pic_master: Default::default(),
                pic_slave: Default::default(),
                ioapic: Default::default(),
            },
            vcpus: (0..vcpus).map(vcpu).collect(),
        },
        devices: DeviceStates {
            serial: SerialSnapshot {
                baud_divisor_low: 12,
                baud_divisor_high: 0,
                interrupt_enable: 0,
                interrupt_identification: 1,
                line_control: 3,
                line_status: 0x60,
                modem_control: 8,
                modem_status: 0xb0,
                scratch: 0x5a,
                rx_fifo: b"poweroff\n".to_vec(),
            },
            virtio: vec![virtio(1), virtio(2)],
        },
    }
}

fn fingerprint() -> ConfigFingerprint {
    ConfigFingerprint {
        memory_bytes: 128 << 20,
        vcpus: 2,
        devices: vec![1, 2],
    }
}

fn sample() -> Vec<u8> {
    encode(ID, &fingerprint(), &state(2)).unwrap()
}

fn expect_here(fp: &ConfigFingerprint) -> Expected<'_> {
    Expected {
        identity: Some(ID),
        fingerprint: Some(fp),
    }
}

/// Decodes as a VM state for the sample's own VM.
fn decode_sample(bytes: &[u8]) -> Result<VmState, FormatError> {
    let fp = fingerprint();
    decode::<VmState>(bytes, &expect_here(&fp)).map(|(_, s)| s)
}

/// Recomputes both checksums after an edit of the header or body.
fn refresh_crcs(b: &mut [u8]) {
    let n = u32_at(b, 44) as usize;
    let hlen = header_len(n);
    let c = crc(&b[..hlen]);
    b[hlen..hlen + 4].copy_from_slice(&c.to_le_bytes());
    let end = b.len() - 4;
    let c = crc(&b[..end]);
    b[end..].copy_from_slice(&c.to_le_bytes());
}

#[test]
fn layout_is_as_documented() {
    let b = sample();
    let body = postcard::to_stdvec(&state(2)).unwrap();
    assert_eq!(&b[0..8], b"TWINVMSN");
    assert_eq!(u32_at(&b, 8), 1);
    assert_eq!(u32_at(&b, 12), PayloadKind::VmState as u32);
    assert_eq!(&b[16..32], &[7; 16]);
    assert_eq!(u64_at(&b, 32), 128 << 20);
    assert_eq!(u32_at(&b, 40), 2);
    assert_eq!(u32_at(&b, 44), 2);
    assert_eq!((u32_at(&b, 48), u32_at(&b, 52)), (1, 2));
    assert_eq!(u64_at(&b, 56), body.len() as u64);
    assert_eq!(u32_at(&b, 64), crc32fast::hash(&b[..64]));
    assert_eq!(&b[68..68 + body.len()], &body[..]);
    assert_eq!(b.len(), 64 + 4 * 2 + body.len());
    let end = b.len() - 4;
    assert_eq!(u32_at(&b, end), crc32fast::hash(&b[..end]));
}

#[test]
fn state_round_trips() {
    let b = sample();
    let (header, s) = decode::<VmState>(&b, &Expected::default()).unwrap();
    assert_eq!(header.identity, ID);
    assert_eq!(header.fingerprint, fingerprint());
    assert_eq!(s.machine.vcpus.len(), 2);
    assert_eq!(s.machine.vcpus[1].regs.rip, 0x10_0001);
    assert_eq!(s.machine.vcpus[0].msrs[0].data, 12345);
    assert_eq!(s.machine.arch.clock.clock, 5_000_000_000);
    assert_eq!(s.devices, state(2).devices);
    // Encoding the decoded state gives the same bytes.
    assert_eq!(encode(ID, &fingerprint(), &s).unwrap(), b);
    assert!(decode_sample(&b).is_ok());
}

#[test]
fn identity_prints_like_a_uuid() {
    let id = VmId([
        0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 0, 1, 2, 3, 4, 5, 6, 7,
    ]);
    assert_eq!(id.to_string(), "12345678-9abc-def0-0001-020304050607");
    let a = VmId::random().unwrap();
    let b = VmId::random().unwrap();
    assert_ne!(a, b);
}

#[test]
fn every_truncation_is_refused() {
    let b = sample();
    for len in 0..b.len() {
        match decode_sample(&b[..len]) {
            Err(FormatError::Truncated { needed, got }) => {
                assert_eq!(got, len as u64);
                assert!(needed > got);
            }
            other => panic!("{len} bytes: {other:?}"),
        }
    }
    let msg = decode_sample(&b[..100]).unwrap_err().to_string();
    assert!(msg.contains("truncated"), "{msg}");
}

#[test]
fn trailing_garbage_is_refused() {
    let mut b = sample();
    b.extend_from_slice(b"xyz");
    let err = decode_sample(&b).unwrap_err();
    assert!(
        matches!(err, FormatError::TrailingBytes { extra: 3 }),
        "{err:?}"
    );
    assert!(err.to_string().contains("trailing garbage"));
}

#[test]
fn bad_magic_is_refused() {
    for input in [
        &b"hello world, this is not a snapshot"[..],
        b"TWINVMSX",
        b"\x7fELF",
    ] {
        let err = decode_sample(input).unwrap_err();
        assert!(matches!(err, FormatError::BadMagic { .. }), "{err:?}");
        assert!(err.to_string().contains("not twinvm state"), "{err}");
    }
}

#[test]
fn another_version_is_refused_before_anything_else() {
    let mut b = sample();
    b[8..12].copy_from_slice(&2u32.to_le_bytes());
    let err = decode_sample(&b).unwrap_err();
    assert!(
        matches!(err, FormatError::UnsupportedVersion { found: 2 }),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "the state is in format version 2, this twinvm reads version 1 only"
    );
    // Even when the rest is some other layout altogether.
    let mut short = b"TWINVMSN".to_vec();
    short.extend_from_slice(&7u32.to_le_bytes());
    assert!(matches!(
        decode_sample(&short),
        Err(FormatError::UnsupportedVersion { found: 7 })
    ));
}

#[test]
fn corrupt_header_and_body_are_refused() {
    // A byte of the memory size: the header checksum catches it.
    let mut b = sample();
    b[33] ^= 0x10;
    let err = decode_sample(&b).unwrap_err();
    assert!(matches!(err, FormatError::HeaderChecksum { .. }), "{err:?}");
    assert!(err.to_string().contains("header is corrupt"));
    // An impossible device count.
    let mut b = sample();
    b[44..48].copy_from_slice(&1000u32.to_le_bytes());
    assert!(matches!(
        decode_sample(&b),
        Err(FormatError::BadDeviceCount(1000))
    ));
    // A body byte, and each checksum itself.
    let sample = sample();
    for at in [100, sample.len() / 2, sample.len() - 5, sample.len() - 1] {
        let mut b = sample.clone();
        b[at] ^= 0x01;
        let err = decode_sample(&b).unwrap_err();
        assert!(matches!(err, FormatError::Checksum { .. }), "{at}: {err:?}");
        assert!(err.to_string().contains("corrupt"));
    }
    let mut b = sample.clone();
    b[66] ^= 0x80;
    assert!(matches!(
        decode_sample(&b),
        Err(FormatError::HeaderChecksum { .. })
    ));
}

#[test]
fn state_of_another_vm_or_shape_is_refused() {
    let b = sample();
    let fp = fingerprint();
    let other = VmId([9; 16]);
    let err = decode::<VmState>(
        &b,
        &Expected {
            identity: Some(other),
            fingerprint: Some(&fp),
        },
    )
    .unwrap_err();
    assert!(matches!(err, FormatError::OtherVm { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "the state belongs to VM 07070707-0707-0707-0707-070707070707, not to VM 09090909-0909-0909-0909-090909090909"
    );

    let bigger = ConfigFingerprint {
        memory_bytes: 256 << 20,
        ..fingerprint()
    };
    let err = decode::<VmState>(&b, &expect_here(&bigger)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "the state is of a VM with 134217728 bytes of memory, this VM has 268435456"
    );
    let one_cpu = ConfigFingerprint {
        vcpus: 1,
        ..fingerprint()
    };
    let err = decode::<VmState>(&b, &expect_here(&one_cpu)).unwrap_err();
    assert!(matches!(
        err,
        FormatError::VcpuMismatch { saved: 2, here: 1 }
    ));
    let disks_only = ConfigFingerprint {
        devices: vec![2],
        ..fingerprint()
    };
    let err = decode::<VmState>(&b, &expect_here(&disks_only)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "the state is of a VM with virtio devices [net, disk], this VM has virtio devices [disk]"
    );
    // The wrong kind of content.
    let err = decode::<dir::SnapshotFile>(&b, &Expected::default()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "the input holds a VM state, not a snapshot file"
    );
}

#[test]
fn bodies_that_do_not_decode_are_refused() {
    let fp = fingerprint();
    // Valid checksums around garbage.
    let b = encode_body(PayloadKind::VmState, ID, &fp, &[0xff; 40]);
    let err = decode_sample(&b).unwrap_err();
    assert!(matches!(err, FormatError::Body(_)), "{err:?}");
    assert!(err.to_string().contains("does not decode"));
    // A valid body followed by more bytes.
    let mut body = postcard::to_stdvec(&state(2)).unwrap();
    body.push(0);
    let b = encode_body(PayloadKind::VmState, ID, &fp, &body);
    assert!(matches!(
        decode_sample(&b),
        Err(FormatError::BodyTrailing(1))
    ));
    // A body cut short.
    let body = postcard::to_stdvec(&state(2)).unwrap();
    let b = encode_body(PayloadKind::VmState, ID, &fp, &body[..body.len() - 1]);
    assert!(matches!(decode_sample(&b), Err(FormatError::Body(_))));
    // A KVM structure of the wrong size inside an otherwise valid body:
    // the first vCPU's first CPUID entry is 40 bytes long; say 39.
    let mut body = postcard::to_stdvec(&state(2)).unwrap();
    // After the VM-wide part come the vCPU count and the CPUID count.
    let at = postcard::to_stdvec(&state(2).machine.arch).unwrap().len() + 2;
    assert_eq!(body[at], 40);
    body[at] = 39;
    let b = encode_body(PayloadKind::VmState, ID, &fp, &body);
    assert!(matches!(decode_sample(&b), Err(FormatError::Body(_))));
}

#[test]
fn huge_length_claims_are_refused_cheaply() {
    let fp = fingerprint();
    // A body length of 2^63 in the header.
    let mut b = sample();
    b[56..64].copy_from_slice(&(1u64 << 63).to_le_bytes());
    refresh_crcs_header_only(&mut b);
    let err = decode_sample(&b).unwrap_err();
    assert!(matches!(err, FormatError::Truncated { .. }), "{err:?}");
    // A body that claims 2^60 vCPUs: a varint, then nothing behind it.
    let mut body = Vec::new();
    body.extend_from_slice(&postcard::to_stdvec(&state(0).machine.arch).unwrap());
    body.extend_from_slice(&[0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x10]);
    body.extend_from_slice(&[0u8; 16]);
    let b = encode_body(PayloadKind::VmState, ID, &fp, &body);
    assert!(matches!(decode_sample(&b), Err(FormatError::Body(_))));
}

/// Recomputes only the header checksum (the whole-file one is left, which
/// does not matter when decoding fails before it).
fn refresh_crcs_header_only(b: &mut [u8]) {
    let n = u32_at(b, 44) as usize;
    let hlen = header_len(n);
    let c = crc(&b[..hlen]);
    b[hlen..hlen + 4].copy_from_slice(&c.to_le_bytes());
}

/// xorshift64: deterministic pseudo-random numbers for the fuzz loop.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Random, truncated and mutated inputs, with and without valid
/// checksums (so that the body decoder is reached too): every one decodes
/// or fails with an error, none panics.
#[test]
fn fuzzed_inputs_never_panic() {
    let fp = fingerprint();
    let good = sample();
    let body = postcard::to_stdvec(&state(2)).unwrap();
    let mut rng = Rng(0x7477_696e_766d_0001);
    let mut decoded = 0;
    for round in 0..4000 {
        let input: Vec<u8> = match round % 5 {
            // Random bytes, sometimes behind a valid magic and version.
            0 => {
                let len = rng.below(300);
                let mut v: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                if rng.below(2) == 0 && v.len() >= 12 {
                    v[..8].copy_from_slice(&MAGIC);
                    v[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
                }
                v
            }
            // A valid state cut at a random point.
            1 => good[..rng.below(good.len())].to_vec(),
            // A valid state with a few bytes changed.
            2 => {
                let mut v = good.clone();
                for _ in 0..1 + rng.below(8) {
                    let at = rng.below(v.len());
                    v[at] = rng.next() as u8;
                }
                v
            }
            // ... with the checksums fixed up afterwards.
            3 => {
                let mut v = good.clone();
                for _ in 0..1 + rng.below(8) {
                    let at = 72 + rng.below(v.len() - 76);
                    v[at] = rng.next() as u8;
                }
                refresh_crcs(&mut v);
                v
            }
            // A body with bytes inserted, removed or changed, framed with
            // valid checksums.
            _ => {
                let mut b = body.clone();
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(b.len());
                    match rng.below(3) {
                        0 => b.insert(at, rng.next() as u8),
                        1 => {
                            b.remove(at);
                        }
                        _ => b[at] = rng.next() as u8,
                    }
                }
                if rng.below(4) == 0 {
                    b.truncate(rng.below(b.len()));
                }
                encode_body(PayloadKind::VmState, ID, &fp, &b)
            }
        };
        if let Ok(s) = decode_sample(&input) {
            decoded += 1;
            // Whatever decodes encodes again.
            encode(ID, &fp, &s).unwrap();
        }
    }
    // Most mutations of the body's bytes still decode (they change a
    // value, not the structure); the loop reached the decoder.
    assert!(decoded > 0);
}
