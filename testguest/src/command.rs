//! Commands read on the serial port, one per line.

/// Longest command line kept; longer lines are reported as unknown.
pub const LINE_MAX: usize = 64;

/// A command from the serial port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Power the VM off.
    Poweroff,
    /// Reboot the VM.
    Reboot,
    /// Print the counter line now.
    Counter,
    /// Panic (tests the crash path).
    Panic,
    /// Print the network counters.
    Net,
    /// Print the disk workload's progress.
    Disk,
    /// `dirty <n>`: set the memory-dirtying rate to n pages per second.
    DirtyRate(u64),
    /// Anything else.
    Unknown,
}

impl Command {
    /// Parses one line (surrounding whitespace is ignored). `None` for an
    /// empty line.
    pub fn parse(line: &[u8]) -> Option<Self> {
        let line = line.trim_ascii();
        Some(match line {
            b"" => return None,
            b"poweroff" => Self::Poweroff,
            b"reboot" => Self::Reboot,
            b"counter" => Self::Counter,
            b"panic" => Self::Panic,
            b"net" => Self::Net,
            b"disk" => Self::Disk,
            _ => match line.strip_prefix(b"dirty ").and_then(parse_u64) {
                Some(rate) => Self::DirtyRate(rate),
                None => Self::Unknown,
            },
        })
    }
}

/// A decimal number of 1 to 19 digits (so it cannot overflow).
fn parse_u64(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(
        digits
            .iter()
            .fold(0u64, |n, d| n * 10 + u64::from(d - b'0')),
    )
}

/// Assembles bytes into lines ending in `\n` or `\r`.
#[derive(Debug)]
pub struct LineReader {
    buf: [u8; LINE_MAX],
    len: usize,
    overflowed: bool,
}

impl Default for LineReader {
    fn default() -> Self {
        Self::new()
    }
}

impl LineReader {
    pub const fn new() -> Self {
        Self {
            buf: [0; LINE_MAX],
            len: 0,
            overflowed: false,
        }
    }

    /// Adds a byte. On a line end, returns the finished line (truncated to
    /// [`LINE_MAX`] bytes; `overflowed` tells whether it was) and starts a new
    /// one.
    pub fn push(&mut self, byte: u8) -> Option<Line<'_>> {
        if byte == b'\n' || byte == b'\r' {
            let line = Line {
                bytes: &self.buf[..self.len],
                overflowed: self.overflowed,
            };
            self.len = 0;
            self.overflowed = false;
            return Some(line);
        }
        if self.len < LINE_MAX {
            self.buf[self.len] = byte;
            self.len += 1;
        } else {
            self.overflowed = true;
        }
        None
    }
}

/// A finished input line.
#[derive(Clone, Copy, Debug)]
pub struct Line<'a> {
    pub bytes: &'a [u8],
    pub overflowed: bool,
}

impl Line<'_> {
    /// The command on this line (`None` for an empty line).
    pub fn command(&self) -> Option<Command> {
        if self.overflowed {
            return Some(Command::Unknown);
        }
        Command::parse(self.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(r: &mut LineReader, input: &[u8]) -> Vec<(Vec<u8>, Option<Command>)> {
        let mut out = Vec::new();
        for &b in input {
            if let Some(line) = r.push(b) {
                out.push((line.bytes.to_vec(), line.command()));
            }
        }
        out
    }

    #[test]
    fn parses_commands() {
        assert_eq!(Command::parse(b"poweroff"), Some(Command::Poweroff));
        assert_eq!(Command::parse(b" reboot \t"), Some(Command::Reboot));
        assert_eq!(Command::parse(b"counter"), Some(Command::Counter));
        assert_eq!(Command::parse(b"panic"), Some(Command::Panic));
        assert_eq!(Command::parse(b"net"), Some(Command::Net));
        assert_eq!(Command::parse(b"disk"), Some(Command::Disk));
        assert_eq!(Command::parse(b"Poweroff"), Some(Command::Unknown));
        assert_eq!(Command::parse(b"counter x"), Some(Command::Unknown));
        assert_eq!(Command::parse(b"dirty 0"), Some(Command::DirtyRate(0)));
        assert_eq!(
            Command::parse(b" dirty 25000 "),
            Some(Command::DirtyRate(25000))
        );
        for bad in [
            &b"dirty"[..],
            b"dirty ",
            b"dirty x",
            b"dirty -1",
            b"dirty 1x",
            b"dirty 99999999999999999999",
        ] {
            assert_eq!(Command::parse(bad), Some(Command::Unknown), "{bad:?}");
        }
        assert_eq!(Command::parse(b""), None);
        assert_eq!(Command::parse(b"  "), None);
    }

    #[test]
    fn splits_lines_on_lf_cr_and_crlf() {
        let mut r = LineReader::new();
        let out = feed(&mut r, b"counter\npoweroff\r\nreboot\rpan");
        let cmds: Vec<_> = out.iter().map(|(_, c)| *c).collect();
        assert_eq!(
            cmds,
            vec![
                Some(Command::Counter),
                Some(Command::Poweroff),
                None,
                Some(Command::Reboot)
            ]
        );
        // The partial line continues with later bytes.
        let out = feed(&mut r, b"ic\n");
        assert_eq!(out, vec![(b"panic".to_vec(), Some(Command::Panic))]);
    }

    #[test]
    fn overlong_line_is_unknown_and_reader_recovers() {
        let mut r = LineReader::new();
        let mut input = vec![b'x'; LINE_MAX + 10];
        input.extend_from_slice(b"\ncounter\n");
        let out = feed(&mut r, &input);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].0.len(), LINE_MAX);
        assert_eq!(out[0].1, Some(Command::Unknown));
        assert_eq!(out[1].1, Some(Command::Counter));
        // "poweroff" padded to exactly LINE_MAX bytes still counts.
        let mut exact = b"poweroff".to_vec();
        exact.resize(LINE_MAX, b' ');
        exact.push(b'\n');
        assert_eq!(feed(&mut r, &exact)[0].1, Some(Command::Poweroff));
    }
}
