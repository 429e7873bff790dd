//! A digest of a paused VM's state, to check that a migration or a
//! checkpoint reproduced it: two VMs whose digests are equal hold the same
//! guest RAM, the same device state and the same vCPU registers.
//!
//! What it covers, exactly:
//! - **RAM**: every byte of guest RAM, as SHA-256 digests of 2 MiB chunks
//!   ([`CHUNK_SIZE`]) in guest-address order (each region cut from its
//!   start; a region's last chunk may be shorter). A chunk with no page in
//!   [`crate::memory::populated_pages`] is all zeros, and gets the digest
//!   of zeros without being read, so an idle 4 GiB guest is quick to
//!   digest. `ram` is the SHA-256 of the chunk digests one after the other.
//! - **devices**: the SHA-256 of the postcard encoding of
//!   [`DeviceStates`]: the serial port and every virtio device (registers,
//!   queues, a held frame).
//! - **vCPUs**: the SHA-256 of each vCPU's general registers (`kvm_regs`)
//!   then special registers (`kvm_sregs`), as raw bytes, vCPU after vCPU.
//!   Nothing else of the machine state: the local APIC's timer count, the
//!   TSC, kvmclock and the PIT keep counting while a VM sits paused, and
//!   legitimately differ between two hosts.
//!
//! [`StateDigest::total`] combines the three.
//!
//! A **page digest** ([`crate::Vm::page_digest`]) covers the same, but its
//! RAM part is per 4 KiB page ([`PAGE_SIZE`]), so that a difference is
//! named to the page: it lists only pages that hold something other than
//! zeros, in guest-address order (a page absent from the list is zeros;
//! only pages in [`crate::memory::populated_pages`] are read), and `ram`
//! is the SHA-256 of the RAM layout (the number of regions, then each
//! region's start and length, as little-endian `u64`s) followed by each
//! listed page's guest address (little-endian `u64`) and digest. Which
//! zero pages happen to be populated changes neither. The two kinds record
//! their granularity ([`StateDigest::chunk_size`]) and never compare
//! equal to each other.

use std::sync::OnceLock;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::arch::x86_64::state::VcpuSnapshot;
use crate::memory::{DirtyBitmap, GuestMemoryMmap, PAGE_SIZE};
use crate::snapshot::FormatError;
use crate::vm::{DeviceStates, Error};

/// Bytes of RAM per chunk digest.
pub const CHUNK_SIZE: u64 = 2 << 20;

/// A SHA-256 digest.
pub type Sha256Digest = [u8; 32];

/// The digest of a paused VM's state ([`crate::Vm::digest`], or per page
/// [`crate::Vm::page_digest`]); see the module documentation for what it
/// covers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateDigest {
    /// Bytes of RAM per entry of `chunks`: [`CHUNK_SIZE`], or
    /// [`PAGE_SIZE`] for a page digest.
    pub chunk_size: u64,
    /// SHA-256 over the chunk digests, in order; for a page digest, over
    /// the RAM layout and the listed pages (see the module documentation).
    pub ram: Sha256Digest,
    /// Per chunk of RAM, in guest-address order: its guest address and the
    /// SHA-256 of its bytes. Every chunk; for a page digest, only the pages
    /// that are not all zeros.
    pub chunks: Vec<(u64, Sha256Digest)>,
    /// SHA-256 of the encoded device states.
    pub devices: Sha256Digest,
    /// SHA-256 of the vCPUs' general and special registers.
    pub vcpus: Sha256Digest,
}

/// Where two digests first differ ([`StateDigest::first_difference`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DigestDifference {
    /// The RAM chunk (for page digests: the page) at `gpa` differs.
    Ram {
        /// Guest address of the chunk or page.
        gpa: u64,
    },
    /// The device states differ.
    Devices,
    /// The vCPU registers differ.
    Vcpus,
    /// The digests are of RAM laid out differently (another size), or of
    /// different granularity (a page digest and a chunk digest), or one of
    /// them does not match its own chunks.
    Layout,
}

impl StateDigest {
    /// One digest of everything: SHA-256 of `ram`, `devices` and `vcpus`.
    pub fn total(&self) -> Sha256Digest {
        let mut h = Sha256::new();
        h.update(self.ram);
        h.update(self.devices);
        h.update(self.vcpus);
        h.finalize().into()
    }

    /// [`Self::total`] in lowercase hex.
    pub fn hex(&self) -> String {
        self.total().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Where `self` and `other` first differ: the layout of RAM, then the
    /// first RAM chunk (or page) in guest-address order, then the devices,
    /// then the vCPUs. `None` if they are equal. Digests of different
    /// granularity differ in layout. Between page digests, a page one of
    /// them does not list is zeros: it equals a listed page of zeros.
    pub fn first_difference(&self, other: &StateDigest) -> Option<DigestDifference> {
        if self.chunk_size != other.chunk_size {
            return Some(DigestDifference::Layout);
        }
        let ram = if self.chunk_size == PAGE_SIZE {
            first_page_difference(&self.chunks, &other.chunks)
        } else {
            first_chunk_difference(&self.chunks, &other.chunks)
        };
        if ram.is_some() {
            return ram;
        }
        if self.ram != other.ram {
            // Equal chunks, different summaries: RAM laid out differently
            // (page digests), or one is not its own.
            return Some(DigestDifference::Layout);
        }
        if self.devices != other.devices {
            return Some(DigestDifference::Devices);
        }
        if self.vcpus != other.vcpus {
            return Some(DigestDifference::Vcpus);
        }
        None
    }
}

/// The first difference of two lists of every chunk: `Layout` unless they
/// name the same chunks, else the first chunk whose digests differ.
fn first_chunk_difference(
    a: &[(u64, Sha256Digest)],
    b: &[(u64, Sha256Digest)],
) -> Option<DigestDifference> {
    let same_layout = a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.0 == y.0);
    if !same_layout {
        return Some(DigestDifference::Layout);
    }
    a.iter()
        .zip(b)
        .find(|(x, y)| x.1 != y.1)
        .map(|(x, _)| DigestDifference::Ram { gpa: x.0 })
}

/// The first difference of two sparse page lists, merged in address
/// order; a page missing from one list is a zero page there. `Layout` if
/// either list is not in strictly ascending order.
fn first_page_difference(
    a: &[(u64, Sha256Digest)],
    b: &[(u64, Sha256Digest)],
) -> Option<DigestDifference> {
    let ascending = |l: &[(u64, Sha256Digest)]| l.windows(2).all(|w| w[0].0 < w[1].0);
    if !ascending(a) || !ascending(b) {
        return Some(DigestDifference::Layout);
    }
    let zero = zero_digest(PAGE_SIZE as usize);
    let (mut a, mut b) = (a.iter().peekable(), b.iter().peekable());
    loop {
        let (gpa, x, y) = match (a.peek(), b.peek()) {
            (None, None) => return None,
            (Some(&&(p, x)), None) => {
                a.next();
                (p, x, zero)
            }
            (None, Some(&&(q, y))) => {
                b.next();
                (q, zero, y)
            }
            (Some(&&(p, x)), Some(&&(q, y))) => match p.cmp(&q) {
                std::cmp::Ordering::Less => {
                    a.next();
                    (p, x, zero)
                }
                std::cmp::Ordering::Greater => {
                    b.next();
                    (q, zero, y)
                }
                std::cmp::Ordering::Equal => {
                    a.next();
                    b.next();
                    (p, x, y)
                }
            },
        };
        if x != y {
            return Some(DigestDifference::Ram { gpa });
        }
    }
}

/// The digest of `len` zero bytes; a full chunk's and a page's are
/// computed once.
fn zero_digest(len: usize) -> Sha256Digest {
    fn of(len: usize) -> Sha256Digest {
        let zeros = vec![0u8; len];
        Sha256::digest(&zeros).into()
    }
    static FULL: OnceLock<Sha256Digest> = OnceLock::new();
    static PAGE: OnceLock<Sha256Digest> = OnceLock::new();
    match len as u64 {
        CHUNK_SIZE => *FULL.get_or_init(|| of(len)),
        PAGE_SIZE => *PAGE.get_or_init(|| of(len)),
        _ => of(len),
    }
}

/// Whether any page of `[offset, offset + len)` of a region is set in its
/// bitmap `words`; pages past the end of the bitmap count as set.
fn any_page(words: &[u64], offset: u64, len: u64) -> bool {
    let first = offset / PAGE_SIZE;
    let end = (offset + len).div_ceil(PAGE_SIZE);
    (first..end).any(|page| {
        words
            .get((page / 64) as usize)
            .is_none_or(|w| w & (1u64 << (page % 64)) != 0)
    })
}

/// The chunk digests of `mem`, reading only chunks with a page in
/// `populated` (one slot per region, in the same order).
pub(crate) fn ram_chunks(
    mem: &GuestMemoryMmap,
    populated: &DirtyBitmap,
) -> Result<Vec<(u64, Sha256Digest)>, Error> {
    let mut buf = Vec::new();
    let mut chunks = Vec::new();
    for (index, region) in mem.iter().enumerate() {
        let start = region.start_addr().raw_value();
        let words = region_words(populated, index, start);
        let len = region.len();
        let mut offset = 0;
        while offset < len {
            let n = (len - offset).min(CHUNK_SIZE);
            let gpa = start + offset;
            // Without a bitmap for the region, read it all.
            let digest = if words.is_some_and(|w| !any_page(w, offset, n)) {
                zero_digest(n as usize)
            } else {
                buf.resize(n as usize, 0);
                mem.read_slice(&mut buf, GuestAddress(gpa))
                    .map_err(|_| Error::Memory(crate::memory::MemoryError::Layout))?;
                Sha256::digest(&buf).into()
            };
            chunks.push((gpa, digest));
            offset += n;
        }
    }
    Ok(chunks)
}

/// The bitmap words of `region` (the `index`th of its memory) in
/// `populated`, if it has a slot for it.
fn region_words(populated: &DirtyBitmap, index: usize, start: u64) -> Option<&[u64]> {
    populated
        .slots
        .get(index)
        .filter(|(addr, _)| addr.raw_value() == start)
        .map(|(_, words)| words.as_slice())
}

/// The guest addresses and lengths of the pages of `mem` in `populated`
/// (one slot per region, in the same order; a region without its slot
/// counts as populated whole), in address order.
fn populated_page_list(mem: &GuestMemoryMmap, populated: &DirtyBitmap) -> Vec<(u64, usize)> {
    let mut list = Vec::new();
    for (index, region) in mem.iter().enumerate() {
        let start = region.start_addr().raw_value();
        let words = region_words(populated, index, start);
        let len = region.len();
        let count = len.div_ceil(PAGE_SIZE);
        let mut page = 0;
        while page < count {
            // Skip to the next populated page; pages past the end of the
            // bitmap count as populated.
            if let Some(&word) = words.and_then(|w| w.get((page / 64) as usize)) {
                let rest = word >> (page % 64);
                if rest == 0 {
                    page = (page / 64 + 1) * 64;
                    continue;
                }
                page += u64::from(rest.trailing_zeros());
                if page >= count {
                    break;
                }
            }
            let offset = page * PAGE_SIZE;
            list.push((start + offset, (len - offset).min(PAGE_SIZE) as usize));
            page += 1;
        }
    }
    list
}

/// The digests of those of `pages` (guest address, length) that are not
/// all zeros, in the same order.
fn digest_pages(
    mem: &GuestMemoryMmap,
    pages: &[(u64, usize)],
) -> Result<Vec<(u64, Sha256Digest)>, Error> {
    static ZEROS: [u8; PAGE_SIZE as usize] = [0; PAGE_SIZE as usize];
    let mut buf = [0u8; PAGE_SIZE as usize];
    let mut digests = Vec::new();
    for &(gpa, n) in pages {
        mem.read_slice(&mut buf[..n], GuestAddress(gpa))
            .map_err(|_| Error::Memory(crate::memory::MemoryError::Layout))?;
        // Comparing is much cheaper than hashing, and many populated pages
        // are zeros.
        if buf[..n] != ZEROS[..n] {
            digests.push((gpa, Sha256::digest(&buf[..n]).into()));
        }
    }
    Ok(digests)
}

/// Populated pages from which [`ram_pages`] hashes on several threads.
const PARALLEL_PAGES: usize = 4096;
/// Most threads [`ram_pages`] hashes on.
const MAX_THREADS: usize = 4;

/// The digests of the pages of `mem` that are not all zeros, in address
/// order, reading only pages in `populated` (one slot per region, in the
/// same order; a region without its slot is read whole). Many pages are
/// hashed on up to [`MAX_THREADS`] threads.
pub(crate) fn ram_pages(
    mem: &GuestMemoryMmap,
    populated: &DirtyBitmap,
) -> Result<Vec<(u64, Sha256Digest)>, Error> {
    let list = populated_page_list(mem, populated);
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(MAX_THREADS);
    if threads < 2 || list.len() < PARALLEL_PAGES {
        return digest_pages(mem, &list);
    }
    std::thread::scope(|s| {
        let parts: Vec<_> = list
            .chunks(list.len().div_ceil(threads))
            .map(|part| s.spawn(move || digest_pages(mem, part)))
            .collect();
        let mut digests = Vec::new();
        for part in parts {
            let part = part
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            digests.extend(part?);
        }
        Ok(digests)
    })
}

/// The `ram` summary of a page digest: the layout of `mem`, then the
/// listed `pages`.
fn page_summary(mem: &GuestMemoryMmap, pages: &[(u64, Sha256Digest)]) -> Sha256Digest {
    let mut h = Sha256::new();
    h.update((mem.num_regions() as u64).to_le_bytes());
    for region in mem.iter() {
        h.update(region.start_addr().raw_value().to_le_bytes());
        h.update(region.len().to_le_bytes());
    }
    for (gpa, d) in pages {
        h.update(gpa.to_le_bytes());
        h.update(d);
    }
    h.finalize().into()
}

/// The RAM part of a digest of `mem` (populated pages `populated`) at
/// `chunk_size` ([`CHUNK_SIZE`] or [`PAGE_SIZE`]): the summary and the
/// chunks.
pub(crate) fn ram_digest(
    mem: &GuestMemoryMmap,
    populated: &DirtyBitmap,
    chunk_size: u64,
) -> Result<(Sha256Digest, Vec<(u64, Sha256Digest)>), Error> {
    if chunk_size == PAGE_SIZE {
        let pages = ram_pages(mem, populated)?;
        return Ok((page_summary(mem, &pages), pages));
    }
    debug_assert_eq!(chunk_size, CHUNK_SIZE);
    let chunks = ram_chunks(mem, populated)?;
    let mut ram = Sha256::new();
    for (_, d) in &chunks {
        ram.update(d);
    }
    Ok((ram.finalize().into(), chunks))
}

/// The digest of a VM's RAM `mem` (populated pages `populated`) at
/// `chunk_size` ([`CHUNK_SIZE`] or [`PAGE_SIZE`]), its device states and
/// its vCPUs.
pub(crate) fn compute(
    mem: &GuestMemoryMmap,
    populated: &DirtyBitmap,
    chunk_size: u64,
    devices: &DeviceStates,
    vcpus: &[VcpuSnapshot],
) -> Result<StateDigest, Error> {
    let (ram, chunks) = ram_digest(mem, populated, chunk_size)?;
    let encoded = postcard::to_stdvec(devices).map_err(FormatError::Encode)?;
    let mut v = Sha256::new();
    for vcpu in vcpus {
        v.update(zerocopy::IntoBytes::as_bytes(&vcpu.regs));
        v.update(zerocopy::IntoBytes::as_bytes(&vcpu.sregs));
    }
    Ok(StateDigest {
        chunk_size,
        ram,
        chunks,
        devices: Sha256::digest(&encoded).into(),
        vcpus: v.finalize().into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 16 MiB of guest RAM from address 0: eight chunks.
    fn test_memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    fn digest_at(mem: &GuestMemoryMmap, populated: &DirtyBitmap, chunk_size: u64) -> StateDigest {
        let (ram, chunks) = ram_digest(mem, populated, chunk_size).unwrap();
        StateDigest {
            chunk_size,
            ram,
            chunks,
            devices: [1; 32],
            vcpus: [2; 32],
        }
    }

    fn digest_of(mem: &GuestMemoryMmap) -> StateDigest {
        digest_at(mem, &crate::memory::populated_pages(mem), CHUNK_SIZE)
    }

    fn page_digest_of(mem: &GuestMemoryMmap) -> StateDigest {
        digest_at(mem, &crate::memory::populated_pages(mem), PAGE_SIZE)
    }

    #[test]
    fn first_difference_finds_the_changed_chunk() {
        let mem = test_memory();
        mem.write_obj(7u64, GuestAddress(0x10_0000)).unwrap();
        let a = digest_of(&mem);
        assert_eq!(a.first_difference(&a.clone()), None);
        // One byte in the third chunk.
        mem.write_obj(1u8, GuestAddress(2 * CHUNK_SIZE + 4097))
            .unwrap();
        let b = digest_of(&mem);
        assert_eq!(
            a.first_difference(&b),
            Some(DigestDifference::Ram {
                gpa: 2 * CHUNK_SIZE
            })
        );
        let changed: Vec<u64> = a
            .chunks
            .iter()
            .zip(&b.chunks)
            .filter(|(x, y)| x.1 != y.1)
            .map(|(x, _)| x.0)
            .collect();
        assert_eq!(changed, vec![2 * CHUNK_SIZE]);
        assert_ne!(a.total(), b.total());

        let devices = StateDigest {
            devices: [9; 32],
            ..a.clone()
        };
        assert_eq!(
            a.first_difference(&devices),
            Some(DigestDifference::Devices)
        );
        let vcpus = StateDigest {
            vcpus: [9; 32],
            ..a.clone()
        };
        assert_eq!(a.first_difference(&vcpus), Some(DigestDifference::Vcpus));
        let mut shorter = a.clone();
        shorter.chunks.pop();
        assert_eq!(a.first_difference(&shorter), Some(DigestDifference::Layout));
        let inconsistent = StateDigest {
            ram: [0; 32],
            ..a.clone()
        };
        assert_eq!(
            a.first_difference(&inconsistent),
            Some(DigestDifference::Layout)
        );
        let hex = a.hex();
        assert_eq!(hex.len(), 64);
        assert!(
            hex.bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
        );
        assert_eq!(&hex[..2], format!("{:02x}", a.total()[0]));
    }

    #[test]
    fn unpopulated_chunks_digest_as_zeros() {
        let mem = test_memory();
        let none = DirtyBitmap {
            slots: mem
                .iter()
                .map(|r| {
                    (
                        r.start_addr(),
                        vec![0; (r.len() / PAGE_SIZE).div_ceil(64) as usize],
                    )
                })
                .collect(),
        };
        let skipped = ram_chunks(&mem, &none).unwrap();
        let all_read = ram_chunks(&mem, &DirtyBitmap { slots: Vec::new() }).unwrap();
        assert_eq!(skipped, all_read);
        assert_eq!(skipped[0].1, zero_digest(CHUNK_SIZE as usize));
        let want: Sha256Digest = Sha256::digest(vec![0u8; CHUNK_SIZE as usize]).into();
        assert_eq!(zero_digest(CHUNK_SIZE as usize), want);
    }

    #[test]
    fn page_ranges_are_looked_up_in_the_bitmap() {
        let words = [0u64, 1 << 5];
        assert!(!any_page(&words, 0, 64 * PAGE_SIZE));
        assert!(any_page(&words, 64 * PAGE_SIZE, PAGE_SIZE * 6));
        assert!(!any_page(&words, 64 * PAGE_SIZE, PAGE_SIZE * 5));
        // Past the bitmap: taken as populated.
        assert!(any_page(&words, 1 << 30, CHUNK_SIZE));
    }

    /// RAM in two regions, 8 MiB from 0 and 4 MiB from 16 MiB, with the
    /// same bytes in a few pages.
    fn two_regions() -> GuestMemoryMmap {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 8 << 20),
            (GuestAddress(16 << 20), 4 << 20),
        ])
        .unwrap();
        for (i, gpa) in [0x1000u64, 0x7f_f000, 0x100_0000, 0x130_0000]
            .into_iter()
            .enumerate()
        {
            mem.write_slice(&[i as u8 + 1; 100], GuestAddress(gpa + 50))
                .unwrap();
        }
        mem
    }

    #[test]
    fn a_page_digest_names_the_changed_page() {
        let a = two_regions();
        let b = two_regions();
        let da = page_digest_of(&a);
        assert_eq!(da.chunk_size, PAGE_SIZE);
        let listed: Vec<u64> = da.chunks.iter().map(|c| c.0).collect();
        assert_eq!(listed, vec![0x1000, 0x7f_f000, 0x100_0000, 0x130_0000]);
        assert_eq!(da.first_difference(&page_digest_of(&b)), None);
        assert_eq!(da.total(), page_digest_of(&b).total());

        // One byte in a listed page of the second region.
        b.write_obj(9u8, GuestAddress(0x130_0fff)).unwrap();
        let db = page_digest_of(&b);
        assert_eq!(
            da.first_difference(&db),
            Some(DigestDifference::Ram { gpa: 0x130_0000 })
        );
        assert_eq!(
            db.first_difference(&da),
            Some(DigestDifference::Ram { gpa: 0x130_0000 })
        );
        assert_ne!(da.total(), db.total());

        // A page only one side lists, before it.
        b.write_obj(1u8, GuestAddress(0x5_0123)).unwrap();
        let db = page_digest_of(&b);
        assert_eq!(
            da.first_difference(&db),
            Some(DigestDifference::Ram { gpa: 0x5_0000 })
        );
        assert_eq!(
            db.first_difference(&da),
            Some(DigestDifference::Ram { gpa: 0x5_0000 })
        );

        // The chunk digest of the same RAM names the chunk.
        assert_eq!(
            digest_of(&a).first_difference(&digest_of(&b)),
            Some(DigestDifference::Ram { gpa: 0 })
        );

        // A page digest goes through postcard as it is.
        let bytes = postcard::to_stdvec(&db).unwrap();
        let back: StateDigest = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, db);
    }

    #[test]
    fn populated_zero_pages_equal_absent_ones() {
        let a = two_regions();
        let b = two_regions();
        // Populated on one side only, and zeros.
        a.write_slice(&[0; 4096], GuestAddress(0x20_0000)).unwrap();
        a.write_obj(0u64, GuestAddress(0x110_0000)).unwrap();
        let pa = crate::memory::populated_pages(&a);
        let pb = crate::memory::populated_pages(&b);
        assert!(pa.contains(GuestAddress(0x20_0000)));
        assert!(!pb.contains(GuestAddress(0x20_0000)));
        let da = digest_at(&a, &pa, PAGE_SIZE);
        let db = digest_at(&b, &pb, PAGE_SIZE);
        assert_eq!(da.first_difference(&db), None);
        assert_eq!(da.ram, db.ram);
        assert_eq!(da.hex(), db.hex());
        // Every page read (no pagemap) lists the same.
        let all = digest_at(&a, &DirtyBitmap { slots: Vec::new() }, PAGE_SIZE);
        assert_eq!(all, da);

        // A digest that lists a zero page equals one that does not.
        let mut listed = db.clone();
        listed
            .chunks
            .insert(1, (0x20_0000, zero_digest(PAGE_SIZE as usize)));
        listed
            .chunks
            .push((0x140_0000, zero_digest(PAGE_SIZE as usize)));
        assert_eq!(listed.first_difference(&db), None);
        assert_eq!(db.first_difference(&listed), None);
        // But a listed page of anything else differs from an absent one.
        listed.chunks[1].1 = [7; 32];
        assert_eq!(
            db.first_difference(&listed),
            Some(DigestDifference::Ram { gpa: 0x20_0000 })
        );
    }

    #[test]
    fn digests_of_another_granularity_or_layout_differ_in_layout() {
        let mem = two_regions();
        let pages = page_digest_of(&mem);
        let chunks = digest_of(&mem);
        assert_eq!(chunks.chunk_size, CHUNK_SIZE);
        assert_eq!(
            pages.first_difference(&chunks),
            Some(DigestDifference::Layout)
        );
        assert_eq!(
            chunks.first_difference(&pages),
            Some(DigestDifference::Layout)
        );

        // The same non-zero pages in RAM of another size.
        let bigger = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 8 << 20),
            (GuestAddress(16 << 20), 6 << 20),
        ])
        .unwrap();
        for d in &pages.chunks {
            let mut page = [0u8; PAGE_SIZE as usize];
            mem.read_slice(&mut page, GuestAddress(d.0)).unwrap();
            bigger.write_slice(&page, GuestAddress(d.0)).unwrap();
        }
        let other = page_digest_of(&bigger);
        assert_eq!(other.chunks, pages.chunks);
        assert_eq!(
            pages.first_difference(&other),
            Some(DigestDifference::Layout)
        );

        // A page list out of order is not a page digest's.
        let mut shuffled = pages.clone();
        shuffled.chunks.swap(0, 1);
        assert_eq!(
            pages.first_difference(&shuffled),
            Some(DigestDifference::Layout)
        );
    }
}
