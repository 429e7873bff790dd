//! The command line: `twinvm run [OPTIONS]`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::{config, size};

/// twinvm: a KVM virtual machine monitor.
#[derive(Debug, Parser)]
#[command(name = "twinvm", version, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a VM and run it until the guest powers off or resets.
    ///
    /// The guest's serial console is connected to stdin/stdout; logs go to
    /// stderr (filter with TWINVM_LOG, default "warn").
    Run(RunArgs),
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

    /// Number of vCPUs, 1 to 255 (KVM may allow fewer) [default: 1]
    #[arg(long, value_name = "N", value_parser = parse_cpus_arg, allow_hyphen_values = true)]
    pub cpus: Option<u8>,

    /// TOML config file; relative paths in it are relative to its directory.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
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
            "--config",
            "vm.toml",
        ])
        .expect("valid arguments");
        assert_eq!(a.kernel, Some(PathBuf::from("/k")));
        assert_eq!(a.initrd, Some(PathBuf::from("/i")));
        assert_eq!(a.cmdline.as_deref(), Some("console=ttyS0 quiet"));
        assert_eq!(a.memory, Some(1 << 30));
        assert_eq!(a.cpus, Some(4));
        assert_eq!(a.config, Some(PathBuf::from("vm.toml")));
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
}
