//! serde helpers for the vectors in saved state, so that decoding an
//! untrusted body never allocates by what a length prefix claims.
//!
//! postcard checks a byte string's length against the input before it
//! copies anything, and reports no size hint for a sequence longer than the
//! bytes left. On top of that, [`seq`] preallocates at most as many bytes
//! as that hint (so at most the remaining input); a vector grows beyond it
//! only as its elements actually decode. [`bytes`] and [`opt_bytes`] encode
//! `Vec<u8>` as one byte string (a length and the bytes) instead of a
//! sequence of single bytes. [`kvm`] and [`kvm_seq`] take KVM structures
//! only at their exact size.
//!
//! Use them with `#[serde(with = "crate::snapshot::codec::seq")]` and so on.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Preallocation for a sequence of `T` with `hint` elements claimed: at most
/// `hint` bytes' worth of elements.
fn capacity<T>(hint: Option<usize>) -> usize {
    hint.unwrap_or(0) / std::mem::size_of::<T>().max(1)
}

/// `Vec<u8>` as one byte string.
pub mod bytes {
    use super::*;

    /// Serializes `v` as a byte string.
    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    /// Deserializes a byte string (or a sequence of bytes, for formats
    /// without byte strings).
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_byte_buf(BytesVisitor)
    }

    pub(super) struct BytesVisitor;

    impl<'de> Visitor<'de> for BytesVisitor {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a byte string")
        }

        fn visit_bytes<E>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut v = Vec::with_capacity(capacity::<u8>(seq.size_hint()));
            while let Some(b) = seq.next_element()? {
                v.push(b);
            }
            Ok(v)
        }
    }
}

/// `Option<Vec<u8>>` with the bytes as one byte string.
pub mod opt_bytes {
    use super::*;

    /// Serializes `v` as an option of a byte string.
    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Wrap<'a>(#[serde(with = "super::bytes")] &'a Vec<u8>);
        v.as_ref().map(Wrap).serialize(s)
    }

    /// Deserializes an option of a byte string.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        #[derive(Deserialize)]
        struct Wrap(#[serde(with = "super::bytes")] Vec<u8>);
        Ok(Option::<Wrap>::deserialize(d)?.map(|w| w.0))
    }
}

/// `Vec<T>` as a sequence, preallocating no more than the input can hold.
pub mod seq {
    use super::*;

    /// Serializes `v` as a sequence.
    pub fn serialize<S: Serializer, T: Serialize>(v: &[T], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v)
    }

    /// Deserializes a sequence.
    pub fn deserialize<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: Deserialize<'de>,
    {
        d.deserialize_seq(SeqVisitor(PhantomData))
    }

    struct SeqVisitor<T>(PhantomData<T>);

    impl<'de, T: Deserialize<'de>> Visitor<'de> for SeqVisitor<T> {
        type Value = Vec<T>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a sequence")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let mut v = Vec::with_capacity(capacity::<T>(seq.size_hint()));
            while let Some(e) = seq.next_element()? {
                v.push(e);
            }
            Ok(v)
        }
    }
}

/// A KVM structure (kvm-bindings encodes each as a byte string of its
/// memory image). kvm-bindings itself pads a short byte string with zeros
/// and cuts a long one; this refuses any but the exact size, so that a
/// damaged state is an error rather than registers silently zeroed, and
/// every decoded structure is backed by as many input bytes as it
/// occupies.
pub mod kvm {
    use super::*;
    use serde::de::value::BytesDeserializer;
    use serde::de::{DeserializeOwned, Error};

    /// Serializes `v` as kvm-bindings does.
    pub fn serialize<S: Serializer, T: Serialize>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        v.serialize(s)
    }

    /// Deserializes a byte string of exactly `size_of::<T>()` bytes with
    /// kvm-bindings' own deserializer.
    pub fn deserialize<'de, D, T>(d: D) -> Result<T, D::Error>
    where
        D: Deserializer<'de>,
        T: DeserializeOwned,
    {
        d.deserialize_bytes(ExactVisitor(PhantomData))
    }

    struct ExactVisitor<T>(PhantomData<T>);

    impl<'de, T: DeserializeOwned> Visitor<'de> for ExactVisitor<T> {
        type Value = T;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(
                f,
                "a {}-byte {}",
                std::mem::size_of::<T>(),
                std::any::type_name::<T>()
                    .rsplit("::")
                    .next()
                    .unwrap_or("KVM structure")
            )
        }

        fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<T, E> {
            if v.len() != std::mem::size_of::<T>() {
                return Err(E::invalid_length(v.len(), &self));
            }
            T::deserialize(BytesDeserializer::<E>::new(v))
        }
    }

    /// A seed deserializing one KVM structure as [`deserialize`] does.
    pub(super) struct ExactSeed<T>(pub(super) PhantomData<T>);

    impl<'de, T: DeserializeOwned> serde::de::DeserializeSeed<'de> for ExactSeed<T> {
        type Value = T;

        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<T, D::Error> {
            deserialize(d)
        }
    }
}

/// A `Vec` of KVM structures, each as [`kvm`] requires, preallocating as
/// [`seq`] does.
pub mod kvm_seq {
    use super::*;
    use serde::de::DeserializeOwned;

    /// Serializes `v` as a sequence.
    pub fn serialize<S: Serializer, T: Serialize>(v: &[T], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v)
    }

    /// Deserializes a sequence of exact-size KVM structures.
    pub fn deserialize<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: DeserializeOwned,
    {
        d.deserialize_seq(KvmSeqVisitor(PhantomData))
    }

    struct KvmSeqVisitor<T>(PhantomData<T>);

    impl<'de, T: DeserializeOwned> Visitor<'de> for KvmSeqVisitor<T> {
        type Value = Vec<T>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a sequence of KVM structures")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let mut v = Vec::with_capacity(capacity::<T>(seq.size_hint()));
            while let Some(e) = seq.next_element_seed(super::kvm::ExactSeed(PhantomData))? {
                v.push(e);
            }
            Ok(v)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        #[serde(with = "bytes")]
        b: Vec<u8>,
        #[serde(with = "opt_bytes")]
        o: Option<Vec<u8>>,
        #[serde(with = "seq")]
        s: Vec<[u64; 4]>,
    }

    #[test]
    fn round_trips_and_uses_byte_strings() {
        let v = Sample {
            b: vec![1, 2, 3],
            o: Some(vec![9; 5]),
            s: vec![[1, 2, 3, 4], [5, 6, 7, 8]],
        };
        let enc = postcard::to_allocvec(&v).unwrap();
        // Length-prefixed byte strings: 1 + 3, then 1 + 1 + 5 for the option.
        assert_eq!(&enc[..4], &[3, 1, 2, 3]);
        assert_eq!(&enc[4..11], &[1, 5, 9, 9, 9, 9, 9]);
        assert_eq!(postcard::from_bytes::<Sample>(&enc).unwrap(), v);
        let none = Sample {
            b: vec![],
            o: None,
            s: vec![],
        };
        let enc = postcard::to_allocvec(&none).unwrap();
        assert_eq!(postcard::from_bytes::<Sample>(&enc).unwrap(), none);
    }

    #[derive(Debug, Serialize, Deserialize)]
    struct Kvm {
        #[serde(with = "kvm")]
        regs: kvm_bindings::kvm_regs,
        #[serde(with = "kvm_seq")]
        msrs: Vec<kvm_bindings::kvm_msr_entry>,
    }

    #[test]
    fn kvm_structures_must_have_their_exact_size() {
        let v = Kvm {
            regs: kvm_bindings::kvm_regs {
                rip: 0x1234,
                ..Default::default()
            },
            msrs: vec![kvm_bindings::kvm_msr_entry {
                index: 0x10,
                data: 99,
                ..Default::default()
            }],
        };
        let enc = postcard::to_allocvec(&v).unwrap();
        // The same bytes kvm-bindings' own serde produces.
        #[derive(Serialize)]
        struct Plain<'a> {
            regs: &'a kvm_bindings::kvm_regs,
            msrs: &'a Vec<kvm_bindings::kvm_msr_entry>,
        }
        let plain = postcard::to_allocvec(&Plain {
            regs: &v.regs,
            msrs: &v.msrs,
        })
        .unwrap();
        assert_eq!(enc, plain);
        let back: Kvm = postcard::from_bytes(&enc).unwrap();
        assert_eq!(back.regs.rip, 0x1234);
        assert_eq!(back.msrs[0].data, 99);

        // kvm_regs is 144 bytes: a 143-byte or 145-byte string is refused.
        let size = std::mem::size_of::<kvm_bindings::kvm_regs>();
        for len in [size - 1, size + 1, 0] {
            let mut bad = vec![len as u8];
            if len >= 0x80 {
                bad = vec![(len as u8) | 0x80, (len >> 7) as u8];
            }
            bad.extend(std::iter::repeat_n(0u8, len));
            bad.push(0);
            let err = postcard::from_bytes::<Kvm>(&bad).unwrap_err();
            assert!(matches!(err, postcard::Error::SerdeDeCustom), "{err:?}");
        }
    }

    #[test]
    fn huge_claimed_lengths_fail_without_allocating_them() {
        // A byte string of 2^62 bytes in a few bytes of input.
        let mut enc = Vec::new();
        let mut n: u64 = 1 << 62;
        while n >= 0x80 {
            enc.push(n as u8 | 0x80);
            n >>= 7;
        }
        enc.push(n as u8);
        assert!(postcard::from_bytes::<Sample>(&enc).is_err());
        // A sequence of 2^62 elements after valid fields.
        let mut enc = vec![0, 0];
        let mut n: u64 = 1 << 62;
        while n >= 0x80 {
            enc.push(n as u8 | 0x80);
            n >>= 7;
        }
        enc.push(n as u8);
        enc.extend_from_slice(&[1; 64]);
        assert!(postcard::from_bytes::<Sample>(&enc).is_err());
    }
}
