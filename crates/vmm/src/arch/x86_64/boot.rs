//! Loading a kernel (Linux bzImage or ELF), its initrd and command line, and
//! the boot parameters ("zero page") with the E820 memory map.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, ReadVolatile};

use super::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIMEM_START, ZERO_PAGE_START};
use crate::memory::{MMIO_HOLE_END, MMIO_HOLE_START, PAGE_SIZE};

/// The command line every Linux guest starts with; `--cmdline` is appended.
pub const DEFAULT_LINUX_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off 8250.nr_uarts=1 \
     i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x100_0000;
/// Offset of the 64-bit entry point (`startup_64`) in a bzImage's
/// protected-mode kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Highest initrd address for kernels that do not state one.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

/// The two kernel formats twinvm boots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// A Linux bzImage (x86 boot protocol 2.06 or later).
    BzImage,
    /// An x86_64 ELF executable such as the test guest.
    Elf,
}

/// Errors while loading what the guest boots from.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file cannot be opened or read.
    #[error("cannot read kernel image {path}")]
    ReadKernel {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The kernel file is not a format twinvm boots.
    #[error("kernel image {0} is neither a Linux bzImage nor an x86_64 ELF executable")]
    UnknownFormat(String),
    /// The loader rejected the image.
    #[error("cannot load kernel image {name} ({format:?})")]
    LoadKernel {
        /// The image.
        name: String,
        /// Its format.
        format: KernelFormat,
        /// The loader's reason.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The bzImage asks for a boot protocol older than 2.06.
    #[error("kernel image {0} uses a boot protocol older than 2.06")]
    OldBootProtocol(String),
    /// The initrd cannot be opened or read.
    #[error("cannot read initrd {path}")]
    ReadInitrd {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The initrd does not fit between the kernel and the top of low RAM.
    #[error("initrd {path} ({size} bytes) does not fit in guest memory above the kernel")]
    InitrdTooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// The command line is invalid or too long.
    #[error("invalid kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// A boot structure could not be written.
    #[error("cannot write the {0} into guest memory")]
    Write(&'static str, #[source] vm_memory::GuestMemoryError),
}

/// What was loaded.
#[derive(Clone, Debug)]
pub struct LoadedKernel {
    /// The image's format.
    pub format: KernelFormat,
    /// Where the boot vCPU starts (64-bit entry point).
    pub entry: GuestAddress,
    /// First byte after the loaded image.
    pub end: u64,
    /// The bzImage's setup header, to be passed back in the zero page.
    pub setup_header: Option<setup_header>,
}

/// Recognizes a kernel image from its first bytes (at least 0x206 for a
/// bzImage).
pub fn detect_format(head: &[u8]) -> Option<KernelFormat> {
    if head.starts_with(b"\x7fELF") {
        return Some(KernelFormat::Elf);
    }
    if head.get(0x202..0x206) == Some(b"HdrS".as_slice()) {
        return Some(KernelFormat::BzImage);
    }
    None
}

/// Loads the kernel image `image` (named `name` in errors) into `mem`.
pub fn load_kernel<M, F>(mem: &M, name: &str, image: &mut F) -> Result<LoadedKernel, BootError>
where
    M: GuestMemoryBackend,
    F: Read + ReadVolatile + Seek,
{
    let read_err = |source| BootError::ReadKernel {
        path: PathBuf::from(name),
        source,
    };
    let mut head = [0u8; 0x206];
    let n = read_up_to(image, &mut head).map_err(read_err)?;
    image.seek(SeekFrom::Start(0)).map_err(read_err)?;
    let format = detect_format(&head[..n]).ok_or_else(|| BootError::UnknownFormat(name.into()))?;
    let load_err = |source| BootError::LoadKernel {
        name: name.into(),
        format,
        source,
    };
    match format {
        KernelFormat::Elf => {
            let r =
                Elf::load(mem, None, image, Some(GuestAddress(HIMEM_START))).map_err(load_err)?;
            Ok(LoadedKernel {
                format,
                entry: r.kernel_load,
                end: r.kernel_end,
                setup_header: None,
            })
        }
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, image, Some(GuestAddress(HIMEM_START)))
                .map_err(load_err)?;
            let hdr = r.setup_header.unwrap_or_default();
            if hdr.version < 0x206 {
                return Err(BootError::OldBootProtocol(name.into()));
            }
            Ok(LoadedKernel {
                format,
                entry: r.kernel_load.unchecked_add(BZIMAGE_64BIT_ENTRY_OFFSET),
                end: r.kernel_end,
                setup_header: Some(hdr),
            })
        }
    }
}

fn read_up_to<F: Read>(f: &mut F, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut total = 0;
    while total < buf.len() {
        match f.read(&mut buf[total..])? {
            0 => break,
            n => total += n,
        }
    }
    Ok(total)
}

/// Opens a kernel file with a clear error.
pub fn open_kernel(path: &Path) -> Result<File, BootError> {
    let file = File::open(path).map_err(|source| BootError::ReadKernel {
        path: path.into(),
        source,
    })?;
    let meta = file.metadata().map_err(|source| BootError::ReadKernel {
        path: path.into(),
        source,
    })?;
    if !meta.is_file() {
        return Err(BootError::ReadKernel {
            path: path.into(),
            source: std::io::Error::other("not a regular file"),
        });
    }
    Ok(file)
}

/// Where an initrd of `size` bytes goes: page aligned, as high as possible
/// below both the end of low RAM and the kernel's `initrd_addr_max`, and
/// above the kernel. `None` if it does not fit.
pub fn initrd_address(
    size: u64,
    low_ram_end: u64,
    kernel_end: u64,
    initrd_addr_max: u64,
) -> Option<GuestAddress> {
    let top = low_ram_end.min(initrd_addr_max.saturating_add(1));
    let start = top.checked_sub(size)? & !(PAGE_SIZE - 1);
    (start >= kernel_end.next_multiple_of(PAGE_SIZE)).then_some(GuestAddress(start))
}

/// Loads the initrd file into guest memory; returns its address and size.
pub fn load_initrd<M: GuestMemoryBackend>(
    mem: &M,
    path: &Path,
    kernel: &LoadedKernel,
    low_ram_end: u64,
) -> Result<(GuestAddress, u64), BootError> {
    let read_err = |source| BootError::ReadInitrd {
        path: path.into(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    if !meta.is_file() {
        return Err(read_err(std::io::Error::other("not a regular file")));
    }
    let size = meta.len();
    let max = kernel
        .setup_header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|&m| m != 0)
        .unwrap_or(DEFAULT_INITRD_ADDR_MAX);
    let addr = initrd_address(size, low_ram_end, kernel.end, max).ok_or_else(|| {
        BootError::InitrdTooLarge {
            path: path.into(),
            size,
        }
    })?;
    let len = usize::try_from(size).map_err(|_| BootError::InitrdTooLarge {
        path: path.into(),
        size,
    })?;
    mem.read_exact_volatile_from(addr, &mut file, len)
        .map_err(|e| BootError::Write("initrd", e))?;
    Ok((addr, size))
}

/// Builds the kernel command line: twinvm's defaults for Linux, then the
/// user's words.
pub fn build_cmdline(format: KernelFormat, extra: &str) -> Result<Cmdline, BootError> {
    build_cmdline_with_devices(format, &[], extra)
}

/// Builds the kernel command line: twinvm's defaults for Linux, the words
/// that announce devices (`virtio_mmio.device=...`, for every kernel
/// format), then the user's words — last, so that a `--` among them (after
/// which Linux passes words to init) cannot swallow twinvm's.
pub fn build_cmdline_with_devices(
    format: KernelFormat,
    devices: &[String],
    extra: &str,
) -> Result<Cmdline, BootError> {
    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)?;
    if format == KernelFormat::BzImage {
        cmdline
            .insert_str(DEFAULT_LINUX_CMDLINE)
            .map_err(BootError::Cmdline)?;
    }
    for word in devices {
        cmdline.insert_str(word).map_err(BootError::Cmdline)?;
    }
    let extra = extra.trim();
    if !extra.is_empty() {
        cmdline.insert_str(extra).map_err(BootError::Cmdline)?;
    }
    Ok(cmdline)
}

/// The E820 map for RAM laid out as in [`crate::memory::ram_ranges`]: the
/// legacy hole [640 KiB, 1 MiB) and the MMIO hole are not RAM; the MP table
/// below 640 KiB is reserved.
pub fn e820_map(ram_size: u64) -> Vec<boot_e820_entry> {
    let entry = |addr, size, r#type| boot_e820_entry { addr, size, r#type };
    let low_end = ram_size.min(MMIO_HOLE_START);
    let mut map = vec![
        entry(0, EBDA_START, E820_RAM),
        entry(EBDA_START, 0xa_0000 - EBDA_START, E820_RESERVED),
    ];
    if low_end > HIMEM_START {
        map.push(entry(HIMEM_START, low_end - HIMEM_START, E820_RAM));
    }
    if ram_size > low_end {
        map.push(entry(MMIO_HOLE_END, ram_size - low_end, E820_RAM));
    }
    map
}

/// Everything the zero page describes.
pub struct BootInfo<'a> {
    /// The loaded kernel.
    pub kernel: &'a LoadedKernel,
    /// The command line.
    pub cmdline: &'a Cmdline,
    /// The initrd's address and size, if any.
    pub initrd: Option<(GuestAddress, u64)>,
    /// Guest RAM size.
    pub ram_size: u64,
}

/// Writes the command line and the zero page into guest memory.
pub fn write_boot_params<M: GuestMemoryBackend>(mem: &M, info: &BootInfo) -> Result<(), BootError> {
    let cmdline = info.cmdline.as_cstring().map_err(BootError::Cmdline)?;
    let bytes = cmdline.as_bytes_with_nul();
    mem.write_slice(bytes, GuestAddress(CMDLINE_START))
        .map_err(|e| BootError::Write("kernel command line", e))?;

    let mut params = boot_params {
        hdr: info.kernel.setup_header.unwrap_or_default(),
        ..Default::default()
    };
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = bytes.len() as u32;
    if params.hdr.kernel_alignment < KERNEL_MIN_ALIGNMENT {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    if let Some((addr, size)) = info.initrd {
        params.hdr.ramdisk_image = addr.raw_value() as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let map = e820_map(info.ram_size);
    params.e820_entries = map.len() as u8;
    params.e820_table[..map.len()].copy_from_slice(&map);
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(|e| BootError::Write("boot parameters", e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestMemoryMmap;
    use std::io::Cursor;

    fn mem(size: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap()
    }

    #[test]
    fn formats_are_recognized_by_magic() {
        assert_eq!(detect_format(b"\x7fELF\x02\x01"), Some(KernelFormat::Elf));
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(detect_format(&bz), Some(KernelFormat::BzImage));
        assert_eq!(detect_format(b"#!/bin/sh\n"), None);
        assert_eq!(detect_format(&[]), None);
    }

    #[test]
    fn garbage_is_refused_with_the_name() {
        let m = mem(4 << 20);
        let err = load_kernel(&m, "junk.bin", &mut Cursor::new(vec![0x55u8; 4096])).unwrap_err();
        assert!(matches!(err, BootError::UnknownFormat(_)));
        assert!(err.to_string().contains("junk.bin"));
        let err = load_kernel(&m, "empty", &mut Cursor::new(Vec::<u8>::new())).unwrap_err();
        assert!(matches!(err, BootError::UnknownFormat(_)));
    }

    #[test]
    fn truncated_elf_is_an_error_not_a_panic() {
        let m = mem(4 << 20);
        let mut img = b"\x7fELF\x02\x01\x01".to_vec();
        img.resize(40, 0);
        let err = load_kernel(&m, "short.elf", &mut Cursor::new(img)).unwrap_err();
        assert!(matches!(err, BootError::LoadKernel { .. }), "{err}");
    }

    #[test]
    fn truncated_bzimage_is_an_error_not_a_panic() {
        let m = mem(4 << 20);
        let mut img = vec![0u8; 0x300];
        img[0x202..0x206].copy_from_slice(b"HdrS");
        let err = load_kernel(&m, "short.bz", &mut Cursor::new(img)).unwrap_err();
        assert!(
            matches!(
                err,
                BootError::LoadKernel { .. } | BootError::OldBootProtocol(_)
            ),
            "{err}"
        );
    }

    #[test]
    fn initrd_goes_high_and_must_fit_above_the_kernel() {
        let a = initrd_address(0x1800, 64 << 20, 2 << 20, DEFAULT_INITRD_ADDR_MAX).unwrap();
        assert_eq!(a.raw_value(), (64 << 20) - 0x2000);
        let a = initrd_address(0x1000, 2 << 30, 2 << 20, DEFAULT_INITRD_ADDR_MAX).unwrap();
        assert_eq!(a.raw_value(), DEFAULT_INITRD_ADDR_MAX + 1 - 0x1000);
        assert!(initrd_address(63 << 20, 64 << 20, 2 << 20, DEFAULT_INITRD_ADDR_MAX).is_none());
        assert!(initrd_address(u64::MAX, 64 << 20, 0, u64::MAX).is_none());
    }

    #[test]
    fn e820_has_holes_where_expected() {
        let m = e820_map(256 << 20);
        let ram: Vec<(u64, u64)> = m
            .iter()
            .filter(|e| e.r#type == E820_RAM)
            .map(|e| (e.addr, e.size))
            .collect();
        assert_eq!(
            ram,
            vec![(0, EBDA_START), (HIMEM_START, (256 << 20) - HIMEM_START)]
        );
        let big = e820_map(4 << 30);
        let last = big.last().unwrap();
        assert_eq!(
            (last.addr, last.size),
            (MMIO_HOLE_END, (4 << 30) - MMIO_HOLE_START)
        );
    }

    #[test]
    fn cmdline_defaults_only_for_linux() {
        let c = build_cmdline(KernelFormat::Elf, " dirty_rate=5 ").unwrap();
        assert_eq!(c.as_cstring().unwrap().to_str().unwrap(), "dirty_rate=5");
        let c = build_cmdline(KernelFormat::BzImage, "quiet").unwrap();
        let s = c.as_cstring().unwrap().into_string().unwrap();
        assert!(
            s.starts_with("console=ttyS0 ") && s.ends_with(" quiet"),
            "{s}"
        );
        assert!(build_cmdline(KernelFormat::Elf, &"x".repeat(CMDLINE_MAX_SIZE)).is_err());
    }

    #[test]
    fn device_words_come_before_the_users() {
        let words = vec![
            "virtio_mmio.device=4K@0xd0000000:5".to_string(),
            "virtio_mmio.device=4K@0xd0001000:6".to_string(),
        ];
        let c = build_cmdline_with_devices(KernelFormat::Elf, &words, "a=b -- x").unwrap();
        assert_eq!(
            c.as_cstring().unwrap().to_str().unwrap(),
            "virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6 a=b -- x"
        );
        let c = build_cmdline_with_devices(KernelFormat::BzImage, &words, "").unwrap();
        let s = c.as_cstring().unwrap().into_string().unwrap();
        assert!(
            s.starts_with("console=ttyS0 ") && s.ends_with(" virtio_mmio.device=4K@0xd0001000:6"),
            "{s}"
        );
    }

    #[test]
    fn zero_page_carries_cmdline_e820_and_initrd() {
        let m = mem(64 << 20);
        let kernel = LoadedKernel {
            format: KernelFormat::Elf,
            entry: GuestAddress(HIMEM_START),
            end: 2 << 20,
            setup_header: None,
        };
        let cmdline = build_cmdline(KernelFormat::Elf, "a=b").unwrap();
        let info = BootInfo {
            kernel: &kernel,
            cmdline: &cmdline,
            initrd: Some((GuestAddress(0x300_0000), 1234)),
            ram_size: 64 << 20,
        };
        write_boot_params(&m, &info).unwrap();
        let p: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ p.hdr.ramdisk_image }, 0x300_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 1234);
        assert_eq!(p.e820_entries, 3);
        let mut buf = [0u8; 4];
        m.read_slice(&mut buf, GuestAddress(CMDLINE_START)).unwrap();
        assert_eq!(&buf, b"a=b\0");
    }
}
