//! The 16550 UART at 0x3f8, polled in both directions (its interrupt is not
//! used).

use super::io::{inb, outb};
use testguest::fmt::Sink;

const BASE: u16 = 0x3f8;
const THR_RBR: u16 = BASE; // transmit / receive buffer (DLAB = 0)
const IER: u16 = BASE + 1; // interrupt enable (DLAB = 0)
const DLL: u16 = BASE; // divisor latch low (DLAB = 1)
const DLM: u16 = BASE + 1; // divisor latch high (DLAB = 1)
const FCR: u16 = BASE + 2; // FIFO control
const LCR: u16 = BASE + 3; // line control
const MCR: u16 = BASE + 4; // modem control
const LSR: u16 = BASE + 5; // line status

const LSR_DATA_READY: u8 = 0x01;
const LSR_THR_EMPTY: u8 = 0x20;
const LCR_DLAB: u8 = 0x80;
const LCR_8N1: u8 = 0x03;

/// Most bytes taken from the receiver in one [`Serial::try_read`] burst by
/// callers; bounds the time spent per poll.
pub const READ_BURST: usize = 16;

/// The serial port. Zero-sized: all state is in the device.
pub struct Serial;

impl Serial {
    /// Programs 115200 8N1, FIFOs on, no interrupts.
    pub fn init() {
        // SAFETY: these ports belong to the UART, which only this guest
        // drives; the writes configure it and have no other effect.
        unsafe {
            outb(IER, 0);
            outb(LCR, LCR_DLAB);
            outb(DLL, 1);
            outb(DLM, 0);
            outb(LCR, LCR_8N1);
            outb(FCR, 0x07); // enable and clear both FIFOs
            outb(MCR, 0x03); // DTR, RTS
        }
    }

    /// A received byte, if one is waiting.
    pub fn try_read() -> Option<u8> {
        // SAFETY: reading LSR has no side effect; reading RBR consumes the
        // byte LSR said is there, which is what we want.
        unsafe {
            if inb(LSR) & LSR_DATA_READY != 0 {
                Some(inb(THR_RBR))
            } else {
                None
            }
        }
    }
}

impl Sink for Serial {
    fn put(&mut self, byte: u8) {
        // SAFETY: polling LSR and writing THR only transmits the byte.
        unsafe {
            while inb(LSR) & LSR_THR_EMPTY == 0 {}
            outb(THR_RBR, byte);
        }
    }
}
