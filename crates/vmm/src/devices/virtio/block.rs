//! virtio-blk: a disk whose sectors live in a [`BlockBackend`].
//!
//! One queue of 256 entries. Features: VIRTIO_F_VERSION_1,
//! VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_FLUSH, and VIRTIO_BLK_F_RO for a
//! read-only disk. Requests: IN, OUT, FLUSH and GET_ID; any other type
//! completes with VIRTIO_BLK_S_UNSUPP. A write to a read-only disk, a
//! request past the end of the disk or a failed host I/O completes with
//! VIRTIO_BLK_S_IOERR.

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

use super::queue::{self, Chain};
use super::worker::{QueueHandler, Worker};
use super::{
    ActivateError, Activation, Backend, Error, F_VERSION_1, TYPE_BLOCK, VirtioDevice, WarnLimit,
};
use crate::DiskConfig;
use crate::memory::GuestMemoryMmap;

/// Entries of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Bytes per sector: the unit of capacity and of request offsets.
pub const SECTOR_SIZE: u64 = 512;
/// Bytes of the request header (type, reserved, sector).
pub const REQUEST_HEADER_LEN: u64 = 16;
/// Most data segments per request the guest may use (the queue size less
/// the header and status descriptors).
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Length of the disk ID (VIRTIO_BLK_T_GET_ID).
pub const ID_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;
/// Bytes copied between guest memory and the back end at a time.
const CHUNK: usize = 128 << 10;

/// Where a disk's sectors live: a raw image file, or later the block
/// replication layer wrapping one. Offsets are in bytes; the device only
/// asks for whole sectors inside [`Self::size`].
pub trait BlockBackend: Send {
    /// The disk's size in bytes.
    fn size(&self) -> u64;
    /// Reads `buf.len()` bytes at `offset`.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()>;
    /// Writes `data` at `offset`.
    fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()>;
    /// Makes every completed write durable (fdatasync for a file).
    fn flush(&mut self) -> std::io::Result<()>;
}

/// A raw disk image: a regular file or a host block device.
#[derive(Debug)]
pub struct RawFile {
    file: File,
    size: u64,
}

impl RawFile {
    /// Opens the image at `path`, for writing unless `readonly`, and locks
    /// it (shared when read-only, exclusive otherwise) so that two writers
    /// cannot corrupt it.
    pub fn open(path: &Path, readonly: bool) -> Result<RawFile, Error> {
        let p = || path.to_path_buf();
        let open = |write: bool| {
            OpenOptions::new()
                .read(true)
                .write(write)
                .custom_flags(libc::O_CLOEXEC)
                .open(path)
        };
        let file = open(!readonly).map_err(|source| match source.kind() {
            ErrorKind::NotFound => Error::DiskMissing { path: p() },
            ErrorKind::PermissionDenied | ErrorKind::ReadOnlyFilesystem
                if !readonly && open(false).is_ok() =>
            {
                Error::DiskNotWritable { path: p() }
            }
            _ => Error::DiskOpen { path: p(), source },
        })?;
        let meta = file
            .metadata()
            .map_err(|source| Error::DiskOpen { path: p(), source })?;
        let size = checked_size(path, &meta, readonly, || {
            let mut f = &file;
            std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0))
        })?;
        let op = if readonly {
            libc::LOCK_SH
        } else {
            libc::LOCK_EX
        };
        // SAFETY: flock on an fd we own; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } != 0 {
            let source = std::io::Error::last_os_error();
            return Err(if source.kind() == ErrorKind::WouldBlock {
                Error::DiskLocked {
                    path: p(),
                    readonly,
                }
            } else {
                Error::DiskOpen { path: p(), source }
            });
        }
        Ok(RawFile { file, size })
    }

    /// The size of the image at `path`, with the checks [`Self::open`]
    /// makes, but without opening it for writing and without locking it
    /// (another process may hold it): a regular file's size comes from its
    /// metadata, a block device is opened read-only to read its size.
    pub fn probe(path: &Path, readonly: bool) -> Result<u64, Error> {
        let p = || path.to_path_buf();
        let meta = std::fs::metadata(path).map_err(|source| match source.kind() {
            ErrorKind::NotFound => Error::DiskMissing { path: p() },
            _ => Error::DiskOpen { path: p(), source },
        })?;
        checked_size(path, &meta, readonly, || {
            let file = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(path)?;
            let mut f = &file;
            std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0))
        })
    }
}

/// Checks that the image at `path`, of metadata `meta`, is a regular file
/// or a block device, writable unless `readonly`, and at least a sector
/// long; returns its size (`block_size` reads a block device's).
fn checked_size(
    path: &Path,
    meta: &std::fs::Metadata,
    readonly: bool,
    block_size: impl FnOnce() -> std::io::Result<u64>,
) -> Result<u64, Error> {
    let p = || path.to_path_buf();
    let kind = meta.file_type();
    if !kind.is_file() && !kind.is_block_device() {
        return Err(Error::DiskNotAFile { path: p() });
    }
    // Root may write a file nobody may write; a file without any write
    // permission is taken as meant to be read-only.
    if !readonly && kind.is_file() && meta.permissions().readonly() {
        return Err(Error::DiskNotWritable { path: p() });
    }
    let size = if kind.is_block_device() {
        block_size().map_err(|source| Error::DiskOpen { path: p(), source })?
    } else {
        meta.len()
    };
    if size < SECTOR_SIZE {
        return Err(Error::DiskTooSmall { path: p(), size });
    }
    Ok(size)
}

impl BlockBackend for RawFile {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.file.write_all_at(data, offset)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.sync_data()
    }
}

/// A virtio-blk device.
pub struct Block {
    name: String,
    readonly: bool,
    id: [u8; ID_LEN],
    /// Capacity in sectors.
    capacity: u64,
    backend: Option<Box<dyn BlockBackend>>,
    worker: Option<Worker<BlockHandler>>,
}

impl Block {
    /// A device named `name` (for messages) on `backend`, whose ID (up to
    /// 20 bytes, longer ones cut) is `id`.
    pub fn new(name: String, backend: Box<dyn BlockBackend>, readonly: bool, id: &[u8]) -> Self {
        let mut block = Block::without_backend(name, backend.size() / SECTOR_SIZE, readonly, id);
        block.backend = Some(backend);
        block
    }

    fn without_backend(name: String, capacity: u64, readonly: bool, id: &[u8]) -> Self {
        let mut id_bytes = [0u8; ID_LEN];
        let n = id.len().min(ID_LEN);
        id_bytes[..n].copy_from_slice(&id[..n]);
        Block {
            name,
            readonly,
            id: id_bytes,
            capacity,
            backend: None,
            worker: None,
        }
    }

    /// Disk `index` as configured: its image opened, its serial checked or
    /// chosen (`twinvm-disk<index>`).
    pub fn with_file(index: usize, config: &DiskConfig) -> Result<Self, Error> {
        let serial = Self::serial(index, config)?;
        let file = RawFile::open(&config.path, config.readonly)?;
        Ok(Block::new(
            Self::config_name(index, config),
            Box::new(file),
            config.readonly,
            serial.as_bytes(),
        ))
    }

    /// Disk `index` as configured, without its back end: its serial
    /// checked or chosen, its image checked and its size read
    /// ([`RawFile::probe`]: not opened for writing, not locked). The
    /// capacity comes from that size; [`VirtioDevice::set_backend`] later
    /// takes only a back end of that size.
    pub fn detached(index: usize, config: &DiskConfig) -> Result<Self, Error> {
        let serial = Self::serial(index, config)?;
        let size = RawFile::probe(&config.path, config.readonly)?;
        Ok(Block::without_backend(
            Self::config_name(index, config),
            size / SECTOR_SIZE,
            config.readonly,
            serial.as_bytes(),
        ))
    }

    fn config_name(index: usize, config: &DiskConfig) -> String {
        format!("disk{index} ({})", config.path.display())
    }

    /// The configured serial, checked, or `twinvm-disk<index>`.
    fn serial(index: usize, config: &DiskConfig) -> Result<String, Error> {
        match &config.serial {
            Some(s) if s.len() > ID_LEN => Err(Error::DiskSerial {
                path: config.path.clone(),
                serial: s.clone(),
            }),
            Some(s) => Ok(s.clone()),
            None => Ok(format!("twinvm-disk{index}")),
        }
    }

    /// Capacity in sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn avail_features(&self) -> u64 {
        let mut f = F_VERSION_1 | 1 << VIRTIO_BLK_F_SEG_MAX | 1 << VIRTIO_BLK_F_FLUSH;
        if self.readonly {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    /// `virtio_blk_config` up to `blk_size`: capacity (u64), size_max (u32,
    /// 0: not offered), seg_max (u32), geometry (4 bytes, not offered),
    /// blk_size (u32, not offered).
    fn config_space(&self) -> Vec<u8> {
        let mut c = Vec::with_capacity(24);
        c.extend_from_slice(&self.capacity.to_le_bytes());
        c.extend_from_slice(&0u32.to_le_bytes());
        c.extend_from_slice(&SEG_MAX.to_le_bytes());
        c.extend_from_slice(&[0; 8]);
        c
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        let backend = self.backend.take().ok_or(ActivateError::BackendLost)?;
        let Some(queue) = a.queues.into_iter().next() else {
            self.backend = Some(backend);
            return Err(ActivateError::InvalidQueue {
                index: 0,
                why: "missing".into(),
            });
        };
        let handler = BlockHandler::new(
            self.name.clone(),
            a.mem,
            queue,
            backend,
            self.readonly,
            self.id,
        );
        let thread = format!("virtio-{}", self.name.split(' ').next().unwrap_or("blk"));
        match Worker::spawn(thread, handler, a.queue_evts, a.interrupt) {
            Ok(worker) => {
                self.worker = Some(worker);
                Ok(())
            }
            Err((e, handler)) => {
                self.backend = Some(handler.backend);
                Err(e)
            }
        }
    }

    fn deactivate(&mut self) -> Option<Vec<Queue>> {
        let handler = self.worker.take()?.stop()?;
        self.backend = Some(handler.backend);
        Some(vec![handler.queue])
    }

    fn sync_backend(&mut self) -> std::io::Result<()> {
        match &mut self.backend {
            Some(backend) => backend.flush(),
            None if self.worker.is_some() => Err(std::io::Error::other(
                "the disk's back end is in use by its running worker",
            )),
            // Released (nothing of it is open any more) or lost with a
            // failed worker: nothing to sync.
            None => Ok(()),
        }
    }

    fn has_backend(&self) -> bool {
        self.backend.is_some() || self.worker.is_some()
    }

    fn take_backend(&mut self) -> Option<Backend> {
        if self.worker.is_some() {
            return None;
        }
        self.backend.take().map(Backend::Block)
    }

    fn set_backend(&mut self, backend: Backend) -> Result<(), String> {
        if self.worker.is_some() {
            return Err("the device is running".into());
        }
        if self.backend.is_some() {
            return Err("the device already has its back end".into());
        }
        let backend = match backend {
            Backend::Block(b) => b,
            other => {
                return Err(format!(
                    "a disk takes a disk back end, not a {}",
                    other.kind()
                ));
            }
        };
        let size = backend.size();
        if size / SECTOR_SIZE != self.capacity {
            return Err(format!(
                "its image now holds {size} bytes ({} sectors), but the disk has {} sectors: the image changed size",
                size / SECTOR_SIZE,
                self.capacity
            ));
        }
        self.backend = Some(backend);
        Ok(())
    }
}

/// How a request ended: the status byte and the bytes written into the
/// guest's buffers before it.
struct Outcome {
    status: u8,
    data_written: u32,
}

impl Outcome {
    fn status(status: u32) -> Self {
        Outcome {
            status: status as u8,
            data_written: 0,
        }
    }
}

/// The worker-side state of a disk: its queue and back end.
pub(crate) struct BlockHandler {
    name: String,
    mem: GuestMemoryMmap,
    pub(crate) queue: Queue,
    backend: Box<dyn BlockBackend>,
    readonly: bool,
    id: [u8; ID_LEN],
    capacity: u64,
    bounce: Vec<u8>,
    warn: WarnLimit,
    /// Chains the guest built wrongly, so far.
    pub(crate) malformed: u64,
}

impl BlockHandler {
    pub(crate) fn new(
        name: String,
        mem: GuestMemoryMmap,
        queue: Queue,
        backend: Box<dyn BlockBackend>,
        readonly: bool,
        id: [u8; ID_LEN],
    ) -> Self {
        BlockHandler {
            name,
            mem,
            queue,
            capacity: backend.size() / SECTOR_SIZE,
            backend,
            readonly,
            id,
            bounce: vec![0; CHUNK],
            warn: WarnLimit::new(),
            malformed: 0,
        }
    }

    fn warn(&mut self, msg: std::fmt::Arguments<'_>) {
        self.warn.warn(&self.name, msg);
    }

    /// Executes every request the guest queued. Returns whether the guest
    /// must be interrupted.
    pub(crate) fn process_queue(&mut self) -> bool {
        let mut used = false;
        loop {
            let head = match queue::pop_head(&mut self.queue, &self.mem) {
                Ok(Some(head)) => head,
                Ok(None) => break,
                Err(e) => {
                    self.malformed += 1;
                    self.warn(format_args!("request queue: {e}"));
                    break;
                }
            };
            let len = self.request(head);
            if let Err(e) = self.queue.add_used(&self.mem, head, len) {
                self.warn(format_args!(
                    "request queue: cannot return request {head}: {e}"
                ));
            }
            used = true;
        }
        used && self.queue.needs_notification(&self.mem).unwrap_or(true)
    }

    /// Executes the request at `head`; returns the used length (data
    /// written plus the status byte, or 0 for a chain without a status
    /// byte).
    fn request(&mut self, head: u16) -> u32 {
        // The used length is a u32 that includes the status byte.
        let max = u64::from(u32::MAX) - 1;
        let chain = match queue::read_chain(
            &self.mem,
            GuestAddress(self.queue.desc_table()),
            self.queue.size(),
            head,
            max,
        ) {
            Ok(chain) => chain,
            Err(e) => {
                self.malformed += 1;
                self.warn(format_args!("request dropped: {e}"));
                return 0;
            }
        };
        let Some(status_at) = chain
            .writable
            .last()
            .filter(|s| s.len > 0)
            .map(|s| s.addr.unchecked_add(u64::from(s.len) - 1))
        else {
            self.malformed += 1;
            self.warn(format_args!(
                "request {head} dropped: it has no device-writable status byte at its end"
            ));
            return 0;
        };
        let outcome = self.execute(&chain);
        // Through vm-memory, so the page is marked dirty.
        if let Err(e) = self.mem.write_obj(outcome.status, status_at) {
            self.warn(format_args!("request {head}: cannot write its status: {e}"));
            return outcome.data_written;
        }
        outcome.data_written + 1
    }

    fn execute(&mut self, chain: &Chain) -> Outcome {
        let head = chain.head;
        let mut header = [0u8; REQUEST_HEADER_LEN as usize];
        if chain.readable_len() < REQUEST_HEADER_LEN
            || queue::read_from(&self.mem, &chain.readable, 0, &mut header).is_err()
        {
            self.malformed += 1;
            self.warn(format_args!(
                "request {head} failed: no {REQUEST_HEADER_LEN}-byte device-readable header"
            ));
            return Outcome::status(VIRTIO_BLK_S_IOERR);
        }
        let kind = u32::from_le_bytes(header[0..4].try_into().unwrap_or_default());
        let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
        let readable_data = chain.readable_len() - REQUEST_HEADER_LEN;
        // The last writable byte is the status.
        let writable_data = chain.writable_len() - 1;
        // Data the wrong way round: a read with device-readable data, a
        // write with device-writable data.
        let (wrong_way, expected) = match kind {
            VIRTIO_BLK_T_OUT => (writable_data, "device-writable"),
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID | VIRTIO_BLK_T_FLUSH => {
                (readable_data, "device-readable")
            }
            _ => (0, ""),
        };
        if wrong_way != 0 {
            self.malformed += 1;
            self.warn(format_args!(
                "request {head} (type {kind}) failed: {wrong_way} bytes of {expected} data"
            ));
            return Outcome::status(VIRTIO_BLK_S_IOERR);
        }
        match kind {
            VIRTIO_BLK_T_IN => self.read(chain, sector, writable_data),
            VIRTIO_BLK_T_OUT => self.write(chain, sector, readable_data),
            VIRTIO_BLK_T_FLUSH => match self.backend.flush() {
                Ok(()) => Outcome::status(VIRTIO_BLK_S_OK),
                Err(e) => {
                    self.warn(format_args!("flush failed: {e}"));
                    Outcome::status(VIRTIO_BLK_S_IOERR)
                }
            },
            VIRTIO_BLK_T_GET_ID => {
                let n = (writable_data as usize).min(ID_LEN);
                if n == 0 {
                    self.malformed += 1;
                    self.warn(format_args!(
                        "request {head} (GET_ID) failed: no data buffer"
                    ));
                    return Outcome::status(VIRTIO_BLK_S_IOERR);
                }
                let id = self.id;
                match queue::write_to(&self.mem, &chain.writable, 0, &id[..n]) {
                    Ok(()) => Outcome {
                        status: VIRTIO_BLK_S_OK as u8,
                        data_written: n as u32,
                    },
                    Err(_) => Outcome::status(VIRTIO_BLK_S_IOERR),
                }
            }
            _ => Outcome::status(VIRTIO_BLK_S_UNSUPP),
        }
    }

    /// The byte offset of `len` bytes at `sector`, if they are whole
    /// sectors inside the disk.
    fn range(&mut self, head: u16, sector: u64, len: u64) -> Option<u64> {
        let ok = len.is_multiple_of(SECTOR_SIZE)
            && sector
                .checked_add(len / SECTOR_SIZE)
                .is_some_and(|end| end <= self.capacity);
        if !ok {
            let capacity = self.capacity;
            self.warn(format_args!(
                "request {head} failed: {len} bytes at sector {sector} are not whole sectors inside the disk's {capacity} sectors"
            ));
            return None;
        }
        Some(sector * SECTOR_SIZE)
    }

    fn read(&mut self, chain: &Chain, sector: u64, len: u64) -> Outcome {
        let Some(offset) = self.range(chain.head, sector, len) else {
            return Outcome::status(VIRTIO_BLK_S_IOERR);
        };
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(CHUNK as u64) as usize;
            let buf = &mut self.bounce[..n];
            if let Err(e) = self.backend.read_at(offset + done, buf) {
                self.warn(format_args!("read of sector {sector} failed: {e}"));
                return Outcome {
                    status: VIRTIO_BLK_S_IOERR as u8,
                    data_written: done as u32,
                };
            }
            // Through vm-memory, so the pages are marked dirty.
            if queue::write_to(&self.mem, &chain.writable, done, buf).is_err() {
                return Outcome {
                    status: VIRTIO_BLK_S_IOERR as u8,
                    data_written: done as u32,
                };
            }
            done += n as u64;
        }
        Outcome {
            status: VIRTIO_BLK_S_OK as u8,
            data_written: len as u32,
        }
    }

    fn write(&mut self, chain: &Chain, sector: u64, len: u64) -> Outcome {
        if self.readonly {
            self.warn(format_args!(
                "write to sector {sector} refused: the disk is read-only"
            ));
            return Outcome::status(VIRTIO_BLK_S_IOERR);
        }
        let Some(offset) = self.range(chain.head, sector, len) else {
            return Outcome::status(VIRTIO_BLK_S_IOERR);
        };
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(CHUNK as u64) as usize;
            let buf = &mut self.bounce[..n];
            if queue::read_from(&self.mem, &chain.readable, REQUEST_HEADER_LEN + done, buf).is_err()
            {
                return Outcome::status(VIRTIO_BLK_S_IOERR);
            }
            if let Err(e) = self.backend.write_at(offset + done, buf) {
                self.warn(format_args!("write of sector {sector} failed: {e}"));
                return Outcome::status(VIRTIO_BLK_S_IOERR);
            }
            done += n as u64;
        }
        Outcome::status(VIRTIO_BLK_S_OK)
    }
}

impl QueueHandler for BlockHandler {
    fn backend_fd(&self) -> Option<RawFd> {
        None
    }

    fn queue_notified(&mut self, _index: usize) -> bool {
        self.process_queue()
    }

    fn backend_ready(&mut self) -> bool {
        false
    }

    fn process_all(&mut self) -> bool {
        self.process_queue()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::testutil::{
        F_NEXT, F_WRITE, TestQueue, take_dirty_pages, test_memory,
    };
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    use vmm_sys_util::tempfile::TempFile;

    const T_DISCARD: u32 = 11;

    /// A 64 KiB image whose byte i is (i / 512 + i) as u8.
    fn image() -> TempFile {
        let t = TempFile::new().unwrap();
        let data: Vec<u8> = (0..65536u32).map(|i| (i / 512 + i) as u8).collect();
        t.as_file().write_all(&data).unwrap();
        t
    }

    fn handler<'a>(
        mem: &'a GuestMemoryMmap,
        path: &Path,
        readonly: bool,
    ) -> (BlockHandler, TestQueue<'a>) {
        let q = TestQueue::at(mem, 256, 0x10000);
        let mut id = [0u8; ID_LEN];
        id[..5].copy_from_slice(b"disk7");
        let h = BlockHandler::new(
            "disk-test".into(),
            mem.clone(),
            q.queue(),
            Box::new(RawFile::open(path, readonly).unwrap()),
            readonly,
            id,
        );
        (h, q)
    }

    /// Writes a request header at `at`.
    fn header(mem: &GuestMemoryMmap, at: u64, kind: u32, sector: u64) {
        mem.write_obj(kind, GuestAddress(at)).unwrap();
        mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
        mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
    }

    fn status(mem: &GuestMemoryMmap, at: u64) -> u8 {
        mem.read_obj(GuestAddress(at)).unwrap()
    }

    /// A three-descriptor request at descriptors `d`, `d+1`, `d+2`: header
    /// at `hdr`, data at `data` (`len` bytes, writable if `write`), status
    /// at `st`.
    #[allow(clippy::too_many_arguments)]
    fn request(q: &TestQueue, d: u16, hdr: u64, data: u64, len: u32, write: bool, st: u64) {
        q.set_desc(d, hdr, 16, F_NEXT, d + 1);
        let f = if write { F_WRITE } else { 0 };
        q.set_desc(d + 1, data, len, f | F_NEXT, d + 2);
        q.set_desc(d + 2, st, 1, F_WRITE, 0);
        q.push_avail(d);
    }

    #[test]
    fn read_marks_exactly_the_data_status_and_used_pages() {
        let img = image();
        let mem = test_memory();
        let (mut h, q) = handler(&mem, img.as_path(), false);
        header(&mem, 0x100000, VIRTIO_BLK_T_IN, 3);
        // 1 KiB crossing the page boundary at 0x202000.
        request(&q, 0, 0x100000, 0x201e00, 1024, true, 0x300000);
        take_dirty_pages(&mem);
        assert!(h.process_queue());
        assert_eq!(status(&mem, 0x300000), VIRTIO_BLK_S_OK as u8);
        assert_eq!(q.used_elem(0), (0, 1025));
        let mut got = vec![0u8; 1024];
        mem.read_slice(&mut got, GuestAddress(0x201e00)).unwrap();
        let want: Vec<u8> = (3 * 512..5 * 512u32).map(|i| (i / 512 + i) as u8).collect();
        assert_eq!(got, want);
        assert_eq!(
            take_dirty_pages(&mem),
            vec![0x14000, 0x201000, 0x202000, 0x300000]
        );
    }

    #[test]
    fn write_then_read_back_and_flush() {
        let img = image();
        let mem = test_memory();
        let (mut h, q) = handler(&mem, img.as_path(), false);
        let data: Vec<u8> = (0..1536u32).map(|i| (i * 3) as u8).collect();
        mem.write_slice(&data, GuestAddress(0x200000)).unwrap();
        header(&mem, 0x100000, VIRTIO_BLK_T_OUT, 100);
        request(&q, 0, 0x100000, 0x200000, 1536, false, 0x300000);
        header(&mem, 0x100100, VIRTIO_BLK_T_FLUSH, 0);
        q.set_desc(3, 0x100100, 16, F_NEXT, 4);
        q.set_desc(4, 0x300010, 1, F_WRITE, 0);
        q.push_avail(3);
        take_dirty_pages(&mem);
        assert!(h.process_queue());
        assert_eq!(status(&mem, 0x300000), VIRTIO_BLK_S_OK as u8);
        assert_eq!(status(&mem, 0x300010), VIRTIO_BLK_S_OK as u8);
        assert_eq!(q.used_elem(0), (0, 1));
        assert_eq!(q.used_elem(1), (3, 1));
        // A write dirties only the status byte's page and the used ring.
        assert_eq!(take_dirty_pages(&mem), vec![0x14000, 0x300000]);
        let mut back = vec![0u8; 1536];
        img.as_file().read_exact_at(&mut back, 100 * 512).unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn get_id_writes_the_serial() {
        let img = image();
        let mem = test_memory();
        let (mut h, q) = handler(&mem, img.as_path(), false);
        mem.write_slice(&[0xff; 20], GuestAddress(0x205000))
            .unwrap();
        header(&mem, 0x100000, VIRTIO_BLK_T_GET_ID, 0);
        request(&q, 0, 0x100000, 0x205000, 20, true, 0x300000);
        take_dirty_pages(&mem);
        assert!(h.process_queue());
        assert_eq!(status(&mem, 0x300000), VIRTIO_BLK_S_OK as u8);
        let mut id = [0u8; 20];
        mem.read_slice(&mut id, GuestAddress(0x205000)).unwrap();
        assert_eq!(&id[..6], b"disk7\0");
        assert_eq!(id[5..], [0; 15]);
        assert_eq!(q.used_elem(0), (0, 21));
        assert_eq!(take_dirty_pages(&mem), vec![0x14000, 0x205000, 0x300000]);
    }

    #[test]
    fn errors_complete_with_a_status() {
        let img = image();
        let mem = test_memory();
        let (mut h, q) = handler(&mem, img.as_path(), false);
        // Past the end: the disk has 128 sectors.
        header(&mem, 0x100000, VIRTIO_BLK_T_IN, 127);
        request(&q, 0, 0x100000, 0x200000, 1024, true, 0x300000);
        // Sector number that overflows.
        header(&mem, 0x100100, VIRTIO_BLK_T_OUT, u64::MAX);
        request(&q, 3, 0x100100, 0x200000, 512, false, 0x300001);
        // Not a whole sector.
        header(&mem, 0x100200, VIRTIO_BLK_T_IN, 0);
        request(&q, 6, 0x100200, 0x200000, 100, true, 0x300002);
        // Unsupported type.
        header(&mem, 0x100300, T_DISCARD, 0);
        request(&q, 9, 0x100300, 0x200000, 16, false, 0x300003);
        take_dirty_pages(&mem);
        assert!(h.process_queue());
        assert_eq!(status(&mem, 0x300000), VIRTIO_BLK_S_IOERR as u8);
        assert_eq!(status(&mem, 0x300001), VIRTIO_BLK_S_IOERR as u8);
        assert_eq!(status(&mem, 0x300002), VIRTIO_BLK_S_IOERR as u8);
        assert_eq!(status(&mem, 0x300003), VIRTIO_BLK_S_UNSUPP as u8);
        assert_eq!(q.used_idx(), 4);
        // Nothing was read into the data buffer.
        assert_eq!(take_dirty_pages(&mem), vec![0x14000, 0x300000]);
    }

    #[test]
    fn writes_to_a_read_only_disk_fail() {
        let img = image();
        let mem = test_memory();
        let (mut h, q) = handler(&mem, img.as_path(), true);
        mem.write_slice(&[0x55; 512], GuestAddress(0x200000))
            .unwrap();
        header(&mem, 0x100000, VIRTIO_BLK_T_OUT, 0);
        request(&q, 0, 0x100000, 0x200000, 512, false, 0x300000);
        assert!(h.process_queue());
        assert_eq!(status(&mem, 0x300000), VIRTIO_BLK_S_IOERR as u8);
        let mut first = [0u8; 512];
        img.as_file().read_exact_at(&mut first, 0).unwrap();
        assert_ne!(first, [0x55; 512]);
        // Reads still work.
        header(&mem, 0x100000, VIRTIO_BLK_T_IN, 0);
        request(&q, 3, 0x100000, 0x200000, 512, true, 0x300000);
        assert!(h.process_queue());
        assert_eq!(status(&mem, 0x300000), VIRTIO_BLK_S_OK as u8);
    }

    #[test]
    fn malformed_requests_are_reported_and_the_queue_goes_on() {
        let img = image();
        let mem = test_memory();
        let (mut h, q) = handler(&mem, img.as_path(), false);
        header(&mem, 0x100000, VIRTIO_BLK_T_IN, 0);
        // 0: a loop, never reaching a status byte.
        q.set_desc(0, 0x100000, 16, F_NEXT, 1);
        q.set_desc(1, 0x200000, 512, F_WRITE | F_NEXT, 1);
        q.push_avail(0);
        // 2: data buffer outside guest memory.
        q.set_desc(2, 0x100000, 16, F_NEXT, 3);
        q.set_desc(3, 0x8000_0000, 512, F_WRITE | F_NEXT, 4);
        q.set_desc(4, 0x300000, 1, F_WRITE, 0);
        q.push_avail(2);
        // 5: no status byte (last descriptor device-readable).
        q.set_desc(5, 0x100000, 16, 0, 0);
        q.push_avail(5);
        // 6: header in a device-writable descriptor (wrong direction).
        q.set_desc(6, 0x100000, 16, F_WRITE | F_NEXT, 7);
        q.set_desc(7, 0x300001, 1, F_WRITE, 0);
        q.push_avail(6);
        // 8: a read whose data buffer is device-readable (wrong direction).
        request(&q, 8, 0x100000, 0x200000, 512, false, 0x300002);
        // 11: oversized: buffers adding up past what a used length holds.
        q.set_desc(11, 0x100000, 16, F_NEXT, 12);
        q.set_desc(12, 0x200000, u32::MAX, F_WRITE | F_NEXT, 13);
        q.set_desc(13, 0x300003, 1, F_WRITE, 0);
        q.push_avail(11);
        // 14: a head index past the queue.
        q.push_avail(300);
        // 15: a good read after all that.
        request(&q, 15, 0x100000, 0x200000, 512, true, 0x300004);
        take_dirty_pages(&mem);

        assert!(h.process_queue());
        assert_eq!(h.malformed, 7);
        // Chains with a status byte got IOERR; the others none.
        assert_eq!(status(&mem, 0x300001), VIRTIO_BLK_S_IOERR as u8);
        assert_eq!(status(&mem, 0x300002), VIRTIO_BLK_S_IOERR as u8);
        assert_eq!(status(&mem, 0x300004), VIRTIO_BLK_S_OK as u8);
        // All but the out-of-range head went back to the guest.
        assert_eq!(q.used_idx(), 7);
        assert_eq!(q.used_elem(0), (0, 0));
        assert_eq!(q.used_elem(1), (2, 0));
        assert_eq!(q.used_elem(2), (5, 0));
        assert_eq!(q.used_elem(3), (6, 1));
        assert_eq!(q.used_elem(6), (15, 513));
        // Only the used ring, the statuses and the good read's data page
        // were written.
        assert_eq!(take_dirty_pages(&mem), vec![0x14000, 0x200000, 0x300000]);
    }

    #[test]
    fn configuration_space_and_features() {
        let img = image();
        let b = Block::new(
            "d".into(),
            Box::new(RawFile::open(img.as_path(), true).unwrap()),
            true,
            b"x",
        );
        let c = b.config_space();
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 128);
        assert_eq!(u32::from_le_bytes(c[12..16].try_into().unwrap()), 254);
        assert_eq!(
            b.avail_features(),
            (1 << 32) | (1 << 2) | (1 << 9) | (1 << 5)
        );
    }

    #[test]
    fn bad_disks_give_clear_errors() {
        let cfg = |path: &Path, readonly| DiskConfig {
            path: path.to_path_buf(),
            readonly,
            serial: None,
        };
        let missing = Path::new("/nonexistent/twinvm-test.img");
        let err = Block::with_file(0, &cfg(missing, false))
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("disk") && err.contains("/nonexistent/twinvm-test.img"),
            "{err}"
        );

        let img = image();
        let mut perms = img.as_file().metadata().unwrap().permissions();
        perms.set_mode(0o444);
        std::fs::set_permissions(img.as_path(), perms).unwrap();
        let err = Block::with_file(0, &cfg(img.as_path(), false))
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("readonly") && err.contains(&img.as_path().display().to_string()),
            "{err}"
        );
        assert!(Block::with_file(0, &cfg(img.as_path(), true)).is_ok());

        let dir = std::env::temp_dir();
        let err = Block::with_file(0, &cfg(&dir, true))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("not a regular file"), "{err}");

        let small = TempFile::new().unwrap();
        small.as_file().write_all(&[0; 100]).unwrap();
        let err = Block::with_file(0, &cfg(small.as_path(), false))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("less than one 512-byte sector"), "{err}");

        let img = image();
        let long = DiskConfig {
            serial: Some("x".repeat(21)),
            ..cfg(img.as_path(), false)
        };
        let err = Block::with_file(0, &long).err().unwrap().to_string();
        assert!(err.contains("serial") && err.contains("disk"), "{err}");
    }

    #[test]
    fn a_disk_is_locked_against_a_second_writer() {
        let img = image();
        let cfg = |readonly| DiskConfig {
            path: img.as_path().to_path_buf(),
            readonly,
            serial: None,
        };
        let first = Block::with_file(0, &cfg(false)).unwrap();
        let err = Block::with_file(1, &cfg(false)).err().unwrap().to_string();
        assert!(err.contains("in use"), "{err}");
        assert!(Block::with_file(1, &cfg(true)).is_err());
        drop(first);
        let a = Block::with_file(0, &cfg(true)).unwrap();
        let _b = Block::with_file(1, &cfg(true)).unwrap();
        assert_eq!(a.capacity(), 128);
        assert!(Block::with_file(2, &cfg(false)).is_err());
    }

    #[test]
    fn default_serial_is_derived_from_the_index() {
        let img = image();
        let b = Block::with_file(
            3,
            &DiskConfig {
                path: img.as_path().to_path_buf(),
                readonly: true,
                serial: None,
            },
        )
        .unwrap();
        assert_eq!(&b.id[..12], b"twinvm-disk3");
    }

    #[test]
    fn a_detached_disk_reads_its_size_without_opening_or_locking_the_image() {
        let img = image();
        let config = DiskConfig {
            path: img.as_path().to_path_buf(),
            readonly: false,
            serial: None,
        };
        // Another user holds the image, locked for writing.
        let holder = RawFile::open(img.as_path(), false).unwrap();
        let mut b = Block::detached(1, &config).unwrap();
        assert_eq!(b.capacity(), 128);
        assert!(!b.has_backend());
        assert_eq!(&b.id[..12], b"twinvm-disk1");
        assert_eq!(b.name(), format!("disk1 ({})", img.as_path().display()));
        // Nothing to sync without a back end.
        b.sync_backend().unwrap();
        assert!(b.take_backend().is_none());
        assert!(matches!(
            RawFile::open(img.as_path(), false),
            Err(Error::DiskLocked { .. })
        ));
        drop(holder);

        let err = b
            .set_backend(Backend::Net(Box::new(
                crate::devices::virtio::net::tests::MockBackend::new(),
            )))
            .unwrap_err();
        assert!(err.contains("takes a disk back end"), "{err}");
        // An image of another size than the disk's capacity is refused.
        let other = TempFile::new().unwrap();
        other.as_file().write_all(&[0; 32768]).unwrap();
        let err = b
            .set_backend(Backend::Block(Box::new(
                RawFile::open(other.as_path(), false).unwrap(),
            )))
            .unwrap_err();
        assert!(
            err.contains("32768 bytes (64 sectors)")
                && err.contains("128 sectors")
                && err.contains("changed size"),
            "{err}"
        );
        assert!(!b.has_backend());

        b.set_backend(Backend::Block(Box::new(
            RawFile::open(img.as_path(), false).unwrap(),
        )))
        .unwrap();
        assert!(b.has_backend());
        b.sync_backend().unwrap();
        let err = b
            .set_backend(Backend::Block(Box::new(
                RawFile::open(other.as_path(), true).unwrap(),
            )))
            .unwrap_err();
        assert!(err.contains("already has its back end"), "{err}");
        // Taken and dropped, the image is free again.
        let taken = b.take_backend();
        assert!(matches!(taken, Some(Backend::Block(_))));
        assert!(RawFile::open(img.as_path(), false).is_err());
        drop(taken);
        assert!(RawFile::open(img.as_path(), false).is_ok());
    }

    #[test]
    fn a_detached_disk_is_checked_like_an_opened_one() {
        let cfg = |path: &Path, readonly| DiskConfig {
            path: path.to_path_buf(),
            readonly,
            serial: None,
        };
        let err = Block::detached(0, &cfg(Path::new("/nonexistent/tv.img"), false))
            .err()
            .unwrap()
            .to_string();
        assert_eq!(err, "disk /nonexistent/tv.img does not exist");
        let err = Block::detached(0, &cfg(&std::env::temp_dir(), true))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("not a regular file"), "{err}");
        let small = TempFile::new().unwrap();
        small.as_file().write_all(&[0; 100]).unwrap();
        let err = Block::detached(0, &cfg(small.as_path(), false))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("less than one 512-byte sector"), "{err}");
        let img = image();
        let long = DiskConfig {
            serial: Some("x".repeat(21)),
            ..cfg(img.as_path(), false)
        };
        let err = Block::detached(0, &long).err().unwrap().to_string();
        assert!(err.contains("serial"), "{err}");
        let mut perms = img.as_file().metadata().unwrap().permissions();
        perms.set_mode(0o444);
        std::fs::set_permissions(img.as_path(), perms).unwrap();
        assert!(matches!(
            Block::detached(0, &cfg(img.as_path(), false)),
            Err(Error::DiskNotWritable { .. })
        ));
        let ro = Block::detached(0, &cfg(img.as_path(), true)).unwrap();
        assert_eq!(
            ro.avail_features() & (1 << VIRTIO_BLK_F_RO),
            1 << VIRTIO_BLK_F_RO
        );
    }
}
