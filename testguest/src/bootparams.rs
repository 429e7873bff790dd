//! Reading the Linux `boot_params` page ("zero page") that twinvm passes in
//! RSI: the command line pointer and the E820 memory map.

/// Size of the `boot_params` page.
pub const BOOT_PARAMS_SIZE: usize = 4096;
/// Offset of `hdr.cmd_line_ptr` (u32).
pub const CMD_LINE_PTR_OFFSET: usize = 0x228;
/// Offset of `e820_entries` (u8).
pub const E820_ENTRIES_OFFSET: usize = 0x1e8;
/// Offset of `e820_table`.
pub const E820_TABLE_OFFSET: usize = 0x2d0;
/// Size of one E820 entry: `addr: u64, size: u64, type: u32`.
pub const E820_ENTRY_SIZE: usize = 20;
/// Number of entries `e820_table` has room for.
pub const E820_MAX_ENTRIES: usize = 128;
/// E820 type of usable RAM.
pub const E820_RAM: u32 = 1;

/// Longest command line the guest reads.
pub const CMDLINE_MAX: usize = 4096;

/// One E820 memory map entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

impl E820Entry {
    /// Whether the entry is usable RAM.
    pub fn is_ram(&self) -> bool {
        self.kind == E820_RAM
    }
}

/// A view of a `boot_params` page.
#[derive(Clone, Copy)]
pub struct BootParams<'a> {
    page: &'a [u8; BOOT_PARAMS_SIZE],
}

impl<'a> BootParams<'a> {
    pub fn new(page: &'a [u8; BOOT_PARAMS_SIZE]) -> Self {
        Self { page }
    }

    /// Guest-physical address of the NUL-terminated command line (0: none).
    pub fn cmd_line_ptr(&self) -> u32 {
        self.u32_at(CMD_LINE_PTR_OFFSET)
    }

    /// Number of valid E820 entries (bounded by the table's size).
    pub fn e820_len(&self) -> usize {
        usize::from(self.page[E820_ENTRIES_OFFSET]).min(E820_MAX_ENTRIES)
    }

    /// E820 entry `index`; `index` must be below [`Self::e820_len`].
    pub fn e820_entry(&self, index: usize) -> E820Entry {
        let at = E820_TABLE_OFFSET + index * E820_ENTRY_SIZE;
        E820Entry {
            addr: self.u64_at(at),
            size: self.u64_at(at + 8),
            kind: self.u32_at(at + 16),
        }
    }

    /// The valid E820 entries.
    pub fn e820(&self) -> impl Iterator<Item = E820Entry> + Clone + '_ {
        (0..self.e820_len()).map(|i| self.e820_entry(i))
    }

    fn u32_at(&self, at: usize) -> u32 {
        let mut v = 0u32;
        for i in (0..4).rev() {
            v = (v << 8) | u32::from(self.page[at + i]);
        }
        v
    }

    fn u64_at(&self, at: usize) -> u64 {
        u64::from(self.u32_at(at)) | (u64::from(self.u32_at(at + 4)) << 32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page() -> Box<[u8; BOOT_PARAMS_SIZE]> {
        Box::new([0u8; BOOT_PARAMS_SIZE])
    }

    fn put_entry(p: &mut [u8; BOOT_PARAMS_SIZE], i: usize, addr: u64, size: u64, kind: u32) {
        let at = E820_TABLE_OFFSET + i * E820_ENTRY_SIZE;
        p[at..at + 8].copy_from_slice(&addr.to_le_bytes());
        p[at + 8..at + 16].copy_from_slice(&size.to_le_bytes());
        p[at + 16..at + 20].copy_from_slice(&kind.to_le_bytes());
    }

    #[test]
    fn reads_cmdline_pointer_and_e820() {
        let mut p = page();
        p[CMD_LINE_PTR_OFFSET..CMD_LINE_PTR_OFFSET + 4].copy_from_slice(&0x2_0000u32.to_le_bytes());
        p[E820_ENTRIES_OFFSET] = 2;
        put_entry(&mut p, 0, 0, 0x9fc00, 1);
        put_entry(&mut p, 1, 0x10_0000, 0x1234_5678_9000, 1);
        put_entry(&mut p, 2, 0xdead, 0xbeef, 1); // beyond e820_entries: ignored
        let bp = BootParams::new(&p);
        assert_eq!(bp.cmd_line_ptr(), 0x2_0000);
        let v: Vec<_> = bp.e820().collect();
        assert_eq!(
            v,
            vec![
                E820Entry {
                    addr: 0,
                    size: 0x9fc00,
                    kind: 1
                },
                E820Entry {
                    addr: 0x10_0000,
                    size: 0x1234_5678_9000,
                    kind: 1
                },
            ]
        );
        assert!(v[0].is_ram());
    }

    #[test]
    fn e820_count_is_bounded() {
        let mut p = page();
        p[E820_ENTRIES_OFFSET] = 255;
        let bp = BootParams::new(&p);
        assert_eq!(bp.e820_len(), E820_MAX_ENTRIES);
        // The last entry still lies inside the page.
        let _ = bp.e820_entry(E820_MAX_ENTRIES - 1);
    }
}
