//! The [`Control`] of a real VM.

use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use super::router::{ApiError, Control};
use super::{RunState, VmStatus, VmSummary};

/// Controls a running [`vmm::Vm`] for the API.
///
/// State changes are serialized by one lock, held while the VM pauses or
/// resumes (milliseconds). A long operation added later (snapshot,
/// migration) should instead record itself in [`Phase`] under the lock,
/// release it while it works (so that `GET /vm` can report its progress),
/// and make conflicting operations answer 409 meanwhile.
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
    /// Asked to power off, or already ended: no more changes. Keeps the
    /// state it had for `GET /vm`.
    Ending(RunState),
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
        if let Phase::Live(state) = *phase {
            *phase = Phase::Ending(state);
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
        if let Phase::Live(state) = *phase {
            self.events
                .send(vmm::VmEvent::PowerOff)
                .map_err(|_| ApiError::conflict("the VM has already ended"))?;
            *phase = Phase::Ending(state);
        }
        Ok(())
    }
}
