//! The router: from method and path to a handler, and what handlers may
//! ask of the VM ([`Control`]).
//!
//! Adding an endpoint is one [`ROUTES`] entry and a handler. Arguments come
//! as a JSON body decoded (with [`json_body`]) into a struct that denies
//! unknown fields. A long-running operation (snapshot, migration) is a
//! [`Control`] method that records its progress where
//! [`Control::status`] can report it, so `GET /vm` shows it meanwhile.

use std::path::{Path, PathBuf};
use std::time::Duration;

use replication::colo::CheckpointInfo;
use replication::migration::Report;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::VmStatus;
use super::http::{Request, Response};
use crate::migration;

/// An error a [`Control`] operation answers with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: u16,
    /// The message for `{"error": ...}`.
    pub message: String,
}

impl ApiError {
    /// 409: the operation does not fit the VM's current state.
    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError {
            status: 409,
            message: message.into(),
        }
    }

    /// 500: the operation failed.
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError {
            status: 500,
            message: message.into(),
        }
    }

    /// 502: an operation involving another host (a migration) failed.
    pub fn bad_gateway(message: impl Into<String>) -> ApiError {
        ApiError {
            status: 502,
            message: message.into(),
        }
    }
}

/// A validated `PUT /vm/migrate` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrateArgs {
    /// The destination's `host:port`.
    pub to: String,
    /// Page channels.
    pub channels: u16,
    /// Downtime budget.
    pub downtime: Duration,
    /// Pre-copy rounds at most.
    pub max_rounds: u32,
    /// Compare digests at switchover; `None`: the VM's default
    /// (`--verify-migration`).
    pub verify: Option<bool>,
}

/// What the API can do to a VM. Operations are idempotent where that makes
/// sense: pausing a paused VM succeeds.
pub trait Control: Send + Sync {
    /// The body of `GET /vm`.
    fn status(&self) -> VmStatus;
    /// Freezes the VM.
    fn pause(&self) -> Result<(), ApiError>;
    /// Lets a paused VM run again.
    fn resume(&self) -> Result<(), ApiError>;
    /// Asks the VM to end as if the guest had powered off.
    fn power_off(&self) -> Result<(), ApiError>;
    /// Writes a snapshot of the VM into the directory `to` (relative to
    /// twinvm's working directory), pausing a running VM for it and
    /// resuming it afterwards; a paused VM stays paused.
    fn snapshot(&self, to: &Path) -> Result<(), ApiError>;
    /// Live-migrates the VM to the `twinvm run --incoming` at `args.to`;
    /// returns once the guest runs there (the VM here has then ended) or
    /// the migration failed (the VM here goes on as before).
    fn migrate(&self, args: &MigrateArgs) -> Result<Report, ApiError>;
    /// Takes a COLO checkpoint now (a primary whose pair is protected) and
    /// returns its figures once the secondary holds it.
    fn checkpoint(&self) -> Result<CheckpointInfo, ApiError>;
}

/// A request handler.
type Handler = fn(&dyn Control, &Request) -> Response;

/// One endpoint.
struct Route {
    method: &'static str,
    path: &'static str,
    handler: Handler,
}

/// Every endpoint. docs/api.md describes them.
const ROUTES: &[Route] = &[
    Route {
        method: "GET",
        path: "/vm",
        handler: get_vm,
    },
    Route {
        method: "PUT",
        path: "/vm/pause",
        handler: put_pause,
    },
    Route {
        method: "PUT",
        path: "/vm/resume",
        handler: put_resume,
    },
    Route {
        method: "PUT",
        path: "/vm/power-off",
        handler: put_power_off,
    },
    Route {
        method: "PUT",
        path: "/vm/snapshot",
        handler: put_snapshot,
    },
    Route {
        method: "PUT",
        path: "/vm/migrate",
        handler: put_migrate,
    },
    Route {
        method: "PUT",
        path: "/vm/checkpoint",
        handler: put_checkpoint,
    },
];

/// Answers `req`: 404 for an unknown path, 405 (with `Allow`) for a method
/// the path does not take, otherwise what the handler says.
pub fn route(control: &dyn Control, req: &Request) -> Response {
    let mut allowed: Vec<&str> = Vec::new();
    for r in ROUTES.iter().filter(|r| r.path == req.path) {
        if r.method == req.method {
            return (r.handler)(control, req);
        }
        allowed.push(r.method);
    }
    if allowed.is_empty() {
        return Response::error(404, format!("no such endpoint: {}", req.path));
    }
    let allow = allowed.join(", ");
    let mut resp = Response::error(
        405,
        format!(
            "method {} is not allowed on {}; use {allow}",
            req.method, req.path
        ),
    );
    resp.allow = Some(allow);
    resp
}

/// The JSON body of `req` as `T`; no body counts as `{}`.
fn json_body<T: DeserializeOwned>(req: &Request) -> Result<T, Response> {
    let body: &[u8] = if req.body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        &req.body
    };
    serde_json::from_slice(body)
        .map_err(|e| Response::error(400, format!("invalid JSON body: {e}")))
}

/// The body of an endpoint that takes no arguments: nothing, or `{}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoArguments {}

/// Runs an operation without arguments; `ok` is its success status.
fn operation(req: &Request, ok: u16, op: impl FnOnce() -> Result<(), ApiError>) -> Response {
    if let Err(resp) = json_body::<NoArguments>(req) {
        return resp;
    }
    match op() {
        Ok(()) => Response::empty(ok),
        Err(e) => Response::error(e.status, e.message),
    }
}

fn get_vm(control: &dyn Control, _req: &Request) -> Response {
    Response::json(200, &control.status())
}

fn put_pause(control: &dyn Control, req: &Request) -> Response {
    operation(req, 204, || control.pause())
}

fn put_resume(control: &dyn Control, req: &Request) -> Response {
    operation(req, 204, || control.resume())
}

fn put_power_off(control: &dyn Control, req: &Request) -> Response {
    operation(req, 202, || control.power_off())
}

/// The body of `PUT /vm/snapshot`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotArguments {
    /// The directory to write the snapshot into.
    to: PathBuf,
}

fn put_snapshot(control: &dyn Control, req: &Request) -> Response {
    let args = match json_body::<SnapshotArguments>(req) {
        Ok(args) => args,
        Err(resp) => return resp,
    };
    if args.to.as_os_str().is_empty() {
        return Response::error(400, "invalid JSON body: `to` is empty");
    }
    match control.snapshot(&args.to) {
        Ok(()) => Response::empty(204),
        Err(e) => Response::error(e.status, e.message),
    }
}

/// The body of `PUT /vm/migrate`. Numbers are taken as wide integers so
/// that a value out of range gets the range in its error.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MigrateArguments {
    /// The destination, `host:port`.
    to: String,
    channels: Option<i64>,
    downtime_ms: Option<i64>,
    max_rounds: Option<i64>,
    verify: Option<bool>,
}

impl MigrateArguments {
    /// Checks every field; the error is the message of a 400.
    fn validate(self) -> Result<MigrateArgs, String> {
        let defaults = replication::migration::Params::default();
        migration::check_addr(&self.to, false).map_err(|e| format!("`to`: {e}"))?;
        let field = |name: &str, value: Option<i64>, range, default: u64| match value {
            None => Ok(default),
            Some(v) => migration::check_range(v.into(), range).map_err(|e| format!("`{name}` {e}")),
        };
        let channels = field(
            "channels",
            self.channels,
            &migration::CHANNELS,
            defaults.channels.into(),
        )?;
        let downtime_ms = field(
            "downtime_ms",
            self.downtime_ms,
            &migration::DOWNTIME_MS,
            u64::try_from(defaults.downtime_budget.as_millis()).unwrap_or(u64::MAX),
        )?;
        let max_rounds = field(
            "max_rounds",
            self.max_rounds,
            &migration::MAX_ROUNDS,
            defaults.max_rounds.into(),
        )?;
        Ok(MigrateArgs {
            to: self.to,
            channels: u16::try_from(channels).map_err(|e| e.to_string())?,
            downtime: Duration::from_millis(downtime_ms),
            max_rounds: u32::try_from(max_rounds).map_err(|e| e.to_string())?,
            verify: self.verify,
        })
    }
}

fn put_migrate(control: &dyn Control, req: &Request) -> Response {
    let args = match json_body::<MigrateArguments>(req) {
        Ok(args) => args,
        Err(resp) => return resp,
    };
    let args = match args.validate() {
        Ok(args) => args,
        Err(e) => return Response::error(400, format!("invalid JSON body: {e}")),
    };
    match control.migrate(&args) {
        Ok(report) => Response::json(200, &report),
        Err(e) => Response::error(e.status, e.message),
    }
}

fn put_checkpoint(control: &dyn Control, req: &Request) -> Response {
    if let Err(resp) = json_body::<NoArguments>(req) {
        return resp;
    }
    match control.checkpoint() {
        Ok(info) => Response::json(200, &info),
        Err(e) => Response::error(e.status, e.message),
    }
}

#[cfg(test)]
pub mod fake {
    //! A [`Control`] for tests.

    use std::path::{Path, PathBuf};
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};

    use replication::colo::CheckpointInfo;
    use replication::migration::Report;

    use super::{ApiError, Control, MigrateArgs};
    use crate::api::{Devices, RunState, VmStatus, VmSummary};

    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A [`Control`] that records what it was asked.
    #[derive(Default)]
    pub struct Fake {
        pub paused: Mutex<bool>,
        pub powered_off: AtomicBool,
        pub fail: AtomicBool,
        /// The directories snapshots were written to, and whether the VM
        /// was paused while each was written.
        pub snapshots: Mutex<Vec<(PathBuf, bool)>>,
        /// The migrations asked for.
        pub migrations: Mutex<Vec<MigrateArgs>>,
        /// Checkpoints taken.
        pub checkpoints: Mutex<u64>,
    }

    impl Control for Fake {
        fn status(&self) -> VmStatus {
            VmStatus {
                state: if *lock(&self.paused) {
                    RunState::Paused
                } else {
                    RunState::Running
                },
                uptime_ms: 42,
                summary: VmSummary {
                    vcpus: 2,
                    memory_bytes: 1 << 30,
                    devices: Devices::default(),
                },
                migration: None,
                replication: None,
            }
        }
        fn pause(&self) -> Result<(), ApiError> {
            if self.fail.load(Ordering::SeqCst) {
                return Err(ApiError::conflict("the VM is shutting down"));
            }
            *lock(&self.paused) = true;
            Ok(())
        }
        fn resume(&self) -> Result<(), ApiError> {
            *lock(&self.paused) = false;
            Ok(())
        }
        fn power_off(&self) -> Result<(), ApiError> {
            self.powered_off.store(true, Ordering::SeqCst);
            Ok(())
        }
        fn snapshot(&self, to: &Path) -> Result<(), ApiError> {
            if self.fail.load(Ordering::SeqCst) {
                return Err(ApiError::internal(format!(
                    "{} is not an empty directory",
                    to.display()
                )));
            }
            // Like the real one: paused while writing, then as before.
            let was_paused = self.is_paused();
            *lock(&self.paused) = true;
            lock(&self.snapshots).push((to.to_path_buf(), self.is_paused()));
            *lock(&self.paused) = was_paused;
            Ok(())
        }
        fn migrate(&self, args: &MigrateArgs) -> Result<Report, ApiError> {
            lock(&self.migrations).push(args.clone());
            if self.fail.load(Ordering::SeqCst) {
                return Err(ApiError::bad_gateway(format!(
                    "migration failed: cannot open the migration link to {}: Connection refused (os error 111)",
                    args.to
                )));
            }
            Ok(Report {
                rounds: 3,
                channels: args.channels,
                ..Report::default()
            })
        }
        fn checkpoint(&self) -> Result<CheckpointInfo, ApiError> {
            if self.fail.load(Ordering::SeqCst) {
                return Err(ApiError::conflict(
                    "cannot take a checkpoint: this VM is not replicated",
                ));
            }
            let mut n = lock(&self.checkpoints);
            *n += 1;
            Ok(CheckpointInfo {
                epoch: *n,
                trigger: Some(replication::colo::Trigger::Request),
                pause_ms: 1.5,
                ..CheckpointInfo::default()
            })
        }
    }

    impl Fake {
        /// Whether it is paused.
        pub fn is_paused(&self) -> bool {
            *lock(&self.paused)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::fake::Fake;
    use super::*;
    use crate::api::{ErrorBody, RunState};

    fn req(method: &str, path: &str, body: &str) -> Request {
        Request {
            method: method.into(),
            path: path.into(),
            body: body.as_bytes().to_vec(),
        }
    }

    fn error_of(resp: &Response) -> String {
        serde_json::from_slice::<ErrorBody>(&resp.body)
            .unwrap_or_else(|e| panic!("not an error body ({e}): {resp:?}"))
            .error
    }

    #[test]
    fn status_pause_resume_power_off() {
        let fake = Fake::default();
        let resp = route(&fake, &req("GET", "/vm", ""));
        assert_eq!(resp.status, 200);
        let status: VmStatus = serde_json::from_slice(&resp.body).expect("status JSON");
        assert_eq!(status.state, RunState::Running);
        assert_eq!(status.summary.vcpus, 2);

        assert_eq!(route(&fake, &req("PUT", "/vm/pause", "")).status, 204);
        assert!(fake.is_paused());
        // Idempotent, and `{}` is as good as no body.
        assert_eq!(route(&fake, &req("PUT", "/vm/pause", " {} ")).status, 204);
        let resp = route(&fake, &req("GET", "/vm", ""));
        assert!(String::from_utf8_lossy(&resp.body).contains("\"state\":\"paused\""));

        assert_eq!(route(&fake, &req("PUT", "/vm/resume", "\n")).status, 204);
        assert!(!fake.is_paused());

        assert_eq!(route(&fake, &req("PUT", "/vm/power-off", "")).status, 202);
        assert!(fake.powered_off.load(Ordering::SeqCst));
    }

    #[test]
    fn unknown_paths_are_404_and_wrong_methods_405() {
        let fake = Fake::default();
        for path in ["/", "/vm/", "/vm/snapshots", "/VM", "/vm/pause/x"] {
            let resp = route(&fake, &req("PUT", path, ""));
            assert_eq!(resp.status, 404, "{path}");
            assert!(error_of(&resp).contains(path), "{path}");
        }
        let resp = route(&fake, &req("POST", "/vm/pause", ""));
        assert_eq!(resp.status, 405);
        assert_eq!(resp.allow.as_deref(), Some("PUT"));
        assert!(error_of(&resp).contains("POST"));
        let resp = route(&fake, &req("PUT", "/vm", ""));
        assert_eq!((resp.status, resp.allow.as_deref()), (405, Some("GET")));
        // Methods are case-sensitive.
        assert_eq!(route(&fake, &req("get", "/vm", "")).status, 405);
        assert!(!fake.is_paused());
    }

    #[test]
    fn bad_json_bodies_are_400_and_change_nothing() {
        let fake = Fake::default();
        for body in [
            "{",
            "not json",
            "{\"force\": true}",
            "null",
            "\"x\"",
            "{}{}",
        ] {
            let resp = route(&fake, &req("PUT", "/vm/pause", body));
            assert_eq!(resp.status, 400, "{body}");
            assert!(error_of(&resp).contains("invalid JSON body"), "{body}");
        }
        assert!(!fake.is_paused());
    }

    #[test]
    fn operation_errors_keep_their_status() {
        let fake = Fake::default();
        fake.fail.store(true, Ordering::SeqCst);
        let resp = route(&fake, &req("PUT", "/vm/pause", ""));
        assert_eq!(resp.status, 409);
        assert_eq!(error_of(&resp), "the VM is shutting down");
    }

    #[test]
    fn snapshot_takes_a_directory() {
        let fake = Fake::default();
        let resp = route(&fake, &req("PUT", "/vm/snapshot", r#"{"to": "/snap/a"}"#));
        assert_eq!(resp.status, 204, "{resp:?}");
        assert!(resp.body.is_empty());
        // A paused VM is snapshotted too, and stays paused.
        assert_eq!(route(&fake, &req("PUT", "/vm/pause", "")).status, 204);
        let resp = route(&fake, &req("PUT", "/vm/snapshot", r#"{"to":"rel/b"}"#));
        assert_eq!(resp.status, 204, "{resp:?}");
        assert!(fake.is_paused());
        assert_eq!(
            *fake.snapshots.lock().unwrap(),
            [
                (PathBuf::from("/snap/a"), true),
                (PathBuf::from("rel/b"), true)
            ]
        );
        let resp = route(&fake, &req("GET", "/vm/snapshot", ""));
        assert_eq!((resp.status, resp.allow.as_deref()), (405, Some("PUT")));
    }

    #[test]
    fn snapshot_bodies_without_a_directory_are_400() {
        let fake = Fake::default();
        for (body, want) in [
            ("", "missing field `to`"),
            ("{}", "missing field `to`"),
            (r#"{"to": ""}"#, "`to` is empty"),
            (r#"{"to": 5}"#, "invalid JSON body"),
            (r#"{"to": "/a", "force": true}"#, "unknown field `force`"),
            (r#"{"dir": "/a"}"#, "unknown field `dir`"),
            ("null", "invalid JSON body"),
            (r#"{"to": "/a""#, "invalid JSON body"),
        ] {
            let resp = route(&fake, &req("PUT", "/vm/snapshot", body));
            assert_eq!(resp.status, 400, "{body}");
            assert!(
                error_of(&resp).contains(want),
                "{body}: {}",
                error_of(&resp)
            );
        }
        assert!(fake.snapshots.lock().unwrap().is_empty());
        assert!(!fake.is_paused());
    }

    #[test]
    fn snapshot_failures_are_500_with_the_reason() {
        let fake = Fake::default();
        fake.fail.store(true, Ordering::SeqCst);
        let resp = route(&fake, &req("PUT", "/vm/snapshot", r#"{"to": "/x"}"#));
        assert_eq!(resp.status, 500);
        assert_eq!(error_of(&resp), "/x is not an empty directory");
    }

    #[test]
    fn migrate_takes_a_destination_and_optional_parameters() {
        let fake = Fake::default();
        let resp = route(
            &fake,
            &req("PUT", "/vm/migrate", r#"{"to": "10.0.0.2:4444"}"#),
        );
        assert_eq!(resp.status, 200, "{resp:?}");
        let report: Report = serde_json::from_slice(&resp.body).expect("a report");
        assert_eq!((report.rounds, report.channels), (3, 1));
        let body = r#"{"to": "[::1]:4444", "channels": 16, "downtime_ms": 60000,
            "max_rounds": 1, "verify": true}"#;
        assert_eq!(route(&fake, &req("PUT", "/vm/migrate", body)).status, 200);
        let body = r#"{"to": "dest:1", "verify": false, "channels": null}"#;
        assert_eq!(route(&fake, &req("PUT", "/vm/migrate", body)).status, 200);
        assert_eq!(
            *fake.migrations.lock().unwrap(),
            [
                MigrateArgs {
                    to: "10.0.0.2:4444".into(),
                    channels: 1,
                    downtime: Duration::from_millis(50),
                    max_rounds: 30,
                    verify: None,
                },
                MigrateArgs {
                    to: "[::1]:4444".into(),
                    channels: 16,
                    downtime: Duration::from_secs(60),
                    max_rounds: 1,
                    verify: Some(true),
                },
                MigrateArgs {
                    to: "dest:1".into(),
                    channels: 1,
                    downtime: Duration::from_millis(50),
                    max_rounds: 30,
                    verify: Some(false),
                },
            ]
        );
        let resp = route(&fake, &req("GET", "/vm/migrate", ""));
        assert_eq!((resp.status, resp.allow.as_deref()), (405, Some("PUT")));
    }

    #[test]
    fn bad_migrate_bodies_are_400_and_start_nothing() {
        let fake = Fake::default();
        for (body, want) in [
            ("", "missing field `to`"),
            ("{}", "missing field `to`"),
            (r#"{"to": ""}"#, "`to`: the address is empty"),
            (r#"{"to": "host"}"#, "has no port"),
            (r#"{"to": "host:0"}"#, "port 0"),
            (r#"{"to": "host:99999"}"#, "not a port number"),
            (r#"{"to": "::1:4444"}"#, "in brackets"),
            (r#"{"to": 4444}"#, "invalid JSON body"),
            (
                r#"{"to": "h:1", "channels": 0}"#,
                "`channels` must be between 1 and 16, not 0",
            ),
            (
                r#"{"to": "h:1", "channels": 17}"#,
                "`channels` must be between 1 and 16, not 17",
            ),
            (
                r#"{"to": "h:1", "channels": -1}"#,
                "`channels` must be between 1 and 16, not -1",
            ),
            (r#"{"to": "h:1", "channels": 1.5}"#, "invalid JSON body"),
            (r#"{"to": "h:1", "channels": "2"}"#, "invalid JSON body"),
            (
                r#"{"to": "h:1", "downtime_ms": 0}"#,
                "`downtime_ms` must be between 1 and 60000, not 0",
            ),
            (
                r#"{"to": "h:1", "downtime_ms": 60001}"#,
                "`downtime_ms` must be between 1 and 60000",
            ),
            (
                r#"{"to": "h:1", "max_rounds": 0}"#,
                "`max_rounds` must be between 1 and 1000, not 0",
            ),
            (
                r#"{"to": "h:1", "max_rounds": 1001}"#,
                "`max_rounds` must be between 1 and 1000",
            ),
            (
                r#"{"to": "h:1", "max_rounds": 99999999999999999999}"#,
                "invalid JSON body",
            ),
            (r#"{"to": "h:1", "verify": "yes"}"#, "invalid JSON body"),
            (
                r#"{"to": "h:1", "bandwidth": 5}"#,
                "unknown field `bandwidth`",
            ),
            (r#"{"dest": "h:1"}"#, "unknown field `dest`"),
            ("[]", "invalid JSON body"),
        ] {
            let resp = route(&fake, &req("PUT", "/vm/migrate", body));
            assert_eq!(resp.status, 400, "{body}");
            let msg = error_of(&resp);
            assert!(msg.contains(want), "{body}: {msg}");
            assert!(msg.starts_with("invalid JSON body"), "{body}: {msg}");
            assert!(!msg.contains('\n'), "{body}: {msg}");
        }
        assert!(fake.migrations.lock().unwrap().is_empty());
    }

    #[test]
    fn checkpoint_returns_its_figures() {
        let fake = Fake::default();
        let resp = route(&fake, &req("PUT", "/vm/checkpoint", ""));
        assert_eq!(resp.status, 200, "{resp:?}");
        let info: CheckpointInfo = serde_json::from_slice(&resp.body).expect("checkpoint JSON");
        assert_eq!(info.epoch, 1);
        assert_eq!(info.trigger, Some(replication::colo::Trigger::Request));
        let json: serde_json::Value = serde_json::from_slice(&resp.body).expect("JSON");
        assert_eq!(json["trigger"], "request");
        assert_eq!(
            route(&fake, &req("PUT", "/vm/checkpoint", "{}")).status,
            200
        );
        let resp = route(&fake, &req("PUT", "/vm/checkpoint", r#"{"now": true}"#));
        assert_eq!(resp.status, 400);
        assert!(error_of(&resp).contains("unknown field `now`"));
        assert_eq!(*fake.checkpoints.lock().unwrap(), 2);
        let resp = route(&fake, &req("GET", "/vm/checkpoint", ""));
        assert_eq!((resp.status, resp.allow.as_deref()), (405, Some("PUT")));
        fake.fail.store(true, Ordering::SeqCst);
        let resp = route(&fake, &req("PUT", "/vm/checkpoint", ""));
        assert_eq!(resp.status, 409);
        assert!(error_of(&resp).contains("not replicated"));
    }

    #[test]
    fn migration_failures_keep_their_status() {
        let fake = Fake::default();
        fake.fail.store(true, Ordering::SeqCst);
        let resp = route(&fake, &req("PUT", "/vm/migrate", r#"{"to": "h:1"}"#));
        assert_eq!(resp.status, 502);
        assert!(error_of(&resp).starts_with("migration failed: "));
    }
}
