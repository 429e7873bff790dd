//! The TOML config file, and the merge of file and command line into a
//! [`vmm::VmConfig`].
//!
//! ```toml
//! [vm]
//! memory = "512M"      # or an integer number of bytes
//! cpus = 2
//! kernel = "path/to/bzImage"
//! initrd = "path/to/initramfs.cpio.gz"
//! cmdline = "extra args"
//! ```
//!
//! Every table rejects unknown keys, so a typo is an error that names the
//! key. Every key is optional. Relative paths are resolved against the
//! directory of the config file. Later sections (`[[net]]`, `[[disk]]`,
//! `[replication]`, `[api]`) become further fields of [`ConfigFile`].

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

use crate::cli::RunArgs;
use crate::size;

/// Guest memory when neither the command line nor the file sets it.
pub const DEFAULT_MEMORY: u64 = 256 << 20;
/// vCPUs when neither the command line nor the file sets them.
pub const DEFAULT_CPUS: u8 = 1;
/// The most vCPUs twinvm accepts before asking KVM (which may allow fewer).
pub const MAX_CPUS: u8 = u8::MAX;

/// Errors in the config file or in the settings as a whole.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read.
    #[error("cannot read config file '{}'", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not match the schema.
    #[error("config file '{}': {location}{message}", .path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// "line L, column C: ", or empty when unknown.
        location: String,
        /// What is wrong, on one line.
        message: String,
    },
    /// A path key set to "".
    #[error("config file '{}': `vm.{key}` must not be empty", .path.display())]
    EmptyPath {
        /// The file.
        path: PathBuf,
        /// The key.
        key: &'static str,
    },
    /// No kernel given, and the binary carries no test guest.
    #[error(
        "no kernel given (--kernel or `vm.kernel`) and this twinvm was built without the bundled test guest"
    )]
    NoBundledGuest,
}

/// Checks a vCPU count from the command line or the config file.
pub fn validate_cpus(n: i128) -> Result<u8, String> {
    match u8::try_from(n) {
        Ok(c) if c >= 1 => Ok(c),
        _ => Err(format!(
            "vCPU count must be between 1 and {MAX_CPUS}, not {n}"
        )),
    }
}

/// The whole config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// `[vm]`: the machine itself.
    #[serde(default)]
    pub vm: VmSection,
}

/// The `[vm]` table. Paths are resolved once the file is loaded.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSection {
    /// Guest memory in bytes.
    pub memory: Option<MemorySize>,
    /// Number of vCPUs.
    pub cpus: Option<Cpus>,
    /// Kernel image.
    pub kernel: Option<PathBuf>,
    /// Initramfs.
    pub initrd: Option<PathBuf>,
    /// Extra kernel command line.
    pub cmdline: Option<String>,
}

/// A validated guest memory size: a size string such as "512M", or an
/// integer number of bytes; non-zero and a multiple of 4 KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemorySize(pub u64);

impl<'de> Deserialize<'de> for MemorySize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = MemorySize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a memory size such as \"512M\" or an integer number of bytes")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<MemorySize, E> {
                size::parse_memory(s)
                    .map(MemorySize)
                    .map_err(|e| E::custom(format!("invalid `memory`: {e}")))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<MemorySize, E> {
                if n < 0 {
                    return Err(E::custom(format!(
                        "invalid `memory`: {}",
                        size::Error::Negative
                    )));
                }
                self.visit_u64(n.unsigned_abs())
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<MemorySize, E> {
                size::validate_memory(n)
                    .map(MemorySize)
                    .map_err(|e| E::custom(format!("invalid `memory`: {e}")))
            }
        }
        d.deserialize_any(V)
    }
}

/// A validated vCPU count (1 to 255).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cpus(pub u8);

impl<'de> Deserialize<'de> for Cpus {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Cpus;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "a number of vCPUs from 1 to {MAX_CPUS}")
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Cpus, E> {
                validate_cpus(n.into())
                    .map(Cpus)
                    .map_err(|e| E::custom(format!("invalid `cpus`: {e}")))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Cpus, E> {
                validate_cpus(n.into())
                    .map(Cpus)
                    .map_err(|e| E::custom(format!("invalid `cpus`: {e}")))
            }
        }
        d.deserialize_any(V)
    }
}

impl ConfigFile {
    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses `text`, the contents of the file at `path`, and resolves its
    /// relative paths against the directory of `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Self, Error> {
        let mut file: ConfigFile = toml::from_str(text).map_err(|e| Error::Parse {
            path: path.to_path_buf(),
            location: e
                .span()
                .map(|span| {
                    let (line, column) = line_column(text, span.start);
                    format!("line {line}, column {column}: ")
                })
                .unwrap_or_default(),
            message: one_line(e.message()),
        })?;
        let base = path.parent().unwrap_or(Path::new(""));
        let vm = &mut file.vm;
        for (key, slot) in [("kernel", &mut vm.kernel), ("initrd", &mut vm.initrd)] {
            if let Some(p) = slot.take() {
                if p.as_os_str().is_empty() {
                    return Err(Error::EmptyPath {
                        path: path.to_path_buf(),
                        key,
                    });
                }
                *slot = Some(if p.is_relative() { base.join(p) } else { p });
            }
        }
        Ok(file)
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

fn one_line(s: &str) -> String {
    s.trim()
        .lines()
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Builds the VM configuration: command-line flags override the config file
/// (`args.config`, if any), which overrides the defaults. Without a kernel,
/// `bundled_guest` (the test guest) is booted.
pub fn vm_config(args: &RunArgs, bundled_guest: &'static [u8]) -> Result<vmm::VmConfig, Error> {
    let file = match &args.config {
        Some(path) => ConfigFile::load(path)?,
        None => ConfigFile::default(),
    };
    merge(file.vm, args, bundled_guest)
}

/// Merges an already loaded `[vm]` table with the command line.
pub fn merge(
    file: VmSection,
    args: &RunArgs,
    bundled_guest: &'static [u8],
) -> Result<vmm::VmConfig, Error> {
    let kernel = match args.kernel.clone().or(file.kernel) {
        Some(path) => vmm::KernelSource::File(path),
        None if bundled_guest.is_empty() => return Err(Error::NoBundledGuest),
        None => vmm::KernelSource::Bytes(bundled_guest),
    };
    Ok(vmm::VmConfig {
        memory_bytes: args
            .memory
            .or(file.memory.map(|m| m.0))
            .unwrap_or(DEFAULT_MEMORY),
        vcpus: args.cpus.or(file.cpus.map(|c| c.0)).unwrap_or(DEFAULT_CPUS),
        kernel,
        initrd: args.initrd.clone().or(file.initrd),
        cmdline: args.cmdline.clone().or(file.cmdline).unwrap_or_default(),
        net: Vec::new(),
        disks: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    static GUEST: &[u8] = b"\x7fELF test guest";

    fn parse(text: &str) -> Result<ConfigFile, Error> {
        ConfigFile::parse(text, Path::new("/etc/twinvm/vm.toml"))
    }

    fn parse_err(text: &str) -> String {
        parse(text).expect_err(text).to_string()
    }

    fn file_path(k: &vmm::KernelSource) -> Option<&Path> {
        match k {
            vmm::KernelSource::File(p) => Some(p),
            vmm::KernelSource::Bytes(_) => None,
        }
    }

    #[test]
    fn full_file_parses() {
        let f = parse(
            r#"
            [vm]
            memory = "512M"
            cpus = 2
            kernel = "/boot/bzImage"
            initrd = "/boot/initrd.gz"
            cmdline = "quiet loglevel=3"
            "#,
        )
        .expect("valid file");
        assert_eq!(f.vm.memory, Some(MemorySize(512 << 20)));
        assert_eq!(f.vm.cpus, Some(Cpus(2)));
        assert_eq!(f.vm.kernel, Some(PathBuf::from("/boot/bzImage")));
        assert_eq!(f.vm.initrd, Some(PathBuf::from("/boot/initrd.gz")));
        assert_eq!(f.vm.cmdline.as_deref(), Some("quiet loglevel=3"));
    }

    #[test]
    fn empty_file_and_empty_table_give_defaults() {
        for text in ["", "[vm]\n", "# just a comment\n"] {
            let f = parse(text).expect("valid file");
            let c = merge(f.vm, &RunArgs::default(), GUEST).expect("defaults");
            assert_eq!(c.memory_bytes, 256 << 20);
            assert_eq!(c.vcpus, 1);
            assert!(matches!(c.kernel, vmm::KernelSource::Bytes(b) if b == GUEST));
            assert!(c.initrd.is_none());
            assert_eq!(c.cmdline, "");
        }
    }

    #[test]
    fn memory_as_integer_bytes() {
        let f = parse("[vm]\nmemory = 67108864\n").expect("valid file");
        assert_eq!(f.vm.memory, Some(MemorySize(64 << 20)));
    }

    #[test]
    fn bad_memory_is_rejected() {
        for (text, want) in [
            ("[vm]\nmemory = 0\n", "greater than zero"),
            ("[vm]\nmemory = \"0\"\n", "greater than zero"),
            ("[vm]\nmemory = \"abc\"\n", "not a size"),
            ("[vm]\nmemory = -4096\n", "negative"),
            ("[vm]\nmemory = 4097\n", "multiple of 4 KiB"),
            ("[vm]\nmemory = \"99999999999T\"\n", "too large"),
            ("[vm]\nmemory = 1.5\n", "memory size such as"),
        ] {
            let msg = parse_err(text);
            assert!(msg.contains("memory"), "{text}: {msg}");
            assert!(msg.contains(want), "{text}: {msg}");
            assert!(msg.contains("line 2"), "{text}: {msg}");
        }
    }

    #[test]
    fn cpus_zero_and_out_of_range_are_rejected() {
        for text in [
            "[vm]\ncpus = 0\n",
            "[vm]\ncpus = 256\n",
            "[vm]\ncpus = -1\n",
        ] {
            let msg = parse_err(text);
            assert!(msg.contains("cpus"), "{text}: {msg}");
            assert!(msg.contains("between 1 and 255"), "{text}: {msg}");
        }
        assert_eq!(
            parse("[vm]\ncpus = 255\n").expect("ok").vm.cpus,
            Some(Cpus(255))
        );
    }

    #[test]
    fn unknown_keys_are_named() {
        let msg = parse_err("[vm]\nmemory = \"1G\"\nmemroy = \"2G\"\n");
        assert!(msg.contains("unknown field `memroy`"), "{msg}");
        assert!(msg.contains("line 3, column 1"), "{msg}");
        assert!(msg.contains("/etc/twinvm/vm.toml"), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");

        let msg = parse_err("[vmm]\ncpus = 1\n");
        assert!(msg.contains("unknown field `vmm`"), "{msg}");

        let msg = parse_err("cpus = 1\n");
        assert!(msg.contains("unknown field `cpus`"), "{msg}");
    }

    #[test]
    fn wrong_types_are_rejected() {
        let msg = parse_err("[vm]\ncpus = \"2\"\n");
        assert!(msg.contains("expected a number of vCPUs"), "{msg}");
        let msg = parse_err("[vm]\nkernel = 5\n");
        assert!(msg.contains("invalid type"), "{msg}");
        let msg = parse_err("[vm]\ncmdline = [\"a\"]\n");
        assert!(msg.contains("invalid type"), "{msg}");
        let msg = parse_err("vm = 3\n");
        assert!(msg.contains("invalid type"), "{msg}");
    }

    #[test]
    fn invalid_toml_is_one_line() {
        let msg = parse_err("[vm\ncpus = 1\n");
        assert!(
            msg.starts_with("config file '/etc/twinvm/vm.toml': line 1"),
            "{msg}"
        );
        assert!(!msg.contains('\n'), "{msg}");
    }

    #[test]
    fn relative_paths_follow_the_config_file() {
        let f = ConfigFile::parse(
            "[vm]\nkernel = \"images/bzImage\"\ninitrd = \"../initrd.gz\"\n",
            Path::new("/srv/vms/web/vm.toml"),
        )
        .expect("valid file");
        assert_eq!(
            f.vm.kernel,
            Some(PathBuf::from("/srv/vms/web/images/bzImage"))
        );
        assert_eq!(
            f.vm.initrd,
            Some(PathBuf::from("/srv/vms/web/../initrd.gz"))
        );

        // A config file named relative to the working directory.
        let f = ConfigFile::parse("[vm]\nkernel = \"k\"\n", Path::new("vm.toml")).expect("ok");
        assert_eq!(f.vm.kernel, Some(PathBuf::from("k")));
        let f = ConfigFile::parse("[vm]\nkernel = \"k\"\n", Path::new("d/vm.toml")).expect("ok");
        assert_eq!(f.vm.kernel, Some(PathBuf::from("d/k")));

        // Absolute paths stay as they are.
        let f = parse("[vm]\nkernel = \"/k\"\n").expect("ok");
        assert_eq!(f.vm.kernel, Some(PathBuf::from("/k")));
    }

    #[test]
    fn empty_paths_are_rejected() {
        let msg = parse_err("[vm]\nkernel = \"\"\n");
        assert!(msg.contains("`vm.kernel` must not be empty"), "{msg}");
    }

    #[test]
    fn flags_override_the_file() {
        let file = parse(
            "[vm]\nmemory = \"512M\"\ncpus = 2\nkernel = \"a\"\ninitrd = \"b\"\ncmdline = \"x\"\n",
        )
        .expect("valid")
        .vm;
        let args = RunArgs {
            kernel: Some("/flag/k".into()),
            initrd: Some("/flag/i".into()),
            cmdline: Some("y".into()),
            memory: Some(1 << 30),
            cpus: Some(3),
            config: None,
        };
        let c = merge(file, &args, GUEST).expect("merge");
        assert_eq!(c.memory_bytes, 1 << 30);
        assert_eq!(c.vcpus, 3);
        assert_eq!(file_path(&c.kernel), Some(Path::new("/flag/k")));
        assert_eq!(c.initrd, Some(PathBuf::from("/flag/i")));
        assert_eq!(c.cmdline, "y");
    }

    #[test]
    fn file_fills_in_what_flags_leave_out() {
        let file = parse("[vm]\nmemory = \"512M\"\ncpus = 2\nkernel = \"a\"\ncmdline = \"x\"\n")
            .expect("valid")
            .vm;
        let args = RunArgs {
            cpus: Some(4),
            ..RunArgs::default()
        };
        let c = merge(file, &args, GUEST).expect("merge");
        assert_eq!(c.memory_bytes, 512 << 20);
        assert_eq!(c.vcpus, 4);
        assert_eq!(file_path(&c.kernel), Some(Path::new("/etc/twinvm/a")));
        assert_eq!(c.cmdline, "x");
    }

    #[test]
    fn no_kernel_and_no_bundled_guest() {
        let err = merge(VmSection::default(), &RunArgs::default(), &[]).expect_err("no kernel");
        assert!(matches!(err, Error::NoBundledGuest));
    }

    #[test]
    fn missing_file_is_a_read_error() {
        let args = RunArgs {
            config: Some("/nonexistent/twinvm/vm.toml".into()),
            ..RunArgs::default()
        };
        let err = vm_config(&args, GUEST).expect_err("missing file");
        assert!(matches!(err, Error::Read { .. }));
        assert_eq!(
            err.to_string(),
            "cannot read config file '/nonexistent/twinvm/vm.toml'"
        );
    }

    #[test]
    fn line_column_counts_characters() {
        let text = "ab\nçd = 1\n";
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, 3), (2, 1));
        assert_eq!(line_column(text, 5), (2, 2));
        assert_eq!(line_column(text, 999), (3, 1));
    }
}
