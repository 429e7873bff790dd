//! Snapshots to a directory: `memory.bin` (guest RAM) and `state.bin` (the
//! VM state in twinvm's format, with the length and CRC32 of `memory.bin`).
//!
//! `memory.bin` is every RAM region in guest order, back to back (for RAM
//! above 3 GiB: the region below the MMIO hole, then the one from 4 GiB).
//! All-zero pages are not written: the file is sparse, its holes read as
//! zeros.
//!
//! Writing is crash-safe: an old `state.bin` is removed first, each file is
//! written under a temporary name, synced, and renamed into place, the
//! memory first and the state last, and the directory is synced after each
//! step. So a directory either has a `state.bin` that belongs with its
//! `memory.bin`, or no `state.bin` at all (an interrupted snapshot), which
//! restoring reports as such. The disk images the virtio disks use are
//! synced too (fdatasync) but are not copied: a snapshot is restored with
//! the same disk, unchanged since the snapshot.

use std::fs::File;
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

use super::{Expected, FormatError, Payload, PayloadKind};
use crate::memory::{GuestMemoryMmap, PAGE_SIZE};
use crate::vm::{Error, Vm, VmState};

/// The state file of a snapshot directory.
pub const STATE_FILE: &str = "state.bin";
/// The guest memory file of a snapshot directory.
pub const MEMORY_FILE: &str = "memory.bin";
/// The largest `state.bin` read: a VM's state is some KiB per vCPU and
/// device, so anything near this is not a state file.
pub const MAX_STATE_FILE: u64 = 64 << 20;
/// Bytes of RAM read or written at a time.
const CHUNK: usize = 1 << 20;

/// What `state.bin` holds.
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotFile {
    /// The `memory.bin` that belongs with this state.
    pub memory: MemoryImage,
    /// The VM state.
    pub state: VmState,
}

impl Payload for SnapshotFile {
    const KIND: PayloadKind = PayloadKind::Snapshot;
}

/// Length and checksum of a `memory.bin`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryImage {
    /// Bytes (all of guest RAM).
    pub len: u64,
    /// CRC32 (IEEE) of the whole file, holes read as zeros.
    pub crc32: u32,
}

/// Why a snapshot could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A file system operation failed.
    #[error("cannot {what} {}", .path.display())]
    Io {
        /// What was being done ("write", "create the directory", ...).
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No `state.bin`.
    #[error(
        "{} holds no complete snapshot: it has no {STATE_FILE} (a snapshot that was interrupted leaves none)",
        .dir.display()
    )]
    Missing {
        /// The directory.
        dir: PathBuf,
    },
    /// A `state.bin` far too large to be one.
    #[error("{} is {size} bytes, too large for a snapshot state file (at most {MAX_STATE_FILE})", .path.display())]
    StateTooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// `state.bin` is malformed, corrupt, or of a VM of another shape.
    #[error("cannot restore from {}", .path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: FormatError,
    },
    /// `memory.bin` has the wrong length.
    #[error("{} is {found} bytes long, the snapshot's guest memory is {expected} bytes (truncated or from another snapshot)", .path.display())]
    MemorySize {
        /// The file.
        path: PathBuf,
        /// Its length.
        found: u64,
        /// The length recorded in the state.
        expected: u64,
    },
    /// `memory.bin` does not match the checksum in `state.bin`.
    #[error("{} is corrupt or from another snapshot (CRC32 {computed:#010x}, the state records {expected:#010x})", .path.display())]
    MemoryChecksum {
        /// The file.
        path: PathBuf,
        /// Its checksum.
        computed: u32,
        /// The checksum recorded in the state.
        expected: u32,
    },
    /// Guest RAM could not be read or written (internal error).
    #[error("cannot access guest memory at {addr:#x}")]
    GuestMemory {
        /// Guest-physical address.
        addr: u64,
        /// Why.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// A device's back end could not be synced.
    #[error("cannot sync the back end of virtio device {device}")]
    Sync {
        /// The device.
        device: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let path = path.to_path_buf();
    move |source| SnapshotError::Io { what, path, source }
}

/// Syncs a directory, so that the names created, renamed or removed in it
/// are durable.
fn sync_dir(dir: &Path) -> Result<(), SnapshotError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error("sync the directory", dir))
}

/// The temporary name `name` is written under.
fn temp_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!(".{name}.tmp"))
}

/// Writes `bytes` to `dir/name` through a synced temporary file.
fn write_file_atomically(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), SnapshotError> {
    let tmp = temp_path(dir, name);
    let file = File::create(&tmp).map_err(io_error("create", &tmp))?;
    file.write_all_at(bytes, 0)
        .and_then(|()| file.sync_all())
        .map_err(io_error("write", &tmp))?;
    let path = dir.join(name);
    std::fs::rename(&tmp, &path).map_err(io_error("rename into place", &path))
}

/// Guest RAM as `memory.bin` lays it out: regions one after the other, cut
/// into chunks of at most `CHUNK` bytes. Yields (guest address, offset in
/// the file, length).
fn ram_chunks(mem: &GuestMemoryMmap) -> impl Iterator<Item = (u64, u64, usize)> + '_ {
    let mut file_offset = 0u64;
    mem.iter().flat_map(move |region| {
        let (start, len) = (region.start_addr().0, region.len());
        let base = file_offset;
        file_offset += len;
        (0..len).step_by(CHUNK).map(move |done| {
            let n = (len - done).min(CHUNK as u64) as usize;
            (start + done, base + done, n)
        })
    })
}

/// Writes guest RAM, region after region, to `dir/memory.bin` (through a
/// synced temporary file), leaving all-zero pages as holes. Returns the
/// file's length and CRC32.
pub fn write_memory(mem: &GuestMemoryMmap, dir: &Path) -> Result<MemoryImage, SnapshotError> {
    let tmp = temp_path(dir, MEMORY_FILE);
    let file = File::create(&tmp).map_err(io_error("create", &tmp))?;
    let zero = [0u8; PAGE_SIZE as usize];
    let mut buf = vec![0u8; CHUNK];
    let mut crc = crc32fast::Hasher::new();
    for (addr, file_offset, n) in ram_chunks(mem) {
        let chunk = &mut buf[..n];
        mem.read_slice(chunk, vm_memory::GuestAddress(addr))
            .map_err(|source| SnapshotError::GuestMemory { addr, source })?;
        crc.update(chunk);
        // Write each run of pages that are not all zero.
        let mut run: Option<usize> = None;
        for (i, page) in chunk.chunks(PAGE_SIZE as usize).enumerate() {
            let at = i * PAGE_SIZE as usize;
            match (page == &zero[..page.len()], run) {
                (false, None) => run = Some(at),
                (true, Some(from)) => {
                    file.write_all_at(&chunk[from..at], file_offset + from as u64)
                        .map_err(io_error("write", &tmp))?;
                    run = None;
                }
                _ => {}
            }
        }
        if let Some(from) = run {
            file.write_all_at(&chunk[from..], file_offset + from as u64)
                .map_err(io_error("write", &tmp))?;
        }
    }
    // Trailing zero pages are a hole too.
    let file_len: u64 = mem.iter().map(|r| r.len()).sum();
    file.set_len(file_len)
        .and_then(|()| file.sync_all())
        .map_err(io_error("write", &tmp))?;
    let path = dir.join(MEMORY_FILE);
    std::fs::rename(&tmp, &path).map_err(io_error("rename into place", &path))?;
    Ok(MemoryImage {
        len: file_len,
        crc32: crc.finalize(),
    })
}

/// Copies `path` (a `memory.bin` described by `image`) into guest RAM,
/// writing only the pages that differ. The checksum is verified as the
/// file is read; a mismatch is reported after RAM was written, so the VM
/// must then be discarded.
pub fn read_memory(
    mem: &GuestMemoryMmap,
    path: &Path,
    image: MemoryImage,
) -> Result<(), SnapshotError> {
    let file = File::open(path).map_err(io_error("open", path))?;
    let found = file.metadata().map_err(io_error("read", path))?.len();
    let ram: u64 = mem.iter().map(|r| r.len()).sum();
    if found != image.len || found != ram {
        return Err(SnapshotError::MemorySize {
            path: path.to_path_buf(),
            found,
            expected: image.len,
        });
    }
    let mut from_file = vec![0u8; CHUNK];
    let mut in_ram = vec![0u8; CHUNK];
    let mut crc = crc32fast::Hasher::new();
    for (addr, file_offset, n) in ram_chunks(mem) {
        let file_chunk = &mut from_file[..n];
        file.read_exact_at(file_chunk, file_offset)
            .map_err(io_error("read", path))?;
        crc.update(file_chunk);
        let ram_chunk = &mut in_ram[..n];
        mem.read_slice(ram_chunk, vm_memory::GuestAddress(addr))
            .map_err(|source| SnapshotError::GuestMemory { addr, source })?;
        let pages = file_chunk
            .chunks(PAGE_SIZE as usize)
            .zip(ram_chunk.chunks(PAGE_SIZE as usize));
        for (i, (want, have)) in pages.enumerate() {
            if want != have {
                let page_addr = addr + (i as u64) * PAGE_SIZE;
                mem.write_slice(want, vm_memory::GuestAddress(page_addr))
                    .map_err(|source| SnapshotError::GuestMemory {
                        addr: page_addr,
                        source,
                    })?;
            }
        }
    }
    let computed = crc.finalize();
    if computed != image.crc32 {
        return Err(SnapshotError::MemoryChecksum {
            path: path.to_path_buf(),
            computed,
            expected: image.crc32,
        });
    }
    Ok(())
}

/// See [`Vm::snapshot_to`]. The VM must be paused; it stays paused.
pub fn snapshot_to(vm: &Vm, dir: &Path) -> Result<(), Error> {
    if !vm.is_paused() {
        return Err(Error::NotPaused);
    }
    // Read the state first: if that fails, nothing on disk has changed.
    let state = vm.save_state()?;
    vm.sync_devices()?;
    std::fs::create_dir_all(dir).map_err(io_error("create the directory", dir))?;
    // An older state.bin must not end up next to the new memory.bin.
    let state_path = dir.join(STATE_FILE);
    match std::fs::remove_file(&state_path) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(io_error("remove the old", &state_path)(e).into()),
    }
    sync_dir(dir)?;
    let memory = write_memory(vm.memory(), dir)?;
    sync_dir(dir)?;
    let bytes = super::encode(
        vm.identity(),
        &vm.fingerprint(),
        &SnapshotFile { memory, state },
    )?;
    write_file_atomically(dir, STATE_FILE, &bytes)?;
    sync_dir(dir)?;
    Ok(())
}

/// Reads and checks `dir/state.bin` for a VM of `vm`'s shape.
fn read_state_file(vm: &Vm, dir: &Path) -> Result<(super::Header, SnapshotFile), SnapshotError> {
    let path = dir.join(STATE_FILE);
    let meta = match std::fs::metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return Err(SnapshotError::Missing {
                dir: dir.to_path_buf(),
            });
        }
        Err(e) => return Err(io_error("read", &path)(e)),
    };
    if meta.len() > MAX_STATE_FILE {
        return Err(SnapshotError::StateTooLarge {
            path,
            size: meta.len(),
        });
    }
    let bytes = std::fs::read(&path).map_err(io_error("read", &path))?;
    let fingerprint = vm.fingerprint();
    super::decode::<SnapshotFile>(
        &bytes,
        &Expected {
            identity: None,
            fingerprint: Some(&fingerprint),
        },
    )
    .map_err(|source| SnapshotError::Format { path, source })
}

/// See [`Vm::restore_from`]. The VM must be paused; it stays paused.
pub fn restore_from(vm: &Vm, dir: &Path) -> Result<(), Error> {
    if !vm.is_paused() {
        return Err(Error::NotPaused);
    }
    let (header, file) = read_state_file(vm, dir)?;
    // Everything about the state is checked before RAM is touched.
    vm.check_state(&file.state)?;
    read_memory(vm.memory(), &dir.join(MEMORY_FILE), file.memory)?;
    vm.load_state(file.state)?;
    vm.set_identity(header.identity);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_chunks_cover_every_region_in_file_order() {
        let low = CHUNK as u64 * 2 + 4096;
        let high = CHUNK as u64 + 8192;
        let mem = GuestMemoryMmap::from_ranges(&[
            (vm_memory::GuestAddress(0), low as usize),
            (vm_memory::GuestAddress(1 << 32), high as usize),
        ])
        .unwrap();
        let chunks: Vec<(u64, u64, usize)> = ram_chunks(&mem).collect();
        let c = CHUNK as u64;
        assert_eq!(
            chunks,
            vec![
                (0, 0, CHUNK),
                (c, c, CHUNK),
                (2 * c, 2 * c, 4096),
                (1 << 32, low, CHUNK),
                ((1 << 32) + c, low + c, 8192),
            ]
        );
    }
}
