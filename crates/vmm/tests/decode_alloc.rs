//! Decoding untrusted state never allocates by what a length in the input
//! claims: a counting allocator records the largest allocation made while
//! decoding inputs that claim enormous lengths, and inputs mutated at
//! random. A length prefix reserves at most the bytes left in the input;
//! beyond that a vector grows only as its elements actually decode (an
//! element may take a few times its encoded size in memory, and a vector
//! doubles as it grows), so the largest allocation stays within a small
//! multiple of the input — where the same inputs without those limits
//! reserve megabytes.
//!
//! A test binary of its own, because it replaces the global allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

use vmm::arch::x86_64::state::{VcpuSnapshot, VmArchSnapshot};
use vmm::devices::legacy::SerialSnapshot;
use vmm::devices::virtio::{DeviceSpecific, QueueState, VirtioState};
use vmm::snapshot::{ConfigFingerprint, Expected, PayloadKind, VmId, encode, encode_body};
use vmm::{DeviceStates, MachineState, VmState};

/// The system allocator, recording the largest allocation of the thread
/// that has tracking on.
struct Counting;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static TRACKING: Cell<bool> = const { Cell::new(false) };
}

fn note(size: usize) {
    if TRACKING.with(Cell::get) {
        LARGEST.fetch_max(size, Ordering::SeqCst);
    }
}

// SAFETY: every call is passed on to the system allocator unchanged; the
// bookkeeping allocates nothing.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The largest allocation decoding an input may make, as a multiple of the
/// input's length.
const FACTOR: usize = 8;

/// Decodes `input` as a VM state and returns the largest allocation made.
fn largest_allocation(input: &[u8], fp: &ConfigFingerprint) -> usize {
    LARGEST.store(0, Ordering::SeqCst);
    TRACKING.with(|t| t.set(true));
    let result = vmm::snapshot::decode::<VmState>(
        input,
        &Expected {
            identity: None,
            fingerprint: Some(fp),
        },
    );
    drop(result);
    TRACKING.with(|t| t.set(false));
    LARGEST.load(Ordering::SeqCst)
}

fn state() -> VmState {
    let vcpu = VcpuSnapshot {
        cpuid: vec![Default::default(); 8],
        mp_state: Default::default(),
        regs: Default::default(),
        sregs: Default::default(),
        xsave: Default::default(),
        xcrs: Default::default(),
        debug_regs: Default::default(),
        lapic: Default::default(),
        msrs: vec![Default::default(); 16],
        events: Default::default(),
    };
    VmState {
        machine: MachineState {
            arch: VmArchSnapshot {
                clock: Default::default(),
                pit: Default::default(),
                pic_master: Default::default(),
                pic_slave: Default::default(),
                ioapic: Default::default(),
            },
            vcpus: vec![vcpu],
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
                scratch: 0,
                rx_fifo: vec![b'x'; 10],
            },
            virtio: vec![VirtioState {
                device_type: 1,
                config: vec![0; 10],
                queues: vec![QueueState::new(256); 2],
                device: DeviceSpecific::Net {
                    pending_rx: Some(vec![0xee; 1500]),
                },
                ..Default::default()
            }],
        },
    }
}

/// A postcard varint.
fn varint(mut n: u64) -> Vec<u8> {
    let mut v = Vec::new();
    while n >= 0x80 {
        v.push(n as u8 | 0x80);
        n >>= 7;
    }
    v.push(n as u8);
    v
}

#[test]
fn decoding_never_allocates_what_the_input_claims() {
    let fp = ConfigFingerprint {
        memory_bytes: 64 << 20,
        vcpus: 1,
        devices: vec![1],
    };
    let id = VmId([1; 16]);
    let good = encode(id, &fp, &state()).unwrap();
    assert!(largest_allocation(&good, &fp) <= good.len());

    let arch = postcard::to_stdvec(&state().machine.arch).unwrap();
    let huge = [
        1u64 << 62,
        1 << 40,
        u64::from(u32::MAX),
        1_000_000,
        5000,
        250,
        64,
    ];
    let mut crafted = Vec::new();
    for &n in &huge {
        // n vCPUs.
        let mut body = arch.clone();
        body.extend(varint(n));
        body.extend_from_slice(&[0x55; 300]);
        crafted.push(body);
        // One vCPU with n CPUID entries.
        let mut body = arch.clone();
        body.extend(varint(1));
        body.extend(varint(n));
        body.extend_from_slice(&[40; 300]);
        crafted.push(body);
        // A KVM structure of n bytes.
        let mut body = arch.clone();
        body.extend(varint(1));
        body.extend(varint(0));
        body.extend(varint(n));
        body.extend_from_slice(&[0; 300]);
        crafted.push(body);
    }
    // A valid machine state, then a serial FIFO or a device list claiming
    // n entries.
    let machine = postcard::to_stdvec(&state().machine).unwrap();
    for &n in &huge {
        let mut body = machine.clone();
        body.extend_from_slice(&[12, 0, 0, 1, 3, 0x60, 8, 0xb0, 0]);
        body.extend(varint(n));
        body.extend_from_slice(&[b'x'; 300]);
        crafted.push(body);
        let mut body = machine.clone();
        body.extend_from_slice(&[12, 0, 0, 1, 3, 0x60, 8, 0xb0, 0, 0]);
        body.extend(varint(n));
        body.extend_from_slice(&[1; 300]);
        crafted.push(body);
    }
    for body in &crafted {
        let input = encode_body(PayloadKind::VmState, id, &fp, body);
        let largest = largest_allocation(&input, &fp);
        assert!(
            largest <= FACTOR * input.len(),
            "a {}-byte input made a {largest}-byte allocation",
            input.len()
        );
    }

    // Random changes to a valid body.
    let body = postcard::to_stdvec(&state()).unwrap();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut rand = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..2000 {
        let mut b = body.clone();
        for _ in 0..1 + rand() % 6 {
            let at = (rand() % b.len() as u64) as usize;
            b[at] = rand() as u8;
        }
        let input = encode_body(PayloadKind::VmState, id, &fp, &b);
        let largest = largest_allocation(&input, &fp);
        assert!(
            largest <= FACTOR * input.len(),
            "a {}-byte input made a {largest}-byte allocation",
            input.len()
        );
    }
}
