//! Minimal output formatting: a byte sink and decimal/hex number writers.
//!
//! The guest prints its regular lines with these instead of `core::fmt`:
//! they need no buffers (so no block copies the compiler could turn into
//! vector instructions) and run few instructions.

/// Something bytes can be written to (the serial port, a test buffer).
pub trait Sink {
    fn put(&mut self, byte: u8);

    fn put_bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.put(b);
        }
    }

    fn put_str(&mut self, s: &str) {
        self.put_bytes(s.as_bytes());
    }

    /// Writes `v` in decimal.
    fn put_u64(&mut self, v: u64) {
        // Largest power of ten not above v (at least 1).
        let mut p: u64 = 1;
        while v / p >= 10 {
            p *= 10;
        }
        let mut rest = v;
        loop {
            let digit = rest / p;
            self.put(b'0' + digit as u8);
            rest -= digit * p;
            if p == 1 {
                break;
            }
            p /= 10;
        }
    }

    /// Writes `v` as `0x` followed by lowercase hex digits, no leading zeros.
    fn put_hex(&mut self, v: u64) {
        self.put_bytes(b"0x");
        let mut shift = 60;
        while shift > 0 && (v >> shift) == 0 {
            shift -= 4;
        }
        loop {
            let nibble = ((v >> shift) & 0xf) as u8;
            self.put(if nibble < 10 {
                b'0' + nibble
            } else {
                b'a' + nibble - 10
            });
            if shift == 0 {
                break;
            }
            shift -= 4;
        }
    }

    /// Writes `bytes` with anything that is not printable ASCII replaced by
    /// `?` (for echoing input back).
    fn put_printable(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.put(if b.is_ascii_graphic() || b == b' ' {
                b
            } else {
                b'?'
            });
        }
    }
}

#[cfg(test)]
pub(crate) mod testing {
    /// A sink collecting bytes, for tests.
    #[derive(Default)]
    pub struct VecSink(pub Vec<u8>);

    impl super::Sink for VecSink {
        fn put(&mut self, byte: u8) {
            self.0.push(byte);
        }
    }

    impl VecSink {
        pub fn text(&self) -> &str {
            std::str::from_utf8(&self.0).unwrap()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Sink;
    use super::testing::VecSink;

    fn dec(v: u64) -> String {
        let mut s = VecSink::default();
        s.put_u64(v);
        s.text().to_string()
    }

    fn hex(v: u64) -> String {
        let mut s = VecSink::default();
        s.put_hex(v);
        s.text().to_string()
    }

    #[test]
    fn decimal() {
        for v in [
            0,
            1,
            9,
            10,
            11,
            99,
            100,
            101,
            1000,
            4096,
            123_456_789,
            u64::MAX,
            u64::MAX - 1,
        ] {
            assert_eq!(dec(v), v.to_string());
        }
        for i in 0..20 {
            let p = 10u64.pow(i);
            assert_eq!(dec(p), p.to_string());
            assert_eq!(dec(p - 1), (p - 1).to_string());
        }
    }

    #[test]
    fn hexadecimal() {
        for v in [0, 1, 0xf, 0x10, 0x100000, 0xdead_beef, u64::MAX, 1 << 63] {
            assert_eq!(hex(v), format!("{v:#x}"));
        }
    }

    #[test]
    fn printable() {
        let mut s = VecSink::default();
        s.put_printable(b"ab c\x00\x1b[\xff~");
        assert_eq!(s.text(), "ab c??[?~");
    }
}
