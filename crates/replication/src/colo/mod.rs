//! COLO checkpointing: a secondary VM kept in step with a running primary.
//!
//! The primary ([`run_primary`]) connects to the secondary
//! ([`run_secondary`]), brings it up by live pre-copy while its own guest
//! runs, and from then on keeps it in step with checkpoints:
//!
//! - **Between checkpoints** the primary streams the pages its guest
//!   dirties to the secondary in background rounds. The secondary keeps
//!   them in a *staging area* (its own guest runs on and must not see
//!   them yet) and, with each round's acknowledgement, reports the pages
//!   *its* guest dirtied that are not staged, which the primary sends in
//!   its next round.
//! - **A checkpoint** (interval timer, a request, a full staging area — one
//!   entry point, [`Handle::request_checkpoint`]) pauses both guests. The
//!   primary sends its residual dirty pages, the pages the secondary
//!   dirtied since its last report (those not staged yet), and the VM
//!   state. As soon as the secondary has *received* all of it, it
//!   acknowledges and the primary resumes; the secondary then applies the
//!   staging area to guest memory, loads the state into its existing VM,
//!   resumes and reports `loaded`.
//! - Nothing is applied before the whole checkpoint has arrived: if the
//!   primary is lost in the middle, the secondary drops the staging area
//!   and its guest goes on from its own consistent state.
//!
//! Why the union of both sides' dirty pages is enough: after checkpoint N
//! the two guests' memories are equal. A page differs on the secondary at
//! checkpoint N+1 only if one of the two guests (or their VMMs) wrote it,
//! and every such page is staged with the primary's contents at the pause.
//! So the secondary needs no copy of guest RAM, only room for one epoch's
//! pages.
//!
//! The wire format is in [`wire`] and `docs/colo.md`.

mod primary;
mod secondary;
mod staging;
pub mod wire;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use primary::run_primary;
pub use secondary::{listen, run_secondary};
pub use staging::Staging;

use crate::auth::AuthKey;
use crate::handshake::HandshakeError;
use crate::link::LinkError;

/// Default checkpoint interval. The pause hardly depends on it (every
/// checkpoint follows a background round), so it trades the share of time
/// the guest is paused (under 1 ms per checkpoint, so well under 1 % at
/// 200 ms) against the secondary's staging memory, which grows with the
/// pages dirtied per interval; see docs/performance.md.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(200);
/// Shortest and longest checkpoint interval accepted.
pub const INTERVAL_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(10)..=Duration::from_secs(3600);
/// Most page channels a pair may use.
pub const MAX_CHANNELS: u16 = 16;
/// Pause times kept for the percentiles in [`Status`].
const PAUSE_HISTORY: usize = 4096;

/// How a protected pair runs. Both sides take the same type; the secondary
/// uses `auth_key`, `vm_id` and the timeouts, the primary all of it.
#[derive(Clone, Debug)]
pub struct Params {
    /// Time between two checkpoints.
    pub interval: Duration,
    /// Time between two background rounds of page streaming; `None` picks
    /// a fifth of the interval, between 5 and 20 ms. (Every checkpoint
    /// also follows a round of its own.)
    pub round_interval: Option<Duration>,
    /// TCP connections pages travel on (1 to [`MAX_CHANNELS`]).
    pub channels: u16,
    /// Debug: at each checkpoint the primary sends a page-granular digest
    /// of guest RAM and machine state taken in the pause; the secondary
    /// compares it with its own after loading. A mismatch ends protection
    /// with the first differing page named.
    pub verify: bool,
    /// Shared secret both sides must prove they know.
    pub auth_key: Option<AuthKey>,
    /// The identity of the protected VM. The primary announces its VM's
    /// identity; a secondary with `vm_id` set refuses a primary announcing
    /// another. `None` on the secondary: it takes the first primary's.
    pub vm_id: Option<[u8; 16]>,
    /// Staged pages (bytes) at which the primary checkpoints early, to
    /// bound the secondary's memory; 0 picks an eighth of guest RAM.
    pub staging_limit: u64,
    /// Time to connect and complete the handshake.
    pub connect_timeout: Duration,
    /// Longest wait for any message from the peer once protection runs.
    pub io_timeout: Duration,
    /// Primary: pause between attempts to reach the secondary.
    pub retry_interval: Duration,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            interval: DEFAULT_INTERVAL,
            round_interval: None,
            channels: 1,
            verify: false,
            auth_key: None,
            vm_id: None,
            staging_limit: 0,
            connect_timeout: Duration::from_secs(10),
            io_timeout: Duration::from_secs(10),
            retry_interval: Duration::from_secs(1),
        }
    }
}

impl Params {
    /// Checks the values a user can set.
    pub fn check(&self) -> Result<(), Error> {
        if !INTERVAL_RANGE.contains(&self.interval) {
            return Err(Error::Params(format!(
                "checkpoint interval {:?}: {:?} to {:?} are allowed",
                self.interval,
                INTERVAL_RANGE.start(),
                INTERVAL_RANGE.end()
            )));
        }
        if self.channels == 0 || self.channels > MAX_CHANNELS {
            return Err(Error::Params(format!(
                "{} channels: 1 to {MAX_CHANNELS} are allowed",
                self.channels
            )));
        }
        Ok(())
    }

    /// The background round interval in effect.
    pub fn round_interval(&self) -> Duration {
        self.round_interval.unwrap_or_else(|| {
            (self.interval / 5).clamp(Duration::from_millis(5), Duration::from_millis(20))
        })
    }
}

/// Which side of the pair this process is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ColoRole {
    /// Runs the guest that serves clients, sends checkpoints.
    Primary,
    /// Runs a copy kept in step, receives checkpoints.
    Secondary,
}

/// Where protection stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// Primary: trying to reach the secondary (the guest runs unprotected).
    Connecting,
    /// Secondary: waiting for its primary; the guest has not run.
    WaitingForPrimary,
    /// The secondary is being brought up by live pre-copy.
    Syncing,
    /// Both VMs run; checkpoints keep the secondary in step.
    Protected,
    /// Primary: the secondary was lost; the guest runs unprotected (the
    /// primary tries to reach a secondary again).
    Degraded,
    /// Secondary: the primary was lost; the guest goes on from its last
    /// complete checkpoint.
    PrimaryLost,
    /// Replication was stopped, or (secondary) the primary's VM ended in
    /// order and this copy with it.
    Stopped,
}

/// Why a checkpoint was taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Trigger {
    /// The first checkpoint, which ends the initial sync.
    Sync,
    /// The checkpoint interval elapsed.
    Interval,
    /// A request through the control API.
    Request,
    /// The secondary's staging area reached its limit.
    StagingFull,
    /// The network proxy saw the two guests' outputs differ.
    Mismatch,
}

/// Where the primary's pause time went, in milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PauseSplit {
    /// Stopping the vCPUs and device workers.
    pub vcpu_stop_ms: f64,
    /// Reading the dirty log.
    pub dirty_log_ms: f64,
    /// Sending the residual pages and the secondary's dirty pages.
    pub page_send_ms: f64,
    /// Waiting for the secondary's dirty-page report (overlaps page send).
    pub svm_report_wait_ms: f64,
    /// Saving the VM state (and the digest in verify mode).
    pub state_save_ms: f64,
    /// From the state sent to the secondary's acknowledgement of receipt.
    pub ack_wait_ms: f64,
    /// Resuming the vCPUs.
    pub resume_ms: f64,
}

impl PauseSplit {
    /// Folds `x`, the `n`th sample, into this running mean.
    fn add_to_mean(&mut self, x: &PauseSplit, n: u64) {
        let n = n.max(1) as f64;
        let f = |m: &mut f64, v: f64| *m += (v - *m) / n;
        f(&mut self.vcpu_stop_ms, x.vcpu_stop_ms);
        f(&mut self.dirty_log_ms, x.dirty_log_ms);
        f(&mut self.page_send_ms, x.page_send_ms);
        f(&mut self.svm_report_wait_ms, x.svm_report_wait_ms);
        f(&mut self.state_save_ms, x.state_save_ms);
        f(&mut self.ack_wait_ms, x.ack_wait_ms);
        f(&mut self.resume_ms, x.resume_ms);
    }
}

/// One completed checkpoint.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CheckpointInfo {
    /// Checkpoint number (1 is the one that ended the initial sync).
    pub epoch: u64,
    /// Why it was taken.
    pub trigger: Option<Trigger>,
    /// How long the primary's guest was paused.
    pub pause_ms: f64,
    /// Where the pause went.
    pub split: PauseSplit,
    /// Pages sent inside the pause (data and zero flags).
    pub pages_in_pause: u64,
    /// Bytes on the wire inside the pause (pages and state).
    pub bytes_in_pause: u64,
    /// Pages sent in background rounds during the epoch before it.
    pub background_pages: u64,
    /// Bytes sent in background rounds during the epoch before it.
    pub background_bytes: u64,
    /// Pages the secondary's guest dirtied that it reported (whole epoch).
    pub secondary_dirty_pages: u64,
    /// Bytes of the encoded VM state.
    pub state_bytes: u64,
    /// Secondary: time to apply the staging area to guest memory.
    pub apply_ms: f64,
    /// Secondary: time to load the state into its VM.
    pub load_ms: f64,
    /// Secondary: staged pages applied.
    pub staged_pages: u64,
    /// Secondary: its process's resident memory after loading.
    pub secondary_rss_bytes: u64,
    /// Verify mode: the digest both sides agreed on.
    pub digest: Option<String>,
}

/// Percentiles of the primary's pause times.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PauseStats {
    /// Checkpoints counted.
    pub count: u64,
    /// Mean over every checkpoint.
    pub mean_ms: f64,
    /// Median of the last [`PAUSE_HISTORY`] checkpoints.
    pub p50_ms: f64,
    /// 99th percentile of the last [`PAUSE_HISTORY`] checkpoints.
    pub p99_ms: f64,
    /// Longest pause of all.
    pub max_ms: f64,
}

/// Upper bounds (ms) of the pause histogram's buckets; a last bucket
/// counts the longer pauses.
pub const PAUSE_BUCKETS_MS: [f64; 10] = [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

/// How the primary's pauses were distributed.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PauseHistogram {
    /// Upper bound of each bucket in milliseconds ([`PAUSE_BUCKETS_MS`]);
    /// the last bucket has none (`null` in JSON).
    pub upper_ms: Vec<Option<f64>>,
    /// Pauses in each bucket.
    pub count: Vec<u64>,
}

impl PauseHistogram {
    fn new() -> Self {
        let mut upper_ms: Vec<Option<f64>> = PAUSE_BUCKETS_MS.iter().map(|&b| Some(b)).collect();
        upper_ms.push(None);
        PauseHistogram {
            count: vec![0; upper_ms.len()],
            upper_ms,
        }
    }

    fn add(&mut self, ms: f64) {
        let i = PAUSE_BUCKETS_MS
            .iter()
            .position(|&b| ms <= b)
            .unwrap_or(PAUSE_BUCKETS_MS.len());
        if let Some(c) = self.count.get_mut(i) {
            *c += 1;
        }
    }
}

/// A checkpoint the secondary received only in part and dropped.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Discarded {
    /// The checkpoint's number.
    pub epoch: u64,
    /// Pages it had staged.
    pub staged_pages: u64,
    /// Why it was dropped.
    pub reason: String,
    /// Verify mode: the secondary's digest when it paused for the
    /// checkpoint, and after dropping it; equal when nothing of it reached
    /// the guest.
    pub digest_at_pause: Option<String>,
    /// See `digest_at_pause`.
    pub digest_after_discard: Option<String>,
}

/// What `status` shows about replication.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// This side's role.
    pub role: ColoRole,
    /// Where protection stands.
    pub state: State,
    /// The other side's address.
    pub peer: String,
    /// Checkpoint interval in milliseconds.
    pub interval_ms: f64,
    /// Page channels.
    pub channels: u16,
    /// Verify mode.
    pub verify: bool,
    /// Checkpoints completed since protection (re)started.
    pub checkpoints: u64,
    /// Primary: pause times.
    pub pause: PauseStats,
    /// Primary: the mean of each part of the pause.
    pub pause_split_mean: PauseSplit,
    /// Primary: the distribution of pause times.
    pub pause_histogram: PauseHistogram,
    /// The last completed checkpoint.
    pub last_checkpoint: Option<CheckpointInfo>,
    /// The checkpoint with the longest pause so far.
    pub slowest_checkpoint: Option<CheckpointInfo>,
    /// The first checkpoint of the session, which ended the initial sync:
    /// starting protection cost the primary this one pause.
    pub sync_checkpoint: Option<CheckpointInfo>,
    /// Background rounds since protection started.
    pub background_rounds: u64,
    /// Pages sent (primary) or received (secondary) in background rounds.
    pub background_pages: u64,
    /// Bytes of those.
    pub background_bytes: u64,
    /// Pages sent or received inside pauses.
    pub pause_pages: u64,
    /// Bytes of those (pages and state).
    pub pause_bytes: u64,
    /// Secondary: bytes staged now; primary: as of the last report.
    pub staging_bytes: u64,
    /// Largest staging area so far.
    pub staging_peak_bytes: u64,
    /// Secondary: this process's resident memory; primary: the
    /// secondary's, as of the last checkpoint.
    pub secondary_rss_bytes: u64,
    /// Verify mode: checkpoints whose digests were compared and equal.
    pub verified_checkpoints: u64,
    /// A checkpoint the secondary dropped half-received.
    pub discarded: Option<Discarded>,
    /// Why the last session ended, if it did.
    pub last_error: Option<String>,
    /// Milliseconds since the state last changed.
    pub state_since_ms: f64,
}

/// Why a session or a request failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The parameters make no sense.
    #[error("invalid replication parameters: {0}")]
    Params(String),
    /// The listening socket could not be set up.
    #[error("cannot listen for the primary on {addr}")]
    Listen {
        /// The address.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Connecting failed.
    #[error("cannot reach the secondary at {addr}")]
    Connect {
        /// The address.
        addr: String,
        /// Why.
        #[source]
        source: LinkError,
    },
    /// The handshake failed.
    #[error("replication handshake failed")]
    Handshake(#[source] HandshakeError),
    /// The link failed (peer gone, timeout...).
    #[error("the replication link failed during {phase}")]
    Link {
        /// What was going on.
        phase: &'static str,
        /// Why.
        #[source]
        source: LinkError,
    },
    /// The peer sent something that breaks the protocol.
    #[error("the replication peer broke the protocol: {0}")]
    Protocol(String),
    /// The peer gave up and said why.
    #[error("the replication peer aborted: {0}")]
    PeerAborted(String),
    /// The two VMs do not fit each other.
    #[error("the peer's VM does not fit this one: {0}")]
    Mismatch(String),
    /// Verify mode: the digests differ.
    #[error("checkpoint {epoch} does not match: {detail}")]
    DigestMismatch {
        /// Checkpoint number.
        epoch: u64,
        /// Where the digests first differ.
        detail: String,
    },
    /// The VM failed an operation.
    #[error("VM operation failed: {what}")]
    Vm {
        /// The operation.
        what: &'static str,
        /// Why.
        #[source]
        source: vmm::Error,
    },
    /// Secondary: the primary was lost, or broke the protocol, before the
    /// first checkpoint completed; the guest never ran here.
    #[error("the primary was lost before the first checkpoint (the guest never ran here)")]
    LostBeforeRunning(#[source] Box<Error>),
    /// Secondary: a checkpoint it had acknowledged could not be applied;
    /// its VM stays stopped.
    #[error("checkpoint {epoch} was received but could not be applied")]
    ApplyFailed {
        /// Checkpoint number.
        epoch: u64,
        /// Why.
        #[source]
        source: Box<Error>,
    },
    /// Guest memory could not be read or written.
    #[error("guest memory access failed: {0}")]
    Memory(String),
    /// A thread could not be started.
    #[error("cannot start a replication thread")]
    Thread(#[source] std::io::Error),
    /// A checkpoint was requested when none can be taken.
    #[error("no checkpoint can be taken: {0}")]
    NotProtected(String),
    /// Replication was stopped.
    #[error("replication was stopped")]
    Stopped,
}

/// Shorthand for an [`Error::Vm`] mapper.
fn vm_err(what: &'static str) -> impl FnOnce(vmm::Error) -> Error {
    move |source| Error::Vm { what, source }
}

/// Shorthand for an [`Error::Link`] mapper.
fn link_err(phase: &'static str) -> impl FnOnce(LinkError) -> Error {
    move |source| Error::Link { phase, source }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Where a requested checkpoint's outcome is put, and the signal that it
/// is there.
type Outcome = Arc<(Mutex<Option<Result<CheckpointInfo, String>>>, Condvar)>;

/// A checkpoint asked for through [`Handle::request_checkpoint`].
struct Request {
    trigger: Trigger,
    /// Filled in when the checkpoint completed or failed.
    done: Outcome,
}

/// What the replication thread and the rest of the process share.
struct Shared {
    status: Mutex<Status>,
    state_since: Mutex<Instant>,
    pauses: Mutex<VecDeque<f64>>,
    pause_total_ms: Mutex<f64>,
    requests: Mutex<VecDeque<Request>>,
    wake: Condvar,
    stop: AtomicBool,
}

/// The control side of a replication session: status, checkpoint
/// requests, stop. Cheap to clone.
#[derive(Clone)]
pub struct Handle(Arc<Shared>);

impl Handle {
    /// A handle for `role`, talking to `peer`, with `params`.
    pub fn new(role: ColoRole, peer: impl Into<String>, params: &Params) -> Handle {
        let state = match role {
            ColoRole::Primary => State::Connecting,
            ColoRole::Secondary => State::WaitingForPrimary,
        };
        Handle(Arc::new(Shared {
            status: Mutex::new(Status {
                role,
                state,
                peer: peer.into(),
                interval_ms: ms(params.interval),
                channels: params.channels,
                verify: params.verify,
                checkpoints: 0,
                pause: PauseStats::default(),
                pause_split_mean: PauseSplit::default(),
                pause_histogram: PauseHistogram::new(),
                last_checkpoint: None,
                slowest_checkpoint: None,
                sync_checkpoint: None,
                background_rounds: 0,
                background_pages: 0,
                background_bytes: 0,
                pause_pages: 0,
                pause_bytes: 0,
                staging_bytes: 0,
                staging_peak_bytes: 0,
                secondary_rss_bytes: 0,
                verified_checkpoints: 0,
                discarded: None,
                last_error: None,
                state_since_ms: 0.0,
            }),
            state_since: Mutex::new(Instant::now()),
            pauses: Mutex::new(VecDeque::new()),
            pause_total_ms: Mutex::new(0.0),
            requests: Mutex::new(VecDeque::new()),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
        }))
    }

    /// The current status.
    pub fn status(&self) -> Status {
        let mut s = lock(&self.0.status).clone();
        s.state_since_ms = ms(lock(&self.0.state_since).elapsed());
        s
    }

    /// Takes a checkpoint now (primary only, while protected) and waits
    /// for it, at most `timeout`. This is the one entry point of every
    /// trigger but the interval timer's, which the replication thread
    /// fires itself.
    pub fn request_checkpoint(
        &self,
        trigger: Trigger,
        timeout: Duration,
    ) -> Result<CheckpointInfo, Error> {
        let status = self.status();
        if status.role != ColoRole::Primary {
            return Err(Error::NotProtected(
                "checkpoints are taken on the primary".into(),
            ));
        }
        if status.state != State::Protected {
            return Err(Error::NotProtected(format!(
                "the pair is {}, not protected",
                state_name(status.state)
            )));
        }
        let done = Arc::new((Mutex::new(None), Condvar::new()));
        lock(&self.0.requests).push_back(Request {
            trigger,
            done: done.clone(),
        });
        self.0.wake.notify_all();
        let deadline = Instant::now() + timeout;
        let mut slot = lock(&done.0);
        loop {
            if let Some(r) = slot.take() {
                return r.map_err(Error::NotProtected);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::NotProtected(format!(
                    "the checkpoint did not complete within {timeout:?}"
                )));
            }
            slot = done
                .1
                .wait_timeout(slot, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Ends replication: the replication thread returns at its next step.
    pub fn stop(&self) {
        self.0.stop.store(true, Ordering::SeqCst);
        self.0.wake.notify_all();
    }

    fn stopped(&self) -> bool {
        self.0.stop.load(Ordering::SeqCst)
    }

    fn update(&self, f: impl FnOnce(&mut Status)) {
        f(&mut lock(&self.0.status));
    }

    fn set_state(&self, state: State) {
        let mut s = lock(&self.0.status);
        if s.state != state {
            tracing::info!(
                "replication: {} → {}",
                state_name(s.state),
                state_name(state)
            );
            s.state = state;
            *lock(&self.0.state_since) = Instant::now();
        }
    }

    /// Records a completed checkpoint in the status.
    fn record(&self, info: &CheckpointInfo) {
        if lock(&self.0.status).role == ColoRole::Secondary {
            // The pause is the primary's: the secondary counts checkpoints
            // and keeps what it measured itself.
            self.update(|s| {
                s.checkpoints += 1;
                s.secondary_rss_bytes = info.secondary_rss_bytes;
                if info.digest.is_some() {
                    s.verified_checkpoints += 1;
                }
                s.last_checkpoint = Some(info.clone());
            });
            return;
        }
        let stats = {
            let mut pauses = lock(&self.0.pauses);
            if pauses.len() == PAUSE_HISTORY {
                pauses.pop_front();
            }
            pauses.push_back(info.pause_ms);
            let mut total = lock(&self.0.pause_total_ms);
            *total += info.pause_ms;
            let mut sorted: Vec<f64> = pauses.iter().copied().collect();
            sorted.sort_by(f64::total_cmp);
            let old = lock(&self.0.status).pause;
            let count = old.count + 1;
            PauseStats {
                count,
                mean_ms: *total / count as f64,
                p50_ms: percentile(&sorted, 0.50),
                p99_ms: percentile(&sorted, 0.99),
                max_ms: old.max_ms.max(info.pause_ms),
            }
        };
        self.update(|s| {
            s.checkpoints += 1;
            s.pause = stats;
            s.pause_histogram.add(info.pause_ms);
            s.pause_split_mean.add_to_mean(&info.split, stats.count);
            s.pause_pages += info.pages_in_pause;
            s.pause_bytes += info.bytes_in_pause;
            if info.secondary_rss_bytes > 0 {
                s.secondary_rss_bytes = info.secondary_rss_bytes;
            }
            if info.digest.is_some() {
                s.verified_checkpoints += 1;
            }
            if info.trigger == Some(Trigger::Sync) {
                s.sync_checkpoint = Some(info.clone());
            }
            if s.slowest_checkpoint
                .as_ref()
                .is_none_or(|w| info.pause_ms > w.pause_ms)
            {
                s.slowest_checkpoint = Some(info.clone());
            }
            s.last_checkpoint = Some(info.clone());
        });
    }

    /// The oldest pending request, if any.
    fn next_request(&self) -> Option<Request> {
        lock(&self.0.requests).pop_front()
    }

    /// Fails every pending request with `why`.
    fn fail_requests(&self, why: &str) {
        let pending: Vec<Request> = lock(&self.0.requests).drain(..).collect();
        for r in pending {
            r.finish(Err(why.to_string()));
        }
    }

    /// Sleeps until `deadline`, a request or a stop, whichever comes first.
    fn sleep_until(&self, deadline: Instant) {
        let mut requests = lock(&self.0.requests);
        loop {
            if !requests.is_empty() || self.stopped() {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            requests = self
                .0
                .wake
                .wait_timeout(requests, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

impl Request {
    fn finish(self, result: Result<CheckpointInfo, String>) {
        *lock(&self.done.0) = Some(result);
        self.done.1.notify_all();
    }
}

/// The name of a state as the status shows it.
pub fn state_name(state: State) -> &'static str {
    match state {
        State::Connecting => "connecting",
        State::WaitingForPrimary => "waiting-for-primary",
        State::Syncing => "syncing",
        State::Protected => "protected",
        State::Degraded => "degraded",
        State::PrimaryLost => "primary-lost",
        State::Stopped => "stopped",
    }
}

/// The `q` quantile of ascending `sorted` (nearest rank); 0 if empty.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Gives the calling thread real-time priority (`SCHED_FIFO`, the lowest
/// level), if the process may. The threads that carry a checkpoint — the
/// primary's replication thread and page senders, the secondary's
/// receivers and coordinator — mostly sleep; when they wake, a checkpoint
/// (and the paused guest) waits for them, so they must not queue behind
/// the guests' vCPU threads, which keep every CPU busy when the host has
/// few. Without the privilege (CAP_SYS_NICE) they keep normal priority.
pub(crate) fn realtime_thread() {
    static LOGGED: std::sync::Once = std::sync::Once::new();
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: changes only the calling thread's scheduling policy; `param`
    // is a valid sched_param.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        LOGGED.call_once(|| {
            tracing::info!("replication threads keep normal priority: {e}");
        });
    }
}

/// This process's resident memory in bytes, from `/proc/self/statm`; 0 if
/// it cannot be read.
pub fn process_rss_bytes() -> u64 {
    let Ok(text) = std::fs::read_to_string("/proc/self/statm") else {
        return 0;
    };
    let pages: u64 = text
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no memory effects.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * u64::try_from(page).unwrap_or(4096)
}

/// Test hooks, read from the environment, that make this process die
/// (SIGKILL, as a host failure would end it) at a chosen point of a
/// checkpoint. Used by the fault tests only.
///
/// `TWINVM_TEST_COLO_DIE=<side>:<epoch>:<pages>`: the primary (`side` =
/// `primary`) dies after sending `pages` pages inside the pause of
/// checkpoint `epoch` (or of the first later one with that many pages;
/// with `pages` = 0, as soon as the pause starts sending, even a pause
/// with nothing to send); the secondary (`secondary`) after receiving
/// `pages` pages of such a pause.
pub const DIE_ENV: &str = "TWINVM_TEST_COLO_DIE";

/// The hook of [`DIE_ENV`] for `role`: (epoch, pages).
fn die_hook(role: ColoRole) -> Option<(u64, u64)> {
    let v = std::env::var(DIE_ENV).ok()?;
    let mut parts = v.split(':');
    let side = parts.next()?;
    let want = match role {
        ColoRole::Primary => "primary",
        ColoRole::Secondary => "secondary",
    };
    if side != want {
        return None;
    }
    let epoch = parts.next()?.parse().ok()?;
    let pages = parts.next()?.parse().ok()?;
    Some((epoch, pages))
}

/// Kills this process if the hook says so.
fn maybe_die(hook: Option<(u64, u64)>, epoch: u64, pages: u64) {
    if let Some((e, n)) = hook
        && epoch >= e
        && pages >= n
    {
        tracing::error!(
            "{DIE_ENV}: killing this process in checkpoint {epoch} after {pages} pages"
        );
        // SAFETY: kill(2) on our own pid; no memory is involved.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

/// Test hook: `TWINVM_TEST_COLO_CORRUPT=<kind>:<epoch>` makes the primary
/// send a bad checkpoint `epoch`: `page-outside-ram` (a page far beyond
/// guest RAM), `truncated` (a page batch cut short, then the link
/// closed) or `skip-page` (from checkpoint `epoch` on, one dirty page left
/// out of each, as a dirty-tracking bug would: verify mode must catch it
/// as soon as a page left out differs). Used by the tests only.
pub const CORRUPT_ENV: &str = "TWINVM_TEST_COLO_CORRUPT";

/// What [`CORRUPT_ENV`] asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Corrupt {
    PageOutsideRam,
    Truncated,
    SkipPage,
}

fn corrupt_hook() -> Option<(Corrupt, u64)> {
    let v = std::env::var(CORRUPT_ENV).ok()?;
    let (kind, epoch) = v.split_once(':')?;
    let kind = match kind {
        "page-outside-ram" => Corrupt::PageOutsideRam,
        "truncated" => Corrupt::Truncated,
        "skip-page" => Corrupt::SkipPage,
        _ => return None,
    };
    Some((kind, epoch.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
    }

    #[test]
    fn params_are_checked() {
        assert!(Params::default().check().is_ok());
        let p = Params {
            interval: Duration::from_millis(1),
            ..Params::default()
        };
        assert!(p.check().is_err());
        let p = Params {
            channels: 0,
            ..Params::default()
        };
        assert!(p.check().is_err());
        let p = Params {
            interval: Duration::from_millis(50),
            ..Params::default()
        };
        assert_eq!(p.round_interval(), Duration::from_millis(10));
        assert_eq!(
            Params::default().round_interval(),
            Duration::from_millis(20)
        );
    }

    #[test]
    fn recorded_checkpoints_feed_the_statistics() {
        let h = Handle::new(ColoRole::Primary, "x", &Params::default());
        for i in 1..=10 {
            h.record(&CheckpointInfo {
                epoch: i,
                pause_ms: i as f64,
                pages_in_pause: 2,
                ..CheckpointInfo::default()
            });
        }
        let s = h.status();
        assert_eq!(s.checkpoints, 10);
        assert_eq!(s.pause.count, 10);
        assert_eq!(s.pause.max_ms, 10.0);
        assert_eq!(s.pause.p50_ms, 5.0);
        assert!((s.pause.mean_ms - 5.5).abs() < 1e-9);
        assert_eq!(s.pause_pages, 20);
        // Buckets ≤1, ≤2, ≤4, ≤8, ≤16 ms.
        assert_eq!(&s.pause_histogram.count[2..7], &[1, 1, 2, 4, 2]);
        assert_eq!(s.pause_histogram.count.iter().sum::<u64>(), 10);
        assert_eq!(s.slowest_checkpoint.unwrap().epoch, 10);
        // A secondary counts checkpoints but has no pauses of its own.
        let sec = Handle::new(ColoRole::Secondary, "x", &Params::default());
        sec.record(&CheckpointInfo {
            epoch: 1,
            secondary_rss_bytes: 7,
            ..CheckpointInfo::default()
        });
        let s = sec.status();
        assert_eq!(
            (s.checkpoints, s.pause.count, s.secondary_rss_bytes),
            (1, 0, 7)
        );
        assert_eq!(s.pause_histogram.count.iter().sum::<u64>(), 0);
        assert!(s.slowest_checkpoint.is_none());
    }

    #[test]
    fn requests_are_refused_unless_protected() {
        let h = Handle::new(ColoRole::Primary, "x", &Params::default());
        assert!(matches!(
            h.request_checkpoint(Trigger::Request, Duration::from_millis(10)),
            Err(Error::NotProtected(_))
        ));
        let s = Handle::new(ColoRole::Secondary, "x", &Params::default());
        assert!(
            s.request_checkpoint(Trigger::Request, Duration::from_millis(10))
                .is_err()
        );
    }
}
