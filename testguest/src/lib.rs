//! Pure logic of the twinvm test guest: everything that does not touch the
//! hardware, so that it can be unit-tested on the host with `cargo test`.
//! The guest program (`main.rs` and `hw/`) drives the machine with it.
//!
//! The guest contract (how twinvm enters it, what it prints, its commands and
//! command-line keys) is described in `docs/test-guest.md` at the repository
//! root.

#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

pub mod bootparams;
pub mod command;
pub mod config;
pub mod disk;
pub mod diskbench;
pub mod fmt;
pub mod ips;
pub mod memmap;
pub mod net;
pub mod report;
pub mod virtio;
pub mod workload;

/// PIT interrupts per second (the guest programs the PIT for 100 Hz).
pub const TICKS_PER_SECOND: u64 = 100;
