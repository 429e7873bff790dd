//! `twinvm ctl`: the client of the control API (docs/api.md).

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::api::http::{self, ClientResponse};
use crate::api::{ErrorBody, VmStatus};
use crate::cli::{CtlAction, CtlArgs};

/// How long to wait for the VM to answer.
const TIMEOUT: Duration = Duration::from_secs(30);
/// How long to wait for a snapshot to be written (guest RAM goes to disk
/// and is synced).
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(600);
/// How long to wait for a migration to end (it reports its progress in
/// `twinvm ctl status` meanwhile).
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(3600);
/// How long to wait for a checkpoint (the VM gives up after 30 s).
const CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(60);
/// The most response bytes read.
const MAX_RESPONSE: u64 = 1 << 20;

/// Errors of `twinvm ctl`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Nothing to connect to.
    #[error("cannot connect to the API socket '{}' (is the VM running with --api-socket?)", .path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The connection failed midway.
    #[error("talking to the VM at '{}' failed", .path.display())]
    Io {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A path that cannot be sent to the VM.
    #[error("cannot use the path '{}'", .path.display())]
    BadPath {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The VM answered with something that is not a valid response.
    #[error("the VM sent an invalid response: {0}")]
    BadResponse(String),
    /// The VM refused the request.
    #[error("the VM answered {status} {}: {message}", http::reason(*.status))]
    Refused {
        /// The HTTP status.
        status: u16,
        /// The error message from the body.
        message: String,
    },
}

/// Runs `twinvm ctl`; prints the result on stdout.
pub fn run(args: &CtlArgs) -> Result<(), Error> {
    let mut body = None;
    let (method, path, done) = match &args.action {
        CtlAction::Status => ("GET", "/vm", String::new()),
        CtlAction::Pause => ("PUT", "/vm/pause", "VM paused".into()),
        CtlAction::Resume => ("PUT", "/vm/resume", "VM resumed".into()),
        CtlAction::Stop => ("PUT", "/vm/power-off", "VM powering off".into()),
        CtlAction::Snapshot { to } => {
            body = Some(snapshot_body(to)?);
            (
                "PUT",
                "/vm/snapshot",
                format!("snapshot written to {}", to.display()),
            )
        }
        CtlAction::Migrate {
            to,
            channels,
            downtime_ms,
            max_rounds,
            verify,
        } => {
            let mut req = serde_json::Map::new();
            req.insert("to".into(), to.as_str().into());
            if let Some(n) = channels {
                req.insert("channels".into(), (*n).into());
            }
            if let Some(ms) = downtime_ms {
                req.insert("downtime_ms".into(), (*ms).into());
            }
            if let Some(n) = max_rounds {
                req.insert("max_rounds".into(), (*n).into());
            }
            if *verify {
                req.insert("verify".into(), true.into());
            }
            body = Some(serde_json::to_vec(&req).map_err(|e| Error::BadResponse(e.to_string()))?);
            ("PUT", "/vm/migrate", String::new())
        }
        CtlAction::Checkpoint => ("PUT", "/vm/checkpoint", String::new()),
    };
    let resp = call(&args.socket, method, path, body.as_deref())?;
    if !(200..300).contains(&resp.status) {
        let message = serde_json::from_slice::<ErrorBody>(&resp.body)
            .map(|b| b.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&resp.body).trim().to_string());
        return Err(Error::Refused {
            status: resp.status,
            message,
        });
    }
    if matches!(args.action, CtlAction::Status) {
        let status: VmStatus = serde_json::from_slice(&resp.body)
            .map_err(|e| Error::BadResponse(format!("status is not valid JSON: {e}")))?;
        let text =
            serde_json::to_string_pretty(&status).map_err(|e| Error::BadResponse(e.to_string()))?;
        println!("{text}");
    } else if matches!(args.action, CtlAction::Migrate { .. }) {
        let report: replication::migration::Report = serde_json::from_slice(&resp.body)
            .map_err(|e| Error::BadResponse(format!("the report is not valid JSON: {e}")))?;
        let text =
            serde_json::to_string_pretty(&report).map_err(|e| Error::BadResponse(e.to_string()))?;
        println!("{text}");
    } else if matches!(args.action, CtlAction::Checkpoint) {
        let info: replication::colo::CheckpointInfo = serde_json::from_slice(&resp.body)
            .map_err(|e| Error::BadResponse(format!("the checkpoint is not valid JSON: {e}")))?;
        let text =
            serde_json::to_string_pretty(&info).map_err(|e| Error::BadResponse(e.to_string()))?;
        println!("{text}");
    } else {
        println!("{done}");
    }
    Ok(())
}

/// The body of `PUT /vm/snapshot` for the directory `to`: relative to this
/// process's working directory, so it is sent as an absolute path (the VM
/// would resolve a relative one against its own).
fn snapshot_body(to: &Path) -> Result<Vec<u8>, Error> {
    let dir = std::path::absolute(to).map_err(|e| Error::BadPath {
        path: to.to_path_buf(),
        source: e,
    })?;
    let dir = dir.to_str().ok_or_else(|| Error::BadPath {
        path: to.to_path_buf(),
        source: std::io::Error::new(ErrorKind::InvalidInput, "the path is not valid UTF-8"),
    })?;
    serde_json::to_vec(&serde_json::json!({ "to": dir }))
        .map_err(|e| Error::BadResponse(e.to_string()))
}

/// Sends one request (with a JSON `body`, if any) to the API socket at
/// `socket` and reads the response.
pub fn call(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> Result<ClientResponse, Error> {
    let timeout = match path {
        "/vm/snapshot" => SNAPSHOT_TIMEOUT,
        "/vm/migrate" => MIGRATE_TIMEOUT,
        "/vm/checkpoint" => CHECKPOINT_TIMEOUT,
        _ => TIMEOUT,
    };
    call_within(socket, method, path, body, timeout)
}

/// [`call`], waiting at most `timeout` for the answer (and for the
/// request to be taken).
pub fn call_within(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<ClientResponse, Error> {
    let mut stream = UnixStream::connect(socket).map_err(|source| Error::Connect {
        path: socket.to_path_buf(),
        source,
    })?;
    let io = |source| Error::Io {
        path: socket.to_path_buf(),
        source,
    };
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream
        .set_write_timeout(Some(timeout.min(TIMEOUT)))
        .map_err(io)?;
    stream
        .write_all(&http::request_bytes(method, path, body))
        .map_err(io)?;
    let mut buf = Vec::new();
    match (&mut stream).take(MAX_RESPONSE).read_to_end(&mut buf) {
        Ok(_) => {}
        // The server may reset the connection after a complete response.
        Err(e) if e.kind() == ErrorKind::ConnectionReset && !buf.is_empty() => {}
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            let hint = if path == "/vm/migrate" {
                " (the migration may still be running: see `twinvm ctl status`)"
            } else {
                ""
            };
            return Err(io(std::io::Error::new(
                ErrorKind::TimedOut,
                format!("no answer within {} s{hint}", timeout.as_secs()),
            )));
        }
        Err(e) => return Err(io(e)),
    }
    if buf.is_empty() {
        return Err(Error::BadResponse(
            "the connection closed without an answer".into(),
        ));
    }
    http::parse_response(&buf).map_err(|e| {
        Error::BadResponse(match e {
            http::HttpError::Malformed(m) => m,
            e => e.to_string(),
        })
    })
}
