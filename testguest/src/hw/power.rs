//! Ending the VM through twinvm's system control port.

use super::interrupts::halt_forever;
use super::io::outb;

/// twinvm's system control port (one-byte write).
const SYSTEM_CONTROL: u16 = 0x600;
const POWEROFF: u8 = 0;
const REBOOT: u8 = 1;
const PANIC: u8 = 2;

/// i8042 command port; 0xfe pulses the CPU reset line.
const I8042_COMMAND: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;

/// Powers the VM off.
pub fn poweroff() -> ! {
    // SAFETY: the write asks twinvm to end the VM, which is the intent.
    unsafe { outb(SYSTEM_CONTROL, POWEROFF) };
    halt_forever()
}

/// Reboots the VM (falls back to the i8042 reset line).
pub fn reboot() -> ! {
    // SAFETY: both writes ask for a reset, which is the intent.
    unsafe {
        outb(SYSTEM_CONTROL, REBOOT);
        outb(I8042_COMMAND, I8042_RESET);
    }
    halt_forever()
}

/// Reports a guest panic to twinvm.
pub fn panic() -> ! {
    // SAFETY: the write tells twinvm the guest panicked, which is the intent.
    unsafe { outb(SYSTEM_CONTROL, PANIC) };
    halt_forever()
}
