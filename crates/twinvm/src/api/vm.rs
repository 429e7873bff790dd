//! The [`Control`] of a real VM.

use std::path::Path;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use super::router::{ApiError, Control};
use super::{RunState, VmStatus, VmSummary};

/// Controls a running [`vmm::Vm`] for the API.
///
/// State changes are serialized by one lock, held while the VM pauses or
/// resumes (milliseconds). A long operation (a snapshot; later migration)
/// instead records itself in [`Phase`] under the lock and releases it while
/// it works, so that `GET /vm` is answered meanwhile; conflicting
/// operations answer 409 until it is done.
pub struct VmControl {
    vm: Arc<vmm::Vm>,
    summary: VmSummary,
    started: Instant,
    events: Sender<vmm::VmEvent>,
    phase: Mutex<Phase>,
}

/// Where the VM is, as far as the API is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Running or paused.
    Live(RunState),
    /// A snapshot is being written: the VM is paused; afterwards it returns
    /// to the state held here.
    Snapshotting(RunState),
    /// Asked to power off, or already ended: no more changes. Keeps the
    /// state it had for `GET /vm`.
    Ending(RunState),
}

/// The 409 for an operation asked for while a snapshot is being written.
fn busy(verb: &str) -> ApiError {
    ApiError::conflict(format!(
        "cannot {verb} the VM: a snapshot is being written; try again when it is done"
    ))
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
    /// summarized by `summary`.
    pub fn new(vm: Arc<vmm::Vm>, summary: VmSummary, started: Instant) -> VmControl {
        let events = vm.event_sender();
        VmControl {
            vm,
            summary,
            started,
            events,
            phase: Mutex::new(Phase::Live(RunState::Running)),
        }
    }

    /// Records that the VM has ended: every later change is refused.
    pub fn mark_ended(&self) {
        let mut phase = self.lock();
        match *phase {
            Phase::Live(state) => *phase = Phase::Ending(state),
            Phase::Snapshotting(_) => *phase = Phase::Ending(RunState::Paused),
            Phase::Ending(_) => {}
        }
    }

    fn lock(&self) -> MutexGuard<'_, Phase> {
        self.phase.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves a live VM to `target` with `change`; nothing to do if it is
    /// there already.
    fn transition(
        &self,
        target: RunState,
        verb: &str,
        change: impl FnOnce(&vmm::Vm) -> Result<(), vmm::Error>,
    ) -> Result<(), ApiError> {
        let mut phase = self.lock();
        match *phase {
            Phase::Ending(_) => Err(ApiError::conflict(format!(
                "cannot {verb} the VM: it is shutting down"
            ))),
            Phase::Snapshotting(_) => Err(busy(verb)),
            Phase::Live(state) if state == target => Ok(()),
            Phase::Live(_) => {
                change(&self.vm).map_err(|e| {
                    ApiError::internal(format!("cannot {verb} the VM: {}", crate::error_chain(&e)))
                })?;
                *phase = Phase::Live(target);
                Ok(())
            }
        }
    }
}

impl Control for VmControl {
    fn status(&self) -> VmStatus {
        let state = match *self.lock() {
            Phase::Live(s) | Phase::Ending(s) => s,
            Phase::Snapshotting(_) => RunState::Paused,
        };
        VmStatus {
            state,
            uptime_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            summary: self.summary.clone(),
        }
    }

    fn pause(&self) -> Result<(), ApiError> {
        self.transition(RunState::Paused, "pause", vmm::Vm::pause)
    }

    fn resume(&self) -> Result<(), ApiError> {
        self.transition(RunState::Running, "resume", vmm::Vm::resume)
    }

    fn power_off(&self) -> Result<(), ApiError> {
        let mut phase = self.lock();
        if let Phase::Snapshotting(_) = *phase {
            return Err(busy("power off"));
        }
        if let Phase::Live(state) = *phase {
            self.events
                .send(vmm::VmEvent::PowerOff)
                .map_err(|_| ApiError::conflict("the VM has already ended"))?;
            *phase = Phase::Ending(state);
        }
        Ok(())
    }

    fn snapshot(&self, to: &Path) -> Result<(), ApiError> {
        let failed = |what: &str, e: &vmm::Error| {
            ApiError::internal(format!("{what}: {}", crate::error_chain(e)))
        };
        // Pause (if running) and record the snapshot under the lock, then
        // write it without holding the lock.
        let before = {
            let mut phase = self.lock();
            let state = match *phase {
                Phase::Ending(_) => {
                    return Err(ApiError::conflict(
                        "cannot snapshot the VM: it is shutting down",
                    ));
                }
                Phase::Snapshotting(_) => return Err(busy("snapshot")),
                Phase::Live(state) => state,
            };
            check_snapshot_dir(to)
                .map_err(|e| ApiError::internal(format!("cannot snapshot the VM: {e}")))?;
            if state == RunState::Running {
                self.vm
                    .pause()
                    .map_err(|e| failed("cannot pause the VM for the snapshot", &e))?;
            }
            *phase = Phase::Snapshotting(state);
            state
        };
        let written = self.vm.snapshot_to(to).map_err(|e| {
            failed(
                &format!("cannot write the snapshot to {}", to.display()),
                &e,
            )
        });
        let mut phase = self.lock();
        if !matches!(*phase, Phase::Snapshotting(_)) {
            // The VM ended meanwhile: nothing to resume.
            return written;
        }
        if before == RunState::Running
            && let Err(e) = self.vm.resume()
        {
            *phase = Phase::Live(RunState::Paused);
            let resume = failed("cannot resume the VM after the snapshot", &e);
            return Err(match written {
                Ok(()) => resume,
                Err(w) => ApiError::internal(format!("{}; {}", w.message, resume.message)),
            });
        }
        *phase = Phase::Live(before);
        written
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
