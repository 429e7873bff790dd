//! Legacy PC devices on the I/O port bus: the 16550 UART (the console), the
//! i8042 controller (its reset line ends the VM), and twinvm's system
//! control port, through which the test guest powers off.
//!
//! Only the UART has state worth saving ([`SerialDevice::save_state`]):
//! vm-superio's i8042 keeps none (reads return 0, only the CPU reset
//! command acts), and the system control port keeps none either.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{I8042Device, Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::BusDevice;
use crate::VmEvent;

/// Base port of the first serial port (COM1).
pub const SERIAL_PORT_BASE: u64 = 0x3f8;
/// Ports COM1 decodes.
pub const SERIAL_PORT_LEN: u64 = 8;
/// ISA IRQ of COM1.
pub const SERIAL_IRQ: u32 = 4;
/// The i8042 data port; the command/status port is at +4.
pub const I8042_BASE: u64 = 0x60;
/// Ports the i8042 decodes (0x60..=0x64).
pub const I8042_LEN: u64 = 5;
/// twinvm's system control port.
pub const SYSCTL_PORT: u64 = 0x600;

/// Bytes the UART's receive FIFO holds (vm-superio's FIFO size).
pub const SERIAL_FIFO_SIZE: usize = 64;

/// Raises an interrupt by signalling an eventfd registered as an irqfd.
///
/// It can be muted: while a saved state is loaded, the UART must not raise
/// an interrupt of its own — the interrupt controllers' saved state already
/// holds whatever the UART had raised.
pub struct IrqTrigger {
    fd: EventFd,
    muted: Arc<AtomicBool>,
}

impl IrqTrigger {
    /// A trigger that signals `fd`.
    pub fn new(fd: EventFd) -> Self {
        IrqTrigger {
            fd,
            muted: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Another handle on the same eventfd and mute switch.
    fn try_clone(&self) -> std::io::Result<Self> {
        Ok(IrqTrigger {
            fd: self.fd.try_clone()?,
            muted: self.muted.clone(),
        })
    }
}

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        if self.muted.load(Ordering::SeqCst) {
            return Ok(());
        }
        self.fd.write(1)
    }
}

/// The saved state of the UART: its registers and the bytes waiting in its
/// receive FIFO (vm-superio's `SerialState`, which has no serde support).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Bytes received and not yet read by the guest, oldest first.
    #[serde(with = "crate::snapshot::codec::bytes")]
    pub rx_fifo: Vec<u8>,
}

impl From<SerialState> for SerialSnapshot {
    fn from(s: SerialState) -> Self {
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            rx_fifo: s.in_buffer,
        }
    }
}

impl From<&SerialSnapshot> for SerialState {
    fn from(s: &SerialSnapshot) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.rx_fifo.clone(),
        }
    }
}

/// A saved UART state that cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SerialStateError {
    /// More received bytes than the FIFO holds.
    #[error(
        "the saved serial port state has {0} bytes in its receive FIFO, more than its {SERIAL_FIFO_SIZE}"
    )]
    FifoOverflow(usize),
    /// The UART could not be rebuilt (internal error).
    #[error("cannot rebuild the serial port from its saved state: {0}")]
    Rebuild(String),
}

/// Sends a VM event when triggered (the i8042's reset line).
pub struct EventTrigger {
    events: Sender<VmEvent>,
    event: VmEvent,
}

impl EventTrigger {
    /// A trigger sending `event` on `events`.
    pub fn new(events: Sender<VmEvent>, event: VmEvent) -> Self {
        EventTrigger { events, event }
    }
}

impl Trigger for EventTrigger {
    type E = ();

    fn trigger(&self) -> Result<(), ()> {
        self.events.send(self.event.clone()).map_err(|_| ())
    }
}

type Uart = Serial<IrqTrigger, NoEvents, Box<dyn Write + Send>>;

/// The console UART.
pub struct SerialDevice {
    uart: Uart,
    output_failed: bool,
}

impl SerialDevice {
    /// A UART whose transmitted bytes go to `out` and whose interrupt
    /// signals `irq`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        SerialDevice {
            uart: Serial::new(IrqTrigger::new(irq), out),
            output_failed: false,
        }
    }

    /// The UART's registers and receive FIFO.
    pub fn save_state(&self) -> SerialSnapshot {
        self.uart.state().into()
    }

    /// Checks that `state` can be loaded, without changing anything.
    pub fn check_state(state: &SerialSnapshot) -> Result<(), SerialStateError> {
        if state.rx_fifo.len() > SERIAL_FIFO_SIZE {
            return Err(SerialStateError::FifoOverflow(state.rx_fifo.len()));
        }
        Ok(())
    }

    /// Replaces the UART's registers and receive FIFO with `state`. The
    /// console output and the interrupt eventfd stay; loading raises no
    /// interrupt (the interrupt controllers' state is loaded separately).
    pub fn load_state(&mut self, state: &SerialSnapshot) -> Result<(), SerialStateError> {
        Self::check_state(state)?;
        let trigger = self
            .uart
            .interrupt_evt()
            .try_clone()
            .map_err(|e| SerialStateError::Rebuild(e.to_string()))?;
        let placeholder_trigger = trigger
            .try_clone()
            .map_err(|e| SerialStateError::Rebuild(e.to_string()))?;
        let muted = trigger.muted.clone();
        // Take the UART out, keeping its output for the rebuilt one.
        let old = std::mem::replace(
            &mut self.uart,
            Serial::new(placeholder_trigger, Box::new(std::io::sink())),
        );
        let out = old.into_writer();
        muted.store(true, Ordering::SeqCst);
        let rebuilt = Serial::from_state(&state.into(), trigger, NoEvents, out);
        muted.store(false, Ordering::SeqCst);
        match rebuilt {
            Ok(uart) => {
                self.uart = uart;
                Ok(())
            }
            // Cannot happen: the FIFO was checked and a muted trigger does
            // not fail. The console output is lost with the old UART.
            Err(e) => Err(SerialStateError::Rebuild(e.to_string())),
        }
    }

    /// Room left in the receive FIFO.
    pub fn input_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Queues bytes the guest will receive; returns how many fitted.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let [byte] = data {
            *byte = self.uart.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let [byte] = data
            && let Err(e) = self.uart.write(offset as u8, *byte)
            && !self.output_failed
        {
            // Once the console's reader is gone (e.g. a closed pipe) every
            // byte fails the same way: say it once, keep the guest running.
            self.output_failed = true;
            tracing::warn!("serial console output failed, further output is dropped: {e}");
        }
    }
}

/// The i8042 keyboard controller; only its CPU reset command does anything.
pub struct I8042(pub I8042Device<EventTrigger>);

impl I8042 {
    /// A controller that sends [`VmEvent::Reset`] on `events` when the guest
    /// pulses the reset line.
    pub fn new(events: Sender<VmEvent>) -> Self {
        I8042(I8042Device::new(EventTrigger::new(events, VmEvent::Reset)))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // 0x61 (NMI status / speaker) and 0x62..0x63 are not the i8042's.
        match (offset, data) {
            (0 | 4, [byte]) => *byte = self.0.read(offset as u8),
            (_, data) => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (0 | 4, [byte]) = (offset, data) {
            // A send failure means the VM is already ending.
            let _ = self.0.write(offset as u8, *byte);
        }
    }
}

/// The system control port: a one-byte write of 0 powers off, 1 resets,
/// 2 reports a guest panic. Reads return 0.
pub struct SystemControl {
    events: Sender<VmEvent>,
}

impl SystemControl {
    /// A port sending its events on `events`.
    pub fn new(events: Sender<VmEvent>) -> Self {
        SystemControl { events }
    }
}

impl BusDevice for SystemControl {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let event = match data.first() {
            Some(0) => VmEvent::PowerOff,
            Some(1) => VmEvent::Reset,
            Some(2) => VmEvent::GuestPanic,
            other => {
                tracing::warn!("system control port: ignoring unknown command {other:?}");
                return;
            }
        };
        // A send failure means the VM is already ending.
        let _ = self.events.send(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    #[test]
    fn sysctl_maps_commands_to_events() {
        let (tx, rx) = channel();
        let mut d = SystemControl::new(tx);
        d.write(0, &[0]);
        d.write(0, &[1]);
        d.write(0, &[2]);
        d.write(0, &[9]);
        d.write(0, &[]);
        let got: Vec<VmEvent> = rx.try_iter().collect();
        assert_eq!(
            got,
            vec![VmEvent::PowerOff, VmEvent::Reset, VmEvent::GuestPanic]
        );
    }

    #[test]
    fn i8042_reset_command_sends_reset() {
        let (tx, rx) = channel();
        let mut d = I8042::new(tx);
        d.write(4, &[0xaa]);
        assert!(rx.try_recv().is_err());
        d.write(4, &[0xfe]);
        assert_eq!(rx.try_recv().unwrap(), VmEvent::Reset);
        let mut b = [1u8];
        d.read(1, &mut b);
        assert_eq!(b, [0]);
    }

    #[test]
    fn serial_output_reaches_the_writer() {
        #[derive(Clone, Default)]
        struct Shared(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl Write for Shared {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let out = Shared::default();
        let mut s = SerialDevice::new(EventFd::new(0).unwrap(), Box::new(out.clone()));
        for b in b"hi" {
            s.write(0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi");
        assert_eq!(s.enqueue_input(b"x"), 1);
        let mut lsr = [0u8];
        s.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready after input");
        let mut rx = [0u8];
        s.read(0, &mut rx);
        assert_eq!(rx, [b'x']);
    }

    #[test]
    fn serial_state_loads_into_another_uart_without_an_interrupt() {
        let mut a = SerialDevice::new(EventFd::new(0).unwrap(), Box::new(std::io::sink()));
        a.write(7, &[0x5a]); // scratch
        a.write(3, &[0x03]); // 8N1
        a.write(1, &[0x01]); // receive-data interrupt on
        assert_eq!(a.enqueue_input(b"abc"), 3);
        let mut first = [0u8];
        a.read(0, &mut first);
        assert_eq!(first, [b'a']);
        let saved = a.save_state();
        assert_eq!(saved.rx_fifo, b"bc");
        assert_eq!(saved.scratch, 0x5a);

        // Through the codec and into a UART with its own output and
        // interrupt eventfd.
        let enc = postcard::to_allocvec(&saved).unwrap();
        let decoded: SerialSnapshot = postcard::from_bytes(&enc).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let out = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        struct Out(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl Write for Out {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut b = SerialDevice::new(irq.try_clone().unwrap(), Box::new(Out(out.clone())));
        b.load_state(&decoded).unwrap();
        assert!(irq.read().is_err(), "loading raised an interrupt");
        assert_eq!(b.save_state(), saved);
        let mut r = [0u8];
        b.read(7, &mut r);
        assert_eq!(r, [0x5a]);
        b.read(0, &mut r);
        assert_eq!(r, [b'b']);
        // The output still reaches the UART's own writer, and interrupts
        // work again after the load.
        b.write(0, b"!");
        assert_eq!(&*out.lock().unwrap(), b"!");
        b.enqueue_input(b"x");
        assert_eq!(irq.read().unwrap(), 1);

        let too_full = SerialSnapshot {
            rx_fifo: vec![0; SERIAL_FIFO_SIZE + 1],
            ..saved
        };
        let err = b.load_state(&too_full).unwrap_err();
        assert!(err.to_string().contains("receive FIFO"), "{err}");
        // A refused state changes nothing.
        b.read(7, &mut r);
        assert_eq!(r, [0x5a]);
    }
}
