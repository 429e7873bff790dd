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

/// The digest of a paused VM's state ([`crate::Vm::digest`]); see the
/// module documentation for what it covers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateDigest {
    /// SHA-256 over the chunk digests, in order.
    pub ram: Sha256Digest,
    /// Per 2 MiB chunk of RAM, in guest-address order: its guest address
    /// and the SHA-256 of its bytes.
    pub chunks: Vec<(u64, Sha256Digest)>,
    /// SHA-256 of the encoded device states.
    pub devices: Sha256Digest,
    /// SHA-256 of the vCPUs' general and special registers.
    pub vcpus: Sha256Digest,
}

/// Where two digests first differ ([`StateDigest::first_difference`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DigestDifference {
    /// The RAM chunk at `gpa` differs.
    Ram {
        /// Guest address of the chunk.
        gpa: u64,
    },
    /// The device states differ.
    Devices,
    /// The vCPU registers differ.
    Vcpus,
    /// The digests are of RAM laid out differently (another size), or one
    /// of them does not match its own chunks.
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
    /// first RAM chunk in guest-address order, then the devices, then the
    /// vCPUs. `None` if they are equal.
    pub fn first_difference(&self, other: &StateDigest) -> Option<DigestDifference> {
        let same_layout = self.chunks.len() == other.chunks.len()
            && self
                .chunks
                .iter()
                .zip(&other.chunks)
                .all(|(a, b)| a.0 == b.0);
        if !same_layout {
            return Some(DigestDifference::Layout);
        }
        if let Some((a, _)) = self
            .chunks
            .iter()
            .zip(&other.chunks)
            .find(|(a, b)| a.1 != b.1)
        {
            return Some(DigestDifference::Ram { gpa: a.0 });
        }
        if self.ram != other.ram {
            // Equal chunks, different summaries: one is not its own.
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

/// The digest of `len` zero bytes; the full chunk's is computed once.
fn zero_digest(len: usize) -> Sha256Digest {
    fn of(len: usize) -> Sha256Digest {
        let zeros = vec![0u8; len];
        Sha256::digest(&zeros).into()
    }
    static FULL: OnceLock<Sha256Digest> = OnceLock::new();
    if len as u64 == CHUNK_SIZE {
        *FULL.get_or_init(|| of(len))
    } else {
        of(len)
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
        let words = populated
            .slots
            .get(index)
            .filter(|(addr, _)| addr.raw_value() == start)
            .map(|(_, words)| words.as_slice());
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

/// The digest of a VM's RAM `mem` (populated pages `populated`), its
/// device states and its vCPUs.
pub(crate) fn compute(
    mem: &GuestMemoryMmap,
    populated: &DirtyBitmap,
    devices: &DeviceStates,
    vcpus: &[VcpuSnapshot],
) -> Result<StateDigest, Error> {
    let chunks = ram_chunks(mem, populated)?;
    let mut ram = Sha256::new();
    for (_, d) in &chunks {
        ram.update(d);
    }
    let encoded = postcard::to_stdvec(devices).map_err(FormatError::Encode)?;
    let mut v = Sha256::new();
    for vcpu in vcpus {
        v.update(zerocopy::IntoBytes::as_bytes(&vcpu.regs));
        v.update(zerocopy::IntoBytes::as_bytes(&vcpu.sregs));
    }
    Ok(StateDigest {
        ram: ram.finalize().into(),
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

    fn digest_of(mem: &GuestMemoryMmap) -> StateDigest {
        let chunks = ram_chunks(mem, &crate::memory::populated_pages(mem)).unwrap();
        let mut ram = Sha256::new();
        for (_, d) in &chunks {
            ram.update(d);
        }
        StateDigest {
            ram: ram.finalize().into(),
            chunks,
            devices: [1; 32],
            vcpus: [2; 32],
        }
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
}
