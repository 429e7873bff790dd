//! Live migration as `twinvm` offers it: the checks of its addresses and
//! parameters (shared by the command line, the config file and the API),
//! the auth key, and the destination's side, `twinvm run --incoming ADDR`.
//! The migration itself is [`replication::migration`]; docs/migration.md
//! describes it for users.

use std::net::TcpListener;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use replication::AuthKey;
use replication::migration::{self, Direction, Params, ProgressHandle};

use crate::api::vm::VmControl;

/// Page channels a migration may use.
pub const CHANNELS: std::ops::RangeInclusive<u64> = 1..=migration::MAX_CHANNELS as u64;
/// Downtime budgets accepted, in milliseconds.
pub const DOWNTIME_MS: std::ops::RangeInclusive<u64> = 1..=60_000;
/// Pre-copy round limits accepted.
pub const MAX_ROUNDS: std::ops::RangeInclusive<u64> = 1..=1000;
/// Longest `host:port` accepted (a DNS name is at most 253 bytes).
const MAX_ADDR_LEN: usize = 300;

/// Errors setting up a migration.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The auth key file is unusable.
    #[error("{0}")]
    AuthKey(String),
    /// The address to receive the migration on cannot be listened on.
    #[error("--incoming: {0}")]
    Listen(String),
    /// The thread that waits for the migration could not be started.
    #[error("cannot start the incoming migration thread")]
    Thread(#[source] std::io::Error),
}

/// What every migration of this VM shares, from `twinvm run`'s options.
#[derive(Debug, Clone, Default)]
pub struct Defaults {
    /// The shared secret (`--auth-key`), both directions.
    pub auth_key: Option<AuthKey>,
    /// `--verify-migration`: compare digests at switchover unless a
    /// request says otherwise.
    pub verify: bool,
}

impl Defaults {
    /// The parameters of a migration of this VM; `verify` overrides the
    /// default.
    pub fn params(&self, verify: Option<bool>) -> Params {
        Params {
            verify: verify.unwrap_or(self.verify),
            auth_key: self.auth_key.clone(),
            ..Params::default()
        }
    }
}

/// Reads the auth key file at `path` (at least 32 bytes, readable by its
/// owner only), with a one-line error that names the file.
pub fn load_auth_key(path: &Path) -> Result<AuthKey, Error> {
    AuthKey::from_file(path).map_err(|e| {
        Error::AuthKey(match e {
            replication::AuthKeyError::TooShort { .. } => {
                format!("auth key file {}: {e}", path.display())
            }
            e => replication::error_text(&e),
        })
    })
}

/// Checks a `host:port` address: a host name, an IPv4 address or a
/// bracketed IPv6 address, and a port. Port 0 ("any free port") only if
/// `any_port`. Names are not resolved here.
pub fn check_addr(addr: &str, any_port: bool) -> Result<(), String> {
    if addr.is_empty() {
        return Err("the address is empty; give HOST:PORT".into());
    }
    if addr.len() > MAX_ADDR_LEN {
        return Err(format!(
            "the address is {} bytes long, at most {MAX_ADDR_LEN}",
            addr.len()
        ));
    }
    let Some((host, port)) = addr.rsplit_once(':') else {
        return Err(format!("'{addr}' has no port; give HOST:PORT"));
    };
    let host_ok = match host.strip_prefix('[') {
        Some(rest) => rest
            .strip_suffix(']')
            .is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok()),
        None => {
            !host.is_empty()
                && !host.contains(':')
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
        }
    };
    if !host_ok {
        return Err(format!(
            "'{host}' in '{addr}' is not a host name or IP address (write an IPv6 address in brackets: [::1]:4444)"
        ));
    }
    match port.parse::<u16>() {
        Ok(0) if !any_port => Err(format!("'{addr}': port 0 cannot be connected to")),
        Ok(_) => Ok(()),
        Err(_) => Err(format!(
            "'{port}' in '{addr}' is not a port number (0 to 65535)"
        )),
    }
}

/// Checks an integer parameter against `range`.
pub fn check_range(value: i128, range: &std::ops::RangeInclusive<u64>) -> Result<u64, String> {
    match u64::try_from(value) {
        Ok(v) if range.contains(&v) => Ok(v),
        _ => Err(format!(
            "must be between {} and {}, not {value}",
            range.start(),
            range.end()
        )),
    }
}

/// A bound migration port, not yet waited on.
pub struct Incoming {
    listener: TcpListener,
    addr: String,
    params: Params,
    progress: ProgressHandle,
}

/// Binds `addr` for an incoming migration. `--incoming ADDR` does this
/// before the VM is built, so a busy port fails at once.
pub fn listen(addr: &str, defaults: &Defaults) -> Result<Incoming, Error> {
    let listener =
        migration::listen(addr).map_err(|e| Error::Listen(replication::error_text(&e)))?;
    let bound = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| addr.to_string());
    if defaults.auth_key.is_none() && !listener.local_addr().is_ok_and(|a| a.ip().is_loopback()) {
        tracing::warn!(
            "waiting for an incoming migration on {bound} without --auth-key: any host that reaches it can send a VM"
        );
    }
    tracing::info!(addr = %bound, "waiting for an incoming migration");
    Ok(Incoming {
        listener,
        addr: bound,
        params: defaults.params(None),
        progress: ProgressHandle::new(Direction::Incoming, ""),
    })
}

impl Incoming {
    /// The migration's progress, for `GET /vm`.
    pub fn progress(&self) -> ProgressHandle {
        self.progress.clone()
    }

    /// Waits for the migration on a thread of its own and receives `vm`
    /// (built with [`vmm::Vm::new_incoming`]); `control` (the API, if any)
    /// learns the outcome. If the migration fails, the VM is ended (its
    /// [`vmm::Vm::wait`] returns) and [`IncomingThread::failure`] says why;
    /// on success the guest runs (or stays paused, as it was on the
    /// source) and nothing else happens: the VM is then like any other.
    pub fn spawn(
        self,
        vm: Arc<vmm::Vm>,
        control: Option<Arc<VmControl>>,
    ) -> Result<IncomingThread, Error> {
        let failure = Arc::new(Mutex::new(None));
        let slot = failure.clone();
        let handle = std::thread::Builder::new()
            .name("migrate-in".into())
            .spawn(move || {
                let Incoming {
                    listener,
                    addr,
                    params,
                    progress,
                } = self;
                match migration::incoming(&vm, &listener, &params, &progress) {
                    Ok(report) => {
                        if let Some(c) = &control {
                            c.incoming_completed();
                        }
                        tracing::info!(
                            on = %addr,
                            from = %progress.get().peer,
                            total_ms = report.total_ms,
                            downtime_ms = report.downtime_ms,
                            identity = %vm.identity(),
                            running = !vm.is_paused(),
                            "incoming migration completed"
                        );
                    }
                    Err(e) => {
                        *slot.lock().unwrap_or_else(|p| p.into_inner()) =
                            Some(replication::error_text(&e));
                        if let Some(c) = &control {
                            c.mark_ended();
                        }
                        // Wakes `vm.wait()`; the VM never ran.
                        let _ = vm.event_sender().send(vmm::VmEvent::PowerOff);
                    }
                }
            })
            .map_err(Error::Thread)?;
        Ok(IncomingThread {
            failure,
            _handle: handle,
        })
    }
}

/// The thread of an incoming migration.
pub struct IncomingThread {
    failure: Arc<Mutex<Option<String>>>,
    /// Not joined: if the VM ends otherwise (powered off while waiting),
    /// the process exits without waiting for a source.
    _handle: JoinHandle<()>,
}

impl IncomingThread {
    /// Why the migration failed, if it did.
    pub fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn addresses_need_a_host_and_a_port() {
        for ok in [
            "127.0.0.1:4444",
            "dest.example.com:1",
            "[::1]:4444",
            "[fe80::1]:65535",
            "host-2:80",
        ] {
            assert_eq!(check_addr(ok, false), Ok(()), "{ok}");
        }
        assert_eq!(check_addr("0.0.0.0:0", true), Ok(()));
        for (bad, want) in [
            ("", "empty"),
            ("127.0.0.1", "has no port"),
            (":4444", "not a host name"),
            ("::1:4444", "in brackets"),
            ("[::1:4444", "not a host name"),
            ("[zz]:1", "not a host name"),
            ("a b:1", "not a host name"),
            ("h:", "not a port number"),
            ("h:65536", "not a port number"),
            ("h:-1", "not a port number"),
            ("h:0", "port 0"),
        ] {
            let err = check_addr(bad, false).expect_err(bad);
            assert!(err.contains(want), "{bad}: {err}");
        }
        let long = format!("{}:1", "a".repeat(400));
        assert!(check_addr(&long, false).is_err());
    }

    #[test]
    fn ranges_are_checked() {
        assert_eq!(check_range(1, &CHANNELS), Ok(1));
        assert_eq!(check_range(16, &CHANNELS), Ok(16));
        assert_eq!(
            check_range(17, &CHANNELS),
            Err("must be between 1 and 16, not 17".into())
        );
        assert!(check_range(0, &CHANNELS).is_err());
        assert!(check_range(-1, &DOWNTIME_MS).is_err());
        assert_eq!(check_range(60_000, &DOWNTIME_MS), Ok(60_000));
        assert!(check_range(60_001, &DOWNTIME_MS).is_err());
        assert!(check_range(1001, &MAX_ROUNDS).is_err());
    }

    #[test]
    fn defaults_fill_the_params() {
        let d = Defaults {
            auth_key: None,
            verify: true,
        };
        let p = d.params(None);
        assert!(p.verify);
        assert_eq!(p.channels, 1);
        assert!(!d.params(Some(false)).verify);
    }

    #[test]
    fn bad_auth_key_files_are_one_line_errors() {
        let dir = std::env::temp_dir().join(format!("twinvm-key-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, bytes: &[u8], mode: u32| {
            let p = dir.join(name);
            std::fs::write(&p, bytes).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            p
        };
        let good = write("good", &[7; 32], 0o600);
        assert!(load_auth_key(&good).is_ok());
        for (path, want) in [
            (dir.join("missing"), "No such file"),
            (write("open", &[7; 32], 0o644), "chmod 600"),
            (write("short", &[7; 8], 0o600), "at least 32"),
        ] {
            let msg = load_auth_key(&path).expect_err("bad key").to_string();
            assert!(msg.contains(want), "{msg}");
            assert!(msg.contains(&path.display().to_string()), "{msg}");
            assert!(!msg.contains('\n'), "{msg}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
