//! Live migration of a running VM between two twinvm processes.
//!
//! The source ([`migrate`]) copies guest RAM to the destination
//! ([`incoming`]) while the guest keeps running, in rounds: the first
//! round sends every page that may be non-zero, each later round the pages
//! the guest (or the VMM's devices) wrote during the previous one. When the
//! pages still dirty fit the downtime budget at the measured bandwidth (or
//! after [`Params::max_rounds`]), the source pauses the VM, sends the last
//! dirty pages and the VM state, the destination loads them, the source
//! releases its taps and disk images, the destination attaches them and
//! resumes the guest.
//!
//! Pages travel on one or more TCP connections ("channels"); a page always
//! goes on the same channel (pages are striped over channels by guest
//! address), so two copies of a page sent in different rounds arrive in
//! order. Zero pages are never sent as data: the destination starts from
//! zeroed RAM, so the first round skips them, and later rounds send a flag.
//!
//! The wire format is in [`wire`] and `docs/migration.md`.

mod destination;
mod source;
pub mod wire;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use destination::{incoming, listen};
pub use source::migrate;

use crate::auth::AuthKey;
use crate::handshake::HandshakeError;
use crate::link::LinkError;

/// Default downtime budget.
pub const DEFAULT_DOWNTIME: Duration = Duration::from_millis(50);
/// Default number of pre-copy rounds after which the source switches over
/// even if the dirty set does not fit the budget.
pub const DEFAULT_MAX_ROUNDS: u32 = 30;
/// Most page channels a migration may use.
pub const MAX_CHANNELS: u16 = 16;

/// How a migration runs. Both sides take the same type; the destination
/// uses `auth_key`, `verify` and the timeouts, the source all of it.
#[derive(Clone, Debug)]
pub struct Params {
    /// TCP connections pages travel on (1 to [`MAX_CHANNELS`]).
    pub channels: u16,
    /// Longest the guest may stay paused at switchover, as estimated from
    /// the measured bandwidth.
    pub downtime_budget: Duration,
    /// Rounds after which the source switches over anyway.
    pub max_rounds: u32,
    /// Debug: both sides compute a digest of guest RAM and device state
    /// at switchover ([`vmm::StateDigest`]); a mismatch fails the
    /// migration and the source resumes.
    pub verify: bool,
    /// Shared secret both sides must prove they know.
    pub auth_key: Option<AuthKey>,
    /// Time to connect to the destination and complete the handshake.
    pub connect_timeout: Duration,
    /// Longest wait for any message from the peer once the migration runs.
    pub io_timeout: Duration,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            channels: 1,
            downtime_budget: DEFAULT_DOWNTIME,
            max_rounds: DEFAULT_MAX_ROUNDS,
            verify: false,
            auth_key: None,
            connect_timeout: Duration::from_secs(10),
            io_timeout: Duration::from_secs(30),
        }
    }
}

/// Which end of a migration this process is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// This process sends its VM.
    Outgoing,
    /// This process receives a VM.
    Incoming,
}

/// Where a migration is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Destination: waiting for a source to connect.
    Waiting,
    /// Connecting and authenticating.
    Connecting,
    /// Copying pages while the guest runs.
    Precopy,
    /// The guest is paused; the last pages and the state are on their way.
    Switchover,
    /// The state is loaded on the destination; taps and disks change hands.
    Handover,
    /// The guest runs on the destination.
    Completed,
    /// The migration failed; on the source the guest runs on as before.
    Failed,
}

/// How the downtime of a completed migration was spent, in milliseconds.
/// Steps measured on the source, except those marked destination.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DowntimeSplit {
    /// Stopping the vCPUs and device threads.
    pub vcpu_stop_ms: f64,
    /// Collecting the last dirty bitmap.
    pub dirty_log_ms: f64,
    /// Sending the last dirty pages, until every channel has them.
    pub last_pages_ms: f64,
    /// Reading the VM state (and digest when verifying).
    pub state_save_ms: f64,
    /// Destination: receiving the state and waiting for its page channels.
    pub state_transfer_ms: f64,
    /// Destination: loading the state into the VM.
    pub state_load_ms: f64,
    /// Source releasing taps and disks, destination attaching them.
    pub handover_ms: f64,
    /// Destination: resuming the vCPUs and devices.
    pub resume_ms: f64,
}

/// The result of a completed migration.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// From the start of the migration until the guest ran on the
    /// destination (as seen by the side reporting).
    pub total_ms: f64,
    /// From pausing the guest on the source until the destination reported
    /// it running again (source's view; on the destination: from the first
    /// switchover message until resume).
    pub downtime_ms: f64,
    /// Pre-copy rounds, the last (paused) one included.
    pub rounds: u32,
    /// Page channels used.
    pub channels: u16,
    /// Pages sent with their contents.
    pub pages_sent: u64,
    /// Pages sent as a zero flag, or skipped because they were never
    /// touched.
    pub zero_pages: u64,
    /// Bytes sent on all channels (headers included).
    pub bytes_sent: u64,
    /// Pages sent while the guest was paused.
    pub last_round_pages: u64,
    /// Page data throughput of the pre-copy rounds, bytes per second.
    pub throughput_bytes_per_s: f64,
    /// The downtime's parts.
    pub split: DowntimeSplit,
    /// Hex digest of guest RAM and state both sides computed (verify mode).
    pub digest: Option<String>,
}

/// A migration's progress, readable while it runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// This side's role.
    pub direction: Direction,
    /// The peer's address.
    pub peer: String,
    /// Where the migration is.
    pub phase: Phase,
    /// The current round (1 is the full copy).
    pub round: u32,
    /// Page channels.
    pub channels: u16,
    /// Pages sent (received) with data so far.
    pub pages: u64,
    /// Zero pages so far.
    pub zero_pages: u64,
    /// Bytes sent (received) so far.
    pub bytes: u64,
    /// Pages the guest dirtied per second in the last round.
    pub dirty_rate_pages_per_s: f64,
    /// Pages still dirty after the last round.
    pub remaining_dirty_pages: u64,
    /// Measured page bandwidth, bytes per second.
    pub bandwidth_bytes_per_s: f64,
    /// Estimated downtime if the source switched over now.
    pub estimated_downtime_ms: f64,
    /// Time since the migration started.
    pub elapsed_ms: f64,
    /// The result, once completed.
    pub report: Option<Report>,
    /// Why it failed, once failed.
    pub error: Option<String>,
}

impl Progress {
    fn new(direction: Direction, peer: String) -> Self {
        Progress {
            direction,
            peer,
            phase: match direction {
                Direction::Outgoing => Phase::Connecting,
                Direction::Incoming => Phase::Waiting,
            },
            round: 0,
            channels: 0,
            pages: 0,
            zero_pages: 0,
            bytes: 0,
            dirty_rate_pages_per_s: 0.0,
            remaining_dirty_pages: 0,
            bandwidth_bytes_per_s: 0.0,
            estimated_downtime_ms: 0.0,
            elapsed_ms: 0.0,
            report: None,
            error: None,
        }
    }
}

/// Shared, updatable view of a migration's [`Progress`] (cheap to clone).
#[derive(Clone, Debug)]
pub struct ProgressHandle(Arc<Mutex<Progress>>);

impl ProgressHandle {
    /// A progress record for a migration in `direction` with `peer`.
    pub fn new(direction: Direction, peer: impl Into<String>) -> Self {
        ProgressHandle(Arc::new(Mutex::new(Progress::new(direction, peer.into()))))
    }

    /// A copy of the current progress.
    pub fn get(&self) -> Progress {
        self.lock().clone()
    }

    fn lock(&self) -> MutexGuard<'_, Progress> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update(&self, f: impl FnOnce(&mut Progress)) {
        f(&mut self.lock());
    }
}

/// Why a migration failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The parameters make no sense.
    #[error("invalid migration parameters: {0}")]
    Params(String),
    /// The listening socket could not be set up.
    #[error("cannot listen for an incoming migration on {addr}")]
    Listen {
        /// The address.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Connecting or the handshake failed.
    #[error("cannot open the migration link to {addr}")]
    Connect {
        /// The address.
        addr: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The handshake failed.
    #[error("migration handshake failed")]
    Handshake(#[source] HandshakeError),
    /// The link failed while the migration ran (peer gone, timeout...).
    #[error("the migration link failed during {phase}")]
    Link {
        /// What was going on.
        phase: &'static str,
        /// Why.
        #[source]
        source: LinkError,
    },
    /// The peer sent something that breaks the protocol.
    #[error("the migration peer broke the protocol: {0}")]
    Protocol(String),
    /// The peer gave up and said why.
    #[error("the migration peer aborted: {0}")]
    PeerAborted(String),
    /// This VM cannot take the incoming state (shape mismatch...).
    #[error("the incoming VM does not fit this one: {0}")]
    Mismatch(String),
    /// Verify mode: the two sides' digests differ.
    #[error("digest mismatch at switchover: {0}")]
    DigestMismatch(String),
    /// The VM failed an operation (pause, state, memory...).
    #[error("VM operation failed: {what}")]
    Vm {
        /// The operation.
        what: &'static str,
        /// Why.
        #[source]
        source: vmm::Error,
    },
    /// The destination took over the taps and disks but its confirmation
    /// never arrived: the guest may run there. The source stays paused with
    /// its back ends released rather than risk two running copies.
    #[error(
        "the migration's outcome is unknown: the link to the destination broke after the handover ({0}); the VM here stays paused — resume it only if the destination is not running it"
    )]
    OutcomeUnknown(String),
    /// A channel thread could not be started.
    #[error("cannot start a migration thread")]
    Thread(#[source] std::io::Error),
}

/// Shorthand for an [`Error::Vm`] mapper.
fn vm_err(what: &'static str) -> impl FnOnce(vmm::Error) -> Error {
    move |source| Error::Vm { what, source }
}

/// Shorthand for an [`Error::Link`] mapper.
fn link_err(phase: &'static str) -> impl FnOnce(LinkError) -> Error {
    move |source| Error::Link { phase, source }
}

/// Test hook: `TWINVM_TEST_MIGRATION_DIE_AFTER_PAGES=N` makes the process
/// kill itself (SIGKILL, as a host failure would end it) once it has sent
/// or received N pages of a migration. Used by the fault tests.
pub const DIE_AFTER_PAGES_ENV: &str = "TWINVM_TEST_MIGRATION_DIE_AFTER_PAGES";

fn die_after_pages() -> Option<u64> {
    std::env::var(DIE_AFTER_PAGES_ENV).ok()?.parse().ok()
}

/// Kills this process if the [`DIE_AFTER_PAGES_ENV`] hook says so.
fn maybe_die(limit: Option<u64>, pages: u64) {
    if let Some(n) = limit
        && pages >= n
    {
        tracing::error!("{DIE_AFTER_PAGES_ENV}={n}: killing this process after {pages} pages");
        // SAFETY: kill(2) on our own pid; no memory is involved.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
