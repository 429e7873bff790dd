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
//! prefault = false             # allocate all of guest RAM up front
//!
//! [[net]]                      # one table per network device
//! tap = "tap0"
//! mac = "52:54:00:12:34:56"    # optional
//!
//! [[disk]]                     # one table per disk
//! path = "disk.img"
//! readonly = false             # optional
//! serial = "data0"             # optional
//!
//! [api]
//! socket = "vm.sock"           # the control API's Unix socket
//!
//! [migration]
//! auth_key = "migration.key"   # shared secret, both directions
//! incoming = "0.0.0.0:4444"    # receive the VM by migration
//! verify = false               # debug: digest compare at switchover
//!
//! [replication]                # COLO protection (docs/colo.md)
//! role = "primary"             # or "secondary"
//! peer = "10.0.0.2:7777"       # primary: the secondary's `listen`
//! listen = "0.0.0.0:7777"      # secondary: where the primary connects
//! interval_ms = 200            # checkpoint interval
//! channels = 1                 # page channels
//! verify = false               # debug: digest compare at checkpoints
//! vm_id = "00112233445566778899aabbccddeeff"
//! staging_limit = "64M"        # or bytes; 0: an eighth of guest RAM
//! auth_key = "colo.key"        # default: `migration.auth_key`
//! ```
//!
//! Every table rejects unknown keys, so a typo is an error that names the
//! key. Every key is optional except `net.tap` and `disk.path`. Relative
//! paths are resolved against the directory of the config file.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

use crate::cli::RunArgs;
use crate::colo::{self, Role};
use crate::{devices, migration, size};

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
    #[error("config file '{}': {location}`{key}` must not be empty", .path.display())]
    EmptyPath {
        /// The file.
        path: PathBuf,
        /// "line L, column C: ", or empty when unknown.
        location: String,
        /// The key, with its table ("vm.kernel").
        key: &'static str,
    },
    /// The `[[net]]` or `[[disk]]` tables as a whole are inconsistent (the
    /// same tap device or image file twice).
    #[error("config file '{}': {location}{source}", .path.display())]
    Devices {
        /// The file.
        path: PathBuf,
        /// "line L, column C: " of the offending entry, or empty.
        location: String,
        /// What is wrong.
        source: devices::Error,
    },
    /// An incoming migration and a snapshot to restore, one of them from
    /// the file.
    #[error(
        "config file '{}': `migration.incoming` cannot be used with --restore (a VM is either restored or received by migration)",
        .path.display()
    )]
    IncomingWithRestore {
        /// The file.
        path: PathBuf,
    },
    /// The replication settings do not fit together (from the file, or
    /// the file and the command line).
    #[error("{0}")]
    Replication(String),
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
    /// `[[net]]`: network devices, in order.
    #[serde(default, deserialize_with = "net_tables")]
    pub net: Vec<NetSection>,
    /// `[[disk]]`: disks, in order.
    #[serde(default, rename = "disk", deserialize_with = "disk_tables")]
    pub disks: Vec<DiskSection>,
    /// `[api]`: the control API.
    #[serde(default)]
    pub api: ApiSection,
    /// `[migration]`: live migration.
    #[serde(default)]
    pub migration: MigrationSection,
    /// `[replication]`: COLO protection.
    #[serde(default)]
    pub replication: ReplicationSection,
}

/// The `[replication]` table. The key path is resolved once the file is
/// loaded.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicationSection {
    /// Primary or secondary.
    pub role: Option<RoleName>,
    /// Primary: the secondary's address.
    pub peer: Option<PeerAddr>,
    /// Secondary: the address to wait for the primary on.
    pub listen: Option<ColoListenAddr>,
    /// Checkpoint interval in milliseconds.
    pub interval_ms: Option<IntervalMs>,
    /// Page channels.
    pub channels: Option<ColoChannels>,
    /// Compare digests at every checkpoint.
    pub verify: Option<bool>,
    /// The protected VM's identity.
    pub vm_id: Option<VmIdHex>,
    /// Staged bytes at which the primary checkpoints early.
    pub staging_limit: Option<StagingLimit>,
    /// The shared secret's file.
    pub auth_key: Option<PathBuf>,
}

/// `"primary"` or `"secondary"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct RoleName(pub Role);

impl TryFrom<String> for RoleName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "primary" => Ok(RoleName(Role::Primary)),
            "secondary" => Ok(RoleName(Role::Secondary)),
            _ => Err(format!(
                "invalid `role`: '{s}' is not a role; give \"primary\" or \"secondary\""
            )),
        }
    }
}

/// A `host:port` to connect to ([`migration::check_addr`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct PeerAddr(pub String);

impl TryFrom<String> for PeerAddr {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        migration::check_addr(&s, false)
            .map(|()| PeerAddr(s))
            .map_err(|e| format!("invalid `peer`: {e}"))
    }
}

/// A `host:port` a secondary listens on ([`colo::check_listen_addr`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct ColoListenAddr(pub String);

impl TryFrom<String> for ColoListenAddr {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        colo::check_listen_addr(&s)
            .map(|()| ColoListenAddr(s))
            .map_err(|e| format!("invalid `listen`: {e}"))
    }
}

/// A checkpoint interval in milliseconds ([`colo::interval_ms_range`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "i64")]
pub struct IntervalMs(pub u64);

impl TryFrom<i64> for IntervalMs {
    type Error = String;
    fn try_from(n: i64) -> Result<Self, String> {
        migration::check_range(n.into(), &colo::interval_ms_range())
            .map(IntervalMs)
            .map_err(|e| format!("invalid `interval_ms`: {e}"))
    }
}

/// A number of page channels ([`colo::CHANNELS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "i64")]
pub struct ColoChannels(pub u16);

impl TryFrom<i64> for ColoChannels {
    type Error = String;
    fn try_from(n: i64) -> Result<Self, String> {
        migration::check_range(n.into(), &colo::CHANNELS)
            .and_then(|n| u16::try_from(n).map_err(|e| e.to_string()))
            .map(ColoChannels)
            .map_err(|e| format!("invalid `channels`: {e}"))
    }
}

/// A VM identity written as 32 hex digits ([`colo::parse_vm_id`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct VmIdHex(pub [u8; 16]);

impl TryFrom<String> for VmIdHex {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        colo::parse_vm_id(&s)
            .map(VmIdHex)
            .map_err(|e| format!("invalid `vm_id`: {e}"))
    }
}

/// A staging limit: a size string such as "64M" or an integer number of
/// bytes; 0 or at least one page ([`colo::check_staging_limit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StagingLimit(pub u64);

impl<'de> Deserialize<'de> for StagingLimit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = StagingLimit;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size such as \"64M\" or an integer number of bytes")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<StagingLimit, E> {
                size::parse_size(s)
                    .map_err(|e| e.to_string())
                    .and_then(colo::check_staging_limit)
                    .map(StagingLimit)
                    .map_err(|e| E::custom(format!("invalid `staging_limit`: {e}")))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<StagingLimit, E> {
                if n < 0 {
                    return Err(E::custom(format!(
                        "invalid `staging_limit`: {}",
                        size::Error::Negative
                    )));
                }
                self.visit_u64(n.unsigned_abs())
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<StagingLimit, E> {
                colo::check_staging_limit(n)
                    .map(StagingLimit)
                    .map_err(|e| E::custom(format!("invalid `staging_limit`: {e}")))
            }
        }
        d.deserialize_any(V)
    }
}

/// Which replication settings were given, and where: each is the name of
/// the flag or config key that gave it, for error messages.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReplicationSources {
    /// The role, and what gave it ("--role primary").
    pub role: Option<(Role, String)>,
    /// What gave the peer address.
    pub peer: Option<&'static str>,
    /// What gave the listen address.
    pub listen: Option<&'static str>,
    /// What asked for an incoming migration.
    pub incoming: Option<&'static str>,
    /// `--restore` was given.
    pub restore: bool,
    /// What gave the settings that need a role but fit either.
    pub others: Vec<&'static str>,
}

impl ReplicationSources {
    /// The settings given on the command line alone.
    pub fn of_args(args: &RunArgs) -> ReplicationSources {
        Self::merged(args, &ReplicationSection::default(), false)
    }

    /// The settings of the command line and the `[replication]` table;
    /// `file_incoming`: the file asks for an incoming migration.
    fn merged(
        args: &RunArgs,
        file: &ReplicationSection,
        file_incoming: bool,
    ) -> ReplicationSources {
        let pick = |flag: bool, flag_name: &'static str, key: bool, key_name: &'static str| {
            if flag {
                Some(flag_name)
            } else if key {
                Some(key_name)
            } else {
                None
            }
        };
        let role = match (args.role, file.role.map(|r| r.0)) {
            (Some(r), _) => Some((r, format!("--role {}", r.name()))),
            (None, Some(r)) => Some((r, format!("`replication.role = \"{}\"`", r.name()))),
            (None, None) => None,
        };
        let others = [
            pick(
                args.checkpoint_interval_ms.is_some(),
                "--checkpoint-interval-ms",
                file.interval_ms.is_some(),
                "`replication.interval_ms`",
            ),
            pick(
                args.replication_channels.is_some(),
                "--replication-channels",
                file.channels.is_some(),
                "`replication.channels`",
            ),
            pick(
                args.verify_checkpoints,
                "--verify-checkpoints",
                file.verify.is_some(),
                "`replication.verify`",
            ),
            pick(
                args.vm_id.is_some(),
                "--vm-id",
                file.vm_id.is_some(),
                "`replication.vm_id`",
            ),
            pick(
                args.staging_limit.is_some(),
                "--staging-limit",
                file.staging_limit.is_some(),
                "`replication.staging_limit`",
            ),
            pick(false, "", file.auth_key.is_some(), "`replication.auth_key`"),
        ]
        .into_iter()
        .flatten()
        .collect();
        ReplicationSources {
            role,
            peer: pick(
                args.peer.is_some(),
                "--peer",
                file.peer.is_some(),
                "`replication.peer`",
            ),
            listen: pick(
                args.listen.is_some(),
                "--listen",
                file.listen.is_some(),
                "`replication.listen`",
            ),
            incoming: pick(
                args.incoming.is_some(),
                "--incoming",
                file_incoming,
                "`migration.incoming`",
            ),
            restore: args.restore.is_some(),
            others,
        }
    }
}

/// Checks that the replication settings fit together: a role with the
/// address it needs and not the other side's, no role with `--incoming`
/// or `--restore`, no replication setting without a role. `complete`:
/// nothing else can supply a setting (no config file is still to be
/// read), so a missing one is an error too.
pub fn check_replication(given: &ReplicationSources, complete: bool) -> Result<(), String> {
    let Some((role, role_name)) = &given.role else {
        if complete
            && let Some(first) = given
                .peer
                .iter()
                .chain(&given.listen)
                .chain(&given.others)
                .next()
        {
            return Err(format!(
                "{first} is a replication setting: give --role primary or --role secondary (or `replication.role`) too"
            ));
        }
        return Ok(());
    };
    if let Some(incoming) = given.incoming {
        return Err(format!(
            "{role_name} cannot be used with {incoming}: a secondary receives its VM from its primary (use --role secondary --listen HOST:PORT)"
        ));
    }
    if given.restore {
        return Err(format!(
            "{role_name} cannot be used with --restore: a protected pair starts from a booted guest"
        ));
    }
    match role {
        Role::Primary => {
            if let Some(listen) = given.listen {
                return Err(format!(
                    "{listen} is for a secondary; a primary ({role_name}) connects to its secondary at --peer HOST:PORT"
                ));
            }
            if complete && given.peer.is_none() {
                return Err(format!(
                    "{role_name} needs the secondary's address: --peer HOST:PORT (or `replication.peer`), the address its --listen gives"
                ));
            }
        }
        Role::Secondary => {
            if let Some(peer) = given.peer {
                return Err(format!(
                    "{peer} is for a primary; a secondary ({role_name}) waits for its primary on --listen HOST:PORT"
                ));
            }
            if complete && given.listen.is_none() {
                return Err(format!(
                    "{role_name} needs an address to wait for its primary on: --listen HOST:PORT (or `replication.listen`)"
                ));
            }
        }
    }
    Ok(())
}

/// The `[migration]` table. The key path is resolved once the file is
/// loaded.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationSection {
    /// The shared secret's file.
    pub auth_key: Option<PathBuf>,
    /// The address to receive the VM on.
    pub incoming: Option<ListenAddr>,
    /// Compare digests at switchover.
    pub verify: Option<bool>,
}

/// A `host:port` to listen on ([`migration::check_addr`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct ListenAddr(pub String);

impl TryFrom<String> for ListenAddr {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        migration::check_addr(&s, true)
            .map(|()| ListenAddr(s))
            .map_err(|e| format!("invalid `incoming`: {e}"))
    }
}

/// The `[api]` table. The path is resolved once the file is loaded.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSection {
    /// The Unix socket to serve the control API on.
    pub socket: Option<PathBuf>,
}

fn net_tables<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<NetSection>, D::Error> {
    table_array(d, "net")
}

fn disk_tables<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<DiskSection>, D::Error> {
    table_array(d, "disk")
}

/// Deserializes an array of tables, `[[name]]`, and explains the mistake
/// of writing a single table, `[name]`, instead.
fn table_array<'de, D, T>(d: D, name: &'static str) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct V<T> {
        name: &'static str,
        item: std::marker::PhantomData<T>,
    }
    impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            write!(f, "one `[[{}]]` table per device", self.name)
        }
        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let mut items = Vec::new();
            while let Some(item) = seq.next_element()? {
                items.push(item);
            }
            Ok(items)
        }
        fn visit_map<A: de::MapAccess<'de>>(self, _: A) -> Result<Vec<T>, A::Error> {
            Err(de::Error::custom(format!(
                "`{0}` must be an array of tables: write `[[{0}]]` (one per device), not `[{0}]`",
                self.name
            )))
        }
    }
    d.deserialize_any(V {
        name,
        item: std::marker::PhantomData,
    })
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
    /// Allocate all of guest RAM up front.
    pub prefault: Option<bool>,
}

/// One `[[net]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetSection {
    /// The host tap device.
    pub tap: toml::Spanned<TapName>,
    /// The guest's MAC address.
    pub mac: Option<MacAddress>,
}

/// One `[[disk]]` table. The path is resolved once the file is loaded.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSection {
    /// The raw image file.
    pub path: toml::Spanned<PathBuf>,
    /// Refuse guest writes.
    #[serde(default)]
    pub readonly: bool,
    /// The ID the guest reads.
    pub serial: Option<DiskSerial>,
}

impl From<NetSection> for vmm::NetConfig {
    fn from(n: NetSection) -> Self {
        vmm::NetConfig {
            tap: n.tap.into_inner().0,
            mac: n.mac.map(|m| m.0),
        }
    }
}

impl From<DiskSection> for vmm::DiskConfig {
    fn from(d: DiskSection) -> Self {
        vmm::DiskConfig {
            path: d.path.into_inner(),
            readonly: d.readonly,
            serial: d.serial.map(|s| s.0),
        }
    }
}

/// A valid Linux network interface name
/// ([`devices::validate_tap_name`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct TapName(pub String);

impl TryFrom<String> for TapName {
    type Error = devices::Error;
    fn try_from(s: String) -> Result<Self, devices::Error> {
        devices::validate_tap_name(&s).map(|()| TapName(s))
    }
}

/// A unicast, non-zero MAC address written as "52:54:00:12:34:56"
/// ([`devices::parse_mac`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct MacAddress(pub [u8; 6]);

impl TryFrom<String> for MacAddress {
    type Error = devices::Error;
    fn try_from(s: String) -> Result<Self, devices::Error> {
        devices::parse_mac(&s).map(MacAddress)
    }
}

/// A disk serial of 1 to 20 printable ASCII characters
/// ([`devices::validate_serial`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct DiskSerial(pub String);

impl TryFrom<String> for DiskSerial {
    type Error = devices::Error;
    fn try_from(s: String) -> Result<Self, devices::Error> {
        devices::validate_serial(&s).map(|()| DiskSerial(s))
    }
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
                .map(|span| location(text, span.start))
                .unwrap_or_default(),
            message: one_line(e.message()),
        })?;
        let base = path.parent().unwrap_or(Path::new(""));
        let resolve = |p: PathBuf| if p.is_relative() { base.join(p) } else { p };
        let vm = &mut file.vm;
        for (key, slot) in [
            ("vm.kernel", &mut vm.kernel),
            ("vm.initrd", &mut vm.initrd),
            ("api.socket", &mut file.api.socket),
            ("migration.auth_key", &mut file.migration.auth_key),
            ("replication.auth_key", &mut file.replication.auth_key),
        ] {
            if let Some(p) = slot.take() {
                if p.as_os_str().is_empty() {
                    return Err(Error::EmptyPath {
                        path: path.to_path_buf(),
                        location: String::new(),
                        key,
                    });
                }
                *slot = Some(resolve(p));
            }
        }
        for disk in &mut file.disks {
            let span = disk.path.span();
            let p = std::mem::take(disk.path.get_mut());
            if p.as_os_str().is_empty() {
                return Err(Error::EmptyPath {
                    path: path.to_path_buf(),
                    location: location(text, span.start),
                    key: "disk.path",
                });
            }
            *disk.path.get_mut() = resolve(p);
        }
        file.check_devices(text, path)?;
        Ok(file)
    }

    /// Refuses two `[[net]]` tables with the same tap device and two
    /// `[[disk]]` tables with the same image file, pointing at the second.
    fn check_devices(&self, text: &str, path: &Path) -> Result<(), Error> {
        let net: Vec<vmm::NetConfig> = self
            .net
            .iter()
            .map(|n| vmm::NetConfig {
                tap: n.tap.get_ref().0.clone(),
                mac: n.mac.map(|m| m.0),
            })
            .collect();
        let disks: Vec<vmm::DiskConfig> = self
            .disks
            .iter()
            .map(|d| vmm::DiskConfig {
                path: d.path.get_ref().clone(),
                readonly: d.readonly,
                serial: None,
            })
            .collect();
        let err = |source: devices::Error, offset: Option<usize>| Error::Devices {
            path: path.to_path_buf(),
            location: offset.map(|o| location(text, o)).unwrap_or_default(),
            source,
        };
        devices::check_unique_taps(&net).map_err(|e| {
            let offset = match &e {
                devices::Error::DuplicateTap { second, .. } => {
                    self.net.get(second - 1).map(|n| n.tap.span().start)
                }
                _ => None,
            };
            err(e, offset)
        })?;
        devices::check_unique_disks(&disks).map_err(|e| {
            let offset = match &e {
                devices::Error::DuplicateDisk { index, .. } => {
                    self.disks.get(index - 1).map(|d| d.path.span().start)
                }
                _ => None,
            };
            err(e, offset)
        })
    }
}

/// "line L, column C: " for byte `offset` in `text`.
fn location(text: &str, offset: usize) -> String {
    let (line, column) = line_column(text, offset);
    format!("line {line}, column {column}: ")
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

/// Everything `twinvm run` needs to know.
#[derive(Debug)]
pub struct Settings {
    /// The VM.
    pub vm: vmm::VmConfig,
    /// Where to serve the control API, if anywhere.
    pub api_socket: Option<PathBuf>,
    /// Live migration.
    pub migration: MigrationSettings,
    /// COLO protection, if a role is given.
    pub replication: Option<colo::Settings>,
}

/// The migration settings of `twinvm run`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct MigrationSettings {
    /// Receive the VM by migration on this address.
    pub incoming: Option<String>,
    /// The shared secret's file.
    pub auth_key: Option<PathBuf>,
    /// Compare digests at switchover.
    pub verify: bool,
}

/// Builds the settings: command-line flags override the config file
/// (`args.config`, if any), which overrides the defaults. Without a kernel,
/// `bundled_guest` (the test guest) is booted.
pub fn settings(args: &RunArgs, bundled_guest: &'static [u8]) -> Result<Settings, Error> {
    let mut file = match &args.config {
        Some(path) => ConfigFile::load(path)?,
        None => ConfigFile::default(),
    };
    let api_socket = args.api_socket.clone().or(file.api.socket.take());
    let section = std::mem::take(&mut file.migration);
    let file_incoming = section.incoming.is_some();
    let migration = MigrationSettings {
        incoming: args.incoming.clone().or(section.incoming.map(|a| a.0)),
        auth_key: args.auth_key.clone().or(section.auth_key),
        verify: args.verify_migration || section.verify.unwrap_or(false),
    };
    if migration.incoming.is_some()
        && args.restore.is_some()
        && let Some(path) = &args.config
    {
        // Both on the command line is a usage error caught earlier.
        return Err(Error::IncomingWithRestore { path: path.clone() });
    }
    let section = std::mem::take(&mut file.replication);
    let sources = ReplicationSources::merged(args, &section, file_incoming);
    check_replication(&sources, true).map_err(Error::Replication)?;
    let replication = args.role.or(section.role.map(|r| r.0)).map(|role| {
        let addr = match role {
            Role::Primary => args.peer.clone().or(section.peer.map(|a| a.0)),
            Role::Secondary => args.listen.clone().or(section.listen.map(|a| a.0)),
        };
        colo::Settings {
            role,
            // Checked above: the role's address is given.
            addr: addr.unwrap_or_default(),
            interval: Duration::from_millis(
                args.checkpoint_interval_ms
                    .or(section.interval_ms.map(|i| i.0))
                    .unwrap_or_else(colo::default_interval_ms),
            ),
            channels: args
                .replication_channels
                .or(section.channels.map(|c| c.0))
                .unwrap_or(1),
            verify: args.verify_checkpoints || section.verify.unwrap_or(false),
            vm_id: args.vm_id.or(section.vm_id.map(|v| v.0)),
            staging_limit: args
                .staging_limit
                .or(section.staging_limit.map(|s| s.0))
                .unwrap_or(0),
            auth_key: args
                .auth_key
                .clone()
                .or(section.auth_key)
                .or(migration.auth_key.clone()),
        }
    });
    Ok(Settings {
        vm: merge(file, args, bundled_guest)?,
        api_socket,
        migration,
        replication,
    })
}

/// Merges an already loaded config file with the command line. Single
/// settings are overridden one by one; the device lists as a whole: any
/// `--net` flag replaces all `[[net]]` tables, any `--disk` flag all
/// `[[disk]]` tables.
pub fn merge(
    file: ConfigFile,
    args: &RunArgs,
    bundled_guest: &'static [u8],
) -> Result<vmm::VmConfig, Error> {
    let ConfigFile {
        vm: file,
        net: file_net,
        disks: file_disks,
        api: _,
        migration: _,
        replication: _,
    } = file;
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
        net: if args.net.is_empty() {
            file_net.into_iter().map(Into::into).collect()
        } else {
            args.net.clone()
        },
        disks: if args.disk.is_empty() {
            file_disks.into_iter().map(Into::into).collect()
        } else {
            args.disk.clone()
        },
        prefault: args.prefault || file.prefault.unwrap_or(false),
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
            prefault = true
            "#,
        )
        .expect("valid file");
        assert_eq!(f.vm.prefault, Some(true));
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
            let c = merge(f, &RunArgs::default(), GUEST).expect("defaults");
            assert_eq!(c.memory_bytes, 256 << 20);
            assert_eq!(c.vcpus, 1);
            assert!(matches!(c.kernel, vmm::KernelSource::Bytes(b) if b == GUEST));
            assert!(c.initrd.is_none());
            assert_eq!(c.cmdline, "");
            assert!(c.net.is_empty() && c.disks.is_empty());
            assert!(!c.prefault);
        }
    }

    #[test]
    fn prefault_from_the_file_or_the_flag() {
        let on = |text: &str, flag: bool| {
            let args = RunArgs {
                prefault: flag,
                ..RunArgs::default()
            };
            merge(parse(text).expect(text), &args, GUEST)
                .expect("valid")
                .prefault
        };
        assert!(on("[vm]\nprefault = true\n", false));
        assert!(on("", true));
        assert!(!on("[vm]\nprefault = false\n", false));
        assert!(parse_err("[vm]\nprefault = 1\n").contains("expected a boolean"));
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
        .expect("valid");
        let args = RunArgs {
            kernel: Some("/flag/k".into()),
            initrd: Some("/flag/i".into()),
            cmdline: Some("y".into()),
            memory: Some(1 << 30),
            cpus: Some(3),
            ..RunArgs::default()
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
            .expect("valid");
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
        let err = merge(ConfigFile::default(), &RunArgs::default(), &[]).expect_err("no kernel");
        assert!(matches!(err, Error::NoBundledGuest));
    }

    #[test]
    fn missing_file_is_a_read_error() {
        let args = RunArgs {
            config: Some("/nonexistent/twinvm/vm.toml".into()),
            ..RunArgs::default()
        };
        let err = settings(&args, GUEST).expect_err("missing file");
        assert!(matches!(err, Error::Read { .. }));
        assert_eq!(
            err.to_string(),
            "cannot read config file '/nonexistent/twinvm/vm.toml'"
        );
    }

    const DEVICES: &str = r#"
        [[net]]
        tap = "tap0"
        mac = "52:54:00:12:34:56"

        [[net]]
        tap = "tap1"

        [[disk]]
        path = "root.img"
        readonly = true
        serial = "root"

        [[disk]]
        path = "/data/d.img"
        "#;

    fn file_net() -> Vec<vmm::NetConfig> {
        vec![
            vmm::NetConfig {
                tap: "tap0".into(),
                mac: Some([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]),
            },
            vmm::NetConfig {
                tap: "tap1".into(),
                mac: None,
            },
        ]
    }

    fn file_disks() -> Vec<vmm::DiskConfig> {
        vec![
            vmm::DiskConfig {
                path: "/etc/twinvm/root.img".into(),
                readonly: true,
                serial: Some("root".into()),
            },
            vmm::DiskConfig {
                path: "/data/d.img".into(),
                readonly: false,
                serial: None,
            },
        ]
    }

    #[test]
    fn net_and_disk_tables_parse() {
        let f = parse(DEVICES).expect("valid file");
        let c = merge(f, &RunArgs::default(), GUEST).expect("merge");
        assert_eq!(c.net, file_net());
        assert_eq!(c.disks, file_disks());
    }

    #[test]
    fn inline_arrays_of_tables_work_too() {
        let f = parse("net = [{ tap = \"a\" }, { tap = \"b\" }]\ndisk = [{ path = \"x\" }]\n")
            .expect("valid file");
        assert_eq!(f.net.len(), 2);
        assert_eq!(*f.disks[0].path.get_ref(), PathBuf::from("/etc/twinvm/x"));
    }

    #[test]
    fn disk_paths_follow_the_config_file() {
        let f = ConfigFile::parse(
            "[[disk]]\npath = \"img/a.img\"\n[[disk]]\npath = \"/abs.img\"\n",
            Path::new("/srv/vm/vm.toml"),
        )
        .expect("valid");
        let c = merge(f, &RunArgs::default(), GUEST).expect("merge");
        let paths: Vec<_> = c.disks.iter().map(|d| d.path.clone()).collect();
        assert_eq!(
            paths,
            [
                PathBuf::from("/srv/vm/img/a.img"),
                PathBuf::from("/abs.img")
            ]
        );
    }

    #[test]
    fn device_flags_replace_the_file_lists() {
        let flag_net = vec![vmm::NetConfig {
            tap: "flagtap".into(),
            mac: None,
        }];
        let flag_disk = vec![vmm::DiskConfig {
            path: "flag.img".into(),
            readonly: false,
            serial: None,
        }];
        // --net only: the file's disks stay.
        let args = RunArgs {
            net: flag_net.clone(),
            ..RunArgs::default()
        };
        let c = merge(parse(DEVICES).expect("valid"), &args, GUEST).expect("merge");
        assert_eq!(c.net, flag_net);
        assert_eq!(c.disks, file_disks());
        // --disk only: the file's network devices stay.
        let args = RunArgs {
            disk: flag_disk.clone(),
            ..RunArgs::default()
        };
        let c = merge(parse(DEVICES).expect("valid"), &args, GUEST).expect("merge");
        assert_eq!(c.net, file_net());
        assert_eq!(c.disks, flag_disk);
    }

    #[test]
    fn bad_device_tables_are_rejected() {
        for (text, want) in [
            (
                "[[net]]\nmac = \"52:54:00:12:34:56\"\n",
                "missing field `tap`",
            ),
            (
                "[[net]]\ntap = \"a/b\"\n",
                "line 2, column 7: invalid tap device name 'a/b'",
            ),
            (
                "[[net]]\ntap = \"\"\n",
                "invalid tap device name '': it is empty",
            ),
            (
                "[[net]]\ntap = \"t\"\nmac = \"zz:00:00:00:00:00\"\n",
                "line 3, column 7: invalid MAC address",
            ),
            (
                "[[net]]\ntap = \"t\"\nmac = \"ff:ff:ff:ff:ff:ff\"\n",
                "multicast",
            ),
            (
                "[[net]]\ntap = \"t\"\nmodel = \"e1000\"\n",
                "unknown field `model`",
            ),
            ("[[net]]\ntap = 3\n", "invalid type"),
            (
                "[net]\ntap = \"t\"\n",
                "write `[[net]]` (one per device), not `[net]`",
            ),
            ("[[disk]]\nreadonly = true\n", "missing field `path`"),
            (
                "[[disk]]\npath = \"\"\n",
                "line 2, column 8: `disk.path` must not be empty",
            ),
            (
                "[[disk]]\npath = \"a\"\nreadonly = \"yes\"\n",
                "invalid type",
            ),
            (
                "[[disk]]\npath = \"a\"\nserial = \"123456789012345678901\"\n",
                "invalid disk serial",
            ),
            (
                "[[disk]]\npath = \"a\"\nserial = \"\"\n",
                "invalid disk serial '': it is empty",
            ),
            ("[[disk]]\npath = \"a\"\nro = true\n", "unknown field `ro`"),
            ("[disk]\npath = \"a\"\n", "write `[[disk]]`"),
            ("disk = 1\n", "one `[[disk]]` table per device"),
        ] {
            let msg = parse_err(text);
            assert!(msg.contains(want), "{text}: {msg}");
            assert!(!msg.contains('\n'), "{msg}");
        }
    }

    #[test]
    fn the_same_tap_or_image_twice_is_rejected() {
        let msg =
            parse_err("[[net]]\ntap = \"t0\"\n[[net]]\ntap = \"t1\"\n[[net]]\ntap = \"t0\"\n");
        assert_eq!(
            msg,
            "config file '/etc/twinvm/vm.toml': line 6, column 7: tap device 't0' is used by two network devices (entries 1 and 3)"
        );
        let msg =
            parse_err("[[disk]]\npath = \"a.img\"\n[[disk]]\npath = \"/etc/twinvm/./a.img\"\n");
        assert_eq!(
            msg,
            "config file '/etc/twinvm/vm.toml': line 4, column 8: disks '/etc/twinvm/a.img' and '/etc/twinvm/./a.img' are the same image file"
        );
        let msg = parse_err(
            "[[disk]]\npath = \"a.img\"\nreadonly = true\n[[disk]]\npath = \"a.img\"\nreadonly = true\n",
        );
        assert!(
            msg.contains("disk '/etc/twinvm/a.img' is given more than once"),
            "{msg}"
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

    #[test]
    fn api_socket_follows_the_config_file_and_the_flag_wins() {
        let f = ConfigFile::parse(
            "[api]\nsocket = \"run/vm.sock\"\n",
            Path::new("/srv/vm/vm.toml"),
        )
        .expect("valid");
        assert_eq!(f.api.socket, Some(PathBuf::from("/srv/vm/run/vm.sock")));
        let f = parse("[api]\nsocket = \"/abs.sock\"\n").expect("valid");
        assert_eq!(f.api.socket, Some(PathBuf::from("/abs.sock")));

        let dir = std::env::temp_dir().join(format!("twinvm-cfg-api-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let cfg = dir.join("vm.toml");
        std::fs::write(&cfg, "[api]\nsocket = \"vm.sock\"\n").expect("write config");
        let mut args = RunArgs {
            config: Some(cfg.clone()),
            ..RunArgs::default()
        };
        let s = settings(&args, GUEST).expect("settings");
        assert_eq!(s.api_socket, Some(dir.join("vm.sock")));
        args.api_socket = Some("/flag.sock".into());
        let s = settings(&args, GUEST).expect("settings");
        assert_eq!(s.api_socket, Some(PathBuf::from("/flag.sock")));
        let _ = std::fs::remove_dir_all(&dir);

        let s = settings(&RunArgs::default(), GUEST).expect("settings");
        assert_eq!(s.api_socket, None);
    }

    #[test]
    fn bad_api_tables_are_rejected() {
        for (text, want) in [
            ("[api]\nsocket = \"\"\n", "`api.socket` must not be empty"),
            ("[api]\nsocket = 1\n", "invalid type"),
            ("[api]\nport = 80\n", "unknown field `port`"),
        ] {
            let msg = parse_err(text);
            assert!(msg.contains(want), "{text}: {msg}");
        }
    }

    #[test]
    fn migration_table_parses_and_flags_win() {
        let f = ConfigFile::parse(
            "[migration]\nauth_key = \"keys/mig.key\"\nincoming = \"0.0.0.0:4444\"\nverify = true\n",
            Path::new("/srv/vm/vm.toml"),
        )
        .expect("valid");
        assert_eq!(
            f.migration.auth_key,
            Some(PathBuf::from("/srv/vm/keys/mig.key"))
        );
        assert_eq!(
            f.migration.incoming,
            Some(ListenAddr("0.0.0.0:4444".into()))
        );
        assert_eq!(f.migration.verify, Some(true));

        let dir = std::env::temp_dir().join(format!("twinvm-cfg-mig-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let cfg = dir.join("vm.toml");
        std::fs::write(
            &cfg,
            "[migration]\nauth_key = \"k\"\nincoming = \"127.0.0.1:4444\"\n",
        )
        .expect("write config");
        let mut args = RunArgs {
            config: Some(cfg.clone()),
            ..RunArgs::default()
        };
        let s = settings(&args, GUEST).expect("settings");
        assert_eq!(
            s.migration,
            MigrationSettings {
                incoming: Some("127.0.0.1:4444".into()),
                auth_key: Some(dir.join("k")),
                verify: false,
            }
        );
        args.incoming = Some("[::1]:5555".into());
        args.auth_key = Some("/flag.key".into());
        args.verify_migration = true;
        let s = settings(&args, GUEST).expect("settings");
        assert_eq!(
            s.migration,
            MigrationSettings {
                incoming: Some("[::1]:5555".into()),
                auth_key: Some(PathBuf::from("/flag.key")),
                verify: true,
            }
        );
        // The file's `incoming` and --restore do not go together.
        args.incoming = None;
        args.restore = Some("/snap".into());
        let err = settings(&args, GUEST).expect_err("incoming and restore");
        assert!(matches!(err, Error::IncomingWithRestore { .. }), "{err}");
        assert!(err.to_string().contains("--restore"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);

        let s = settings(&RunArgs::default(), GUEST).expect("settings");
        assert_eq!(s.migration, MigrationSettings::default());
    }

    #[test]
    fn bad_migration_tables_are_rejected() {
        for (text, want) in [
            (
                "[migration]\nauth_key = \"\"\n",
                "`migration.auth_key` must not be empty",
            ),
            (
                "[migration]\nincoming = \"4444\"\n",
                "line 2, column 12: invalid `incoming`: '4444' has no port",
            ),
            ("[migration]\nincoming = 4444\n", "invalid type"),
            ("[migration]\nverify = \"yes\"\n", "invalid type"),
            ("[migration]\nchannels = 2\n", "unknown field `channels`"),
        ] {
            let msg = parse_err(text);
            assert!(msg.contains(want), "{text}: {msg}");
            assert!(!msg.contains('\n'), "{msg}");
        }
    }

    #[test]
    fn replication_table_parses_and_flags_win() {
        let f = ConfigFile::parse(
            r#"
            [replication]
            role = "primary"
            peer = "10.0.0.2:7777"
            interval_ms = 100
            channels = 4
            verify = true
            vm_id = "00112233445566778899aabbccddeeff"
            staging_limit = "64M"
            auth_key = "keys/colo.key"
            "#,
            Path::new("/srv/vm/vm.toml"),
        )
        .expect("valid");
        let r = &f.replication;
        assert_eq!(r.role, Some(RoleName(Role::Primary)));
        assert_eq!(r.peer, Some(PeerAddr("10.0.0.2:7777".into())));
        assert_eq!(r.interval_ms, Some(IntervalMs(100)));
        assert_eq!(r.channels, Some(ColoChannels(4)));
        assert_eq!(r.verify, Some(true));
        assert_eq!(r.vm_id.map(|v| v.0[15]), Some(0xff));
        assert_eq!(r.staging_limit, Some(StagingLimit(64 << 20)));
        assert_eq!(r.auth_key, Some(PathBuf::from("/srv/vm/keys/colo.key")));
        let f = parse("[replication]\nstaging_limit = 0\n").expect("valid");
        assert_eq!(f.replication.staging_limit, Some(StagingLimit(0)));

        let dir = std::env::temp_dir().join(format!("twinvm-cfg-colo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let cfg = dir.join("vm.toml");
        std::fs::write(
            &cfg,
            "[replication]\nrole = \"secondary\"\nlisten = \"0.0.0.0:7777\"\nchannels = 2\n\
             [migration]\nauth_key = \"m.key\"\n",
        )
        .expect("write config");
        let mut args = RunArgs {
            config: Some(cfg.clone()),
            ..RunArgs::default()
        };
        let s = settings(&args, GUEST).expect("settings");
        assert_eq!(
            s.replication,
            Some(colo::Settings {
                role: Role::Secondary,
                addr: "0.0.0.0:7777".into(),
                interval: replication::colo::DEFAULT_INTERVAL,
                channels: 2,
                verify: false,
                vm_id: None,
                staging_limit: 0,
                // The migration key serves replication too.
                auth_key: Some(dir.join("m.key")),
            })
        );
        args.listen = Some("127.0.0.1:9".into());
        args.replication_channels = Some(16);
        args.checkpoint_interval_ms = Some(10);
        args.verify_checkpoints = true;
        args.vm_id = Some([1; 16]);
        args.staging_limit = Some(1 << 20);
        args.auth_key = Some("/flag.key".into());
        let r = settings(&args, GUEST)
            .expect("settings")
            .replication
            .unwrap();
        assert_eq!(r.addr, "127.0.0.1:9");
        assert_eq!(r.channels, 16);
        assert_eq!(r.interval, Duration::from_millis(10));
        assert!(r.verify);
        assert_eq!(r.vm_id, Some([1; 16]));
        assert_eq!(r.staging_limit, 1 << 20);
        assert_eq!(r.auth_key, Some(PathBuf::from("/flag.key")));
        // A role on the command line overrides the file's, and the file's
        // listen address then does not fit.
        args.role = Some(Role::Primary);
        args.listen = None;
        args.peer = Some("h:1".into());
        let err = settings(&args, GUEST).expect_err("listen with primary");
        assert!(
            err.to_string()
                .contains("`replication.listen` is for a secondary"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);

        let s = settings(&RunArgs::default(), GUEST).expect("settings");
        assert_eq!(s.replication, None);
    }

    #[test]
    fn bad_replication_tables_are_rejected() {
        for (text, want) in [
            (
                "[replication]\nrole = \"tertiary\"\n",
                "line 2, column 8: invalid `role`: 'tertiary' is not a role; give \"primary\" or \"secondary\"",
            ),
            ("[replication]\nrole = 1\n", "invalid type"),
            (
                "[replication]\npeer = \"h\"\n",
                "line 2, column 8: invalid `peer`: 'h' has no port",
            ),
            ("[replication]\npeer = \"h:0\"\n", "port 0"),
            ("[replication]\nlisten = \"0.0.0.0:0\"\n", "port 0"),
            (
                "[replication]\ninterval_ms = 5\n",
                "invalid `interval_ms`: must be between 10 and 3600000, not 5",
            ),
            ("[replication]\ninterval_ms = \"1s\"\n", "invalid type"),
            (
                "[replication]\nchannels = 17\n",
                "invalid `channels`: must be between 1 and 16, not 17",
            ),
            ("[replication]\nchannels = 0\n", "between 1 and 16"),
            ("[replication]\nvm_id = \"abc\"\n", "invalid `vm_id`"),
            ("[replication]\nvm_id = 5\n", "invalid type"),
            (
                "[replication]\nstaging_limit = 12\n",
                "invalid `staging_limit`: 12 bytes is less than one page",
            ),
            (
                "[replication]\nstaging_limit = -1\n",
                "invalid `staging_limit`: size must not be negative",
            ),
            ("[replication]\nstaging_limit = \"x\"\n", "not a size"),
            ("[replication]\nverify = \"yes\"\n", "invalid type"),
            (
                "[replication]\nauth_key = \"\"\n",
                "`replication.auth_key` must not be empty",
            ),
            ("[replication]\nmode = 1\n", "unknown field `mode`"),
        ] {
            let msg = parse_err(text);
            assert!(msg.contains(want), "{text}: {msg}");
            assert!(!msg.contains('\n'), "{msg}");
        }
    }

    #[test]
    fn replication_settings_must_fit_together() {
        let check = |args: &RunArgs, text: &str| {
            let file = parse(text).expect("valid file");
            let incoming = file.migration.incoming.is_some();
            let given = ReplicationSources::merged(args, &file.replication, incoming);
            check_replication(&given, true)
        };
        let none = RunArgs::default();
        assert_eq!(check(&none, ""), Ok(()));
        assert_eq!(
            check(&none, "[replication]\nrole = \"primary\"\npeer = \"h:1\"\n"),
            Ok(())
        );
        for (args, text, want) in [
            (
                &none,
                "[replication]\nrole = \"primary\"\n",
                "`replication.role = \"primary\"` needs the secondary's address",
            ),
            (
                &none,
                "[replication]\nrole = \"secondary\"\n",
                "needs an address to wait for its primary on: --listen",
            ),
            (
                &none,
                "[replication]\nrole = \"secondary\"\nlisten = \"h:1\"\npeer = \"h:2\"\n",
                "`replication.peer` is for a primary",
            ),
            (
                &none,
                "[replication]\ninterval_ms = 100\n",
                "`replication.interval_ms` is a replication setting: give --role",
            ),
            (
                &none,
                "[replication]\nauth_key = \"k\"\n",
                "`replication.auth_key` is a replication setting",
            ),
            (
                &none,
                "[replication]\nrole = \"secondary\"\nlisten = \"h:1\"\n[migration]\nincoming = \"h:2\"\n",
                "cannot be used with `migration.incoming`",
            ),
        ] {
            let err = check(args, text).expect_err(text);
            assert!(err.contains(want), "{text}: {err}");
        }
        let restore = RunArgs {
            restore: Some("/snap".into()),
            ..RunArgs::default()
        };
        let err = check(
            &restore,
            "[replication]\nrole = \"primary\"\npeer = \"h:1\"\n",
        )
        .expect_err("restore");
        assert!(err.contains("cannot be used with --restore"), "{err}");
        // Without the file, what is missing is not an error yet.
        let primary = RunArgs {
            role: Some(Role::Primary),
            ..RunArgs::default()
        };
        assert_eq!(
            check_replication(&ReplicationSources::of_args(&primary), false),
            Ok(())
        );
        assert!(check_replication(&ReplicationSources::of_args(&primary), true).is_err());
    }
}
