//! Intel MultiProcessor Specification 1.4 tables.
//!
//! A guest without ACPI tables learns about its CPUs, its IOAPIC and the
//! routing of the ISA interrupts from an MP table. Linux looks for the MP
//! floating pointer structure in a few legacy places, one of them the last KiB
//! of base memory (639 KiB to 640 KiB, where a PC keeps its extended BIOS data
//! area). twinvm writes the floating pointer at the start of that KiB and the
//! configuration table right behind it:
//!
//! | entries         | count      | what                                     |
//! |-----------------|------------|------------------------------------------|
//! | processor       | one a vCPU | APIC id = vCPU index, vCPU 0 is the BSP  |
//! | bus             | 1          | bus 0, "ISA"                             |
//! | I/O APIC        | 1          | id = number of vCPUs, at 0xfec00000      |
//! | I/O interrupt   | 16         | ISA IRQ n to IOAPIC pin n (KVM's wiring) |
//! | local interrupt | 2          | LINT0 ExtINT, LINT1 NMI, on every LAPIC  |
//!
//! For up to 40 vCPUs the whole table ends below 640 KiB. A larger table
//! (up to [`MAX_CPUS`], about 5 KiB) continues past 640 KiB into the legacy
//! hole below 1 MiB; the table's pointer allows that, Linux reserves the
//! table wherever it is, and guest memory only has to cover it.
//!
//! All structures are little-endian and packed; they are built byte by byte
//! and written with one `write_slice`, so the VMM's dirty tracking of guest
//! memory sees the write.

use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError, Permissions};

/// Where the MP floating pointer and table are placed (just below 640 KiB, in the EBDA area Linux scans).
pub const MPTABLE_START: u64 = 0x9fc00;

/// The end of base memory (640 KiB).
#[cfg(test)]
const BASE_MEMORY_END: u64 = 0xa_0000;
/// Where kernels are loaded (1 MiB): the table must end below it.
const HIMEM_START: u64 = 0x10_0000;

/// Sizes of the structures, in bytes (MP spec 1.4, chapter 4).
const FLOATING_POINTER_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const PROCESSOR_LEN: usize = 20;
const BUS_LEN: usize = 8;
const IOAPIC_LEN: usize = 8;
const IO_INTERRUPT_LEN: usize = 8;
const LOCAL_INTERRUPT_LEN: usize = 8;
/// Offsets of the checksum bytes in the floating pointer and the header.
const FLOATING_POINTER_CHECKSUM: usize = 10;
const HEADER_CHECKSUM: usize = 7;

/// Number of ISA interrupt lines routed to the IOAPIC.
const ISA_IRQS: u8 = 16;
/// Number of local interrupt entries (LINT0 and LINT1).
const LOCAL_INTERRUPTS: usize = 2;

/// Size of everything except the processor entries.
const FIXED_LEN: usize = FLOATING_POINTER_LEN
    + HEADER_LEN
    + BUS_LEN
    + IOAPIC_LEN
    + ISA_IRQS as usize * IO_INTERRUPT_LEN
    + LOCAL_INTERRUPTS * LOCAL_INTERRUPT_LEN;

/// The most vCPUs an MP table describes: APIC ids are 8 bits, the IOAPIC
/// takes the id after the last vCPU and 0xff means "every local APIC".
pub const MAX_CPUS: u8 = 254;

const _: () = assert!(MPTABLE_START + mptable_len(MAX_CPUS as usize) as u64 <= HIMEM_START);

const FLOATING_POINTER_SIGNATURE: &[u8; 4] = b"_MP_";
const HEADER_SIGNATURE: &[u8; 4] = b"PCMP";
/// MP specification revision 1.4.
const SPEC_REVISION: u8 = 4;
const OEM_ID: &[u8; 8] = b"TWINVM  ";
const PRODUCT_ID: &[u8; 12] = b"KVM GUEST   ";

/// Default physical address of every local APIC.
const LAPIC_ADDRESS: u32 = 0xfee0_0000;
/// Local APIC version reported by KVM's in-kernel LAPIC.
const LAPIC_VERSION: u8 = 0x14;
/// Address and version of KVM's in-kernel IOAPIC.
const IOAPIC_ADDRESS: u32 = 0xfec0_0000;
const IOAPIC_VERSION: u8 = 0x11;

/// CPU signature (CPUID leaf 1 EAX layout): family 6, model 0, stepping 0.
const CPU_SIGNATURE: u32 = 6 << 8;
/// CPU feature flags (CPUID leaf 1 EDX layout): FPU (bit 0) and APIC (bit 9).
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);

/// Entry types.
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

/// Processor entry flags.
const CPU_ENABLED: u8 = 1 << 0;
const CPU_BOOTSTRAP: u8 = 1 << 1;
/// IOAPIC entry flags.
const IOAPIC_ENABLED: u8 = 1 << 0;

/// Interrupt types of I/O and local interrupt entries.
const INTERRUPT_INT: u8 = 0;
const INTERRUPT_NMI: u8 = 1;
const INTERRUPT_EXTINT: u8 = 3;
/// Polarity and trigger mode as the source bus defines them (ISA: active high, edge).
const INTERRUPT_FLAGS_CONFORM: u16 = 0;

/// The ISA bus.
const ISA_BUS_ID: u8 = 0;
const ISA_BUS_TYPE: &[u8; 6] = b"ISA   ";
/// Destination APIC id meaning "every local APIC".
const ALL_LAPICS: u8 = 0xff;

/// Why the MP table could not be written.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// A VM needs at least one vCPU.
    #[error("the MP table needs at least one vCPU")]
    NoCpus,
    /// More vCPUs than an MP table can describe.
    #[error("{requested} vCPUs do not fit in the MP table (at most {max})")]
    TooManyCpus {
        /// The number of vCPUs asked for.
        requested: u8,
        /// The most the table can describe.
        max: u8,
    },
    /// Guest memory does not cover the table's place.
    #[error("guest memory does not cover the MP table at {start:#x}..{end:#x}")]
    NotInGuestMemory {
        /// First byte of the table.
        start: u64,
        /// One past its last byte.
        end: u64,
    },
    /// Writing the table into guest memory failed.
    #[error("writing the MP table into guest memory failed")]
    Write(#[source] GuestMemoryError),
}

/// Writes the MP floating pointer and configuration table for `num_cpus`
/// vCPUs at [`MPTABLE_START`].
///
/// Guest memory must cover `MPTABLE_START` up to the end of the table (640
/// KiB for 40 vCPUs, about 5 KiB further for [`MAX_CPUS`]); nothing is
/// written unless the whole table fits.
///
/// # Errors
///
/// [`MptableError::NoCpus`] or [`MptableError::TooManyCpus`] when `num_cpus`
/// is not in `1..=MAX_CPUS`, [`MptableError::NotInGuestMemory`] when guest
/// memory does not cover the table, [`MptableError::Write`] when the write
/// fails.
pub fn setup_mptable<M: GuestMemory>(mem: &M, num_cpus: u8) -> Result<(), MptableError> {
    let table = build_mptable(num_cpus)?;
    let start = MPTABLE_START;
    let end = start + table.len() as u64;
    if !mem.check_range(GuestAddress(start), table.len(), Permissions::Write) {
        return Err(MptableError::NotInGuestMemory { start, end });
    }
    mem.write_slice(&table, GuestAddress(start))
        .map_err(MptableError::Write)
}

/// Size in bytes of the floating pointer plus the table for `num_cpus` vCPUs.
const fn mptable_len(num_cpus: usize) -> usize {
    FIXED_LEN + num_cpus * PROCESSOR_LEN
}

/// Builds the floating pointer followed by the configuration table, as the
/// bytes that go to [`MPTABLE_START`].
fn build_mptable(num_cpus: u8) -> Result<Vec<u8>, MptableError> {
    if num_cpus == 0 {
        return Err(MptableError::NoCpus);
    }
    if num_cpus > MAX_CPUS {
        return Err(MptableError::TooManyCpus {
            requested: num_cpus,
            max: MAX_CPUS,
        });
    }
    let len = mptable_len(usize::from(num_cpus));
    let mut t = Vec::with_capacity(len);

    // Floating pointer structure. The table is below 1 MiB and shorter than
    // 64 KiB, so every length and address fits its (16- or 32-bit) field.
    t.extend_from_slice(FLOATING_POINTER_SIGNATURE);
    put_u32(&mut t, (MPTABLE_START as u32) + FLOATING_POINTER_LEN as u32);
    t.push((FLOATING_POINTER_LEN / 16) as u8); // length in 16-byte units
    t.push(SPEC_REVISION);
    t.push(0); // checksum, set below
    t.push(0); // feature byte 1: 0 = a configuration table is present
    t.push(0); // feature byte 2: IMCR absent, virtual wire mode
    t.extend_from_slice(&[0; 3]); // feature bytes 3-5, reserved
    debug_assert_eq!(t.len(), FLOATING_POINTER_LEN);
    t[FLOATING_POINTER_CHECKSUM] = checksum(&t[..FLOATING_POINTER_LEN]);

    // Configuration table header.
    let ioapic_id = num_cpus;
    let entry_count = usize::from(num_cpus) + 1 + 1 + usize::from(ISA_IRQS) + LOCAL_INTERRUPTS;
    let header = t.len();
    t.extend_from_slice(HEADER_SIGNATURE);
    put_u16(&mut t, (len - FLOATING_POINTER_LEN) as u16); // base table length
    t.push(SPEC_REVISION);
    t.push(0); // checksum, set below
    t.extend_from_slice(OEM_ID);
    t.extend_from_slice(PRODUCT_ID);
    put_u32(&mut t, 0); // OEM table pointer
    put_u16(&mut t, 0); // OEM table size
    put_u16(&mut t, entry_count as u16);
    put_u32(&mut t, LAPIC_ADDRESS);
    put_u16(&mut t, 0); // extended table length
    t.push(0); // extended table checksum
    t.push(0); // reserved
    debug_assert_eq!(t.len() - header, HEADER_LEN);

    // Entries, in the order the specification requires: processors, buses,
    // I/O APICs, I/O interrupts, local interrupts.
    for cpu in 0..num_cpus {
        let bsp = if cpu == 0 { CPU_BOOTSTRAP } else { 0 };
        t.push(ENTRY_PROCESSOR);
        t.push(cpu); // local APIC id
        t.push(LAPIC_VERSION);
        t.push(CPU_ENABLED | bsp);
        put_u32(&mut t, CPU_SIGNATURE);
        put_u32(&mut t, CPU_FEATURES);
        t.extend_from_slice(&[0; 8]); // reserved
    }

    t.push(ENTRY_BUS);
    t.push(ISA_BUS_ID);
    t.extend_from_slice(ISA_BUS_TYPE);

    t.push(ENTRY_IOAPIC);
    t.push(ioapic_id);
    t.push(IOAPIC_VERSION);
    t.push(IOAPIC_ENABLED);
    put_u32(&mut t, IOAPIC_ADDRESS);

    // KVM's in-kernel IOAPIC wires ISA IRQ n to pin n (including the PIT on
    // IRQ 0), so the routing is the identity.
    for irq in 0..ISA_IRQS {
        t.push(ENTRY_IO_INTERRUPT);
        t.push(INTERRUPT_INT);
        put_u16(&mut t, INTERRUPT_FLAGS_CONFORM);
        t.push(ISA_BUS_ID);
        t.push(irq); // source bus IRQ
        t.push(ioapic_id);
        t.push(irq); // IOAPIC pin (INTIN#)
    }

    // LINT0 takes the 8259 PIC's output (ExtINT), LINT1 is the NMI line.
    for (kind, lint) in [(INTERRUPT_EXTINT, 0), (INTERRUPT_NMI, 1)] {
        t.push(ENTRY_LOCAL_INTERRUPT);
        t.push(kind);
        put_u16(&mut t, INTERRUPT_FLAGS_CONFORM);
        t.push(ISA_BUS_ID);
        t.push(0); // source bus IRQ
        t.push(ALL_LAPICS);
        t.push(lint); // LINTIN#
    }

    debug_assert_eq!(t.len(), len);
    t[header + HEADER_CHECKSUM] = checksum(&t[header..]);
    Ok(t)
}

fn put_u16(t: &mut Vec<u8>, v: u16) {
    t.extend_from_slice(&v.to_le_bytes());
}

fn put_u32(t: &mut Vec<u8>, v: u32) {
    t.extend_from_slice(&v.to_le_bytes());
}

/// The byte that makes `bytes` (whose checksum byte is still 0) sum to 0.
fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |sum, b| sum.wrapping_add(*b))
        .wrapping_neg()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::bitmap::{AtomicBitmap, Bitmap};
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

    type Memory = vm_memory::GuestMemoryMmap<AtomicBitmap>;

    const MIB: usize = 1 << 20;

    fn memory(ranges: &[(u64, usize)]) -> Memory {
        let ranges: Vec<_> = ranges
            .iter()
            .map(|&(start, len)| (GuestAddress(start), len))
            .collect();
        Memory::from_ranges(&ranges).unwrap()
    }

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_le_bytes([b[at], b[at + 1]])
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    /// Reads the floating pointer and the configuration table back from guest
    /// memory, following the pointer the way a guest does.
    fn read_back(mem: &Memory) -> (Vec<u8>, Vec<u8>) {
        let mut fp = vec![0u8; FLOATING_POINTER_LEN];
        mem.read_slice(&mut fp, GuestAddress(MPTABLE_START))
            .unwrap();
        let table_at = u64::from(u32_at(&fp, 4));
        let mut header = vec![0u8; HEADER_LEN];
        mem.read_slice(&mut header, GuestAddress(table_at)).unwrap();
        let mut table = vec![0u8; usize::from(u16_at(&header, 4))];
        mem.read_slice(&mut table, GuestAddress(table_at)).unwrap();
        (fp, table)
    }

    /// A parsed entry of the configuration table.
    #[derive(Debug, PartialEq)]
    enum Entry {
        Processor {
            apic_id: u8,
            version: u8,
            flags: u8,
        },
        Bus {
            id: u8,
            kind: [u8; 6],
        },
        Ioapic {
            id: u8,
            version: u8,
            flags: u8,
            address: u32,
        },
        IoInterrupt {
            kind: u8,
            flags: u16,
            bus: u8,
            irq: u8,
            ioapic: u8,
            pin: u8,
        },
        LocalInterrupt {
            kind: u8,
            flags: u16,
            bus: u8,
            irq: u8,
            lapic: u8,
            lint: u8,
        },
    }

    fn entries(table: &[u8]) -> Vec<Entry> {
        let mut at = HEADER_LEN;
        let mut out = Vec::new();
        while at < table.len() {
            let e = &table[at..];
            let (entry, len) = match e[0] {
                ENTRY_PROCESSOR => (
                    Entry::Processor {
                        apic_id: e[1],
                        version: e[2],
                        flags: e[3],
                    },
                    PROCESSOR_LEN,
                ),
                ENTRY_BUS => (
                    Entry::Bus {
                        id: e[1],
                        kind: e[2..8].try_into().unwrap(),
                    },
                    BUS_LEN,
                ),
                ENTRY_IOAPIC => (
                    Entry::Ioapic {
                        id: e[1],
                        version: e[2],
                        flags: e[3],
                        address: u32_at(e, 4),
                    },
                    IOAPIC_LEN,
                ),
                ENTRY_IO_INTERRUPT => (
                    Entry::IoInterrupt {
                        kind: e[1],
                        flags: u16_at(e, 2),
                        bus: e[4],
                        irq: e[5],
                        ioapic: e[6],
                        pin: e[7],
                    },
                    IO_INTERRUPT_LEN,
                ),
                ENTRY_LOCAL_INTERRUPT => (
                    Entry::LocalInterrupt {
                        kind: e[1],
                        flags: u16_at(e, 2),
                        bus: e[4],
                        irq: e[5],
                        lapic: e[6],
                        lint: e[7],
                    },
                    LOCAL_INTERRUPT_LEN,
                ),
                other => panic!("unknown entry type {other} at offset {at}"),
            };
            out.push(entry);
            at += len;
        }
        assert_eq!(at, table.len(), "entries overrun the base table");
        out
    }

    #[test]
    fn floating_pointer_is_valid() {
        let mem = memory(&[(0, MIB)]);
        setup_mptable(&mem, 2).unwrap();
        let (fp, _) = read_back(&mem);
        assert_eq!(&fp[0..4], b"_MP_");
        assert_eq!(u64::from(u32_at(&fp, 4)), MPTABLE_START + 16);
        assert_eq!(fp[8], 1, "length in 16-byte units");
        assert_eq!(fp[9], 4, "spec revision 1.4");
        assert_eq!(sum(&fp), 0, "floating pointer checksum");
        assert_ne!(fp[10], 0, "checksum byte must have been filled in");
        assert_eq!(&fp[11..16], &[0; 5], "no default configuration, no IMCR");
    }

    #[test]
    fn header_is_valid() {
        let mem = memory(&[(0, MIB)]);
        setup_mptable(&mem, 4).unwrap();
        let (_, table) = read_back(&mem);
        assert_eq!(&table[0..4], b"PCMP");
        assert_eq!(usize::from(u16_at(&table, 4)), mptable_len(4) - 16);
        assert_eq!(table[6], 4, "spec revision 1.4");
        assert_eq!(sum(&table), 0, "base table checksum");
        assert_eq!(&table[8..16], b"TWINVM  ");
        assert_eq!(u32_at(&table, 28), 0, "no OEM table");
        assert_eq!(u16_at(&table, 32), 0, "no OEM table");
        assert_eq!(usize::from(u16_at(&table, 34)), entries(&table).len());
        assert_eq!(u32_at(&table, 36), 0xfee0_0000, "LAPIC address");
        assert_eq!(u16_at(&table, 40), 0, "no extended table");
    }

    #[test]
    fn checksums_and_counts_for_every_cpu_count() {
        for cpus in 1..=MAX_CPUS {
            let mem = memory(&[(0, MIB)]);
            setup_mptable(&mem, cpus).unwrap();
            let (fp, table) = read_back(&mem);
            assert_eq!(sum(&fp), 0, "{cpus} vCPUs: floating pointer checksum");
            assert_eq!(sum(&table), 0, "{cpus} vCPUs: base table checksum");
            let entries = entries(&table);
            assert_eq!(usize::from(u16_at(&table, 34)), entries.len());
            let processors = entries
                .iter()
                .filter(|e| matches!(e, Entry::Processor { .. }))
                .count();
            assert_eq!(processors, usize::from(cpus));
            assert_eq!(entries.len(), usize::from(cpus) + 1 + 1 + 16 + 2);
            let end = MPTABLE_START + 16 + table.len() as u64;
            assert_eq!(
                end <= BASE_MEMORY_END,
                cpus <= 40,
                "{cpus} vCPUs end at {end:#x}"
            );
        }
    }

    #[test]
    fn entries_describe_cpus_ioapic_and_isa_routing() {
        let cpus = 3;
        let mem = memory(&[(0, MIB)]);
        setup_mptable(&mem, cpus).unwrap();
        let (_, table) = read_back(&mem);

        let mut expected = vec![
            Entry::Processor {
                apic_id: 0,
                version: 0x14,
                flags: CPU_ENABLED | CPU_BOOTSTRAP,
            },
            Entry::Processor {
                apic_id: 1,
                version: 0x14,
                flags: CPU_ENABLED,
            },
            Entry::Processor {
                apic_id: 2,
                version: 0x14,
                flags: CPU_ENABLED,
            },
            Entry::Bus {
                id: 0,
                kind: *b"ISA   ",
            },
            Entry::Ioapic {
                id: cpus,
                version: 0x11,
                flags: IOAPIC_ENABLED,
                address: 0xfec0_0000,
            },
        ];
        expected.extend((0..16).map(|irq| Entry::IoInterrupt {
            kind: INTERRUPT_INT,
            flags: 0,
            bus: 0,
            irq,
            ioapic: cpus,
            pin: irq,
        }));
        expected.push(Entry::LocalInterrupt {
            kind: INTERRUPT_EXTINT,
            flags: 0,
            bus: 0,
            irq: 0,
            lapic: 0xff,
            lint: 0,
        });
        expected.push(Entry::LocalInterrupt {
            kind: INTERRUPT_NMI,
            flags: 0,
            bus: 0,
            irq: 0,
            lapic: 0xff,
            lint: 1,
        });
        assert_eq!(entries(&table), expected);

        // Every processor entry carries a CPU signature and feature flags.
        for cpu in 0..usize::from(cpus) {
            let e = &table[HEADER_LEN + cpu * PROCESSOR_LEN..];
            assert_eq!(u32_at(e, 4), CPU_SIGNATURE);
            assert_eq!(u32_at(e, 8), CPU_FEATURES);
            assert_eq!(&e[12..20], &[0; 8]);
        }
    }

    #[test]
    fn forty_cpus_stay_below_640k() {
        let kib = (BASE_MEMORY_END - MPTABLE_START) as usize;
        assert!(mptable_len(40) <= kib);
        assert!(mptable_len(41) > kib);
        // Memory that ends at 640 KiB holds the table for 40 vCPUs, not 41.
        let mem = memory(&[(0, BASE_MEMORY_END as usize)]);
        setup_mptable(&mem, 40).unwrap();
        assert!(matches!(
            setup_mptable(&mem, 41),
            Err(MptableError::NotInGuestMemory { .. })
        ));
    }

    #[test]
    fn max_cpus_table_ends_below_1m() {
        let mem = memory(&[(0, MIB)]);
        setup_mptable(&mem, MAX_CPUS).unwrap();
        let (fp, table) = read_back(&mem);
        assert_eq!(sum(&fp), 0);
        assert_eq!(sum(&table), 0);
        assert!(MPTABLE_START + 16 + table.len() as u64 <= HIMEM_START);
        assert!(entries(&table).contains(&Entry::Ioapic {
            id: 254,
            version: 0x11,
            flags: IOAPIC_ENABLED,
            address: 0xfec0_0000,
        }));
    }

    #[test]
    fn no_cpus_is_an_error() {
        let mem = memory(&[(0, MIB)]);
        assert!(matches!(setup_mptable(&mem, 0), Err(MptableError::NoCpus)));
    }

    #[test]
    fn too_many_cpus_is_an_error() {
        let mem = memory(&[(0, MIB)]);
        for cpus in [MAX_CPUS + 1, u8::MAX] {
            match setup_mptable(&mem, cpus) {
                Err(MptableError::TooManyCpus { requested, max }) => {
                    assert_eq!((requested, max), (cpus, MAX_CPUS));
                }
                other => panic!("{cpus} vCPUs: expected TooManyCpus, got {other:?}"),
            }
        }
        // Nothing was written.
        let mut fp = [0u8; 4];
        mem.read_slice(&mut fp, GuestAddress(MPTABLE_START))
            .unwrap();
        assert_eq!(fp, [0; 4]);
    }

    #[test]
    fn memory_below_640k_is_an_error() {
        // RAM ends below the table.
        let mem = memory(&[(0, 0x80000)]);
        match setup_mptable(&mem, 1) {
            Err(MptableError::NotInGuestMemory { start, end }) => {
                assert_eq!(start, MPTABLE_START);
                assert_eq!(end, MPTABLE_START + mptable_len(1) as u64);
            }
            other => panic!("expected NotInGuestMemory, got {other:?}"),
        }
        // RAM ends inside the table: nothing is written.
        let mem = memory(&[(0, 0x9fd00)]);
        assert!(matches!(
            setup_mptable(&mem, 8),
            Err(MptableError::NotInGuestMemory { .. })
        ));
        let mut fp = [0u8; 4];
        mem.read_slice(&mut fp, GuestAddress(MPTABLE_START))
            .unwrap();
        assert_eq!(fp, [0; 4]);
        // A small table still fits in the same memory.
        setup_mptable(&mem, 1).unwrap();
        // RAM with a hole where the table goes.
        let mem = memory(&[(0, 0x9f000), (0x10_0000, MIB)]);
        assert!(matches!(
            setup_mptable(&mem, 1),
            Err(MptableError::NotInGuestMemory { .. })
        ));
    }

    #[test]
    fn writes_only_the_table_and_marks_it_dirty() {
        let mem = memory(&[(0, MIB)]);
        setup_mptable(&mem, 2).unwrap();
        let len = mptable_len(2);
        let mut around = [0u8; 2];
        mem.read_slice(&mut around[..1], GuestAddress(MPTABLE_START - 1))
            .unwrap();
        mem.read_slice(&mut around[1..], GuestAddress(MPTABLE_START + len as u64))
            .unwrap();
        assert_eq!(around, [0, 0]);

        let mut written = vec![0u8; len];
        mem.read_slice(&mut written, GuestAddress(MPTABLE_START))
            .unwrap();
        assert_eq!(written, build_mptable(2).unwrap());

        // The VMM's own writes must show up in the dirty bitmap.
        let region = mem.find_region(GuestAddress(MPTABLE_START)).unwrap();
        assert!(region.bitmap().dirty_at(MPTABLE_START as usize));
        assert!(!region.bitmap().dirty_at(0));
    }

    #[test]
    fn errors_read_well() {
        assert_eq!(
            MptableError::TooManyCpus {
                requested: 255,
                max: 254
            }
            .to_string(),
            "255 vCPUs do not fit in the MP table (at most 254)"
        );
        assert_eq!(
            MptableError::NotInGuestMemory {
                start: 0x9fc00,
                end: 0x9fcf0
            }
            .to_string(),
            "guest memory does not cover the MP table at 0x9fc00..0x9fcf0"
        );
    }
}
