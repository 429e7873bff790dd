//! The machine side of the guest: entry point, port I/O, serial port,
//! interrupts and timer, power control.

pub mod entry;
pub mod interrupts;
pub mod io;
pub mod mem;
pub mod power;
pub mod serial;
pub mod virtio;
