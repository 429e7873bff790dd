//! Parsing of human-readable sizes such as `512M` or `2GiB`.
//!
//! Syntax: a whole decimal number, optionally followed by a unit. Units are
//! case-insensitive and binary (powers of 1024): `K`, `M`, `G`, `T`, each
//! optionally followed by `B` or `iB` (`K`, `KB` and `KiB` all mean 1024
//! bytes). A bare `B` or no unit at all means bytes. Whitespace around the
//! number and between the number and the unit is ignored.
//!
//! Guest memory sizes must in addition be non-zero and a multiple of 4 KiB
//! ([`validate_memory`], [`parse_memory`]).

/// The page size guest memory must be a multiple of.
pub const PAGE_SIZE: u64 = 4096;

/// Why a size was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Nothing but whitespace.
    #[error("empty size")]
    Empty,
    /// A leading minus sign.
    #[error("size must not be negative")]
    Negative,
    /// Not a number followed by an optional unit.
    #[error(
        "'{0}' is not a size; expected a whole number with an optional K, M, G or T suffix (e.g. 512M)"
    )]
    Invalid(String),
    /// A number followed by an unknown unit.
    #[error("unknown unit '{unit}' in '{input}'; use K, M, G or T")]
    UnknownUnit {
        /// The whole input.
        input: String,
        /// The unit as written.
        unit: String,
    },
    /// The size does not fit in 64 bits.
    #[error("'{0}' is too large")]
    Overflow(String),
    /// A memory size of zero.
    #[error("size must be greater than zero")]
    Zero,
    /// A memory size that is not page-aligned.
    #[error("{0} bytes is not a multiple of 4 KiB")]
    Unaligned(u64),
}

/// Parses a size in bytes (zero and unaligned sizes are allowed here).
pub fn parse_size(input: &str) -> Result<u64, Error> {
    let s = input.trim();
    if s.is_empty() {
        return Err(Error::Empty);
    }
    if s.starts_with('-') {
        return Err(Error::Negative);
    }
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, rest) = s.split_at(digits_end);
    if digits.is_empty() {
        return Err(Error::Invalid(input.to_string()));
    }
    let unit = rest.trim_start();
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => {
            // "1.5G", "12abc", "0x10": the number itself is not whole decimal.
            if unit.starts_with(|c: char| c.is_ascii_alphabetic()) {
                return Err(Error::UnknownUnit {
                    input: input.to_string(),
                    unit: unit.to_string(),
                });
            }
            return Err(Error::Invalid(input.to_string()));
        }
    };
    let number: u64 = digits
        .parse()
        .map_err(|_| Error::Overflow(input.to_string()))?;
    number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| Error::Overflow(input.to_string()))
}

/// Checks that `bytes` is usable as a guest memory size.
pub fn validate_memory(bytes: u64) -> Result<u64, Error> {
    if bytes == 0 {
        return Err(Error::Zero);
    }
    if !bytes.is_multiple_of(PAGE_SIZE) {
        return Err(Error::Unaligned(bytes));
    }
    Ok(bytes)
}

/// Parses a guest memory size: [`parse_size`], then [`validate_memory`].
pub fn parse_memory(input: &str) -> Result<u64, Error> {
    validate_memory(parse_size(input)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: u64 = 1024;
    const M: u64 = 1024 * K;
    const G: u64 = 1024 * M;
    const T: u64 = 1024 * G;

    #[test]
    fn plain_numbers_are_bytes() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4096B"), Ok(4096));
        assert_eq!(parse_size("  8192 "), Ok(8192));
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
    }

    #[test]
    fn units_are_binary_and_case_insensitive() {
        for (s, v) in [
            ("1K", K),
            ("1k", K),
            ("1KB", K),
            ("1kib", K),
            ("1KiB", K),
            ("512M", 512 * M),
            ("512m", 512 * M),
            ("512MiB", 512 * M),
            ("512 MB", 512 * M),
            ("2G", 2 * G),
            ("2gib", 2 * G),
            ("100T", 100 * T),
            ("1TiB", T),
            ("007M", 7 * M),
        ] {
            assert_eq!(parse_size(s), Ok(v), "{s}");
        }
    }

    #[test]
    fn malformed_sizes_are_rejected() {
        assert_eq!(parse_size(""), Err(Error::Empty));
        assert_eq!(parse_size("   "), Err(Error::Empty));
        assert_eq!(parse_size("-1"), Err(Error::Negative));
        assert_eq!(parse_size("-4K"), Err(Error::Negative));
        assert_eq!(parse_size("abc"), Err(Error::Invalid("abc".into())));
        assert_eq!(parse_size("M"), Err(Error::Invalid("M".into())));
        assert_eq!(parse_size("+4K"), Err(Error::Invalid("+4K".into())));
        assert_eq!(parse_size("1.5G"), Err(Error::Invalid("1.5G".into())));
        assert_eq!(parse_size("1 2"), Err(Error::Invalid("1 2".into())));
        assert_eq!(
            parse_size("12abc"),
            Err(Error::UnknownUnit {
                input: "12abc".into(),
                unit: "abc".into()
            })
        );
        assert!(matches!(parse_size("4KK"), Err(Error::UnknownUnit { .. })));
        assert!(matches!(parse_size("4P"), Err(Error::UnknownUnit { .. })));
        assert!(matches!(
            parse_size("0x1000"),
            Err(Error::UnknownUnit { .. })
        ));
    }

    #[test]
    fn overflow_is_rejected() {
        assert_eq!(
            parse_size("18446744073709551616"),
            Err(Error::Overflow("18446744073709551616".into()))
        );
        assert_eq!(
            parse_size("99999999999999999999999999G"),
            Err(Error::Overflow("99999999999999999999999999G".into()))
        );
        assert_eq!(
            parse_size("16777216T"),
            Err(Error::Overflow("16777216T".into()))
        );
        assert_eq!(parse_size("16777215T"), Ok(16_777_215 * T));
    }

    #[test]
    fn memory_must_be_nonzero_and_page_aligned() {
        assert_eq!(parse_memory("0"), Err(Error::Zero));
        assert_eq!(parse_memory("0G"), Err(Error::Zero));
        assert_eq!(parse_memory("4097"), Err(Error::Unaligned(4097)));
        assert_eq!(parse_memory("1K"), Err(Error::Unaligned(1024)));
        assert_eq!(parse_memory("4K"), Ok(4096));
        assert_eq!(parse_memory("256M"), Ok(256 * M));
        assert_eq!(parse_memory("abc"), Err(Error::Invalid("abc".into())));
        assert_eq!(validate_memory(8192), Ok(8192));
        assert_eq!(validate_memory(0), Err(Error::Zero));
    }

    #[test]
    fn messages_are_clear() {
        assert_eq!(
            Error::Unaligned(4097).to_string(),
            "4097 bytes is not a multiple of 4 KiB"
        );
        assert!(
            parse_size("abc")
                .unwrap_err()
                .to_string()
                .contains("'abc' is not a size")
        );
    }
}
