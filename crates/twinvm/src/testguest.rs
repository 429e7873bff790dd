//! The bundled test guest (see docs/test-guest.md), booted when no kernel
//! is given. build.rs builds it and points `TWINVM_TESTGUEST_ELF` at the
//! image.

/// The test guest's ELF image (empty if the build could not provide one).
pub const ELF: &[u8] = include_bytes!(env!("TWINVM_TESTGUEST_ELF"));
