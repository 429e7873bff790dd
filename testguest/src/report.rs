//! The lines the guest prints. Each ends in a single `\n`.

use crate::config::Config;
use crate::fmt::Sink;
use crate::memmap::Region;

/// The ready banner (without the line end).
pub const BANNER: &str = "TWINVM TESTGUEST READY";

/// `TWINVM TESTGUEST READY`
pub fn banner(out: &mut impl Sink) {
    out.put_str(BANNER);
    out.put(b'\n');
}

/// `config dirty_rate=<n> dirty_area=<bytes> dirty_base=<hex> poweroff_after=<n> measure_ips=<0|1>`
pub fn config(out: &mut impl Sink, config: &Config, area: &Region) {
    out.put_str("config dirty_rate=");
    out.put_u64(config.dirty_rate);
    out.put_str(" dirty_area=");
    out.put_u64(area.size);
    out.put_str(" dirty_base=");
    out.put_hex(area.base);
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

/// `ips=<n>`
pub fn ips(out: &mut impl Sink, ips: u64) {
    out.put_str("ips=");
    out.put_u64(ips);
    out.put(b'\n');
}

/// `unknown command: <line>` (non-printable bytes shown as `?`).
pub fn unknown_command(out: &mut impl Sink, line: &[u8]) {
    out.put_str("unknown command: ");
    out.put_printable(line);
    out.put(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fmt::testing::VecSink;

    #[test]
    fn lines() {
        let mut s = VecSink::default();
        banner(&mut s);
        let cfg = Config {
            dirty_rate: 1000,
            dirty_mb: 16,
            poweroff_after: 3,
            measure_ips: true,
        };
        config(
            &mut s,
            &cfg,
            &Region {
                base: 0x11_3000,
                size: 16 << 20,
            },
        );
        counter(&mut s, 500, 5000);
        ips(&mut s, 1_700_000);
        unknown_command(&mut s, b"fo\x07o");
        assert_eq!(
            s.text(),
            "TWINVM TESTGUEST READY\n\
             config dirty_rate=1000 dirty_area=16777216 dirty_base=0x113000 poweroff_after=3 measure_ips=1\n\
             counter=500 dirtied=5000\n\
             ips=1700000\n\
             unknown command: fo?o\n"
        );
    }
}
