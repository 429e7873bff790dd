//! COLO protection as `twinvm run` offers it: the checks of the
//! replication options (shared by the command line and the config file),
//! and the thread that runs [`replication::colo::run_primary`] or
//! [`replication::colo::run_secondary`] next to the VM. The checkpointing
//! itself is [`replication::colo`]; docs/colo.md describes it for users.

use std::net::TcpListener;
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use replication::colo::{self, ColoRole, Handle, Params, State};

use crate::api::vm::VmControl;
use crate::migration;

/// Which side of a protected pair `twinvm run` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// Runs the guest that serves clients; sends checkpoints to `--peer`.
    Primary,
    /// Waits on `--listen` for its primary and is kept in step with it.
    Secondary,
}

impl Role {
    /// The engine's name for it.
    pub fn colo(self) -> ColoRole {
        match self {
            Role::Primary => ColoRole::Primary,
            Role::Secondary => ColoRole::Secondary,
        }
    }

    /// "primary" or "secondary".
    pub fn name(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Secondary => "secondary",
        }
    }
}

/// Page channels a pair may use.
pub const CHANNELS: std::ops::RangeInclusive<u64> = 1..=colo::MAX_CHANNELS as u64;
/// The smallest staging limit other than 0 (the default): one page.
pub const MIN_STAGING_LIMIT: u64 = 4096;
/// How long the replication thread may take to end once the VM has ended.
pub const STOP_BOUND: Duration = Duration::from_secs(10);

/// Checkpoint intervals accepted, in milliseconds.
pub fn interval_ms_range() -> std::ops::RangeInclusive<u64> {
    let ms = |d: &Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    ms(colo::INTERVAL_RANGE.start())..=ms(colo::INTERVAL_RANGE.end())
}

/// The default checkpoint interval in milliseconds.
pub fn default_interval_ms() -> u64 {
    u64::try_from(colo::DEFAULT_INTERVAL.as_millis()).unwrap_or(u64::MAX)
}

/// Checks the address a secondary listens on: `host:port` like any other
/// ([`migration::check_addr`]), and not port 0, which its primary could
/// not be told.
pub fn check_listen_addr(addr: &str) -> Result<(), String> {
    migration::check_addr(addr, true)?;
    if addr.rsplit_once(':').is_some_and(|(_, port)| port == "0") {
        return Err(format!(
            "'{addr}': port 0 would pick a port the primary cannot know; give a fixed port"
        ));
    }
    Ok(())
}

/// Parses a VM identity: 32 hex digits (16 bytes), or the same in the
/// 8-4-4-4-12 form in which twinvm logs identities.
pub fn parse_vm_id(s: &str) -> Result<[u8; 16], String> {
    let bad = || {
        format!(
            "'{s}' is not a VM id: give 32 hex digits (16 bytes), e.g. 00112233445566778899aabbccddeeff"
        )
    };
    let t = s.trim();
    let hex: String = if t.len() == 36 {
        let dashes = [8, 13, 18, 23];
        if !t
            .char_indices()
            .all(|(i, c)| (c == '-') == dashes.contains(&i))
        {
            return Err(bad());
        }
        t.chars().filter(|&c| c != '-').collect()
    } else {
        t.to_string()
    };
    if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    let mut id = [0u8; 16];
    for (i, byte) in id.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(id)
}

/// 32 lowercase hex digits.
pub fn format_vm_id(id: &[u8; 16]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks a staging limit in bytes: 0 (the engine's default) or at least
/// one page.
pub fn check_staging_limit(bytes: u64) -> Result<u64, String> {
    if bytes != 0 && bytes < MIN_STAGING_LIMIT {
        return Err(format!(
            "{bytes} bytes is less than one page ({MIN_STAGING_LIMIT}); give 0 for the default (an eighth of guest RAM) or a size such as 64M"
        ));
    }
    Ok(bytes)
}

/// The replication settings of `twinvm run`, checked and merged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// This side's role.
    pub role: Role,
    /// Primary: the secondary's address. Secondary: the address to listen
    /// on.
    pub addr: String,
    /// Checkpoint interval.
    pub interval: Duration,
    /// Page channels.
    pub channels: u16,
    /// Debug: compare digests at every checkpoint.
    pub verify: bool,
    /// The protected VM's identity.
    pub vm_id: Option<[u8; 16]>,
    /// Staged bytes at which the primary checkpoints early; 0: default.
    pub staging_limit: u64,
    /// The shared secret's file.
    pub auth_key: Option<std::path::PathBuf>,
}

impl Settings {
    /// The engine's parameters, with the auth key loaded already.
    pub fn params(&self, auth_key: Option<replication::AuthKey>) -> Result<Params, Error> {
        let params = Params {
            interval: self.interval,
            channels: self.channels,
            verify: self.verify,
            auth_key,
            vm_id: self.vm_id,
            staging_limit: self.staging_limit,
            ..Params::default()
        };
        params.check().map_err(Error::Params)?;
        Ok(params)
    }
}

/// Errors setting up replication.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The parameters were refused by the engine.
    #[error(transparent)]
    Params(colo::Error),
    /// The secondary's port cannot be listened on.
    #[error("--listen: {0}")]
    Listen(String),
    /// The replication thread could not be started.
    #[error("cannot start the replication thread")]
    Thread(#[source] std::io::Error),
}

/// Binds the secondary's address. `twinvm run --role secondary` does this
/// before the VM is built, so a busy port fails at once.
pub fn listen(addr: &str, authenticated: bool) -> Result<TcpListener, Error> {
    let listener = colo::listen(addr).map_err(|e| Error::Listen(replication::error_text(&e)))?;
    let bound = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| addr.to_string());
    if !authenticated && !listener.local_addr().is_ok_and(|a| a.ip().is_loopback()) {
        tracing::warn!(
            "waiting for a primary on {bound} without --auth-key: any host that reaches it can become this VM's primary"
        );
    }
    tracing::info!(addr = %bound, "waiting for the primary");
    Ok(listener)
}

/// The replication thread of a running `twinvm run --role ...`.
pub struct Replication {
    handle: Handle,
    done: Receiver<()>,
    thread: JoinHandle<()>,
    failure: Arc<Mutex<Option<String>>>,
}

impl Replication {
    /// Protects the started `vm` with the secondary at `peer`.
    pub fn spawn_primary(
        vm: Arc<vmm::Vm>,
        peer: String,
        params: Params,
        handle: Handle,
    ) -> Result<Replication, Error> {
        let h = handle.clone();
        Self::spawn("colo-primary", handle, move |_| {
            tracing::info!(peer = %peer, identity = %vm.identity(), "protecting the VM");
            colo::run_primary(&vm, &peer, &params, &h);
        })
    }

    /// Waits on `listener` for the primary and keeps `vm` (built with
    /// [`vmm::Vm::new_incoming`], not started) in step with it. If that
    /// fails before the guest ever ran, the VM is ended (its
    /// [`vmm::Vm::wait`] returns) and [`Replication::failure`] says why.
    pub fn spawn_secondary(
        vm: Arc<vmm::Vm>,
        listener: TcpListener,
        params: Params,
        handle: Handle,
        control: Option<Arc<VmControl>>,
    ) -> Result<Replication, Error> {
        if let Some(c) = &control {
            watch_start(c.clone(), handle.clone())?;
        }
        let h = handle.clone();
        Self::spawn("colo-secondary", handle, move |failure| {
            match colo::run_secondary(&vm, &listener, &params, &h) {
                Ok(()) => {
                    let status = h.status();
                    if status.state == State::PrimaryLost {
                        tracing::warn!(
                            checkpoints = status.checkpoints,
                            reason = status.last_error.as_deref().unwrap_or("unknown"),
                            "the primary was lost; the guest goes on from its last checkpoint"
                        );
                        if let Some(c) = &control {
                            c.replication_ended();
                        }
                    }
                }
                Err(e) => {
                    *lock(failure) = Some(replication::error_text(&e));
                    if let Some(c) = &control {
                        c.mark_ended();
                    }
                    // Wakes `vm.wait()`; the guest never ran.
                    let _ = vm.event_sender().send(vmm::VmEvent::PowerOff);
                }
            }
        })
    }

    fn spawn(
        name: &str,
        handle: Handle,
        body: impl FnOnce(&Mutex<Option<String>>) + Send + 'static,
    ) -> Result<Replication, Error> {
        let failure = Arc::new(Mutex::new(None));
        let slot = failure.clone();
        let (tx, done) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                body(&slot);
                let _ = tx.send(());
            })
            .map_err(Error::Thread)?;
        Ok(Replication {
            handle,
            done,
            thread,
            failure,
        })
    }

    /// Stops replication and waits for its thread, at most `bound`.
    pub fn stop(self, bound: Duration) {
        self.handle.stop();
        match self.done.recv_timeout(bound) {
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                if self.thread.join().is_err() {
                    tracing::error!("the replication thread panicked");
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                tracing::warn!(
                    "the replication thread did not end within {bound:?}; exiting without it"
                );
            }
        }
    }

    /// Why the secondary failed before its guest ran, if it did.
    pub fn failure(&self) -> Option<String> {
        lock(&self.failure).clone()
    }
}

/// Watches a secondary until its guest runs (or replication ends), so
/// that its API counts its uptime from then.
fn watch_start(control: Arc<VmControl>, handle: Handle) -> Result<(), Error> {
    std::thread::Builder::new()
        .name("colo-watch".into())
        .spawn(move || {
            while !control.secondary_progress()
                && matches!(
                    handle.status().state,
                    State::WaitingForPrimary | State::Syncing
                )
            {
                std::thread::sleep(Duration::from_millis(50));
            }
        })
        .map(drop)
        .map_err(Error::Thread)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_ids_are_32_hex_digits_or_a_uuid() {
        let want = [
            0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd,
            0xee, 0xff,
        ];
        assert_eq!(parse_vm_id("00112233445566778899aabbccddeeff"), Ok(want));
        assert_eq!(parse_vm_id("00112233445566778899AABBCCDDEEFF"), Ok(want));
        assert_eq!(
            parse_vm_id("00112233-4455-6677-8899-aabbccddeeff"),
            Ok(want)
        );
        assert_eq!(format_vm_id(&want), "00112233445566778899aabbccddeeff");
        assert_eq!(
            vmm::VmId(want).to_string(),
            "00112233-4455-6677-8899-aabbccddeeff"
        );
        for bad in [
            "",
            "0011",
            "00112233445566778899aabbccddeef",
            "00112233445566778899aabbccddeeff00",
            "00112233445566778899aabbccddeefg",
            "0011223-34455-6677-8899-aabbccddeeff",
            "00112233-4455-6677-8899-aabbccddeef-",
            "+0112233445566778899aabbccddeeff",
            "ééééééééééééééééé",
        ] {
            let err = parse_vm_id(bad).expect_err(bad);
            assert!(err.contains("32 hex digits"), "{bad}: {err}");
        }
    }

    #[test]
    fn listen_addresses_need_a_fixed_port() {
        assert_eq!(check_listen_addr("0.0.0.0:7777"), Ok(()));
        assert_eq!(check_listen_addr("[::]:1"), Ok(()));
        let err = check_listen_addr("0.0.0.0:0").expect_err("port 0");
        assert!(err.contains("port 0"), "{err}");
        assert!(check_listen_addr("7777").is_err());
    }

    #[test]
    fn ranges_follow_the_engine() {
        assert_eq!(interval_ms_range(), 10..=3_600_000);
        assert!(interval_ms_range().contains(&default_interval_ms()));
        assert_eq!(CHANNELS, 1..=16);
        assert_eq!(check_staging_limit(0), Ok(0));
        assert_eq!(check_staging_limit(4096), Ok(4096));
        assert!(check_staging_limit(1).is_err());
    }

    #[test]
    fn settings_become_checked_params() {
        let s = Settings {
            role: Role::Primary,
            addr: "h:1".into(),
            interval: Duration::from_millis(100),
            channels: 4,
            verify: true,
            vm_id: Some([7; 16]),
            staging_limit: 1 << 20,
            auth_key: None,
        };
        let p = s.params(None).expect("valid");
        assert_eq!(p.interval, Duration::from_millis(100));
        assert_eq!((p.channels, p.verify, p.staging_limit), (4, true, 1 << 20));
        assert_eq!(p.vm_id, Some([7; 16]));
        let bad = Settings { channels: 0, ..s };
        assert!(bad.params(None).is_err());
    }
}
