//! Virtio over MMIO (version 2, "modern"): finding the devices on the kernel
//! command line, register and feature constants, feature negotiation and the
//! layout and index arithmetic of split virtqueues. The register accesses
//! themselves are in the guest binary (`hw/virtio.rs`).

use crate::config::parse_decimal;

/// Most virtio-mmio devices the guest drives.
pub const MAX_DEVICES: usize = 8;

/// One `virtio_mmio.device=<size>@<base>:<irq>` word of the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioDevice {
    /// Guest-physical base address of the register window.
    pub base: u64,
    /// Size of the register window in bytes.
    pub size: u64,
    /// Interrupt line (GSI; below 16 it is also a PIC IRQ).
    pub irq: u8,
}

/// The devices named on the command line, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioDevices {
    list: [MmioDevice; MAX_DEVICES],
    len: usize,
}

impl MmioDevices {
    pub const fn new() -> Self {
        Self {
            list: [MmioDevice {
                base: 0,
                size: 0,
                irq: 0,
            }; MAX_DEVICES],
            len: 0,
        }
    }

    /// Every valid `virtio_mmio.device=` word of `cmdline`, in order (at most
    /// [`MAX_DEVICES`]; malformed words are skipped).
    pub fn parse(cmdline: &[u8]) -> Self {
        let mut devices = Self::new();
        for word in cmdline.split(|b| b.is_ascii_whitespace()) {
            let Some(spec) = word.strip_prefix(b"virtio_mmio.device=") else {
                continue;
            };
            if let Some(device) = parse_device(spec) {
                devices.push(device);
            }
        }
        devices
    }

    fn push(&mut self, device: MmioDevice) {
        if self.len < MAX_DEVICES {
            self.list[self.len] = device;
            self.len += 1;
        }
    }

    pub fn as_slice(&self) -> &[MmioDevice] {
        &self.list[..self.len]
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Default for MmioDevices {
    fn default() -> Self {
        Self::new()
    }
}

/// Parses `<size>@<base>:<irq>` (Linux syntax): size in bytes with an
/// optional `K`/`M`/`G` suffix (decimal or `0x` hex), base in decimal or
/// `0x` hex, irq decimal. The window must hold the registers (0x200 bytes or
/// more) and not wrap; the irq must be 1..=15 (a PIC line other than the
/// timer's).
pub fn parse_device(spec: &[u8]) -> Option<MmioDevice> {
    let at = spec.iter().position(|&b| b == b'@')?;
    let (size, rest) = (&spec[..at], &spec[at + 1..]);
    let colon = rest.iter().position(|&b| b == b':')?;
    let (base, irq) = (&rest[..colon], &rest[colon + 1..]);

    let (size, unit) = match size.last()? {
        b'k' | b'K' => (&size[..size.len() - 1], 1u64 << 10),
        b'm' | b'M' => (&size[..size.len() - 1], 1 << 20),
        b'g' | b'G' => (&size[..size.len() - 1], 1 << 30),
        _ => (size, 1),
    };
    let size = parse_number(size)?.checked_mul(unit)?;
    let base = parse_number(base)?;
    let irq = parse_decimal(irq)?;
    if size < MMIO_MIN_SIZE || base.checked_add(size).is_none() || !(1..16).contains(&irq) {
        return None;
    }
    if irq == 2 {
        return None; // the PIC cascade
    }
    Some(MmioDevice {
        base,
        size,
        irq: irq as u8,
    })
}

/// A decimal number, or hexadecimal with a `0x` prefix.
pub fn parse_number(s: &[u8]) -> Option<u64> {
    match s.strip_prefix(b"0x").or_else(|| s.strip_prefix(b"0X")) {
        Some(hex) => parse_hex(hex),
        None => parse_decimal(s),
    }
}

/// Non-empty hexadecimal digits; `None` on anything else or overflow.
pub fn parse_hex(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 16 {
        return None;
    }
    let mut v = 0u64;
    for &b in s {
        let digit = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            b'A'..=b'F' => b - b'A' + 10,
            _ => return None,
        };
        v = (v << 4) | u64::from(digit);
    }
    Some(v)
}

/// Smallest register window that holds the common registers and a config
/// space.
pub const MMIO_MIN_SIZE: u64 = 0x200;

/// `MagicValue`: "virt".
pub const MAGIC: u32 = 0x7472_6976;
/// The only transport version the guest drives (virtio 1.x over MMIO).
pub const VERSION: u32 = 2;

/// Register offsets of the MMIO transport (virtio 1.x, 4.2.2).
pub mod reg {
    pub const MAGIC_VALUE: usize = 0x000;
    pub const VERSION: usize = 0x004;
    pub const DEVICE_ID: usize = 0x008;
    pub const DEVICE_FEATURES: usize = 0x010;
    pub const DEVICE_FEATURES_SEL: usize = 0x014;
    pub const DRIVER_FEATURES: usize = 0x020;
    pub const DRIVER_FEATURES_SEL: usize = 0x024;
    pub const QUEUE_SEL: usize = 0x030;
    pub const QUEUE_NUM_MAX: usize = 0x034;
    pub const QUEUE_NUM: usize = 0x038;
    pub const QUEUE_READY: usize = 0x044;
    pub const QUEUE_NOTIFY: usize = 0x050;
    pub const INTERRUPT_STATUS: usize = 0x060;
    pub const INTERRUPT_ACK: usize = 0x064;
    pub const STATUS: usize = 0x070;
    pub const QUEUE_DESC_LOW: usize = 0x080;
    pub const QUEUE_DESC_HIGH: usize = 0x084;
    pub const QUEUE_DRIVER_LOW: usize = 0x090;
    pub const QUEUE_DRIVER_HIGH: usize = 0x094;
    pub const QUEUE_DEVICE_LOW: usize = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: usize = 0x0a4;
    pub const CONFIG_GENERATION: usize = 0x0fc;
    pub const CONFIG: usize = 0x100;
}

/// Device status bits.
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const NEEDS_RESET: u32 = 64;
    pub const FAILED: u32 = 128;
}

/// Device IDs.
pub const DEVICE_NET: u32 = 1;
pub const DEVICE_BLOCK: u32 = 2;

/// Feature bits.
pub mod feature {
    /// Virtio 1.x (required: legacy devices are not driven).
    pub const VERSION_1: u64 = 1 << 32;
    /// `used_event` and `avail_event`: each side says up to which ring
    /// entry it needs no interrupt (driver) or notification (device).
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    /// Net: the device has a MAC address in its config space.
    pub const NET_MAC: u64 = 1 << 5;
    /// Block: maximum segments per request in config space.
    pub const BLK_SEG_MAX: u64 = 1 << 2;
    /// Block: the device is read-only.
    pub const BLK_RO: u64 = 1 << 5;
    /// Block: the device supports flush.
    pub const BLK_FLUSH: u64 = 1 << 9;
}

/// `InterruptStatus` bit: a queue has new used buffers.
pub const INTERRUPT_USED_BUFFER: u32 = 1;
/// `InterruptStatus` bit: the configuration changed.
pub const INTERRUPT_CONFIG_CHANGE: u32 = 2;

/// The features to accept: all of `required` (else `None`) plus those of
/// `optional` the device offers.
pub fn negotiate(offered: u64, required: u64, optional: u64) -> Option<u64> {
    if offered & required != required {
        return None;
    }
    Some(required | (offered & optional))
}

/// Descriptor flags.
pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;

/// Used ring flag (without [`feature::RING_EVENT_IDX`]): the device needs
/// no notification now.
pub const USED_F_NO_NOTIFY: u16 = 1;

/// Whether moving a free-running ring index from `old` to `new` passes
/// `event`, the entry after which the other side asked to hear (virtio
/// 1.x, `vring_need_event`): `event` is one of `old .. new`, all indices
/// wrapping at 2^16.
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// Largest queue the guest sets up (its rings fit in one page).
pub const MAX_QUEUE_SIZE: u16 = 128;

/// The queue size to use: `QueueNumMax` capped to `want` (and to
/// [`MAX_QUEUE_SIZE`]), rounded down to a power of two; `None` if the queue
/// is unavailable (`QueueNumMax` 0).
pub fn queue_size(num_max: u32, want: u16) -> Option<u16> {
    let cap = u32::from(want.min(MAX_QUEUE_SIZE)).min(num_max);
    if cap == 0 {
        return None;
    }
    Some(1 << (31 - cap.leading_zeros()))
}

/// Where the three parts of a split virtqueue of `size` entries lie, as
/// offsets from the start of its memory (descriptor table first, 16-byte
/// aligned; available ring 2-byte aligned; used ring 4-byte aligned).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueLayout {
    pub size: u16,
    pub desc: usize,
    pub avail: usize,
    pub used: usize,
    /// Bytes the queue occupies.
    pub bytes: usize,
}

impl QueueLayout {
    pub const fn new(size: u16) -> Self {
        let n = size as usize;
        let desc = 0;
        let avail = desc + 16 * n;
        // flags, idx, ring[n], used_event
        let avail_end = avail + 4 + 2 * n + 2;
        let used = (avail_end + 3) & !3;
        // flags, idx, ring[n] of {id: u32, len: u32}, avail_event
        let bytes = used + 4 + 8 * n + 2;
        Self {
            size,
            desc,
            avail,
            used,
            bytes,
        }
    }

    /// Offset of available ring entry `idx` (a free-running index).
    pub fn avail_entry(&self, idx: u16) -> usize {
        self.avail + 4 + 2 * usize::from(idx & (self.size - 1))
    }

    /// Offset of used ring entry `idx` (a free-running index).
    pub fn used_entry(&self, idx: u16) -> usize {
        self.used + 4 + 8 * usize::from(idx & (self.size - 1))
    }

    /// Offset of `used_event`, after the available ring's entries: the
    /// driver's "interrupt me once this entry is used".
    pub fn used_event(&self) -> usize {
        self.avail + 4 + 2 * usize::from(self.size)
    }

    /// Offset of `avail_event`, after the used ring's entries: the
    /// device's "notify me once this entry is available".
    pub fn avail_event(&self) -> usize {
        self.used + 4 + 8 * usize::from(self.size)
    }
}

/// Used entries the device published that the driver has not consumed:
/// both indices run freely and wrap at 2^16.
pub fn used_pending(used_idx: u16, last_seen: u16) -> u16 {
    used_idx.wrapping_sub(last_seen)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_words() {
        assert_eq!(
            parse_device(b"4K@0xd0000000:5"),
            Some(MmioDevice {
                base: 0xd000_0000,
                size: 4096,
                irq: 5
            })
        );
        assert_eq!(
            parse_device(b"0x1000@3489665024:7"),
            Some(MmioDevice {
                base: 0xd000_1000,
                size: 4096,
                irq: 7
            })
        );
        assert_eq!(parse_device(b"1M@0xD0002000:11").unwrap().size, 1 << 20);
        assert_eq!(parse_device(b"512@0x1000:3").unwrap().size, 512);
        for bad in [
            &b""[..],
            b"4K",
            b"4K@0xd0000000",
            b"4K@0xd0000000:",
            b"4K@:5",
            b"@0xd0000000:5",
            b"4X@0xd0000000:5",
            b"256@0xd0000000:5",
            b"4K@0xd0000000:0",
            b"4K@0xd0000000:2",
            b"4K@0xd0000000:16",
            b"4K@0xd0000000:5:1",
            b"4K@0xffffffffffffffff:5",
            b"4K@0x:5",
            b"4K@0x12345678901234567:5",
            b"99999999999999999999G@0:5",
        ] {
            assert_eq!(parse_device(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn finds_devices_on_a_command_line_in_order() {
        let d = MmioDevices::parse(
            b"console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 ip=10.0.0.2/24 \
              virtio_mmio.device=bad virtio_mmio.device=4K@0xd0001000:6\tvirtio_mmio.device=4K@0xd0002000:7",
        );
        let bases: Vec<u64> = d.as_slice().iter().map(|d| d.base).collect();
        assert_eq!(bases, vec![0xd000_0000, 0xd000_1000, 0xd000_2000]);
        let irqs: Vec<u8> = d.as_slice().iter().map(|d| d.irq).collect();
        assert_eq!(irqs, vec![5, 6, 7]);
        assert!(MmioDevices::parse(b"dirty_rate=5").is_empty());
        assert!(MmioDevices::parse(b"xvirtio_mmio.device=4K@0xd0000000:5").is_empty());
    }

    #[test]
    fn at_most_max_devices() {
        let mut line = Vec::new();
        for i in 0..MAX_DEVICES + 3 {
            line.extend_from_slice(
                format!("virtio_mmio.device=4K@{:#x}:5 ", 0xd000_0000 + i * 0x1000).as_bytes(),
            );
        }
        assert_eq!(MmioDevices::parse(&line).as_slice().len(), MAX_DEVICES);
    }

    #[test]
    fn feature_negotiation() {
        let offered = feature::VERSION_1 | feature::NET_MAC | (1 << 0) | (1 << 15);
        assert_eq!(
            negotiate(offered, feature::VERSION_1, feature::NET_MAC),
            Some(feature::VERSION_1 | feature::NET_MAC)
        );
        assert_eq!(
            negotiate(feature::NET_MAC, feature::VERSION_1, feature::NET_MAC),
            None
        );
        assert_eq!(
            negotiate(
                feature::VERSION_1,
                feature::VERSION_1,
                feature::BLK_RO | feature::BLK_FLUSH
            ),
            Some(feature::VERSION_1)
        );
    }

    #[test]
    fn queue_sizes() {
        assert_eq!(queue_size(256, 64), Some(64));
        assert_eq!(queue_size(32, 64), Some(32));
        assert_eq!(queue_size(100, 128), Some(64));
        assert_eq!(queue_size(1024, 1024), Some(MAX_QUEUE_SIZE));
        assert_eq!(queue_size(1, 64), Some(1));
        assert_eq!(queue_size(0, 64), None);
        assert_eq!(queue_size(64, 0), None);
    }

    #[test]
    fn queue_layouts_fit_a_page_and_are_aligned() {
        let l = QueueLayout::new(64);
        assert_eq!((l.desc, l.avail, l.used), (0, 1024, 1160));
        assert_eq!(l.bytes, 1160 + 4 + 512 + 2);
        for size in [1u16, 2, 4, 8, 16, 32, 64, 128] {
            let l = QueueLayout::new(size);
            assert!(l.bytes <= 4096, "size {size}");
            assert_eq!(l.desc % 16, 0);
            assert_eq!(l.avail % 2, 0);
            assert_eq!(l.used % 4, 0);
            assert!(l.used >= l.avail + 6 + 2 * usize::from(size));
        }
        let l = QueueLayout::new(8);
        assert_eq!(l.avail_entry(0), l.avail + 4);
        assert_eq!(l.avail_entry(9), l.avail + 4 + 2);
        assert_eq!(l.avail_entry(u16::MAX), l.avail + 4 + 14);
        assert_eq!(l.used_entry(8), l.used + 4);
        assert_eq!(l.used_entry(15), l.used + 4 + 56);
        // The event fields close each ring, inside the queue's memory.
        let l = QueueLayout::new(64);
        assert_eq!(l.used_event(), 1024 + 4 + 128);
        assert_eq!(l.avail_event(), 1160 + 4 + 512);
        assert_eq!(l.avail_event() + 2, l.bytes);
        assert!(l.used_event() + 2 <= l.used);
    }

    #[test]
    fn event_indices() {
        // The device asked to hear of entry 5: publishing 5 (old 5, new 6)
        // passes it, publishing 6 afterwards (old 6, new 7) does not.
        assert!(need_event(5, 6, 5));
        assert!(!need_event(5, 7, 6));
        // Several entries at once, the event among them or not.
        assert!(need_event(5, 9, 3));
        assert!(!need_event(9, 9, 3));
        assert!(!need_event(2, 9, 3));
        // Nothing published: never.
        assert!(!need_event(5, 5, 5));
        // Across the wrap of the 16-bit indices.
        assert!(need_event(u16::MAX, 1, 65534));
        assert!(need_event(0, 2, u16::MAX));
        assert!(!need_event(3, 2, u16::MAX));
        // An event left far behind (the device does not want to hear).
        assert!(!need_event(0, 70, 69));
    }

    #[test]
    fn ring_indices_wrap() {
        assert_eq!(used_pending(5, 5), 0);
        assert_eq!(used_pending(7, 5), 2);
        assert_eq!(used_pending(1, u16::MAX), 2);
        assert_eq!(used_pending(0, 65000), 536);
    }

    #[test]
    fn numbers() {
        assert_eq!(parse_number(b"0x10"), Some(16));
        assert_eq!(parse_number(b"0XfF"), Some(255));
        assert_eq!(parse_number(b"10"), Some(10));
        assert_eq!(parse_number(b"0x"), None);
        assert_eq!(parse_hex(b"ffffffffffffffff"), Some(u64::MAX));
        assert_eq!(parse_hex(b"1ffffffffffffffff"), None);
        assert_eq!(parse_hex(b"g"), None);
    }
}
