//! `twinvm`: the command-line front end of the twinvm VMM.
//!
//! `twinvm run`: stdout carries only the guest's serial console; logs and
//! errors go to stderr. Exit status: 0 when the guest powers off or resets
//! or the VM has migrated away, 1 on any error, 2 on a command-line usage
//! error. `twinvm ctl` talks to the control API of a running VM
//! (docs/api.md). Live migration: docs/migration.md. `twinvm run --role`
//! and `twinvm pair`: COLO protection, docs/colo.md.

mod api;
mod cli;
mod colo;
mod config;
mod ctl;
mod devices;
mod migration;
mod pair;
mod size;
mod testguest;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::error::ErrorKind;
use clap::{CommandFactory, Parser};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;

/// Errors that end `twinvm`.
#[derive(Debug, thiserror::Error)]
enum Error {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] config::Error),
    /// The VM failed.
    #[error(transparent)]
    Vm(#[from] vmm::Error),
    /// The control API could not be set up.
    #[error(transparent)]
    Api(#[from] api::server::Error),
    /// `twinvm ctl` failed.
    #[error(transparent)]
    Ctl(#[from] ctl::Error),
    /// A migration could not be set up (auth key, `--incoming` port).
    #[error(transparent)]
    Migration(#[from] migration::Error),
    /// The incoming migration failed; the VM never ran.
    #[error("incoming migration failed: {0}")]
    Incoming(String),
    /// Replication could not be set up (parameters, `--listen` port).
    #[error(transparent)]
    Colo(#[from] colo::Error),
    /// The secondary's replication failed: before its guest ever ran, or
    /// with a checkpoint it could not apply (its VM stopped).
    #[error("replication failed: {0}")]
    Secondary(String),
    /// `twinvm pair` failed.
    #[error(transparent)]
    Pair(#[from] pair::Error),
    /// `--restore DIR` names no directory.
    #[error("--restore '{}': {}", .0.display(), if .0.exists() { "not a directory" } else { "no such directory" })]
    NoSnapshotDir(std::path::PathBuf),
    /// The snapshot could not be loaded into the VM.
    #[error("--restore '{}'", .dir.display())]
    Restore {
        /// The snapshot directory.
        dir: std::path::PathBuf,
        /// Why.
        #[source]
        source: vmm::Error,
    },
}

/// How long requests still in progress when the VM ends may take to finish
/// (e.g. the response to the request that powered it off).
const API_GRACE: Duration = Duration::from_secs(2);

fn main() -> ExitCode {
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => return usage_error(err),
    };
    if let Err(err) = cli.validate() {
        return usage_error(cli::Cli::command().error(ErrorKind::ValueValidation, err));
    }
    init_logging();
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("twinvm: error: {}", error_chain(&err));
            ExitCode::FAILURE
        }
    }
}

/// Runs the subcommand; returns the exit status.
fn run(cli: cli::Cli) -> Result<u8, Error> {
    match cli.command {
        cli::Command::Run(args) => {
            match run_vm(&args)? {
                // It lives on elsewhere.
                vmm::VmExit::Migrated => tracing::info!("VM migrated"),
                exit => tracing::info!(?exit, "VM ended"),
            }
            Ok(0)
        }
        cli::Command::Pair(args) => Ok(pair::run(&args)?),
        cli::Command::Ctl(args) => {
            ctl::run(&args)?;
            Ok(0)
        }
    }
}

/// `twinvm run`: builds and starts the VM (or receives it by migration),
/// serves its control API if asked to, and waits until the VM ends.
fn run_vm(args: &cli::RunArgs) -> Result<vmm::VmExit, Error> {
    let settings = config::settings(args, testguest::ELF)?;
    let config = &settings.vm;
    tracing::debug!(
        memory_bytes = config.memory_bytes,
        vcpus = config.vcpus,
        initrd = ?config.initrd,
        cmdline = %config.cmdline,
        net = ?config.net,
        disks = ?config.disks,
        api_socket = ?settings.api_socket,
        restore = ?args.restore,
        incoming = ?settings.migration.incoming,
        auth_key = ?settings.migration.auth_key,
        replication = ?settings.replication,
        "starting VM"
    );
    if let Some(dir) = &args.restore
        && !dir.is_dir()
    {
        return Err(Error::NoSnapshotDir(dir.clone()));
    }
    let defaults = migration::Defaults {
        auth_key: settings
            .migration
            .auth_key
            .as_deref()
            .map(migration::load_auth_key)
            .transpose()?,
        verify: settings.migration.verify,
    };
    let replication = settings.replication.as_ref();
    let colo_params = replication
        .map(|r| {
            let key = match (&r.auth_key, &settings.migration.auth_key) {
                // The same file: loaded already.
                (Some(k), Some(m)) if k == m => defaults.auth_key.clone(),
                (k, _) => k.as_deref().map(migration::load_auth_key).transpose()?,
            };
            Ok::<_, Error>(r.params(key)?)
        })
        .transpose()?;
    // The socket first: a bad path fails before anything boots, and the
    // socket is bound before any other thread exists (see api::server).
    let listener = settings
        .api_socket
        .as_deref()
        .map(api::server::bind)
        .transpose()?;
    // Then the migration port: a busy one fails before the VM is built.
    let incoming = settings
        .migration
        .incoming
        .as_deref()
        .map(|addr| migration::listen(addr, &defaults))
        .transpose()?;
    // Likewise a secondary's port.
    let colo_listener = match (replication, &colo_params) {
        (Some(r), Some(params)) if r.role == colo::Role::Secondary => {
            Some(colo::listen(&r.addr, params.auth_key.is_some())?)
        }
        _ => None,
    };
    let vm = Arc::new(if incoming.is_some() || colo_listener.is_some() {
        // Its taps and disks are attached when the source (or the
        // primary's first checkpoint) hands them over.
        vmm::Vm::new_incoming(config, vmm::Console::stdio())?
    } else {
        vmm::Vm::new(config, vmm::Console::stdio())?
    });
    if let Some(dir) = &args.restore {
        // The VM is built as usual (its kernel loaded), then its RAM and
        // state are replaced by the snapshot's.
        vm.restore_from(dir).map_err(|source| Error::Restore {
            dir: dir.clone(),
            source,
        })?;
        tracing::info!(dir = %dir.display(), identity = %vm.identity(), "restored the snapshot");
    }
    // A primary announces its VM's identity to the secondary, which
    // refuses another than its --vm-id.
    if let Some(r) = replication
        && r.role == colo::Role::Primary
        && let Some(id) = r.vm_id
    {
        vm.set_identity(vmm::VmId(id));
    }
    let colo_handle = replication.zip(colo_params.as_ref()).map(|(r, params)| {
        let peer = match r.role {
            colo::Role::Primary => r.addr.as_str(),
            // Known once a primary connects.
            colo::Role::Secondary => "",
        };
        replication::colo::Handle::new(r.role.colo(), peer, params)
    });
    let summary = api::VmSummary::of(config);
    let control = match (&incoming, &colo_listener, &colo_handle) {
        (Some(incoming), _, _) => listener.as_ref().map(|_| {
            api::vm::VmControl::incoming(vm.clone(), summary, defaults, incoming.progress())
        }),
        (None, Some(_), Some(handle)) => listener
            .as_ref()
            .map(|_| api::vm::VmControl::secondary(vm.clone(), summary, defaults, handle.clone())),
        _ => {
            vm.start()?;
            let started = Instant::now();
            listener.as_ref().map(|_| {
                let control = api::vm::VmControl::new(vm.clone(), summary, defaults, started);
                match &colo_handle {
                    Some(handle) => control.replicated(handle.clone()),
                    None => control,
                }
            })
        }
    }
    .map(Arc::new);
    let server = match (listener, &control) {
        (Some(listener), Some(control)) => {
            tracing::info!(path = %listener.path().display(), "serving the control API");
            Some(listener.serve(control.clone())?)
        }
        _ => None,
    };
    let incoming = incoming
        .map(|incoming| incoming.spawn(vm.clone(), control.clone()))
        .transpose()?;
    let protection = match (replication, colo_params, colo_handle) {
        (Some(r), Some(params), Some(handle)) => Some(match colo_listener {
            Some(colo_listener) => colo::Replication::spawn_secondary(
                vm.clone(),
                colo_listener,
                params,
                handle,
                control.clone(),
            )?,
            None => colo::Replication::spawn_primary(vm.clone(), r.addr.clone(), params, handle)?,
        }),
        _ => None,
    };
    let exit = vm.wait();
    if let Some(control) = &control {
        control.mark_ended();
    }
    let secondary_failure = protection.and_then(|p| {
        let failure = p.failure();
        p.stop(colo::STOP_BOUND);
        failure
    });
    if let Some(server) = server {
        server.stop(API_GRACE);
    }
    if let Some(failure) = incoming.and_then(|i| i.failure()) {
        return Err(Error::Incoming(failure));
    }
    if let Some(failure) = secondary_failure {
        return Err(Error::Secondary(failure));
    }
    Ok(exit?)
}

/// Handles a clap error: help and version go to stdout with status 0 as
/// usual; a usage error becomes one `twinvm: error:` line and status 2.
fn usage_error(err: clap::Error) -> ExitCode {
    match err.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            // Prints to stdout or stderr as appropriate; if even that fails
            // there is nowhere left to report it.
            let _ = err.print();
            ExitCode::from(u8::try_from(err.exit_code()).unwrap_or(2))
        }
        _ => {
            eprintln!("twinvm: error: {}", cli::one_line_message(&err));
            ExitCode::from(2)
        }
    }
}

/// Logs to stderr, filtered by `TWINVM_LOG` (tracing env-filter syntax,
/// default "warn"; invalid directives are ignored), in colour only when
/// stderr is a terminal.
fn init_logging() {
    let filter = EnvFilter::builder()
        .with_default_directive(LevelFilter::WARN.into())
        .with_env_var("TWINVM_LOG")
        .from_env_lossy();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// `err` and its `source()` chain joined with ": " on one line
/// ([`replication::error_text`]), with line breaks inside messages folded
/// into spaces.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    replication::error_text(err)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("cannot load kernel '/k'")]
        Load(#[source] Inner),
    }

    #[derive(Debug, thiserror::Error)]
    enum Inner {
        #[error("reading the image")]
        Read(#[source] std::io::Error),
    }

    #[test]
    fn chain_is_joined_on_one_line() {
        let err = Outer::Load(Inner::Read(std::io::Error::from_raw_os_error(libc::ENOENT)));
        assert_eq!(
            error_chain(&err),
            "cannot load kernel '/k': reading the image: No such file or directory (os error 2)"
        );
    }

    #[test]
    fn repeated_source_text_is_not_duplicated() {
        #[derive(Debug, thiserror::Error)]
        #[error("open failed: {0}")]
        struct Repeats(#[source] std::io::Error);
        let err = Repeats(std::io::Error::other("boom"));
        assert_eq!(error_chain(&err), "open failed: boom");
    }

    #[test]
    fn multi_line_messages_are_flattened() {
        let err = std::io::Error::other("first\n  second\n");
        assert_eq!(error_chain(&err), "first second");
    }

    #[test]
    fn config_errors_are_transparent() {
        let err = Error::from(config::Error::NoBundledGuest);
        assert!(error_chain(&err).starts_with("no kernel given"));
    }
}
