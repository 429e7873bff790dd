//! The lines the guest prints. Each ends in a single `\n`.

use crate::config::{Config, Ipv4Cidr};
use crate::disk::Outcome;
use crate::diskbench::{BenchLine, REQUEST_BYTES};
use crate::fmt::Sink;
use crate::memmap::WorkRanges;
use crate::net::NetStats;

/// The ready banner (without the line end).
pub const BANNER: &str = "TWINVM TESTGUEST READY";

/// `TWINVM TESTGUEST READY`
pub fn banner(out: &mut impl Sink) {
    out.put_str(BANNER);
    out.put(b'\n');
}

/// `config dirty_rate=<n> dirty_area=<bytes> dirty_base=<hex> dirty_end=<hex> poweroff_after=<n> measure_ips=<0|1>`
/// (`dirty_area` counts the bytes of all the work area's ranges, which lie
/// between `dirty_base` and `dirty_end`)
pub fn config(out: &mut impl Sink, config: &Config, area: &WorkRanges) {
    out.put_str("config dirty_rate=");
    out.put_u64(config.dirty_rate);
    out.put_str(" dirty_area=");
    out.put_u64(area.size());
    out.put_str(" dirty_base=");
    out.put_hex(area.base());
    out.put_str(" dirty_end=");
    out.put_hex(area.end());
    out.put_str(" poweroff_after=");
    out.put_u64(config.poweroff_after);
    out.put_str(" measure_ips=");
    out.put_u64(u64::from(config.measure_ips));
    out.put(b'\n');
}

/// `counter=<n> dirtied=<n>`
pub fn counter(out: &mut impl Sink, counter: u64, dirtied: u64) {
    out.put_str("counter=");
    out.put_u64(counter);
    out.put_str(" dirtied=");
    out.put_u64(dirtied);
    out.put(b'\n');
}

/// `counter=<n> dirtied=<n> records=<n>`: the counter line while the disk
/// stream runs (`records`: records it has written).
pub fn counter_with_records(out: &mut impl Sink, counter: u64, dirtied: u64, records: u64) {
    out.put_str("counter=");
    out.put_u64(counter);
    out.put_str(" dirtied=");
    out.put_u64(dirtied);
    out.put_str(" records=");
    out.put_u64(records);
    out.put(b'\n');
}

/// `ips=<n>`
pub fn ips(out: &mut impl Sink, ips: u64) {
    out.put_str("ips=");
    out.put_u64(ips);
    out.put(b'\n');
}

/// `dirty_rate=<n>`: the answer to a `dirty <n>` command.
pub fn dirty_rate(out: &mut impl Sink, rate: u64) {
    out.put_str("dirty_rate=");
    out.put_u64(rate);
    out.put(b'\n');
}

/// `unknown command: <line>` (non-printable bytes shown as `?`).
pub fn unknown_command(out: &mut impl Sink, line: &[u8]) {
    out.put_str("unknown command: ");
    out.put_printable(line);
    out.put(b'\n');
}

/// Two lowercase hex digits.
fn put_hex_byte(out: &mut impl Sink, b: u8) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    out.put(DIGITS[usize::from(b >> 4)]);
    out.put(DIGITS[usize::from(b & 0xf)]);
}

fn put_ipv4(out: &mut impl Sink, addr: [u8; 4]) {
    for (i, b) in addr.iter().enumerate() {
        if i > 0 {
            out.put(b'.');
        }
        out.put_u64(u64::from(*b));
    }
}

/// `net<i> mac=<xx:xx:xx:xx:xx:xx> ip=<a.b.c.d/prefix|none>[ gw=<a.b.c.d>]`
pub fn net_up(
    out: &mut impl Sink,
    index: usize,
    mac: [u8; 6],
    ip: Option<Ipv4Cidr>,
    gw: Option<[u8; 4]>,
) {
    out.put_str("net");
    out.put_u64(index as u64);
    out.put_str(" mac=");
    for (i, b) in mac.iter().enumerate() {
        if i > 0 {
            out.put(b':');
        }
        put_hex_byte(out, *b);
    }
    out.put_str(" ip=");
    match ip {
        Some(ip) => {
            put_ipv4(out, ip.addr);
            out.put(b'/');
            out.put_u64(u64::from(ip.prefix));
        }
        None => out.put_str("none"),
    }
    if let (Some(gw), Some(_)) = (gw, ip) {
        out.put_str(" gw=");
        put_ipv4(out, gw);
    }
    out.put(b'\n');
}

/// `net<i> rx=<frames> tx=<frames> echo_bytes=<n> tcp_requests=<n> udp_requests=<n>`
pub fn net_stats(out: &mut impl Sink, index: usize, rx: u64, tx: u64, stats: &NetStats) {
    out.put_str("net");
    out.put_u64(index as u64);
    out.put_str(" rx=");
    out.put_u64(rx);
    out.put_str(" tx=");
    out.put_u64(tx);
    out.put_str(" echo_bytes=");
    out.put_u64(stats.echo_bytes);
    out.put_str(" tcp_requests=");
    out.put_u64(stats.tcp_requests);
    out.put_str(" udp_requests=");
    out.put_u64(stats.udp_requests);
    out.put(b'\n');
}

/// `disk<i> capacity=<sectors> serial=<id> ro=<0|1>`: the ID up to its
/// first NUL, bytes other than printable ASCII (and space) shown as `?`,
/// `-` if empty or unavailable.
pub fn disk_info(out: &mut impl Sink, index: usize, capacity: u64, serial: &[u8], ro: bool) {
    out.put_str("disk");
    out.put_u64(index as u64);
    out.put_str(" capacity=");
    out.put_u64(capacity);
    out.put_str(" serial=");
    let end = serial.iter().position(|&b| b == 0).unwrap_or(serial.len());
    if end == 0 {
        out.put(b'-');
    } else {
        for &b in &serial[..end] {
            out.put(if b.is_ascii_graphic() { b } else { b'?' });
        }
    }
    out.put_str(" ro=");
    out.put_u64(u64::from(ro));
    out.put(b'\n');
}

/// The result lines of the disk record workload.
pub fn disk_outcome(out: &mut impl Sink, outcome: &Outcome) {
    match *outcome {
        Outcome::Wrote(n) => {
            out.put_str("disk wrote ");
            out.put_u64(n);
            out.put_str(" records\n");
        }
        Outcome::WriteRefused => out.put_str("disk write refused (read-only)\n"),
        Outcome::Verified(n) => {
            out.put_str("disk verified ");
            out.put_u64(n);
            out.put_str(" records\n");
        }
        Outcome::IoError { record, op, status } => {
            out.put_str("disk error at record ");
            out.put_u64(record);
            out.put_str(": ");
            out.put_str(op);
            out.put_str(" status=");
            out.put_u64(u64::from(status));
            out.put(b'\n');
        }
        Outcome::BadRecord { record, error } => {
            out.put_str("disk error at record ");
            out.put_u64(record);
            out.put_str(": ");
            out.put_str(error.describe());
            out.put(b'\n');
        }
    }
}

/// `disk<i> records written=<n> verified=<n>` (the `disk` command).
pub fn disk_progress(out: &mut impl Sink, index: usize, written: u64, verified: u64) {
    out.put_str("disk");
    out.put_u64(index as u64);
    out.put_str(" records written=");
    out.put_u64(written);
    out.put_str(" verified=");
    out.put_u64(verified);
    out.put(b'\n');
}

/// `disk stream start sectors=<n> rate=<n> flush_every=<n>`
pub fn disk_stream_start(out: &mut impl Sink, sectors: u64, rate: u64, flush_every: u64) {
    out.put_str("disk stream start sectors=");
    out.put_u64(sectors);
    out.put_str(" rate=");
    out.put_u64(rate);
    out.put_str(" flush_every=");
    out.put_u64(flush_every);
    out.put(b'\n');
}

/// `disk<i> stream written=<n> flushed=<n>` (the `disk` command while the
/// stream runs).
pub fn disk_stream_progress(out: &mut impl Sink, index: usize, written: u64, flushed: u64) {
    out.put_str("disk");
    out.put_u64(index as u64);
    out.put_str(" stream written=");
    out.put_u64(written);
    out.put_str(" flushed=");
    out.put_u64(flushed);
    out.put(b'\n');
}

/// `net<i> discard_bytes=<n> source_bytes=<n>` (the `net` command's second
/// line).
pub fn net_bulk_stats(out: &mut impl Sink, index: usize, stats: &NetStats) {
    out.put_str("net");
    out.put_u64(index as u64);
    out.put_str(" discard_bytes=");
    out.put_u64(stats.discard_bytes);
    out.put_str(" source_bytes=");
    out.put_u64(stats.source_bytes);
    out.put(b'\n');
}

fn put_bytes_requests(out: &mut impl Sink, requests: u64) {
    out.put_str(" bytes=");
    out.put_u64(requests.saturating_mul(REQUEST_BYTES));
    out.put_str(" requests=");
    out.put_u64(requests);
}

/// The lines of the disk benchmark.
pub fn disk_bench(out: &mut impl Sink, line: &BenchLine) {
    out.put_str("disk bench ");
    match *line {
        BenchLine::Start { requests, depth } => {
            out.put_str("start");
            put_bytes_requests(out, requests);
            out.put_str(" request_bytes=");
            out.put_u64(REQUEST_BYTES);
            out.put_str(" in_flight=");
            out.put_u64(depth as u64);
        }
        BenchLine::Write { requests, ticks } | BenchLine::Read { requests, ticks } => {
            out.put_str(if matches!(line, BenchLine::Write { .. }) {
                "write"
            } else {
                "read"
            });
            put_bytes_requests(out, requests);
            out.put_str(" ticks=");
            out.put_u64(ticks);
        }
        BenchLine::Flush { ticks } => {
            out.put_str("flush ticks=");
            out.put_u64(ticks);
        }
        BenchLine::Failed {
            request,
            op,
            status,
        } => {
            out.put_str("error at request ");
            out.put_u64(request);
            out.put_str(": ");
            out.put_str(op);
            out.put_str(" status=");
            out.put_u64(u64::from(status));
        }
        BenchLine::WrongData { request } => {
            out.put_str("error at request ");
            out.put_u64(request);
            out.put_str(": read wrong data");
        }
    }
    out.put(b'\n');
}

/// `disk<i> bench written=<requests> read=<requests>` (the `disk` command
/// during the benchmark).
pub fn disk_bench_progress(out: &mut impl Sink, index: usize, written: u64, read: u64) {
    out.put_str("disk");
    out.put_u64(index as u64);
    out.put_str(" bench written=");
    out.put_u64(written);
    out.put_str(" read=");
    out.put_u64(read);
    out.put(b'\n');
}

/// `virtio at <base>: <problem>` (a device that is not driven).
pub fn device_error(out: &mut impl Sink, base: u64, problem: &str) {
    out.put_str("virtio at ");
    out.put_hex(base);
    out.put_str(": ");
    out.put_str(problem);
    out.put(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bootparams::E820Entry;
    use crate::fmt::testing::VecSink;
    use crate::memmap::work_ranges;

    #[test]
    fn lines() {
        let mut s = VecSink::default();
        banner(&mut s);
        let cfg = Config {
            dirty_rate: 1000,
            dirty_mb: 16,
            poweroff_after: 3,
            measure_ips: true,
            ..Config::default()
        };
        let ram = [
            E820Entry {
                addr: 0x10_0000,
                size: 0xbff0_0000,
                kind: 1,
            },
            E820Entry {
                addr: 0x1_0000_0000,
                size: 0x4000_0000,
                kind: 1,
            },
        ];
        config(
            &mut s,
            &cfg,
            &work_ranges(ram.into_iter(), 0x11_3000, 16 << 20),
        );
        config(
            &mut s,
            &cfg,
            &work_ranges(ram.into_iter(), 0x11_3000, u64::MAX),
        );
        config(&mut s, &cfg, &WorkRanges::default());
        counter(&mut s, 500, 5000);
        counter_with_records(&mut s, 600, 6000, 42);
        ips(&mut s, 1_700_000);
        unknown_command(&mut s, b"fo\x07o");
        assert_eq!(
            s.text(),
            "TWINVM TESTGUEST READY\n\
             config dirty_rate=1000 dirty_area=16777216 dirty_base=0x113000 dirty_end=0x1113000 poweroff_after=3 measure_ips=1\n\
             config dirty_rate=1000 dirty_area=4293840896 dirty_base=0x113000 dirty_end=0x140000000 poweroff_after=3 measure_ips=1\n\
             config dirty_rate=1000 dirty_area=0 dirty_base=0x0 dirty_end=0x0 poweroff_after=3 measure_ips=1\n\
             counter=500 dirtied=5000\n\
             counter=600 dirtied=6000 records=42\n\
             ips=1700000\n\
             unknown command: fo?o\n"
        );
    }

    #[test]
    fn device_lines() {
        use crate::disk::RecordError;
        let mut s = VecSink::default();
        let ip = Some(Ipv4Cidr {
            addr: [10, 0, 0, 2],
            prefix: 24,
        });
        net_up(&mut s, 0, [0x52, 0x54, 0, 0xab, 0x0c, 0xff], ip, None);
        net_up(&mut s, 1, [2, 0, 0, 0, 0, 1], ip, Some([10, 0, 0, 1]));
        net_up(&mut s, 0, [2, 0, 0, 0, 0, 1], None, Some([10, 0, 0, 1]));
        net_stats(
            &mut s,
            0,
            10,
            12,
            &NetStats {
                echo_bytes: 5,
                tcp_requests: 6,
                udp_requests: 7,
                discard_bytes: 8,
                source_bytes: 9,
            },
        );
        net_bulk_stats(
            &mut s,
            0,
            &NetStats {
                discard_bytes: 8,
                source_bytes: 9,
                ..NetStats::default()
            },
        );
        disk_info(&mut s, 0, 2048, b"twinvm-disk0\0\0\0\0\0\0\0\0", false);
        disk_info(&mut s, 1, 8, b"a b\x01", true);
        disk_info(&mut s, 2, 8, b"\0abc", true);
        for o in [
            Outcome::Wrote(100),
            Outcome::WriteRefused,
            Outcome::Verified(100),
            Outcome::IoError {
                record: 3,
                op: "read",
                status: 1,
            },
            Outcome::BadRecord {
                record: 4,
                error: RecordError::BadChecksum,
            },
        ] {
            disk_outcome(&mut s, &o);
        }
        disk_progress(&mut s, 0, 10, 0);
        disk_stream_start(&mut s, 2048, 20, 16);
        disk_stream_progress(&mut s, 0, 100, 96);
        for line in [
            BenchLine::Start {
                requests: 256,
                depth: 8,
            },
            BenchLine::Write {
                requests: 256,
                ticks: 70,
            },
            BenchLine::Flush { ticks: 1 },
            BenchLine::Read {
                requests: 256,
                ticks: 65,
            },
            BenchLine::Failed {
                request: 9,
                op: "read",
                status: 2,
            },
            BenchLine::WrongData { request: 3 },
        ] {
            disk_bench(&mut s, &line);
        }
        disk_bench_progress(&mut s, 0, 256, 12);
        device_error(&mut s, 0xd000_1000, "not virtio-mmio version 2");
        assert_eq!(
            s.text(),
            "net0 mac=52:54:00:ab:0c:ff ip=10.0.0.2/24\n\
             net1 mac=02:00:00:00:00:01 ip=10.0.0.2/24 gw=10.0.0.1\n\
             net0 mac=02:00:00:00:00:01 ip=none\n\
             net0 rx=10 tx=12 echo_bytes=5 tcp_requests=6 udp_requests=7\n\
             net0 discard_bytes=8 source_bytes=9\n\
             disk0 capacity=2048 serial=twinvm-disk0 ro=0\n\
             disk1 capacity=8 serial=a?b? ro=1\n\
             disk2 capacity=8 serial=- ro=1\n\
             disk wrote 100 records\n\
             disk write refused (read-only)\n\
             disk verified 100 records\n\
             disk error at record 3: read status=1\n\
             disk error at record 4: bad checksum\n\
             disk0 records written=10 verified=0\n\
             disk stream start sectors=2048 rate=20 flush_every=16\n\
             disk0 stream written=100 flushed=96\n\
             disk bench start bytes=1048576 requests=256 request_bytes=4096 in_flight=8\n\
             disk bench write bytes=1048576 requests=256 ticks=70\n\
             disk bench flush ticks=1\n\
             disk bench read bytes=1048576 requests=256 ticks=65\n\
             disk bench error at request 9: read status=2\n\
             disk bench error at request 3: read wrong data\n\
             disk0 bench written=256 read=12\n\
             virtio at 0xd0001000: not virtio-mmio version 2\n"
        );
    }
}
