//! The twinvm test guest: a freestanding x86_64 program that prints a ready
//! banner, counts PIT ticks, dirties memory at a chosen rate, obeys a few
//! serial commands, and drives virtio network and block devices (network
//! services, a disk record workload). See `docs/test-guest.md` at the
//! repository root.

#![no_std]
#![no_main]
#![warn(clippy::undocumented_unsafe_blocks)]

mod devices;
mod hw;

use core::panic::PanicInfo;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use devices::{DEVICE_MEMORY, Machine};

use hw::interrupts::{self, wait_for_interrupt};
use hw::power;
use hw::serial::{self, Serial};
use testguest::TICKS_PER_SECOND;
use testguest::bootparams::{BOOT_PARAMS_SIZE, BootParams, CMDLINE_MAX};
use testguest::command::{Command, LineReader};
use testguest::config::Config;
use testguest::fmt::Sink;
use testguest::memmap::{work_area, work_ranges};
use testguest::report;
use testguest::virtio::MmioDevices;
use testguest::workload::Workload;

unsafe extern "C" {
    /// End of the memory the image uses, stack included (link.ld).
    static __image_end: u8;
}

/// The tick counter, kept in guest memory: ticks handled by the main loop.
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Called by `_start` with the guest-physical address of `boot_params`.
extern "C" fn kmain(boot_params: u64) -> ! {
    Serial::init();
    interrupts::init();
    report::banner(&mut Serial);

    // SAFETY: twinvm passes the address of a 4 KiB boot_params page, identity
    // mapped; the guest never writes it.
    let bp = BootParams::new(unsafe { &*(boot_params as *const [u8; BOOT_PARAMS_SIZE]) });
    let line = cmdline(bp.cmd_line_ptr());
    let config = Config::parse(line);
    let devices = MmioDevices::parse(line);
    let image_end = &raw const __image_end as u64;
    // With virtio devices, their memory comes first above the image and the
    // work area follows it; without, the work area starts at the image end.
    // (twinvm's page tables and boot data are below the image.)
    let mut device_area = None;
    let mut work_start = image_end;
    if !devices.is_empty() {
        let area = work_area(bp.e820(), image_end, DEVICE_MEMORY);
        if area.size == DEVICE_MEMORY {
            device_area = Some(area);
            work_start = area.base + area.size;
        }
    }
    // The work area: all RAM above that (or the first dirty_mb MiB of it).
    let area = work_ranges(bp.e820(), work_start, config.dirty_bytes());
    report::config(&mut Serial, &config, &area);

    interrupts::start_timer();
    if config.measure_ips {
        let (outer, ticks) = interrupts::run_ips_loop(testguest::ips::MEASURE_TICKS);
        report::ips(
            &mut Serial,
            testguest::ips::instructions_per_second(outer, ticks),
        );
    }
    let machine = Machine::probe(&devices, device_area, &config, 0);
    run(&config, Workload::new(area, config.dirty_rate), machine)
}

/// The command line at guest-physical address `ptr` (empty if 0), up to its
/// NUL or [`CMDLINE_MAX`] bytes.
fn cmdline(ptr: u32) -> &'static [u8] {
    if ptr == 0 {
        return &[];
    }
    let start = ptr as usize as *const u8;
    let mut len = 0;
    // SAFETY: twinvm places a NUL-terminated command line at ptr in identity
    // mapped RAM; the scan stops at the NUL or the length limit.
    while len < CMDLINE_MAX && unsafe { start.add(len).read() } != 0 {
        len += 1;
    }
    // SAFETY: the len bytes just read are valid and nothing writes them.
    unsafe { core::slice::from_raw_parts(start, len) }
}

/// The serial input line being assembled. A static rather than a local: it
/// starts zeroed with .bss, where a local would be zeroed with block stores.
static mut INPUT: LineReader = LineReader::new();

/// The main loop: handle the ticks that arrived, poll the serial port and
/// the devices, halt when there is nothing to do.
fn run(config: &Config, mut workload: Workload, mut machine: Machine) -> ! {
    let input = &raw mut INPUT;
    // SAFETY: run is entered once and never returns, so this is the only
    // reference to INPUT there will ever be.
    let input = unsafe { &mut *input };
    let poweroff_tick = config.poweroff_after.saturating_mul(TICKS_PER_SECOND);
    let mut counter = 0u64;
    loop {
        let arrived = interrupts::ticks();
        let ticked = counter < arrived;
        while counter < arrived {
            counter += 1;
            COUNTER.store(counter, Ordering::Relaxed);
            workload.tick(counter, |addr, value| {
                // SAFETY: addr is a page of the work area: RAM above the
                // image, identity mapped, used by nothing else.
                unsafe { (addr as *mut u64).write_volatile(value) }
            });
            machine.tick();
            if counter.is_multiple_of(TICKS_PER_SECOND) {
                report_counter(counter, &workload, &machine);
                if counter == poweroff_tick {
                    Serial.put_str("poweroff\n");
                    power::poweroff();
                }
            }
        }
        for _ in 0..serial::READ_BURST {
            let Some(byte) = Serial::try_read() else {
                break;
            };
            if let Some(line) = input.push(byte) {
                match line.command() {
                    None => {}
                    Some(Command::Poweroff) => {
                        Serial.put_str("poweroff\n");
                        power::poweroff();
                    }
                    Some(Command::Reboot) => {
                        Serial.put_str("reboot\n");
                        power::reboot();
                    }
                    Some(Command::Counter) => report_counter(counter, &workload, &machine),
                    Some(Command::Panic) => panic!("panic requested on the serial port"),
                    Some(Command::Net) => machine.report_net(),
                    Some(Command::Disk) => machine.report_disk(),
                    Some(Command::DirtyRate(rate)) => {
                        workload.set_rate(rate);
                        report::dirty_rate(&mut Serial, rate);
                    }
                    Some(Command::Unknown) => report::unknown_command(&mut Serial, line.bytes),
                }
            }
        }
        let irqs = interrupts::take_irqs();
        let busy = machine.poll(counter * (1000 / TICKS_PER_SECOND), irqs, ticked);
        if !busy && interrupts::ticks() == counter && !interrupts::irqs_pending() {
            wait_for_interrupt();
        }
    }
}

/// The counter line (with the disk stream's records while it runs).
fn report_counter(counter: u64, workload: &Workload, machine: &Machine) {
    match machine.stream_written() {
        None => report::counter(&mut Serial, counter, workload.dirtied()),
        Some(records) => {
            report::counter_with_records(&mut Serial, counter, workload.dirtied(), records)
        }
    }
}

/// Set by the first panic, so a panic while reporting one stops at once.
static PANICKING: AtomicBool = AtomicBool::new(false);

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    if !PANICKING.swap(true, Ordering::Relaxed) {
        let out = &mut Serial;
        out.put_str("PANIC: ");
        match info.message().as_str() {
            Some(message) => out.put_str(message),
            None => {
                let _ = core::fmt::write(&mut FmtSerial, format_args!("{}", info.message()));
            }
        }
        if let Some(location) = info.location() {
            out.put_str(" at ");
            out.put_str(location.file());
            out.put(b':');
            out.put_u64(u64::from(location.line()));
        }
        out.put(b'\n');
    }
    power::panic()
}

/// `core::fmt` output to the serial port (panic messages with arguments).
struct FmtSerial;

impl core::fmt::Write for FmtSerial {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        Serial.put_str(s);
        Ok(())
    }
}
