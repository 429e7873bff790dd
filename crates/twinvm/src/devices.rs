//! Network and disk device settings: `--net` and `--disk` values, MAC
//! addresses, tap device names and disk serials, and the checks that apply
//! to the whole list of devices (no tap or image used twice).
//!
//! ```text
//! --net  tap=NAME[,mac=XX:XX:XX:XX:XX:XX]
//! --disk PATH[,readonly][,serial=ID]
//! ```
//!
//! Parsing is pure; only [`check_unique_disks`] looks at the file system.

use std::ffi::OsStr;
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

/// Longest tap device name Linux accepts (IFNAMSIZ - 1).
pub const MAX_TAP_NAME_LEN: usize = 15;
/// Longest disk serial (the size of the virtio-blk ID).
pub const MAX_SERIAL_LEN: usize = 20;

/// Why a device setting was rejected. Every message names the kind of
/// setting ("tap", "MAC", "disk") and, where there is one, the bad value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Not six ':'-separated pairs of hex digits.
    #[error(
        "invalid MAC address {}: expected six pairs of hex digits separated by ':' (e.g. 52:54:00:12:34:56)",
        Quoted(.0)
    )]
    MacSyntax(String),
    /// A multicast (or broadcast) address.
    #[error(
        "invalid MAC address {}: it is a multicast address (bit 0 of the first byte is set); a network card needs a unicast address such as 52:54:00:12:34:56",
        Quoted(.0)
    )]
    MacMulticast(String),
    /// 00:00:00:00:00:00.
    #[error("invalid MAC address {}: it must not be all zeros", Quoted(.0))]
    MacZero(String),
    /// A name Linux would not accept for a network interface.
    #[error("invalid tap device name {}: {why}", Quoted(.name))]
    TapName {
        /// The name.
        name: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// `--net` without `tap=`.
    #[error("network device without a tap device: `tap=NAME` is required (e.g. tap=tap0)")]
    TapMissing,
    /// A disk serial that is too long, empty or not printable ASCII.
    #[error("invalid disk serial {}: {why}", Quoted(.serial))]
    Serial {
        /// The serial.
        serial: String,
        /// What is wrong with it.
        why: String,
    },
    /// `--disk ,readonly` or `--disk ""`.
    #[error("the disk image path is empty")]
    DiskPathEmpty,
    /// An empty `key=value` item, e.g. from a trailing comma.
    #[error("empty {device} option (a stray ',')")]
    EmptyOption {
        /// "network device" or "disk".
        device: &'static str,
    },
    /// A `--net` item that is not `key=value`.
    #[error("network device option {} is not KEY=VALUE; did you mean 'tap={}'?", Quoted(.0), .0.escape_debug())]
    NotKeyValue(String),
    /// A key other than the known ones.
    #[error("unknown {device} option {}; expected {expected}", Quoted(.key))]
    UnknownOption {
        /// "network device" or "disk".
        device: &'static str,
        /// The key as written.
        key: String,
        /// The keys that are allowed.
        expected: &'static str,
    },
    /// The same key twice in one value.
    #[error("{device} option '{key}' is given more than once")]
    DuplicateOption {
        /// "network device" or "disk".
        device: &'static str,
        /// The key.
        key: &'static str,
    },
    /// `readonly=...`.
    #[error("disk option 'readonly' takes no value; write just 'readonly'")]
    ReadonlyValue,
    /// Two network devices on one tap.
    #[error(
        "tap device {} is used by two network devices (entries {first} and {second})",
        Quoted(.tap)
    )]
    DuplicateTap {
        /// The tap device.
        tap: String,
        /// 1-based index of the first network device using it.
        first: usize,
        /// 1-based index of the second.
        second: usize,
    },
    /// The same image file attached twice.
    #[error("{}", duplicate_disk_message(.first, .second))]
    DuplicateDisk {
        /// The first path as given.
        first: PathBuf,
        /// The second path as given.
        second: PathBuf,
        /// 1-based index of the second disk in the list.
        index: usize,
    },
}

fn duplicate_disk_message(first: &Path, second: &Path) -> String {
    let (a, b) = (first.display().to_string(), second.display().to_string());
    if a == b {
        format!("disk {} is given more than once", Quoted(&a))
    } else {
        format!(
            "disks {} and {} are the same image file",
            Quoted(&a),
            Quoted(&b)
        )
    }
}

/// Displays a user-supplied string in single quotes with control characters
/// and the like escaped, so that an error stays on one line.
struct Quoted<'a>(&'a str);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "'{}'", self.0.escape_debug())
    }
}

/// Parses a MAC address such as `52:54:00:12:34:56` (hex digits in either
/// case). Multicast and all-zero addresses are refused: neither can be a
/// network card's own address.
pub fn parse_mac(s: &str) -> Result<[u8; 6], Error> {
    let syntax = || Error::MacSyntax(s.to_string());
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        let part = parts.next().ok_or_else(syntax)?;
        if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(syntax());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| syntax())?;
    }
    if parts.next().is_some() {
        return Err(syntax());
    }
    if mac[0] & 1 != 0 {
        return Err(Error::MacMulticast(s.to_string()));
    }
    if mac == [0; 6] {
        return Err(Error::MacZero(s.to_string()));
    }
    Ok(mac)
}

/// Checks a tap device name against the rules Linux applies to network
/// interface names (`dev_valid_name`): 1 to 15 bytes, not "." or "..", and
/// no '/', ':', NUL or whitespace.
pub fn validate_tap_name(name: &str) -> Result<(), Error> {
    let bad = |why| {
        Err(Error::TapName {
            name: name.to_string(),
            why,
        })
    };
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > MAX_TAP_NAME_LEN {
        return bad("it is longer than 15 bytes");
    }
    if name == "." || name == ".." {
        return bad("'.' and '..' are not interface names");
    }
    for b in name.bytes() {
        match b {
            b'/' => return bad("it contains '/'"),
            b':' => return bad("it contains ':'"),
            0 => return bad("it contains a NUL byte"),
            // The kernel's isspace(): \t \n \v \f \r, space, and 0xa0
            // (which can occur inside a UTF-8 character).
            b'\t' | b'\n' | 0x0b | 0x0c | b'\r' | b' ' | 0xa0 => {
                return bad("it contains whitespace");
            }
            _ => {}
        }
    }
    Ok(())
}

/// Checks a disk serial: 1 to 20 bytes of printable ASCII (space to '~').
pub fn validate_serial(serial: &str) -> Result<(), Error> {
    let bad = |why: String| {
        Err(Error::Serial {
            serial: serial.to_string(),
            why,
        })
    };
    if serial.is_empty() {
        return bad("it is empty".to_string());
    }
    if serial.len() > MAX_SERIAL_LEN {
        return bad(format!(
            "it is {} bytes long; at most {MAX_SERIAL_LEN} are allowed",
            serial.len()
        ));
    }
    if let Some(c) = serial.chars().find(|c| !matches!(c, ' '..='~')) {
        return bad(format!("{} is not printable ASCII", Quoted(&c.to_string())));
    }
    Ok(())
}

/// Parses a `--net` value: `tap=NAME[,mac=XX:XX:XX:XX:XX:XX]`, keys in any
/// order, each at most once.
pub fn parse_net(s: &str) -> Result<vmm::NetConfig, Error> {
    const DEVICE: &str = "network device";
    let mut tap = None;
    let mut mac = None;
    for item in s.split(',') {
        if item.is_empty() {
            return Err(Error::EmptyOption { device: DEVICE });
        }
        let Some((key, value)) = item.split_once('=') else {
            return Err(Error::NotKeyValue(item.to_string()));
        };
        match key {
            "tap" => {
                if tap.is_some() {
                    return Err(Error::DuplicateOption {
                        device: DEVICE,
                        key: "tap",
                    });
                }
                validate_tap_name(value)?;
                tap = Some(value.to_string());
            }
            "mac" => {
                if mac.is_some() {
                    return Err(Error::DuplicateOption {
                        device: DEVICE,
                        key: "mac",
                    });
                }
                mac = Some(parse_mac(value)?);
            }
            _ => {
                return Err(Error::UnknownOption {
                    device: DEVICE,
                    key: key.to_string(),
                    expected: "tap=NAME or mac=XX:XX:XX:XX:XX:XX",
                });
            }
        }
    }
    Ok(vmm::NetConfig {
        tap: tap.ok_or(Error::TapMissing)?,
        mac,
    })
}

/// Parses a `--disk` value: `PATH[,readonly][,serial=ID]`. Everything up to
/// the first ',' is the path, so a path containing ',' cannot be given this
/// way (the config file has no such limit). The path need not be UTF-8.
pub fn parse_disk(arg: &OsStr) -> Result<vmm::DiskConfig, Error> {
    const DEVICE: &str = "disk";
    let mut items = arg.as_bytes().split(|&b| b == b',');
    let path = items.next().unwrap_or_default();
    if path.is_empty() {
        return Err(Error::DiskPathEmpty);
    }
    let mut readonly = false;
    let mut serial: Option<String> = None;
    for item in items {
        let item = String::from_utf8_lossy(item);
        let (key, value) = match item.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (&*item, None),
        };
        match (key, value) {
            ("", None) => return Err(Error::EmptyOption { device: DEVICE }),
            ("readonly", None) => {
                if readonly {
                    return Err(Error::DuplicateOption {
                        device: DEVICE,
                        key: "readonly",
                    });
                }
                readonly = true;
            }
            ("readonly", Some(_)) => return Err(Error::ReadonlyValue),
            ("serial", Some(v)) => {
                if serial.is_some() {
                    return Err(Error::DuplicateOption {
                        device: DEVICE,
                        key: "serial",
                    });
                }
                validate_serial(v)?;
                serial = Some(v.to_string());
            }
            _ => {
                return Err(Error::UnknownOption {
                    device: DEVICE,
                    key: item.into_owned(),
                    expected: "'readonly' or 'serial=ID' after the image path (which comes first and cannot contain ',')",
                });
            }
        }
    }
    Ok(vmm::DiskConfig {
        path: PathBuf::from(OsStr::from_bytes(path)),
        readonly,
        serial,
    })
}

/// Refuses two network devices on the same tap device.
pub fn check_unique_taps(net: &[vmm::NetConfig]) -> Result<(), Error> {
    for (j, b) in net.iter().enumerate() {
        if let Some(i) = net[..j].iter().position(|a| a.tap == b.tap) {
            return Err(Error::DuplicateTap {
                tap: b.tap.clone(),
                first: i + 1,
                second: j + 1,
            });
        }
    }
    Ok(())
}

/// Refuses the same image file attached twice: two paths that are equal
/// once "." components and repeated '/' are dropped, or two existing paths
/// that lead to the same file (through symbolic links, hard links, or one
/// absolute and one relative path). Paths that cannot be examined are left
/// for the VMM to report when it opens them.
pub fn check_unique_disks(disks: &[vmm::DiskConfig]) -> Result<(), Error> {
    let ids: Vec<Option<(u64, u64)>> = disks
        .iter()
        .map(|d| std::fs::metadata(&d.path).ok().map(|m| (m.dev(), m.ino())))
        .collect();
    for (j, b) in disks.iter().enumerate() {
        let dup = disks[..j].iter().enumerate().find(|&(i, a)| {
            same_path_lexically(&a.path, &b.path) || (ids[i].is_some() && ids[i] == ids[j])
        });
        if let Some((_, a)) = dup {
            return Err(Error::DuplicateDisk {
                first: a.path.clone(),
                second: b.path.clone(),
                index: j + 1,
            });
        }
    }
    Ok(())
}

/// True if `a` and `b` are the same path apart from "." components and
/// repeated or trailing '/'. ".." is kept: "x/../y" may not be "y" when x
/// is a symbolic link.
pub fn same_path_lexically(a: &Path, b: &Path) -> bool {
    fn significant(p: &Path) -> impl Iterator<Item = Component<'_>> {
        p.components().filter(|c| *c != Component::CurDir)
    }
    significant(a).eq(significant(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(s: &str) -> Result<vmm::DiskConfig, Error> {
        parse_disk(OsStr::new(s))
    }

    fn net(tap: &str) -> vmm::NetConfig {
        vmm::NetConfig {
            tap: tap.to_string(),
            mac: None,
        }
    }

    fn disk_at(path: impl Into<PathBuf>) -> vmm::DiskConfig {
        vmm::DiskConfig {
            path: path.into(),
            readonly: false,
            serial: None,
        }
    }

    #[test]
    fn mac_parses_in_either_case() {
        assert_eq!(
            parse_mac("52:54:00:12:34:56"),
            Ok([0x52, 0x54, 0x00, 0x12, 0x34, 0x56])
        );
        assert_eq!(
            parse_mac("02:AB:cd:Ef:00:ff"),
            Ok([0x02, 0xab, 0xcd, 0xef, 0x00, 0xff])
        );
    }

    #[test]
    fn mac_syntax_errors() {
        for bad in [
            "",
            "zz:zz:zz:zz:zz:zz",
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "52:54:00:12:34:5",
            "52:54:00:12:34:567",
            "52-54-00-12-34-56",
            "525400123456",
            "52:54:00:12:34:56:",
            ":52:54:00:12:34:56",
            "52:54:00:12:34:+5",
            " 52:54:00:12:34:56",
            "52:54::12:34:56",
            "５2:54:00:12:34:56",
        ] {
            let err = parse_mac(bad).expect_err(bad);
            assert_eq!(err, Error::MacSyntax(bad.to_string()), "{bad}");
            let msg = err.to_string();
            assert!(msg.starts_with("invalid MAC address '"), "{msg}");
        }
    }

    #[test]
    fn multicast_broadcast_and_zero_macs_are_refused() {
        for bad in [
            "01:00:5e:00:00:01",
            "ff:ff:ff:ff:ff:ff",
            "33:33:00:00:00:01",
        ] {
            assert_eq!(parse_mac(bad), Err(Error::MacMulticast(bad.to_string())));
        }
        let msg = parse_mac("03:00:00:00:00:00").unwrap_err().to_string();
        assert!(msg.contains("multicast"), "{msg}");
        assert_eq!(
            parse_mac("00:00:00:00:00:00"),
            Err(Error::MacZero("00:00:00:00:00:00".to_string()))
        );
        // Locally administered unicast is fine.
        assert!(parse_mac("02:00:00:00:00:01").is_ok());
        assert!(parse_mac("fe:ff:ff:ff:ff:ff").is_ok());
    }

    #[test]
    fn tap_names_follow_linux_rules() {
        for good in ["tap0", "t", "a23456789012345", "tap-vm.1_x", "täp", "-"] {
            assert_eq!(validate_tap_name(good), Ok(()), "{good}");
        }
        for (bad, why) in [
            ("", "empty"),
            ("a234567890123456", "longer than 15"),
            ("täääääääp", "longer than 15"),
            (".", "'.' and '..'"),
            ("..", "'.' and '..'"),
            ("tap/0", "'/'"),
            ("tap:0", "':'"),
            ("tap 0", "whitespace"),
            ("tap\t0", "whitespace"),
            ("tap\n", "whitespace"),
            ("tap\u{b}", "whitespace"),
            ("t\u{a0}", "whitespace"),
            ("tap\0", "NUL"),
        ] {
            let err = validate_tap_name(bad).expect_err(bad);
            let msg = err.to_string();
            assert!(msg.starts_with("invalid tap device name '"), "{msg}");
            assert!(msg.contains(why), "{bad:?}: {msg}");
            assert!(!msg.contains('\n') && !msg.contains('\0'), "{msg:?}");
        }
    }

    #[test]
    fn serials_are_short_printable_ascii() {
        for good in ["data0", "x", "12345678901234567890", "a b~!", "serial=x"] {
            assert_eq!(validate_serial(good), Ok(()), "{good}");
        }
        for (bad, why) in [
            ("", "empty"),
            ("123456789012345678901", "21 bytes long; at most 20"),
            ("dätä", "'ä' is not printable ASCII"),
            ("a\tb", "'\\t' is not printable ASCII"),
            ("a\u{7f}", "is not printable ASCII"),
        ] {
            let msg = validate_serial(bad).expect_err(bad).to_string();
            assert!(msg.starts_with("invalid disk serial '"), "{msg}");
            assert!(msg.contains(why), "{bad:?}: {msg}");
            assert!(!msg.contains('\t'), "{msg:?}");
        }
    }

    #[test]
    fn net_values_parse() {
        assert_eq!(parse_net("tap=tap0"), Ok(net("tap0")));
        let with_mac = vmm::NetConfig {
            tap: "tap1".to_string(),
            mac: Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
        };
        assert_eq!(
            parse_net("tap=tap1,mac=52:54:00:12:34:56"),
            Ok(with_mac.clone())
        );
        assert_eq!(parse_net("mac=52:54:00:12:34:56,tap=tap1"), Ok(with_mac));
        // Only the first '=' separates key and value.
        assert!(matches!(
            parse_net("tap=a=b"),
            Ok(vmm::NetConfig { tap, .. }) if tap == "a=b"
        ));
    }

    #[test]
    fn net_errors() {
        assert_eq!(parse_net("mac=52:54:00:12:34:56"), Err(Error::TapMissing));
        assert_eq!(
            parse_net(""),
            Err(Error::EmptyOption {
                device: "network device"
            })
        );
        assert_eq!(
            parse_net("tap=t0,"),
            Err(Error::EmptyOption {
                device: "network device"
            })
        );
        assert_eq!(
            parse_net("tap0"),
            Err(Error::NotKeyValue("tap0".to_string()))
        );
        assert!(
            parse_net("tap0")
                .unwrap_err()
                .to_string()
                .contains("did you mean 'tap=tap0'?")
        );
        assert!(matches!(
            parse_net("tap=t0,model=e1000"),
            Err(Error::UnknownOption { key, .. }) if key == "model"
        ));
        assert!(matches!(
            parse_net("TAP=t0"),
            Err(Error::UnknownOption { key, .. }) if key == "TAP"
        ));
        assert_eq!(
            parse_net("tap=t0,tap=t1"),
            Err(Error::DuplicateOption {
                device: "network device",
                key: "tap"
            })
        );
        assert_eq!(
            parse_net("tap=t0,mac=52:54:00:12:34:56,mac=52:54:00:12:34:57"),
            Err(Error::DuplicateOption {
                device: "network device",
                key: "mac"
            })
        );
        assert!(matches!(
            parse_net("tap=t0,mac=zz:00:00:00:00:00"),
            Err(Error::MacSyntax(_))
        ));
        assert!(matches!(
            parse_net("tap=t0,mac=01:00:00:00:00:00"),
            Err(Error::MacMulticast(_))
        ));
        assert!(matches!(parse_net("tap="), Err(Error::TapName { .. })));
        assert!(matches!(parse_net("tap=a/b"), Err(Error::TapName { .. })));
    }

    #[test]
    fn net_messages_name_the_problem() {
        for (arg, want) in [
            ("mac=52:54:00:12:34:56", "tap"),
            ("tap=t0,mac=zz:00:00:00:00:00", "mac"),
            ("tap=t0,mac=01:00:00:00:00:00", "mac"),
            ("tap=t0,foo=1", "tap=NAME or mac="),
            ("tap=t0,tap=t1", "'tap' is given more than once"),
            ("tap=0123456789abcdef", "tap"),
        ] {
            let msg = parse_net(arg).expect_err(arg).to_string();
            assert!(
                msg.to_lowercase().contains(&want.to_lowercase()),
                "{arg}: {msg}"
            );
        }
    }

    #[test]
    fn disk_values_parse() {
        assert_eq!(disk("disk.img"), Ok(disk_at("disk.img")));
        assert_eq!(
            disk("/var/lib/vm/root.img,readonly"),
            Ok(vmm::DiskConfig {
                path: "/var/lib/vm/root.img".into(),
                readonly: true,
                serial: None,
            })
        );
        let both = vmm::DiskConfig {
            path: "a.img".into(),
            readonly: true,
            serial: Some("data0".to_string()),
        };
        assert_eq!(disk("a.img,readonly,serial=data0"), Ok(both.clone()));
        assert_eq!(disk("a.img,serial=data0,readonly"), Ok(both));
        // '=' in the path is fine: the path is everything before the first ','.
        assert_eq!(disk("x=y.img"), Ok(disk_at("x=y.img")));
        assert_eq!(disk("serial=x"), Ok(disk_at("serial=x")));
    }

    #[test]
    fn disk_path_need_not_be_utf8() {
        let arg = OsStr::from_bytes(b"/tmp/\xff.img,readonly");
        let d = parse_disk(arg).expect("valid");
        assert_eq!(d.path.as_os_str().as_bytes(), b"/tmp/\xff.img");
        assert!(d.readonly);
    }

    #[test]
    fn disk_errors() {
        assert_eq!(disk(""), Err(Error::DiskPathEmpty));
        assert_eq!(disk(",readonly"), Err(Error::DiskPathEmpty));
        assert_eq!(disk("a.img,"), Err(Error::EmptyOption { device: "disk" }));
        assert_eq!(
            disk("a.img,,readonly"),
            Err(Error::EmptyOption { device: "disk" })
        );
        assert_eq!(
            disk("a.img,readonly,readonly"),
            Err(Error::DuplicateOption {
                device: "disk",
                key: "readonly"
            })
        );
        assert_eq!(disk("a.img,readonly=on"), Err(Error::ReadonlyValue));
        assert_eq!(
            disk("a.img,serial=a,serial=b"),
            Err(Error::DuplicateOption {
                device: "disk",
                key: "serial"
            })
        );
        assert!(matches!(disk("a.img,serial="), Err(Error::Serial { .. })));
        assert!(matches!(
            disk("a.img,serial=123456789012345678901"),
            Err(Error::Serial { .. })
        ));
        assert!(matches!(
            disk("a.img,serial=dätä"),
            Err(Error::Serial { .. })
        ));
        for (arg, key) in [
            ("a.img,ro", "ro"),
            ("a.img,serial", "serial"),
            ("a,b.img", "b.img"),
            ("a.img,format=raw", "format=raw"),
        ] {
            let err = disk(arg).expect_err(arg);
            assert!(
                matches!(&err, Error::UnknownOption { key: k, .. } if k == key),
                "{arg}: {err:?}"
            );
            let msg = err.to_string();
            assert!(msg.contains("unknown disk option"), "{msg}");
            assert!(msg.contains("cannot contain ','"), "{msg}");
        }
    }

    #[test]
    fn disk_messages_name_the_problem() {
        for arg in [
            "",
            "a.img,",
            "a.img,x",
            "a.img,readonly=1",
            "a.img,serial=",
            "a.img,readonly,readonly",
        ] {
            let msg = disk(arg).expect_err(arg).to_string();
            assert!(msg.contains("disk"), "{arg}: {msg}");
        }
    }

    #[test]
    fn duplicate_taps_are_refused() {
        assert_eq!(check_unique_taps(&[]), Ok(()));
        assert_eq!(check_unique_taps(&[net("a"), net("b"), net("c")]), Ok(()));
        let err = check_unique_taps(&[net("a"), net("b"), net("c"), net("b")]).unwrap_err();
        assert_eq!(
            err,
            Error::DuplicateTap {
                tap: "b".to_string(),
                first: 2,
                second: 4
            }
        );
        assert_eq!(
            err.to_string(),
            "tap device 'b' is used by two network devices (entries 2 and 4)"
        );
    }

    #[test]
    fn paths_compare_lexically() {
        for (a, b) in [
            ("a.img", "a.img"),
            ("a.img", "./a.img"),
            ("d/a.img", "d//./a.img"),
            ("/d/a.img", "/d/a.img/"),
        ] {
            assert!(same_path_lexically(Path::new(a), Path::new(b)), "{a} {b}");
        }
        for (a, b) in [
            ("a.img", "b.img"),
            ("a.img", "/a.img"),
            ("d/../a.img", "a.img"),
        ] {
            assert!(!same_path_lexically(Path::new(a), Path::new(b)), "{a} {b}");
        }
    }

    #[test]
    fn duplicate_disks_are_refused() {
        assert_eq!(check_unique_disks(&[]), Ok(()));
        let ok = [disk_at("/nonexistent/a.img"), disk_at("/nonexistent/b.img")];
        assert_eq!(check_unique_disks(&ok), Ok(()));

        let same = [
            disk_at("/nonexistent/a.img"),
            disk_at("/nonexistent/./a.img"),
        ];
        let msg = check_unique_disks(&same).unwrap_err().to_string();
        assert_eq!(
            msg,
            "disks '/nonexistent/a.img' and '/nonexistent/./a.img' are the same image file"
        );
        let twice = [disk_at("/nonexistent/a.img"), disk_at("/nonexistent/a.img")];
        let msg = check_unique_disks(&twice).unwrap_err().to_string();
        assert_eq!(msg, "disk '/nonexistent/a.img' is given more than once");
    }

    #[test]
    fn the_same_file_under_two_names_is_refused() {
        let dir = std::env::temp_dir().join(format!("twinvm-devices-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).expect("create temp dir");
        let img = dir.join("a.img");
        std::fs::write(&img, b"").expect("create image");
        std::os::unix::fs::symlink(&img, dir.join("link.img")).expect("symlink");
        std::fs::write(dir.join("b.img"), b"").expect("create second image");

        let via_link = [disk_at(&img), disk_at(dir.join("link.img"))];
        let err = check_unique_disks(&via_link);
        let via_dotdot = [
            disk_at(&img),
            disk_at(dir.join("../").join(dir.file_name().unwrap()).join("a.img")),
        ];
        let err2 = check_unique_disks(&via_dotdot);
        let distinct = [disk_at(&img), disk_at(dir.join("b.img"))];
        let ok = check_unique_disks(&distinct);
        let _ = std::fs::remove_dir_all(&dir);

        assert!(matches!(err, Err(Error::DuplicateDisk { .. })), "{err:?}");
        assert!(matches!(err2, Err(Error::DuplicateDisk { .. })), "{err2:?}");
        assert_eq!(ok, Ok(()));
    }
}
