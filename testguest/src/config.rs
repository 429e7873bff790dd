//! The guest's settings, read from the kernel command line.
//!
//! The command line is space-separated `key=value` words. Words the guest
//! does not know are ignored (twinvm's own defaults share the line), and so is
//! a known key whose value is not valid for it (numbers are decimal, addresses
//! dotted quads). The last valid value of a key wins.

/// Settings of the test guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Pages per second to dirty (0: idle).
    pub dirty_rate: u64,
    /// Requested size of the work area, in MiB (capped to free RAM later);
    /// [`DIRTY_MB_ALL`]: all of it.
    pub dirty_mb: u64,
    /// Power off after this many seconds (0: never).
    pub poweroff_after: u64,
    /// Measure and print the instruction rate after the banner.
    pub measure_ips: bool,
    /// The guest's IPv4 address and prefix length (`ip=`); no network
    /// without it.
    pub ip: Option<Ipv4Cidr>,
    /// Default gateway (`gw=`).
    pub gw: Option<[u8; 4]>,
    /// The workload on the first disk (`disk=records` or `disk=bench`).
    pub disk_workload: DiskWorkload,
    /// Records the disk workload writes (`disk_records=`).
    pub disk_records: u64,
    /// Read the records back and verify them (`disk_verify=1`).
    pub disk_verify: bool,
    /// Records written per second (`disk_rate=`, 0: as fast as possible).
    pub disk_rate: u64,
    /// The stream flushes after every this many records
    /// (`disk_flush_every=`, 0: never).
    pub disk_flush_every: u64,
    /// MiB the disk benchmark writes and reads back (`disk_bench_mb=`).
    pub disk_bench_mb: u64,
}

/// What runs on the first disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DiskWorkload {
    /// Nothing (the disk is only identified).
    #[default]
    Off,
    /// The record workload (`disk=records`).
    Records,
    /// The throughput benchmark (`disk=bench`).
    Bench,
    /// Records appended without end (`disk=stream`).
    Stream,
}

/// An IPv4 address with a prefix length (0..=32).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Cidr {
    pub addr: [u8; 4],
    pub prefix: u8,
}

/// `dirty_mb` when it is not given (or given as `all`): all RAM above the
/// guest's own memory.
pub const DIRTY_MB_ALL: u64 = u64::MAX;

/// Records the disk workload writes when `disk_records` is not given.
pub const DEFAULT_DISK_RECORDS: u64 = 64;
/// MiB the disk benchmark moves when `disk_bench_mb` is not given.
pub const DEFAULT_DISK_BENCH_MB: u64 = 4;

impl Default for Config {
    fn default() -> Self {
        Self {
            dirty_rate: 0,
            dirty_mb: DIRTY_MB_ALL,
            poweroff_after: 0,
            measure_ips: false,
            ip: None,
            gw: None,
            disk_workload: DiskWorkload::Off,
            disk_records: DEFAULT_DISK_RECORDS,
            disk_verify: false,
            disk_rate: 0,
            disk_flush_every: crate::disk::DEFAULT_FLUSH_EVERY,
            disk_bench_mb: DEFAULT_DISK_BENCH_MB,
        }
    }
}

impl Config {
    /// Parses a command line.
    pub fn parse(cmdline: &[u8]) -> Self {
        let mut config = Self::default();
        for word in cmdline.split(|b| b.is_ascii_whitespace()) {
            let Some(eq) = word.iter().position(|&b| b == b'=') else {
                continue;
            };
            let (key, value) = (&word[..eq], &word[eq + 1..]);
            let number = parse_decimal(value);
            match (key, number) {
                (b"dirty_rate", Some(n)) => config.dirty_rate = n,
                (b"dirty_mb", Some(n)) => config.dirty_mb = n,
                (b"dirty_mb", None) if value == b"all" => config.dirty_mb = DIRTY_MB_ALL,
                (b"poweroff_after", Some(n)) => config.poweroff_after = n,
                (b"measure_ips", Some(n)) => config.measure_ips = n != 0,
                (b"disk_records", Some(n)) => config.disk_records = n,
                (b"disk_verify", Some(n)) => config.disk_verify = n != 0,
                (b"disk_rate", Some(n)) => config.disk_rate = n,
                (b"disk_flush_every", Some(n)) => config.disk_flush_every = n,
                (b"disk_bench_mb", Some(n)) => config.disk_bench_mb = n,
                (b"disk", _) => {
                    config.disk_workload = match value {
                        b"records" => DiskWorkload::Records,
                        b"bench" => DiskWorkload::Bench,
                        b"stream" => DiskWorkload::Stream,
                        _ => DiskWorkload::Off,
                    }
                }
                (b"ip", _) => {
                    if let Some(cidr) = parse_cidr(value) {
                        config.ip = Some(cidr);
                    }
                }
                (b"gw", _) => {
                    if let Some(gw) = parse_ipv4(value) {
                        config.gw = Some(gw);
                    }
                }
                _ => {}
            }
        }
        config
    }

    /// Requested work area size in bytes (`u64::MAX`: all free RAM).
    pub fn dirty_bytes(&self) -> u64 {
        self.dirty_mb.saturating_mul(1 << 20)
    }
}

/// Parses a dotted-quad IPv4 address (`10.0.0.2`).
pub fn parse_ipv4(s: &[u8]) -> Option<[u8; 4]> {
    let mut addr = [0u8; 4];
    let mut parts = s.split(|&b| b == b'.');
    for byte in &mut addr {
        let part = parts.next()?;
        if part.len() > 3 {
            return None;
        }
        *byte = u8::try_from(parse_decimal(part)?).ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(addr)
}

/// Parses `a.b.c.d/prefix` (prefix 0..=32); without `/prefix` the prefix is
/// 24.
pub fn parse_cidr(s: &[u8]) -> Option<Ipv4Cidr> {
    let (addr, prefix) = match s.iter().position(|&b| b == b'/') {
        Some(slash) => {
            let prefix = &s[slash + 1..];
            if prefix.len() > 2 {
                return None;
            }
            (&s[..slash], parse_decimal(prefix)?)
        }
        None => (s, 24),
    };
    if prefix > 32 {
        return None;
    }
    Some(Ipv4Cidr {
        addr: parse_ipv4(addr)?,
        prefix: prefix as u8,
    })
}

/// Parses a non-empty unsigned decimal number; `None` on anything else,
/// including overflow.
pub fn parse_decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for &b in s {
        if !b.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_on_empty_line() {
        assert_eq!(Config::parse(b""), Config::default());
        assert_eq!(Config::default().dirty_mb, DIRTY_MB_ALL);
        assert_eq!(Config::default().dirty_bytes(), u64::MAX);
        assert_eq!(Config::parse(b"dirty_mb=16").dirty_bytes(), 16 << 20);
        assert_eq!(
            Config::parse(b"dirty_mb=16 dirty_mb=all").dirty_mb,
            DIRTY_MB_ALL
        );
        assert_eq!(Config::parse(b"dirty_mb=16 dirty_mb=x").dirty_mb, 16);
    }

    #[test]
    fn reads_all_keys_among_unknown_words() {
        let c = Config::parse(
            b"console=ttyS0 dirty_rate=1000 reboot=k dirty_mb=4 panic=1 poweroff_after=3 measure_ips=1 quiet",
        );
        assert_eq!(
            c,
            Config {
                dirty_rate: 1000,
                dirty_mb: 4,
                poweroff_after: 3,
                measure_ips: true,
                ..Config::default()
            }
        );
    }

    #[test]
    fn tabs_newlines_and_repeated_spaces() {
        let c = Config::parse(b"  dirty_rate=5\t\tdirty_mb=1\n measure_ips=0 ");
        assert_eq!(c.dirty_rate, 5);
        assert_eq!(c.dirty_mb, 1);
        assert!(!c.measure_ips);
    }

    #[test]
    fn bad_values_keep_the_previous_value() {
        let c = Config::parse(
            b"dirty_rate=7 dirty_rate=x dirty_rate= dirty_rate=-1 dirty_rate=99999999999999999999999",
        );
        assert_eq!(c.dirty_rate, 7);
        let c = Config::parse(b"dirty_rate=1 dirty_rate=2");
        assert_eq!(c.dirty_rate, 2);
    }

    #[test]
    fn keys_must_match_exactly() {
        let c = Config::parse(b"xdirty_rate=5 dirty_rate2=6 DIRTY_RATE=7 dirty_rate =8 =9");
        assert_eq!(c, Config::default());
    }

    #[test]
    fn measure_ips_any_nonzero() {
        assert!(Config::parse(b"measure_ips=2").measure_ips);
    }

    #[test]
    fn huge_dirty_mb_saturates() {
        let c = Config::parse(b"dirty_mb=18446744073709551615");
        assert_eq!(c.dirty_bytes(), u64::MAX);
    }

    #[test]
    fn network_and_disk_keys() {
        let c = Config::parse(
            b"virtio_mmio.device=4K@0xd0000000:5 ip=10.0.0.2/24 gw=10.0.0.1 disk=records disk_records=100 disk_verify=1 disk_rate=50",
        );
        assert_eq!(
            c.ip,
            Some(Ipv4Cidr {
                addr: [10, 0, 0, 2],
                prefix: 24
            })
        );
        assert_eq!(c.gw, Some([10, 0, 0, 1]));
        assert_eq!(c.disk_workload, DiskWorkload::Records);
        assert_eq!(
            (c.disk_records, c.disk_verify, c.disk_rate),
            (100, true, 50)
        );

        let d = Config::default();
        assert_eq!(
            (d.ip, d.gw, d.disk_workload),
            (None, None, DiskWorkload::Off)
        );
        assert_eq!((d.disk_records, d.disk_verify, d.disk_rate), (64, false, 0));
        assert_eq!(d.disk_bench_mb, 4);

        assert_eq!(d.disk_flush_every, 16);
        let st = Config::parse(b"disk=stream disk_rate=20 disk_flush_every=5");
        assert_eq!(
            (st.disk_workload, st.disk_rate, st.disk_flush_every),
            (DiskWorkload::Stream, 20, 5)
        );

        let b = Config::parse(b"disk=bench disk_bench_mb=16 disk_bench_mb=x");
        assert_eq!(
            (b.disk_workload, b.disk_bench_mb),
            (DiskWorkload::Bench, 16)
        );

        // Bad values keep the previous one; disk= other than records turns
        // the workload off.
        let c = Config::parse(b"ip=10.0.0.2 ip=10.0.0.300/24 gw=1.2.3 disk=records disk=none");
        assert_eq!(c.ip.unwrap().prefix, 24);
        assert_eq!(c.gw, None);
        assert_eq!(c.disk_workload, DiskWorkload::Off);
    }

    #[test]
    fn ipv4_parser() {
        assert_eq!(parse_ipv4(b"10.0.0.2"), Some([10, 0, 0, 2]));
        assert_eq!(parse_ipv4(b"255.255.255.255"), Some([255; 4]));
        for bad in [
            &b""[..],
            b"1.2.3",
            b"1.2.3.4.5",
            b"1.2.3.256",
            b"1..2.3",
            b"a.b.c.d",
            b"1.2.3.0004",
            b"1.2.3.4.",
        ] {
            assert_eq!(parse_ipv4(bad), None, "{}", String::from_utf8_lossy(bad));
        }
        assert_eq!(
            parse_cidr(b"192.168.1.7/16"),
            Some(Ipv4Cidr {
                addr: [192, 168, 1, 7],
                prefix: 16
            })
        );
        assert_eq!(parse_cidr(b"1.2.3.4/32").unwrap().prefix, 32);
        assert_eq!(parse_cidr(b"1.2.3.4/0").unwrap().prefix, 0);
        for bad in [
            &b"1.2.3.4/33"[..],
            b"1.2.3.4/",
            b"1.2.3.4/x",
            b"/24",
            b"1.2.3.4/024",
        ] {
            assert_eq!(parse_cidr(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn decimal_parser() {
        assert_eq!(parse_decimal(b"0"), Some(0));
        assert_eq!(parse_decimal(b"0042"), Some(42));
        assert_eq!(parse_decimal(b"18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_decimal(b"18446744073709551616"), None);
        assert_eq!(parse_decimal(b""), None);
        assert_eq!(parse_decimal(b"1k"), None);
        assert_eq!(parse_decimal(b"+1"), None);
    }
}
