//! Legacy PC devices on the I/O port bus: the 16550 UART (the console), the
//! i8042 controller (its reset line ends the VM), and twinvm's system
//! control port, through which the test guest powers off.

use std::io::Write;
use std::sync::mpsc::Sender;

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

/// Raises an interrupt by signalling an eventfd registered as an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
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

/// The console UART.
pub struct SerialDevice {
    uart: Serial<IrqTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>,
    output_failed: bool,
}

impl SerialDevice {
    /// A UART whose transmitted bytes go to `out` and whose interrupt
    /// signals `irq`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        SerialDevice {
            uart: Serial::new(IrqTrigger(irq), out),
            output_failed: false,
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
}
