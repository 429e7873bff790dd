//! x86 port I/O.

use core::arch::asm;

/// Writes a byte to an I/O port.
///
/// # Safety
/// Writing to a device port can change machine state (interrupt routing,
/// power); the caller must know what the port does.
#[inline(always)]
pub unsafe fn outb(port: u16, value: u8) {
    // SAFETY: `out` has no memory effects; the caller vouches for the port.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

/// Reads a byte from an I/O port.
///
/// # Safety
/// Reading some device ports has side effects (e.g. consuming input).
#[inline(always)]
pub unsafe fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: `in` has no memory effects; the caller vouches for the port.
    unsafe {
        asm!("in al, dx", out("al") value, in("dx") port, options(nomem, nostack, preserves_flags))
    }
    value
}
