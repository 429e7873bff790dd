//! The command line: `twinvm run [OPTIONS]`, `twinvm pair [OPTIONS]` and
//! `twinvm ctl --socket PATH ACTION`.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::builder::{OsStringValueParser, TypedValueParser};
use clap::{Args, Parser, Subcommand};

use crate::colo::{self, Role};
use crate::{config, devices, migration, size};

/// twinvm: a KVM virtual machine monitor.
#[derive(Debug, Parser)]
#[command(name = "twinvm", version, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The checks of [`RunArgs::validate`] and
    /// [`RunArgs::validate_replication`] (or [`PairArgs::validate`]) for
    /// whichever subcommand was given; a failure is a usage error.
    pub fn validate(&self) -> Result<(), String> {
        match &self.command {
            Command::Run(args) => {
                args.validate().map_err(|e| e.to_string())?;
                args.validate_replication()
            }
            Command::Pair(args) => args.validate().map_err(|e| e.to_string()),
            Command::Ctl(_) => Ok(()),
        }
    }
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a VM and run it until the guest powers off or resets.
    ///
    /// The guest's serial console is connected to stdin/stdout; logs go to
    /// stderr (filter with TWINVM_LOG, default "warn").
    Run(RunArgs),
    /// Start a protected pair on this machine: a primary VM with its
    /// console on this terminal, and a secondary kept in step with it by
    /// checkpoints (docs/colo.md).
    ///
    /// Runs `twinvm run --role secondary` and `twinvm run --role primary`
    /// as child processes, with a fresh auth key and VM id, their API
    /// sockets and the secondary's console log in --dir. The secondary
    /// gets its own copy of every disk image; network devices are used by
    /// the primary only. Ends when the primary's guest powers off (or on
    /// Ctrl-C / SIGTERM), stopping the secondary; exits with the primary's
    /// status.
    Pair(PairArgs),
    /// Control a running VM through its API socket (see `run --api-socket`).
    Ctl(CtlArgs),
}

/// Options of `twinvm ctl`.
#[derive(Debug, Clone, Args)]
pub struct CtlArgs {
    /// The VM's API socket (`twinvm run --api-socket PATH`).
    #[arg(long, value_name = "PATH", value_parser = OsStringValueParser::new().try_map(parse_path_arg))]
    pub socket: PathBuf,

    /// What to do.
    #[command(subcommand)]
    pub action: CtlAction,
}

/// What `twinvm ctl` asks of the VM.
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum CtlAction {
    /// Print the VM's status as JSON: state, uptime, vCPUs, memory, devices.
    Status,
    /// Pause the VM (no-op if paused).
    Pause,
    /// Resume a paused VM (no-op if running).
    Resume,
    /// Power the VM off; `twinvm run` then exits with status 0.
    Stop,
    /// Write a snapshot of the VM (guest memory and state) into a new or
    /// empty directory; a running VM is paused meanwhile and then resumed.
    /// Restore it with `twinvm run --restore DIR`.
    Snapshot {
        /// The directory (created if needed; relative to this command's
        /// working directory).
        #[arg(long, value_name = "DIR", value_parser = OsStringValueParser::new().try_map(parse_path_arg))]
        to: PathBuf,
    },
    /// Live-migrate the VM to a `twinvm run --incoming HOST:PORT` on this
    /// or another host, and print the migration's report as JSON. The
    /// guest keeps running while its memory is copied; once it runs at the
    /// destination, this VM's `twinvm run` exits with status 0. If the
    /// migration fails, the VM runs on here.
    Migrate {
        /// The destination's `--incoming` address.
        #[arg(long, value_name = "HOST:PORT", value_parser = parse_connect_addr)]
        to: String,
        /// TCP connections to copy pages on, 1 to 16 [default: 1]
        #[arg(long, value_name = "N", value_parser = parse_channels, allow_hyphen_values = true)]
        channels: Option<u16>,
        /// Longest pause of the guest at switchover, estimated from the
        /// measured bandwidth, in milliseconds: 1 to 60000 [default: 50]
        #[arg(long, value_name = "MS", value_parser = parse_downtime_ms, allow_hyphen_values = true)]
        downtime_ms: Option<u64>,
        /// Copy rounds after which the guest is paused for switchover even
        /// if the budget is not met: 1 to 1000 [default: 30]
        #[arg(long, value_name = "N", value_parser = parse_max_rounds, allow_hyphen_values = true)]
        max_rounds: Option<u32>,
        /// Debug: both sides compare a digest of guest RAM and device state
        /// at switchover; a mismatch fails the migration [default: the VM's
        /// --verify-migration]
        #[arg(long)]
        verify: bool,
    },
    /// Take a COLO checkpoint now (a primary whose pair is protected) and
    /// print its figures as JSON: pause time, pages, bytes.
    Checkpoint,
}

/// Options of `twinvm run`. Each one overrides the same setting in the
/// config file.
#[derive(Debug, Default, Clone, Args)]
pub struct RunArgs {
    /// Kernel to boot: a Linux bzImage or an x86_64 ELF image
    /// [default: the bundled test guest]
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,

    /// Initramfs for a Linux kernel.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,

    /// Extra kernel command line, appended to twinvm's defaults.
    #[arg(long, value_name = "STR")]
    pub cmdline: Option<String>,

    /// Guest memory: a whole number of bytes, or with a K, M, G or T suffix
    /// (binary units; "KiB"/"KB" also accepted); a multiple of 4 KiB
    /// [default: 256M]
    #[arg(long, value_name = "SIZE", value_parser = parse_memory_arg, allow_hyphen_values = true)]
    pub memory: Option<u64>,

    /// Allocate all of guest RAM when the VM is built, instead of page by
    /// page as the guest first touches it: the host's memory is committed
    /// at once, and nothing later waits for the host to allocate a page
    /// (e.g. pages arriving in a live migration).
    #[arg(long)]
    pub prefault: bool,

    /// Number of vCPUs, 1 to 255 (KVM may allow fewer) [default: 1]
    #[arg(long, value_name = "N", value_parser = parse_cpus_arg, allow_hyphen_values = true)]
    pub cpus: Option<u8>,

    /// Network device (virtio-net) backed by the existing host tap device
    /// NAME, optionally with the guest MAC address MAC (unicast, e.g.
    /// 52:54:00:12:34:56). May be repeated; any --net flag replaces the
    /// config file's [[net]] list.
    #[arg(long, value_name = "tap=NAME[,mac=MAC]", value_parser = parse_net_arg)]
    pub net: Vec<vmm::NetConfig>,

    /// Disk (virtio-blk) backed by the raw image file PATH; `readonly` makes
    /// it read-only, `serial=ID` sets the ID the guest sees (up to 20
    /// printable ASCII characters). PATH cannot contain ',' here (use the
    /// config file). May be repeated; any --disk flag replaces the config
    /// file's [[disk]] list.
    #[arg(
        long,
        value_name = "PATH[,readonly][,serial=ID]",
        value_parser = OsStringValueParser::new().try_map(parse_disk_arg)
    )]
    pub disk: Vec<vmm::DiskConfig>,

    /// Serve the control API on a Unix socket at PATH, created with mode
    /// 0600 and removed when the VM ends (see `twinvm ctl`).
    #[arg(long, value_name = "PATH", value_parser = OsStringValueParser::new().try_map(parse_path_arg))]
    pub api_socket: Option<PathBuf>,

    /// TOML config file; relative paths in it are relative to its directory.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Continue the guest from the snapshot in DIR (`twinvm ctl snapshot`)
    /// instead of booting it. Give the same memory, vCPUs, network devices
    /// and disks (unchanged) as the snapshotted VM had.
    #[arg(long, value_name = "DIR", value_parser = OsStringValueParser::new().try_map(parse_path_arg))]
    pub restore: Option<PathBuf>,

    /// Receive the VM by live migration instead of booting it: listen on
    /// HOST:PORT (e.g. 0.0.0.0:4444) for a `twinvm ctl migrate` from its
    /// source, then run it. Give the same memory, vCPUs, network devices
    /// and disks as the source VM has (docs/migration.md).
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_listen_addr, conflicts_with = "restore")]
    pub incoming: Option<String>,

    /// Shared secret for live migration, both directions: the file's whole
    /// content (at least 32 bytes; mode 0600). Both sides must use the
    /// same file content.
    #[arg(long, value_name = "FILE", value_parser = OsStringValueParser::new().try_map(parse_path_arg))]
    pub auth_key: Option<PathBuf>,

    /// Debug: compare a digest of guest RAM and device state at every
    /// migration's switchover (outgoing ones unless the request says
    /// otherwise).
    #[arg(long)]
    pub verify_migration: bool,

    /// COLO fault tolerance (docs/colo.md): `primary` runs the guest and
    /// keeps the secondary at --peer in step with checkpoints; `secondary`
    /// waits on --listen for its primary and runs its copy of the guest.
    /// Not with --incoming or --restore.
    #[arg(long, value_name = "ROLE")]
    pub role: Option<Role>,

    /// The primary's secondary: the address its --listen gives.
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_connect_addr)]
    pub peer: Option<String>,

    /// Where a secondary waits for its primary (e.g. 0.0.0.0:7777); port 0
    /// is refused.
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_colo_listen_addr)]
    pub listen: Option<String>,

    /// Time between two checkpoints, 10 to 3600000 [default: 500]
    #[arg(long, value_name = "MS", value_parser = parse_interval_ms, allow_hyphen_values = true)]
    pub checkpoint_interval_ms: Option<u64>,

    /// TCP connections pages travel on to the secondary, 1 to 16
    /// [default: 1]
    #[arg(long, value_name = "N", value_parser = parse_colo_channels, allow_hyphen_values = true)]
    pub replication_channels: Option<u16>,

    /// Debug: compare digests of guest RAM and state on both sides at
    /// every checkpoint; a mismatch ends protection naming the first page
    /// that differs.
    #[arg(long)]
    pub verify_checkpoints: bool,

    /// The protected VM's identity, 32 hex digits; give both sides the
    /// same. A secondary with one refuses a primary announcing another.
    #[arg(long, value_name = "HEX32", value_parser = parse_vm_id)]
    pub vm_id: Option<[u8; 16]>,

    /// Staged bytes on the secondary at which the primary checkpoints
    /// early, a size like --memory; 0 means an eighth of guest RAM
    /// [default: 0]
    #[arg(long, value_name = "SIZE", value_parser = parse_staging_limit, allow_hyphen_values = true)]
    pub staging_limit: Option<u64>,
}

/// Options of `twinvm pair`: the VM's (as for `twinvm run`) and where the
/// pair keeps its files.
#[derive(Debug, Default, Clone, Args)]
pub struct PairArgs {
    /// Directory for the pair's auth key, API sockets
    /// (primary.sock, secondary.sock), the secondary's console log and
    /// its disk copies; created if needed [default: a new directory
    /// under $TMPDIR or /tmp]
    #[arg(long, value_name = "DIR", value_parser = OsStringValueParser::new().try_map(parse_path_arg))]
    pub dir: Option<PathBuf>,

    /// Local TCP port the secondary listens on for its primary
    /// [default: a free port]
    #[arg(long, value_name = "PORT", value_parser = parse_port, allow_hyphen_values = true)]
    pub port: Option<u16>,

    /// Kernel to boot: a Linux bzImage or an x86_64 ELF image
    /// [default: the bundled test guest]
    #[arg(long, value_name = "PATH", value_parser = OsStringValueParser::new().try_map(parse_path_arg))]
    pub kernel: Option<PathBuf>,

    /// Initramfs for a Linux kernel.
    #[arg(long, value_name = "PATH", value_parser = OsStringValueParser::new().try_map(parse_path_arg))]
    pub initrd: Option<PathBuf>,

    /// Extra kernel command line, appended to twinvm's defaults.
    #[arg(long, value_name = "STR")]
    pub cmdline: Option<String>,

    /// Guest memory, as for `twinvm run` [default: 256M]
    #[arg(long, value_name = "SIZE", value_parser = parse_memory_arg, allow_hyphen_values = true)]
    pub memory: Option<u64>,

    /// Number of vCPUs, 1 to 255 [default: 1]
    #[arg(long, value_name = "N", value_parser = parse_cpus_arg, allow_hyphen_values = true)]
    pub cpus: Option<u8>,

    /// Network device on the host tap NAME, as for `twinvm run`; used by
    /// the primary only (the secondary's copy reaches no network).
    #[arg(long, value_name = "tap=NAME[,mac=MAC]", value_parser = parse_net_arg)]
    pub net: Vec<vmm::NetConfig>,

    /// Disk on the raw image PATH, as for `twinvm run`; the primary uses
    /// PATH, the secondary a copy made in --dir at start.
    #[arg(
        long,
        value_name = "PATH[,readonly][,serial=ID]",
        value_parser = OsStringValueParser::new().try_map(parse_disk_arg)
    )]
    pub disk: Vec<vmm::DiskConfig>,

    /// Time between two checkpoints, 10 to 3600000 [default: 500]
    #[arg(long, value_name = "MS", value_parser = parse_interval_ms, allow_hyphen_values = true)]
    pub checkpoint_interval_ms: Option<u64>,

    /// TCP connections pages travel on, 1 to 16 [default: 1]
    #[arg(long, value_name = "N", value_parser = parse_colo_channels, allow_hyphen_values = true)]
    pub replication_channels: Option<u16>,

    /// Debug: compare digests of both VMs at every checkpoint.
    #[arg(long)]
    pub verify_checkpoints: bool,

    /// Staged bytes at which the primary checkpoints early; 0 means an
    /// eighth of guest RAM [default: 0]
    #[arg(long, value_name = "SIZE", value_parser = parse_staging_limit, allow_hyphen_values = true)]
    pub staging_limit: Option<u64>,
}

impl PairArgs {
    /// Like [`RunArgs::validate`]: no tap or image twice.
    pub fn validate(&self) -> Result<(), devices::Error> {
        devices::check_unique_taps(&self.net)?;
        devices::check_unique_disks(&self.disk)
    }
}

impl RunArgs {
    /// Checks what clap cannot check value by value: that no two `--net`
    /// flags name the same tap device and no two `--disk` flags the same
    /// image file (the latter looks at the file system).
    pub fn validate(&self) -> Result<(), devices::Error> {
        devices::check_unique_taps(&self.net)?;
        devices::check_unique_disks(&self.disk)
    }

    /// Checks the replication options given on the command line against
    /// each other ([`config::check_replication`]). Whatever a config file
    /// could still supply (a role, a peer) is checked once it is read.
    pub fn validate_replication(&self) -> Result<(), String> {
        let given = config::ReplicationSources::of_args(self);
        config::check_replication(&given, self.config.is_none())
    }
}

fn parse_net_arg(s: &str) -> Result<vmm::NetConfig, devices::Error> {
    devices::parse_net(s)
}

fn parse_disk_arg(s: OsString) -> Result<vmm::DiskConfig, devices::Error> {
    devices::parse_disk(&s)
}

fn parse_path_arg(s: OsString) -> Result<PathBuf, String> {
    if s.is_empty() {
        Err("the path is empty".into())
    } else {
        Ok(PathBuf::from(s))
    }
}

fn parse_listen_addr(s: &str) -> Result<String, String> {
    migration::check_addr(s, true).map(|()| s.to_string())
}

fn parse_connect_addr(s: &str) -> Result<String, String> {
    migration::check_addr(s, false).map(|()| s.to_string())
}

/// A whole number within `range`.
fn parse_in_range(s: &str, range: &std::ops::RangeInclusive<u64>) -> Result<u64, String> {
    let n: i128 = s
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a whole number"))?;
    migration::check_range(n, range)
}

fn parse_colo_listen_addr(s: &str) -> Result<String, String> {
    colo::check_listen_addr(s).map(|()| s.to_string())
}

fn parse_port(s: &str) -> Result<u16, String> {
    parse_in_range(s, &(1..=u64::from(u16::MAX)))
        .and_then(|n| u16::try_from(n).map_err(|e| e.to_string()))
}

fn parse_interval_ms(s: &str) -> Result<u64, String> {
    parse_in_range(s, &colo::interval_ms_range())
}

fn parse_colo_channels(s: &str) -> Result<u16, String> {
    parse_in_range(s, &colo::CHANNELS).and_then(|n| u16::try_from(n).map_err(|e| e.to_string()))
}

fn parse_vm_id(s: &str) -> Result<[u8; 16], String> {
    colo::parse_vm_id(s)
}

fn parse_staging_limit(s: &str) -> Result<u64, String> {
    size::parse_size(s)
        .map_err(|e| e.to_string())
        .and_then(colo::check_staging_limit)
}

fn parse_channels(s: &str) -> Result<u16, String> {
    parse_in_range(s, &migration::CHANNELS)
        .and_then(|n| u16::try_from(n).map_err(|e| e.to_string()))
}

fn parse_downtime_ms(s: &str) -> Result<u64, String> {
    parse_in_range(s, &migration::DOWNTIME_MS)
}

fn parse_max_rounds(s: &str) -> Result<u32, String> {
    parse_in_range(s, &migration::MAX_ROUNDS)
        .and_then(|n| u32::try_from(n).map_err(|e| e.to_string()))
}

fn parse_memory_arg(s: &str) -> Result<u64, size::Error> {
    size::parse_memory(s)
}

fn parse_cpus_arg(s: &str) -> Result<u8, String> {
    let t = s.trim();
    let n: i128 = t
        .parse()
        .map_err(|_| format!("'{s}' is not a whole number"))?;
    config::validate_cpus(n)
}

/// Turns a clap error other than `--help`/`--version` into the single line
/// twinvm prints for every error (without the `twinvm: error: ` prefix).
///
/// clap renders "error: <message>" followed, after a blank line, by tips and
/// usage; the message itself may continue on indented lines (a list of
/// missing arguments). Those are joined into one line.
pub fn one_line_message(err: &clap::Error) -> String {
    let rendered = err.render().to_string();
    let mut message: Vec<&str> = Vec::new();
    let mut tips: Vec<&str> = Vec::new();
    let mut in_first_paragraph = true;
    for line in rendered.lines().map(str::trim) {
        if line.is_empty() {
            in_first_paragraph = message.is_empty();
        } else if in_first_paragraph {
            message.push(line);
        } else if line.starts_with("tip:") {
            tips.push(line);
        }
    }
    let joined = std::iter::once(message.join(" "))
        .chain(tips.iter().map(|t| t.to_string()))
        .collect::<Vec<_>>()
        .join("; ");
    let msg = joined.strip_prefix("error:").unwrap_or(&joined).trim();
    if msg.is_empty() {
        format!("invalid command line ({}); try '--help'", err.kind())
    } else {
        format!("{msg}; try '--help'")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<RunArgs, clap::Error> {
        let argv = std::iter::once("twinvm").chain(args.iter().copied());
        Cli::try_parse_from(argv).map(|cli| match cli.command {
            Command::Run(run) => run,
            _ => panic!("not a run command"),
        })
    }

    fn parse_ctl(args: &[&str]) -> Result<CtlArgs, clap::Error> {
        let argv = ["twinvm", "ctl"].into_iter().chain(args.iter().copied());
        Cli::try_parse_from(argv).map(|cli| match cli.command {
            Command::Ctl(ctl) => ctl,
            _ => panic!("not a ctl command"),
        })
    }

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn all_flags_parse() {
        let a = parse(&[
            "run",
            "--kernel",
            "/k",
            "--initrd",
            "/i",
            "--cmdline",
            "console=ttyS0 quiet",
            "--memory",
            "1G",
            "--cpus",
            "4",
            "--prefault",
            "--net",
            "tap=tap0,mac=52:54:00:12:34:56",
            "--net",
            "tap=tap1",
            "--disk",
            "root.img,readonly,serial=root",
            "--disk",
            "/data.img",
            "--api-socket",
            "/run/vm.sock",
            "--config",
            "vm.toml",
        ])
        .expect("valid arguments");
        assert_eq!(a.kernel, Some(PathBuf::from("/k")));
        assert_eq!(a.initrd, Some(PathBuf::from("/i")));
        assert_eq!(a.cmdline.as_deref(), Some("console=ttyS0 quiet"));
        assert_eq!(a.memory, Some(1 << 30));
        assert_eq!(a.cpus, Some(4));
        assert!(a.prefault);
        assert_eq!(a.config, Some(PathBuf::from("vm.toml")));
        assert_eq!(a.api_socket, Some(PathBuf::from("/run/vm.sock")));
        assert_eq!(
            a.net,
            [
                vmm::NetConfig {
                    tap: "tap0".into(),
                    mac: Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
                },
                vmm::NetConfig {
                    tap: "tap1".into(),
                    mac: None,
                },
            ]
        );
        assert_eq!(
            a.disk,
            [
                vmm::DiskConfig {
                    path: "root.img".into(),
                    readonly: true,
                    serial: Some("root".into()),
                },
                vmm::DiskConfig {
                    path: "/data.img".into(),
                    readonly: false,
                    serial: None,
                },
            ]
        );
        assert_eq!(a.validate(), Ok(()));
    }

    #[test]
    fn bad_net_and_disk_values_are_usage_errors() {
        for (args, want) in [
            (
                ["--net", "tap=t0,mac=zz:00:00:00:00:00"],
                "invalid MAC address",
            ),
            (["--net", "tap=t0,mac=01:00:00:00:00:00"], "multicast"),
            (["--net", "mac=52:54:00:12:34:56"], "`tap=NAME` is required"),
            (
                ["--net", "tap=t0,speed=10"],
                "unknown network device option 'speed'",
            ),
            (["--net", "tap=t0,tap=t1"], "'tap' is given more than once"),
            (
                ["--disk", "a.img,serial=123456789012345678901"],
                "invalid disk serial",
            ),
            (["--disk", "a.img,ro"], "unknown disk option 'ro'"),
            (["--disk", ",readonly"], "disk image path is empty"),
        ] {
            let err = parse(&["run", args[0], args[1]]).expect_err(args[1]);
            assert_eq!(err.exit_code(), 2);
            let msg = one_line_message(&err);
            assert!(msg.contains(args[0]), "{msg}");
            assert!(msg.contains(want), "{msg}");
            assert!(!msg.contains('\n'), "{msg}");
        }
    }

    #[test]
    fn the_same_tap_or_disk_twice_fails_validation() {
        let a = parse(&["run", "--net", "tap=a", "--net", "tap=b", "--net", "tap=a"])
            .expect("each value is valid");
        assert!(matches!(
            a.validate(),
            Err(devices::Error::DuplicateTap {
                first: 1,
                second: 3,
                ..
            })
        ));
        let a = parse(&[
            "run",
            "--disk",
            "/nonexistent/x.img",
            "--disk",
            "/nonexistent/x.img,readonly",
        ])
        .expect("each value is valid");
        assert!(matches!(
            a.validate(),
            Err(devices::Error::DuplicateDisk { .. })
        ));
    }

    #[test]
    fn nothing_given_means_defaults_later() {
        let a = parse(&["run"]).expect("valid arguments");
        assert!(a.kernel.is_none() && a.memory.is_none() && a.cpus.is_none());
    }

    #[test]
    fn cpus_zero_is_rejected_clearly() {
        let err = parse(&["run", "--cpus", "0"]).expect_err("0 vCPUs");
        let msg = one_line_message(&err);
        assert!(msg.contains("--cpus"), "{msg}");
        assert!(msg.contains("between 1 and 255"), "{msg}");
        assert!(!msg.contains('\n'));
    }

    #[test]
    fn cpus_out_of_range_or_garbage_is_rejected() {
        for bad in [
            "256",
            "1000",
            "-1",
            "two",
            "",
            "99999999999999999999999999999",
        ] {
            let err = parse(&["run", "--cpus", bad]).expect_err(bad);
            let msg = one_line_message(&err);
            assert!(msg.contains("--cpus"), "{bad}: {msg}");
        }
        assert_eq!(
            parse(&["run", "--cpus", "255"]).map(|a| a.cpus).ok(),
            Some(Some(255))
        );
    }

    #[test]
    fn bad_memory_is_rejected() {
        for bad in ["0", "abc", "", "-1", "4097", "99999999999T"] {
            let err = parse(&["run", "--memory", bad]).expect_err(bad);
            let msg = one_line_message(&err);
            assert!(msg.contains("--memory"), "{bad}: {msg}");
            assert!(!msg.contains('\n'));
        }
    }

    #[test]
    fn unknown_flag_gives_one_line() {
        let err = parse(&["run", "--kernal", "x"]).expect_err("typo");
        let msg = one_line_message(&err);
        assert!(msg.contains("--kernal"), "{msg}");
        assert!(
            msg.contains("tip: a similar argument exists: '--kernel'"),
            "{msg}"
        );
        assert!(!msg.contains('\n'));
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn empty_api_socket_is_rejected() {
        let err = parse(&["run", "--api-socket", ""]).expect_err("empty path");
        let msg = one_line_message(&err);
        assert!(msg.contains("--api-socket"), "{msg}");
        assert!(msg.contains("empty"), "{msg}");
    }

    #[test]
    fn ctl_actions_parse() {
        for (word, action) in [
            ("status", CtlAction::Status),
            ("pause", CtlAction::Pause),
            ("resume", CtlAction::Resume),
            ("stop", CtlAction::Stop),
        ] {
            let a = parse_ctl(&["--socket", "/tmp/s", word]).expect(word);
            assert_eq!(a.socket, PathBuf::from("/tmp/s"));
            assert_eq!(a.action, action);
        }
        let a = parse_ctl(&["--socket", "/tmp/s", "snapshot", "--to", "snap/1"]).expect("snapshot");
        assert_eq!(
            a.action,
            CtlAction::Snapshot {
                to: PathBuf::from("snap/1")
            }
        );
    }

    #[test]
    fn snapshot_needs_a_directory_and_restore_takes_one() {
        for args in [
            &["--socket", "/tmp/s", "snapshot"][..],
            &["--socket", "/tmp/s", "snapshot", "--to", ""],
            &["--socket", "/tmp/s", "snapshot", "/d"],
        ] {
            let err = parse_ctl(args).expect_err(&args.join(" "));
            assert_eq!(err.exit_code(), 2, "{args:?}");
            assert!(!one_line_message(&err).contains('\n'));
        }
        let a = parse(&["run", "--restore", "/snap"]).expect("valid arguments");
        assert_eq!(a.restore, Some(PathBuf::from("/snap")));
        let err = parse(&["run", "--restore", ""]).expect_err("empty path");
        assert!(one_line_message(&err).contains("--restore"));
    }

    #[test]
    fn ctl_needs_a_socket_and_a_known_action() {
        for args in [
            &["status"][..],
            &["--socket", "/tmp/s"],
            &["--socket", "/tmp/s", "reboot"],
            &["--socket", "", "status"],
        ] {
            let err = parse_ctl(args).expect_err(&args.join(" "));
            assert_eq!(err.exit_code(), 2, "{args:?}");
            assert!(!one_line_message(&err).contains('\n'));
        }
    }

    #[test]
    fn migration_flags_parse() {
        let a = parse(&[
            "run",
            "--incoming",
            "0.0.0.0:4444",
            "--auth-key",
            "/etc/twinvm/key",
            "--verify-migration",
        ])
        .expect("valid arguments");
        assert_eq!(a.incoming.as_deref(), Some("0.0.0.0:4444"));
        assert_eq!(a.auth_key, Some(PathBuf::from("/etc/twinvm/key")));
        assert!(a.verify_migration);
        let a = parse(&["run", "--incoming", "[::]:0"]).expect("any port");
        assert_eq!(a.incoming.as_deref(), Some("[::]:0"));
        let a = parse(&["run"]).expect("valid arguments");
        assert!(a.incoming.is_none() && a.auth_key.is_none() && !a.verify_migration);
    }

    #[test]
    fn incoming_conflicts_with_restore_and_needs_an_address() {
        let err = parse(&["run", "--incoming", "h:1", "--restore", "/snap"]).expect_err("both");
        assert_eq!(err.exit_code(), 2);
        let msg = one_line_message(&err);
        assert!(
            msg.contains("--incoming") && msg.contains("--restore"),
            "{msg}"
        );
        assert!(msg.contains("cannot be used with"), "{msg}");
        for (bad, want) in [
            ("", "empty"),
            ("4444", "has no port"),
            ("host:port", "not a port number"),
            ("::1:4444", "in brackets"),
        ] {
            let err = parse(&["run", "--incoming", bad]).expect_err(bad);
            assert_eq!(err.exit_code(), 2);
            let msg = one_line_message(&err);
            assert!(msg.contains("--incoming"), "{bad}: {msg}");
            assert!(msg.contains(want), "{bad}: {msg}");
            assert!(!msg.contains('\n'), "{msg}");
        }
        let err = parse(&["run", "--auth-key", ""]).expect_err("empty path");
        assert!(one_line_message(&err).contains("--auth-key"));
    }

    #[test]
    fn ctl_migrate_parses_and_checks_its_ranges() {
        let a =
            parse_ctl(&["--socket", "/s", "migrate", "--to", "10.0.0.2:4444"]).expect("migrate");
        assert_eq!(
            a.action,
            CtlAction::Migrate {
                to: "10.0.0.2:4444".into(),
                channels: None,
                downtime_ms: None,
                max_rounds: None,
                verify: false,
            }
        );
        let a = parse_ctl(&[
            "--socket",
            "/s",
            "migrate",
            "--to",
            "dest:1",
            "--channels",
            "16",
            "--downtime-ms",
            "60000",
            "--max-rounds",
            "1000",
            "--verify",
        ])
        .expect("migrate");
        assert_eq!(
            a.action,
            CtlAction::Migrate {
                to: "dest:1".into(),
                channels: Some(16),
                downtime_ms: Some(60_000),
                max_rounds: Some(1000),
                verify: true,
            }
        );
        for (args, want) in [
            (&["migrate"][..], "--to"),
            (&["migrate", "--to", "dest"], "has no port"),
            (&["migrate", "--to", "dest:0"], "port 0"),
            (
                &["migrate", "--to", "h:1", "--channels", "0"],
                "between 1 and 16, not 0",
            ),
            (
                &["migrate", "--to", "h:1", "--channels", "17"],
                "between 1 and 16, not 17",
            ),
            (
                &["migrate", "--to", "h:1", "--channels", "-3"],
                "between 1 and 16, not -3",
            ),
            (
                &["migrate", "--to", "h:1", "--channels", "two"],
                "not a whole number",
            ),
            (
                &[
                    "migrate",
                    "--to",
                    "h:1",
                    "--channels",
                    "99999999999999999999",
                ],
                "between 1 and 16",
            ),
            (
                &["migrate", "--to", "h:1", "--downtime-ms", "0"],
                "between 1 and 60000",
            ),
            (
                &["migrate", "--to", "h:1", "--downtime-ms", "60001"],
                "between 1 and 60000",
            ),
            (
                &["migrate", "--to", "h:1", "--max-rounds", "0"],
                "between 1 and 1000",
            ),
            (
                &["migrate", "--to", "h:1", "--max-rounds", "1001"],
                "between 1 and 1000",
            ),
            (
                &["migrate", "--to", "h:1", "--bandwidth", "1"],
                "--bandwidth",
            ),
        ] {
            let argv: Vec<&str> = ["--socket", "/s"]
                .into_iter()
                .chain(args.iter().copied())
                .collect();
            let err = parse_ctl(&argv).expect_err(&args.join(" "));
            assert_eq!(err.exit_code(), 2, "{args:?}");
            let msg = one_line_message(&err);
            assert!(msg.contains(want), "{args:?}: {msg}");
            assert!(!msg.contains('\n'), "{msg}");
        }
    }

    #[test]
    fn replication_flags_parse() {
        let a = parse(&[
            "run",
            "--role",
            "primary",
            "--peer",
            "10.0.0.2:7777",
            "--checkpoint-interval-ms",
            "100",
            "--replication-channels",
            "4",
            "--verify-checkpoints",
            "--vm-id",
            "00112233-4455-6677-8899-aabbccddeeff",
            "--staging-limit",
            "64M",
        ])
        .expect("valid arguments");
        assert_eq!(a.role, Some(Role::Primary));
        assert_eq!(a.peer.as_deref(), Some("10.0.0.2:7777"));
        assert_eq!(a.checkpoint_interval_ms, Some(100));
        assert_eq!(a.replication_channels, Some(4));
        assert!(a.verify_checkpoints);
        assert_eq!(a.vm_id.map(|v| v[0]), Some(0x00));
        assert_eq!(a.vm_id.map(|v| v[15]), Some(0xff));
        assert_eq!(a.staging_limit, Some(64 << 20));
        assert_eq!(a.validate_replication(), Ok(()));
        let a = parse(&["run", "--role", "secondary", "--listen", "0.0.0.0:7777"]).expect("valid");
        assert_eq!(a.validate_replication(), Ok(()));
        let a = parse(&["run", "--staging-limit", "0"]).expect("valid");
        assert_eq!(a.staging_limit, Some(0));
    }

    #[test]
    fn bad_replication_values_are_usage_errors() {
        for (args, want) in [
            (
                &["--role", "tertiary"][..],
                "possible values: primary, secondary",
            ),
            (&["--role", ""], "--role"),
            (&["--peer", "h"], "has no port"),
            (&["--peer", "h:0"], "port 0"),
            (&["--listen", "0.0.0.0:0"], "port 0"),
            (&["--listen", "::1:7"], "in brackets"),
            (
                &["--checkpoint-interval-ms", "9"],
                "between 10 and 3600000, not 9",
            ),
            (&["--checkpoint-interval-ms", "3600001"], "between 10"),
            (&["--checkpoint-interval-ms", "-1"], "between 10"),
            (&["--checkpoint-interval-ms", "1s"], "not a whole number"),
            (&["--replication-channels", "0"], "between 1 and 16, not 0"),
            (&["--replication-channels", "17"], "between 1 and 16"),
            (&["--vm-id", "0011"], "32 hex digits"),
            (&["--vm-id", ""], "32 hex digits"),
            (&["--staging-limit", "100"], "less than one page"),
            (&["--staging-limit", "-1M"], "negative"),
            (&["--staging-limit", "lots"], "not a size"),
        ] {
            let argv: Vec<&str> = std::iter::once("run").chain(args.iter().copied()).collect();
            let err = parse(&argv).expect_err(&args.join(" "));
            assert_eq!(err.exit_code(), 2, "{args:?}");
            let msg = one_line_message(&err);
            assert!(msg.contains(args[0]), "{args:?}: {msg}");
            assert!(msg.contains(want), "{args:?}: {msg}");
            assert!(!msg.contains('\n'), "{msg}");
        }
    }

    #[test]
    fn replication_flags_must_fit_together() {
        for (args, want) in [
            (&["--role", "primary"][..], "--role primary needs"),
            (&["--role", "secondary"], "--role secondary needs"),
            (
                &["--role", "secondary", "--listen", "h:1", "--peer", "h:2"],
                "--peer is for a primary",
            ),
            (
                &["--role", "primary", "--peer", "h:1", "--listen", "h:2"],
                "--listen is for a secondary",
            ),
            (&["--peer", "h:1"], "--peer is a replication setting"),
            (
                &["--verify-checkpoints"],
                "--verify-checkpoints is a replication setting",
            ),
            (
                &[
                    "--role",
                    "secondary",
                    "--listen",
                    "h:1",
                    "--incoming",
                    "h:2",
                ],
                "--role secondary cannot be used with --incoming",
            ),
            (
                &["--role", "primary", "--peer", "h:1", "--restore", "/s"],
                "--role primary cannot be used with --restore",
            ),
        ] {
            let argv: Vec<&str> = std::iter::once("run").chain(args.iter().copied()).collect();
            let a = parse(&argv).expect("each value is valid");
            let err = a.validate_replication().expect_err(&args.join(" "));
            assert!(err.contains(want), "{args:?}: {err}");
        }
        // With a config file, a role or an address may come from it.
        let a = parse(&["run", "--role", "primary", "--config", "vm.toml"]).expect("valid");
        assert_eq!(a.validate_replication(), Ok(()));
        let a = parse(&["run", "--peer", "h:1", "--config", "vm.toml"]).expect("valid");
        assert_eq!(a.validate_replication(), Ok(()));
    }

    #[test]
    fn pair_and_checkpoint_parse() {
        let cli = Cli::try_parse_from([
            "twinvm",
            "pair",
            "--dir",
            "/tmp/p",
            "--port",
            "7777",
            "--memory",
            "64M",
            "--net",
            "tap=t0",
            "--disk",
            "a.img",
            "--checkpoint-interval-ms",
            "50",
            "--replication-channels",
            "2",
            "--verify-checkpoints",
        ])
        .expect("valid");
        let Command::Pair(p) = cli.command else {
            panic!("not pair")
        };
        assert_eq!(p.dir, Some(PathBuf::from("/tmp/p")));
        assert_eq!(p.port, Some(7777));
        assert_eq!(p.memory, Some(64 << 20));
        assert_eq!((p.net.len(), p.disk.len()), (1, 1));
        assert_eq!(p.checkpoint_interval_ms, Some(50));
        assert_eq!(p.replication_channels, Some(2));
        assert!(p.verify_checkpoints);
        for bad in [
            &["pair", "--port", "0"][..],
            &["pair", "--port", "65536"],
            &["pair", "--dir", ""],
            &["pair", "--role", "primary"],
            &["pair", "--api-socket", "/s"],
            &["pair", "--checkpoint-interval-ms", "1"],
        ] {
            let err = Cli::try_parse_from(std::iter::once("twinvm").chain(bad.iter().copied()))
                .expect_err(&bad.join(" "));
            assert_eq!(err.exit_code(), 2, "{bad:?}");
        }
        let a = parse_ctl(&["--socket", "/s", "checkpoint"]).expect("checkpoint");
        assert_eq!(a.action, CtlAction::Checkpoint);
    }
}
