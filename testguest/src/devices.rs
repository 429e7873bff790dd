//! The virtio devices named on the command line and what runs on them: the
//! network services on the first network device, the record workload, the
//! record stream or the benchmark on the first disk.

use smoltcp::time::Instant;
use testguest::config::{Config, DiskWorkload};
use testguest::disk::{Op, RecordJob, StreamJob, encode_record};
use testguest::diskbench::{BenchJob, BenchOp, DEPTH as BENCH_DEPTH};
use testguest::fmt::Sink;
use testguest::memmap::Region;
use testguest::net::{ARENA_BYTES, NetMemory, NetSettings, NetStack, mac_is_usable};
use testguest::report;
use testguest::virtio::{DEVICE_BLOCK, DEVICE_NET, MmioDevices};

use crate::hw::interrupts::{self, wait_for_interrupt};
use crate::hw::serial::Serial;
use crate::hw::virtio::{
    BLK_BENCH_MEMORY, BLK_ID_BYTES, BLK_MEMORY, BlkRequest, DeviceMemory, NET_MEMORY, PAGE,
    VirtioBlk, VirtioNet, open,
};

/// Disks the guest drives (more are reported and left alone).
pub const MAX_DISKS: usize = 4;

/// RAM set aside above the image for device rings, buffers and socket
/// buffers when the command line names virtio devices (the same whatever
/// runs on them).
pub const DEVICE_MEMORY: u64 = NET_MEMORY
    + (ARENA_BYTES as u64).next_multiple_of(PAGE)
    + MAX_DISKS as u64 * BLK_MEMORY
    + BLK_BENCH_MEMORY;

/// Frames processed per main-loop pass before ticks and the serial port
/// get their turn again.
const FRAMES_PER_POLL: usize = 8;
/// Ticks to wait for a disk's ID at start.
const GET_ID_TIMEOUT_TICKS: u64 = 300;

/// Socket slots of the network stack (a static: the stack borrows them for
/// the rest of the guest's life).
static mut NET_SOCKETS: NetMemory<'static> = NetMemory::new();

struct Net {
    dev: VirtioNet,
    stack: Option<NetStack<'static>>,
    irq: u32,
}

struct Disk {
    dev: VirtioBlk,
    irq: u32,
    job: Option<RecordJob>,
    stream: Option<StreamJob>,
    op: Option<Op>,
    bench: Option<Bench>,
}

/// The disk benchmark and the request in each of its slots.
struct Bench {
    job: BenchJob,
    slots: [Option<BenchOp>; BENCH_DEPTH],
}

/// The driven devices.
pub struct Machine {
    net: Option<Net>,
    disks: [Option<Disk>; MAX_DISKS],
}

impl Machine {
    /// No devices.
    pub const fn none() -> Self {
        Self {
            net: None,
            disks: [const { None }; MAX_DISKS],
        }
    }

    /// Initializes the devices in `devices` with memory from `area` (which
    /// must be [`DEVICE_MEMORY`] bytes, or `None` if there was no room),
    /// unmasks their interrupts and prints a line for each. The timer must
    /// run (waiting for a disk uses it).
    pub fn probe(devices: &MmioDevices, area: Option<Region>, config: &Config, now: u64) -> Self {
        let mut machine = Self::none();
        let Some(first) = devices.as_slice().first() else {
            return machine;
        };
        let Some(area) = area else {
            report::device_error(&mut Serial, first.base, "no RAM for device buffers");
            return machine;
        };
        // SAFETY: the area is RAM above the image that nothing else uses
        // (the work area starts after it).
        let mut mem = unsafe { DeviceMemory::new(area.base, area.size) };
        let mut disks = 0;
        for device in devices.as_slice() {
            let mmio = match open(device) {
                Ok(mmio) => mmio,
                Err(problem) => {
                    report::device_error(&mut Serial, device.base, problem);
                    continue;
                }
            };
            let irq = 1u32 << device.irq;
            match mmio.device_id() {
                DEVICE_NET if machine.net.is_none() => match VirtioNet::new(mmio, &mut mem) {
                    Ok(dev) => {
                        interrupts::unmask_irq(device.irq);
                        machine.net = Some(start_net(dev, irq, config, now, &mut mem));
                    }
                    Err(problem) => {
                        mmio.fail();
                        report::device_error(&mut Serial, device.base, problem);
                    }
                },
                DEVICE_BLOCK if disks < MAX_DISKS => match VirtioBlk::new(mmio, &mut mem) {
                    Ok(dev) => {
                        interrupts::unmask_irq(device.irq);
                        let disk = start_disk(dev, irq, disks, config, &mut mem);
                        machine.disks[disks] = Some(disk);
                        disks += 1;
                    }
                    Err(problem) => {
                        mmio.fail();
                        report::device_error(&mut Serial, device.base, problem);
                    }
                },
                DEVICE_NET | DEVICE_BLOCK => {
                    mmio.fail();
                    report::device_error(&mut Serial, device.base, "one device too many");
                }
                0 => report::device_error(&mut Serial, device.base, "no device"),
                _ => {
                    mmio.fail();
                    report::device_error(&mut Serial, device.base, "device type not driven");
                }
            }
        }
        machine
    }

    /// One timer tick passed (called once per tick, in order).
    pub fn tick(&mut self) {
        if let Some(disk) = &mut self.disks[0] {
            if let Some(job) = &mut disk.job {
                job.tick();
            }
            if let Some(stream) = &mut disk.stream {
                stream.tick();
            }
        }
    }

    /// Records the disk stream has written, if it runs.
    pub fn stream_written(&self) -> Option<u64> {
        match &self.disks[0] {
            Some(Disk {
                stream: Some(stream),
                ..
            }) => Some(stream.progress().0),
            _ => None,
        }
    }

    /// Does the devices' work: `now_ms` is the guest's clock, `irqs` the
    /// interrupt lines that fired, `ticked` whether ticks passed. Returns
    /// whether work is left (the caller should not halt).
    pub fn poll(&mut self, now_ms: u64, irqs: u32, ticked: bool) -> bool {
        let mut busy = false;
        if let Some(net) = &mut self.net {
            let interrupted = irqs & net.irq != 0;
            if interrupted {
                net.dev.ack_interrupt();
            }
            if let Some(stack) = &mut net.stack {
                let now = Instant::from_millis(now_ms as i64);
                for _ in 0..FRAMES_PER_POLL {
                    let more = stack.poll_frame(now, &mut net.dev);
                    net.dev.flush();
                    if !more {
                        break;
                    }
                }
                // Timers, and frames held back while the transmit queue was
                // full (a completion frees it).
                if ticked || interrupted || net.dev.tx_unblocked() {
                    stack.poll_timers(now, &mut net.dev);
                    net.dev.flush();
                }
                busy |= net.dev.can_receive();
            }
        }
        for disk in self.disks.iter_mut().flatten() {
            if irqs & disk.irq != 0 {
                disk.dev.ack_interrupt();
            }
            disk.run_job();
            disk.run_stream();
            disk.run_bench();
        }
        busy
    }

    /// The `net` command.
    pub fn report_net(&self) {
        if let Some(net) = &self.net {
            let (rx, tx) = net.dev.frames();
            let stats = net.stack.as_ref().map(|s| s.stats()).unwrap_or_default();
            report::net_stats(&mut Serial, 0, rx, tx, &stats);
            report::net_bulk_stats(&mut Serial, 0, &stats);
        }
    }

    /// The `disk` command.
    pub fn report_disk(&self) {
        match &self.disks[0] {
            Some(Disk { job: Some(job), .. }) => {
                let (written, verified) = job.progress();
                report::disk_progress(&mut Serial, 0, written, verified);
            }
            Some(Disk {
                stream: Some(stream),
                ..
            }) => {
                let (written, flushed) = stream.progress();
                report::disk_stream_progress(&mut Serial, 0, written, flushed);
            }
            Some(Disk {
                bench: Some(bench), ..
            }) => {
                let (written, read) = bench.job.progress();
                report::disk_bench_progress(&mut Serial, 0, written, read);
            }
            _ => {}
        }
    }
}

fn start_net(dev: VirtioNet, irq: u32, config: &Config, now: u64, mem: &mut DeviceMemory) -> Net {
    let mac = dev.mac();
    report::net_up(&mut Serial, 0, mac, config.ip, config.gw);
    let mut net = Net {
        dev,
        stack: None,
        irq,
    };
    let Some(ip) = config.ip else {
        return net;
    };
    if !mac_is_usable(mac) {
        Serial.put_str("net0 unusable MAC address: network off\n");
        return net;
    }
    let settings = NetSettings {
        mac,
        ip,
        gw: config.gw,
    };
    let Some(arena) = mem.alloc(ARENA_BYTES as u64) else {
        Serial.put_str("net0 out of device memory: network off\n");
        return net;
    };
    // SAFETY: ARENA_BYTES of device memory, allocated for the stack alone.
    let arena = unsafe { core::slice::from_raw_parts_mut(arena as usize as *mut u8, ARENA_BYTES) };
    let sockets = &raw mut NET_SOCKETS;
    // SAFETY: start_net runs once (for the first network device), so this
    // is the only reference ever made to NET_SOCKETS.
    let sockets = unsafe { &mut *sockets };
    net.stack = Some(NetStack::new(
        &settings,
        &mut net.dev,
        sockets,
        arena,
        Instant::from_millis(now as i64),
    ));
    net
}

fn start_disk(
    mut dev: VirtioBlk,
    irq: u32,
    index: usize,
    config: &Config,
    mem: &mut DeviceMemory,
) -> Disk {
    dev.submit(BlkRequest::GetId);
    let start = interrupts::ticks();
    let status = loop {
        if let Some(status) = dev.poll() {
            break Some(status);
        }
        if interrupts::ticks() - start > GET_ID_TIMEOUT_TICKS {
            break None;
        }
        wait_for_interrupt();
    };
    dev.ack_interrupt();
    let mut serial = [0u8; BLK_ID_BYTES];
    match status {
        Some(0) => serial.copy_from_slice(&dev.data()[..BLK_ID_BYTES]),
        Some(_) => {}
        None => {
            Serial.put_str("disk");
            Serial.put_u64(index as u64);
            Serial.put_str(" timeout: disk not used\n");
            return Disk {
                dev,
                irq,
                job: None,
                stream: None,
                op: None,
                bench: None,
            };
        }
    }
    report::disk_info(&mut Serial, index, dev.capacity, &serial, dev.read_only);
    let workload = if index == 0 {
        config.disk_workload
    } else {
        DiskWorkload::Off
    };
    let job = (workload == DiskWorkload::Records).then(|| {
        RecordJob::new(
            config.disk_records,
            dev.capacity,
            config.disk_verify,
            dev.read_only,
            dev.flush,
            config.disk_rate,
        )
    });
    let stream = (workload == DiskWorkload::Stream).then(|| {
        let stream = StreamJob::new(
            dev.capacity,
            config.disk_flush_every,
            dev.read_only,
            dev.flush,
            config.disk_rate,
        );
        report::disk_stream_start(
            &mut Serial,
            stream.sectors(),
            config.disk_rate,
            stream.flush_every(),
        );
        stream
    });
    let mut bench = None;
    if workload == DiskWorkload::Bench {
        match dev.enable_bench(mem) {
            Ok(()) => {
                let mut job = BenchJob::new(
                    config.disk_bench_mb,
                    dev.capacity,
                    dev.flush,
                    BENCH_DEPTH,
                    interrupts::ticks(),
                );
                report::disk_bench(&mut Serial, &job.start_line());
                job.restart_clock(interrupts::ticks());
                bench = Some(Bench {
                    job,
                    slots: [None; BENCH_DEPTH],
                });
            }
            Err(problem) => {
                Serial.put_str("disk0 benchmark off: ");
                Serial.put_str(problem);
                Serial.put(b'\n');
            }
        }
    }
    Disk {
        dev,
        irq,
        job,
        stream,
        op: None,
        bench,
    }
}

impl Disk {
    /// Takes the finished benchmark requests, ends phases, and fills the
    /// free slots with the next requests (one notification for all).
    fn run_bench(&mut self) {
        let Some(bench) = &mut self.bench else {
            return;
        };
        if bench.job.is_done() {
            return;
        }
        for _ in 0..BENCH_DEPTH {
            let Some((slot, status, stamp)) = self.dev.pop_bench() else {
                break;
            };
            let Some(op) = bench.slots.get_mut(slot).and_then(Option::take) else {
                continue;
            };
            if let Some(line) = bench.job.complete(op, status, stamp) {
                report::disk_bench(&mut Serial, &line);
            }
        }
        // Bounded: at most the write, flush and read phases end.
        for _ in 0..3 {
            match bench.job.settle(interrupts::ticks()) {
                Some(line) => {
                    report::disk_bench(&mut Serial, &line);
                    bench.job.restart_clock(interrupts::ticks());
                }
                None => break,
            }
        }
        let mut queued = false;
        for (slot, in_use) in bench.slots.iter_mut().enumerate() {
            if in_use.is_some() {
                continue;
            }
            let Some(op) = bench.job.next_op() else {
                break;
            };
            self.dev.submit_bench(slot, op);
            *in_use = Some(op);
            queued = true;
        }
        if queued {
            self.dev.kick();
        }
    }

    /// Issues `op` (one request in flight at a time).
    fn submit(&mut self, op: Op) {
        let request = match op {
            Op::Write(k) => {
                encode_record(k, self.dev.data());
                BlkRequest::Write(k)
            }
            Op::Append { record, sector } => {
                encode_record(record, self.dev.data());
                BlkRequest::Write(sector)
            }
            Op::Flush => BlkRequest::Flush,
            Op::Read(k) => BlkRequest::Read(k),
        };
        self.dev.submit(request);
        self.op = Some(op);
    }

    /// Takes the stream's finished request and issues its next one.
    fn run_stream(&mut self) {
        let Some(stream) = &mut self.stream else {
            return;
        };
        if let Some(op) = self.op {
            let Some(status) = self.dev.poll() else {
                return;
            };
            self.op = None;
            if let Some(outcome) = stream.complete(op, status) {
                report::disk_outcome(&mut Serial, &outcome);
            }
        }
        if let Some(op) = stream.next_op() {
            self.submit(op);
        }
    }

    /// Takes a finished request and issues the next one of the workload.
    fn run_job(&mut self) {
        let Some(job) = &mut self.job else {
            return;
        };
        if let Some(op) = self.op {
            let Some(status) = self.dev.poll() else {
                return;
            };
            self.op = None;
            if let Some(outcome) = job.complete(op, status, self.dev.data()) {
                report::disk_outcome(&mut Serial, &outcome);
            }
        }
        if job.is_done() {
            return;
        }
        match job.next_op() {
            Some(op) => {
                self.submit(op);
            }
            None => {
                if let Some(outcome) = job.settle() {
                    report::disk_outcome(&mut Serial, &outcome);
                }
            }
        }
    }
}
