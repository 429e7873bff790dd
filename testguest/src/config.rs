//! The guest's settings, read from the kernel command line.
//!
//! The command line is space-separated `key=value` words. Words the guest
//! does not know are ignored (twinvm's own defaults share the line), and so is
//! a known key whose value is not a decimal number. The last valid value of a
//! key wins.

/// Settings of the test guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Pages per second to dirty (0: idle).
    pub dirty_rate: u64,
    /// Requested size of the work area, in MiB (capped to free RAM later).
    pub dirty_mb: u64,
    /// Power off after this many seconds (0: never).
    pub poweroff_after: u64,
    /// Measure and print the instruction rate after the banner.
    pub measure_ips: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            dirty_rate: 0,
            dirty_mb: 16,
            poweroff_after: 0,
            measure_ips: false,
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
            let Some(value) = parse_decimal(value) else {
                continue;
            };
            match key {
                b"dirty_rate" => config.dirty_rate = value,
                b"dirty_mb" => config.dirty_mb = value,
                b"poweroff_after" => config.poweroff_after = value,
                b"measure_ips" => config.measure_ips = value != 0,
                _ => {}
            }
        }
        config
    }

    /// Requested work area size in bytes.
    pub fn dirty_bytes(&self) -> u64 {
        self.dirty_mb.saturating_mul(1 << 20)
    }
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
        assert_eq!(Config::default().dirty_mb, 16);
        assert_eq!(Config::default().dirty_bytes(), 16 << 20);
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
                measure_ips: true
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
