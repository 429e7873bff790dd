//! The [`Control`] of a real VM.

use std::path::Path;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use replication::colo::{self, CheckpointInfo, Trigger};
use replication::migration::{self, Direction, ProgressHandle, Report};

use super::router::{ApiError, Control, MigrateArgs};
use super::{RunState, VmStatus, VmSummary};
use crate::migration::Defaults;

/// Controls a running [`vmm::Vm`] for the API.
///
/// State changes are serialized by one lock, held while the VM pauses or
/// resumes (milliseconds). A long operation (a snapshot, a migration)
/// instead records itself in [`Phase`] under the lock and releases it while
/// it works, so that `GET /vm` is answered meanwhile; conflicting
/// operations answer 409 until it is done.
pub struct VmControl {
    vm: Arc<vmm::Vm>,
    summary: VmSummary,
    events: Sender<vmm::VmEvent>,
    migration: Defaults,
    /// COLO protection, with a role.
    replication: Option<colo::Handle>,
    state: Mutex<State>,
}

/// How long `PUT /vm/checkpoint` waits for its checkpoint.
pub const CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(30);

/// What [`VmControl`]'s lock guards.
struct State {
    phase: Phase,
    /// When the guest started (here); `None` while it waits for an
    /// incoming migration.
    started: Option<Instant>,
    /// The migration running, or the last one.
    migration: Option<ProgressHandle>,
}

/// Where the VM is, as far as the API is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Running or paused.
    Live(RunState),
    /// A snapshot is being written: the VM is paused; afterwards it returns
    /// to the state held here.
    Snapshotting(RunState),
    /// An outgoing migration runs: it pauses and resumes the VM itself.
    Migrating,
    /// The VM waits for (or receives) an incoming migration; it has not
    /// run yet.
    Incoming,
    /// COLO replication runs (a primary, or a secondary that has not lost
    /// its primary): the replication thread pauses and resumes the VM,
    /// which must stay in step with its peer.
    Replicating,
    /// Asked to power off, or already ended (migrated, too): no more
    /// changes. Keeps the state it had for `GET /vm`.
    Ending(RunState),
}

/// The 409 for an operation asked for in `phase`, or `None` if the VM is
/// live.
fn refusal(phase: Phase, verb: &str) -> Option<ApiError> {
    let why = match phase {
        Phase::Live(_) => return None,
        Phase::Snapshotting(_) => {
            "a snapshot is being written; try again when it is done".to_string()
        }
        Phase::Migrating if verb == "migrate" => "a migration is running already".to_string(),
        Phase::Migrating => {
            "a migration is running and controls the VM; try again when it is done (it fails or the VM ends)"
                .to_string()
        }
        Phase::Incoming => {
            "it waits for an incoming migration and runs once that completes".to_string()
        }
        Phase::Replicating => {
            "COLO replication is active and the primary and the secondary must stay in step (power the VM off to end it)"
                .to_string()
        }
        Phase::Ending(_) => "it is shutting down".to_string(),
    };
    Some(ApiError::conflict(format!("cannot {verb} the VM: {why}")))
}

/// Checks that `dir` can take a snapshot: it does not exist yet (it is
/// created, with its parents) or is an empty directory. A snapshot never
/// replaces files already there, an older snapshot included.
pub fn check_snapshot_dir(dir: &Path) -> Result<(), String> {
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("cannot look at {}: {e}", dir.display())),
        Ok(meta) if !meta.is_dir() => Err(format!(
            "{} exists and is not a directory; give a new or empty directory",
            dir.display()
        )),
        Ok(_) => {
            let mut entries = std::fs::read_dir(dir)
                .map_err(|e| format!("cannot read the directory {}: {e}", dir.display()))?;
            if entries.next().is_some() {
                Err(format!(
                    "{} is not empty; give a new or empty directory (an older snapshot is not replaced)",
                    dir.display()
                ))
            } else {
                Ok(())
            }
        }
    }
}

impl VmControl {
    /// Controls `vm`, started at `started` with the configuration
    /// summarized by `summary`; its migrations use `migration`.
    pub fn new(
        vm: Arc<vmm::Vm>,
        summary: VmSummary,
        migration: Defaults,
        started: Instant,
    ) -> VmControl {
        Self::build(
            vm,
            summary,
            migration,
            State {
                phase: Phase::Live(RunState::Running),
                started: Some(started),
                migration: None,
            },
        )
    }

    /// Controls `vm`, which waits for the incoming migration reporting
    /// into `progress`; [`VmControl::incoming_completed`] once it runs.
    pub fn incoming(
        vm: Arc<vmm::Vm>,
        summary: VmSummary,
        migration: Defaults,
        progress: ProgressHandle,
    ) -> VmControl {
        Self::build(
            vm,
            summary,
            migration,
            State {
                phase: Phase::Incoming,
                started: None,
                migration: Some(progress),
            },
        )
    }

    /// Controls `vm`, a COLO secondary built with
    /// [`vmm::Vm::new_incoming`]: the replication thread behind `handle`
    /// starts it once it holds its primary's first checkpoint.
    pub fn secondary(
        vm: Arc<vmm::Vm>,
        summary: VmSummary,
        migration: Defaults,
        handle: colo::Handle,
    ) -> VmControl {
        let mut control = Self::build(
            vm,
            summary,
            migration,
            State {
                phase: Phase::Replicating,
                started: None,
                migration: None,
            },
        );
        control.replication = Some(handle);
        control
    }

    /// Makes this the control of a COLO primary, protected through
    /// `handle`: until the VM ends, the replication thread alone pauses
    /// and resumes it.
    pub fn replicated(mut self, handle: colo::Handle) -> VmControl {
        {
            let st = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
            if matches!(st.phase, Phase::Live(_)) {
                st.phase = Phase::Replicating;
            }
        }
        self.replication = Some(handle);
        self
    }

    fn build(vm: Arc<vmm::Vm>, summary: VmSummary, migration: Defaults, state: State) -> Self {
        let events = vm.event_sender();
        VmControl {
            vm,
            summary,
            events,
            migration,
            replication: None,
            state: Mutex::new(state),
        }
    }

    /// Notes, from its replication status, when a secondary's guest began
    /// to run (for `uptime_ms`); true once it has.
    pub fn secondary_progress(&self) -> bool {
        let Some(handle) = &self.replication else {
            return true;
        };
        note_secondary_start(&mut self.lock(), &handle.status())
    }

    /// Records that a secondary lost its primary after its guest ran: the
    /// guest goes on like any VM's, and takes every request again.
    pub fn replication_ended(&self) {
        let mut st = self.lock();
        if st.phase == Phase::Replicating {
            st.phase = Phase::Live(self.current_state());
            st.started.get_or_insert_with(Instant::now);
        }
    }

    /// Records that the incoming migration completed: the VM is live, as
    /// it was on the source (running or paused).
    pub fn incoming_completed(&self) {
        let mut st = self.lock();
        if st.phase == Phase::Incoming {
            st.phase = Phase::Live(self.current_state());
            st.started = Some(Instant::now());
        }
    }

    /// Records that the VM has ended: every later change is refused.
    pub fn mark_ended(&self) {
        let mut st = self.lock();
        st.phase = match st.phase {
            Phase::Live(state) => Phase::Ending(state),
            Phase::Snapshotting(_) | Phase::Migrating | Phase::Incoming => {
                Phase::Ending(RunState::Paused)
            }
            Phase::Replicating => Phase::Ending(self.current_state()),
            Phase::Ending(state) => Phase::Ending(state),
        };
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the VM runs, as the VM itself says (for phases in which a
    /// migration pauses and resumes it).
    fn current_state(&self) -> RunState {
        if self.vm.is_paused() {
            RunState::Paused
        } else {
            RunState::Running
        }
    }

    /// Moves a live VM to `target` with `change`; nothing to do if it is
    /// there already.
    fn transition(
        &self,
        target: RunState,
        verb: &str,
        change: impl FnOnce(&vmm::Vm) -> Result<(), vmm::Error>,
    ) -> Result<(), ApiError> {
        let mut st = self.lock();
        if let Some(e) = refusal(st.phase, verb) {
            return Err(e);
        }
        if st.phase == Phase::Live(target) {
            return Ok(());
        }
        change(&self.vm).map_err(|e| {
            ApiError::internal(format!("cannot {verb} the VM: {}", crate::error_chain(&e)))
        })?;
        st.phase = Phase::Live(target);
        Ok(())
    }
}

/// Sets `st.started` for a secondary whose guest runs: it does from the
/// first checkpoint on, which made it protected. True once it is set.
fn note_secondary_start(st: &mut State, replication: &colo::Status) -> bool {
    if st.started.is_none() {
        st.started = match replication.state {
            colo::State::Protected => {
                Duration::try_from_secs_f64(replication.state_since_ms / 1000.0)
                    .ok()
                    .and_then(|d| Instant::now().checked_sub(d))
            }
            colo::State::PrimaryLost => Some(Instant::now()),
            _ => None,
        };
    }
    st.started.is_some()
}

/// Resumes `vm`, first taking back its taps and disks if a migration whose
/// outcome is unknown left them released: this fails while the
/// destination holds them (a tap is busy, a disk image locked), so a guest
/// that runs there is not resumed here too.
fn resume(vm: &vmm::Vm) -> Result<(), vmm::Error> {
    if !vm.backends_attached() {
        vm.attach_backends()?;
    }
    vm.resume()
}

impl Control for VmControl {
    fn status(&self) -> VmStatus {
        let mut st = self.lock();
        let replication = self.replication.as_ref().map(colo::Handle::status);
        if let Some(r) = &replication {
            note_secondary_start(&mut st, r);
        }
        let state = match st.phase {
            Phase::Live(s) | Phase::Ending(s) => s,
            Phase::Snapshotting(_) => RunState::Paused,
            Phase::Migrating | Phase::Incoming | Phase::Replicating => self.current_state(),
        };
        let uptime = st.started.map_or(0, |t| {
            u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)
        });
        VmStatus {
            state,
            uptime_ms: uptime,
            summary: self.summary.clone(),
            migration: st.migration.as_ref().map(ProgressHandle::get),
            replication,
        }
    }

    fn pause(&self) -> Result<(), ApiError> {
        self.transition(RunState::Paused, "pause", vmm::Vm::pause)
    }

    fn resume(&self) -> Result<(), ApiError> {
        self.transition(RunState::Running, "resume", resume)
    }

    fn power_off(&self) -> Result<(), ApiError> {
        let mut st = self.lock();
        let state = match st.phase {
            Phase::Ending(_) => return Ok(()),
            Phase::Live(state) => state,
            // Ends the pair: the replication thread is stopped once the VM
            // has ended.
            Phase::Replicating => self.current_state(),
            // Nothing has arrived yet: the destination can simply stop.
            Phase::Incoming
                if st
                    .migration
                    .as_ref()
                    .is_some_and(|p| p.get().phase == migration::Phase::Waiting) =>
            {
                RunState::Paused
            }
            Phase::Incoming => {
                return Err(ApiError::conflict(
                    "cannot power off the VM: an incoming migration is arriving; it runs once that completes",
                ));
            }
            phase => {
                return Err(refusal(phase, "power off")
                    .unwrap_or_else(|| ApiError::conflict("cannot power off the VM now")));
            }
        };
        self.events
            .send(vmm::VmEvent::PowerOff)
            .map_err(|_| ApiError::conflict("the VM has already ended"))?;
        st.phase = Phase::Ending(state);
        Ok(())
    }

    fn snapshot(&self, to: &Path) -> Result<(), ApiError> {
        let failed = |what: &str, e: &vmm::Error| {
            ApiError::internal(format!("{what}: {}", crate::error_chain(e)))
        };
        // Pause (if running) and record the snapshot under the lock, then
        // write it without holding the lock.
        let before = {
            let mut st = self.lock();
            if let Some(e) = refusal(st.phase, "snapshot") {
                return Err(e);
            }
            let Phase::Live(state) = st.phase else {
                return Err(ApiError::conflict("cannot snapshot the VM now"));
            };
            check_snapshot_dir(to)
                .map_err(|e| ApiError::internal(format!("cannot snapshot the VM: {e}")))?;
            if state == RunState::Running {
                self.vm
                    .pause()
                    .map_err(|e| failed("cannot pause the VM for the snapshot", &e))?;
            }
            st.phase = Phase::Snapshotting(state);
            state
        };
        let written = self.vm.snapshot_to(to).map_err(|e| {
            failed(
                &format!("cannot write the snapshot to {}", to.display()),
                &e,
            )
        });
        let mut st = self.lock();
        if !matches!(st.phase, Phase::Snapshotting(_)) {
            // The VM ended meanwhile: nothing to resume.
            return written;
        }
        if before == RunState::Running
            && let Err(e) = self.vm.resume()
        {
            st.phase = Phase::Live(RunState::Paused);
            let resume = failed("cannot resume the VM after the snapshot", &e);
            return Err(match written {
                Ok(()) => resume,
                Err(w) => ApiError::internal(format!("{}; {}", w.message, resume.message)),
            });
        }
        st.phase = Phase::Live(before);
        written
    }

    fn migrate(&self, args: &MigrateArgs) -> Result<Report, ApiError> {
        let progress = ProgressHandle::new(Direction::Outgoing, args.to.clone());
        {
            let mut st = self.lock();
            if let Some(e) = refusal(st.phase, "migrate") {
                return Err(e);
            }
            st.phase = Phase::Migrating;
            st.migration = Some(progress.clone());
        }
        let params = migration::Params {
            channels: args.channels,
            downtime_budget: args.downtime,
            max_rounds: args.max_rounds,
            ..self.migration.params(args.verify)
        };
        tracing::info!(
            to = %args.to,
            channels = params.channels,
            downtime_ms = args.downtime.as_millis(),
            max_rounds = params.max_rounds,
            verify = params.verify,
            "migration started"
        );
        // The connection thread runs the whole migration; the lock is free
        // meanwhile, so `GET /vm` shows its progress.
        let result = migration::migrate(&self.vm, &args.to, &params, &progress);
        let mut st = self.lock();
        match result {
            Ok(report) => {
                // The guest lives on at the destination: this VM ends, and
                // `twinvm run` exits once this response is written.
                st.phase = Phase::Ending(RunState::Paused);
                drop(st);
                tracing::info!(
                    to = %args.to,
                    total_ms = report.total_ms,
                    downtime_ms = report.downtime_ms,
                    rounds = report.rounds,
                    "migration completed"
                );
                self.vm.end_migrated();
                Ok(report)
            }
            Err(e) => {
                if st.phase == Phase::Migrating {
                    st.phase = Phase::Live(self.current_state());
                }
                Err(ApiError::bad_gateway(format!(
                    "migration failed: {}",
                    replication::error_text(&e)
                )))
            }
        }
    }

    fn checkpoint(&self) -> Result<CheckpointInfo, ApiError> {
        let refused = |why: &str| ApiError::conflict(format!("cannot take a checkpoint: {why}"));
        let Some(handle) = &self.replication else {
            return Err(refused(
                "this VM is not replicated (checkpoints are taken by a `twinvm run --role primary`)",
            ));
        };
        if let Phase::Ending(_) = self.lock().phase {
            return Err(refused("the VM is shutting down"));
        }
        // Without the lock: `GET /vm` answers while the checkpoint is taken.
        match handle.request_checkpoint(Trigger::Request, CHECKPOINT_TIMEOUT) {
            Ok(info) => Ok(info),
            Err(colo::Error::NotProtected(why)) => Err(refused(&why)),
            Err(e) => Err(ApiError::bad_gateway(format!(
                "checkpoint failed: {}",
                replication::error_text(&e)
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "twinvm-snapdir-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create a temporary directory");
        dir
    }

    #[test]
    fn only_a_live_vm_takes_changes() {
        assert_eq!(refusal(Phase::Live(RunState::Paused), "pause"), None);
        for (phase, verb, want) in [
            (
                Phase::Snapshotting(RunState::Running),
                "migrate",
                "cannot migrate the VM: a snapshot is being written",
            ),
            (
                Phase::Migrating,
                "migrate",
                "cannot migrate the VM: a migration is running already",
            ),
            (
                Phase::Migrating,
                "pause",
                "cannot pause the VM: a migration is running",
            ),
            (
                Phase::Migrating,
                "snapshot",
                "cannot snapshot the VM: a migration is running",
            ),
            (
                Phase::Incoming,
                "resume",
                "cannot resume the VM: it waits for an incoming migration",
            ),
            (
                Phase::Ending(RunState::Paused),
                "migrate",
                "cannot migrate the VM: it is shutting down",
            ),
            (
                Phase::Replicating,
                "pause",
                "cannot pause the VM: COLO replication is active",
            ),
            (
                Phase::Replicating,
                "snapshot",
                "cannot snapshot the VM: COLO replication is active",
            ),
            (
                Phase::Replicating,
                "migrate",
                "cannot migrate the VM: COLO replication is active",
            ),
        ] {
            let e = refusal(phase, verb).expect("refused");
            assert_eq!(e.status, 409);
            assert!(
                e.message.starts_with(want),
                "{phase:?} {verb}: {}",
                e.message
            );
        }
    }

    #[test]
    fn snapshot_dir_must_be_new_or_empty() {
        let dir = temp_dir("check");
        assert_eq!(check_snapshot_dir(&dir), Ok(()));
        assert_eq!(check_snapshot_dir(&dir.join("new/nested")), Ok(()));
        std::fs::write(dir.join("state.bin"), b"old").unwrap();
        let err = check_snapshot_dir(&dir).expect_err("not empty");
        assert!(err.contains("is not empty"), "{err}");
        let err = check_snapshot_dir(&dir.join("state.bin")).expect_err("a file");
        assert!(err.contains("is not a directory"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
