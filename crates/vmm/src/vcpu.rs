//! vCPU threads.
//!
//! Each vCPU runs `KVM_RUN` on its own thread, driven by a small state
//! machine: **running** (in and out of `KVM_RUN`, serving port and MMIO
//! exits), **paused** (blocked on its command channel, guest state frozen and
//! readable), **stopped** (the guest failed or asked to end; waiting to be
//! told to exit) and **exiting**. Commands arrive on a channel; to make a
//! thread that is inside `KVM_RUN` look at them, the controller *kicks* it
//! with a real-time signal whose handler sets `immediate_exit` in the vCPU's
//! `kvm_run` page, so `KVM_RUN` returns `EINTR` at once — also when the
//! signal lands just before the thread re-enters `KVM_RUN`.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{
    KVM_INTERNAL_ERROR_EMULATION, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN, kvm_run,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

use crate::VmEvent;
use crate::arch::x86_64::state::{StateError, VcpuSnapshot, load_vcpu, save_vcpu};
use crate::devices::Bus;
use crate::memory::GuestMemoryMmap;

/// Offset from `SIGRTMIN` of the signal that kicks vCPU threads.
const KICK_SIGNAL_OFFSET: i32 = 0;

/// How long a controller waits for a vCPU to acknowledge a command before
/// declaring it stuck.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);

thread_local! {
    /// This thread's `kvm_run` page, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(
    _num: libc::c_int,
    _info: *mut libc::siginfo_t,
    _ctx: *mut libc::c_void,
) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is this thread's own kvm_run mapping, set by
        // the vCPU thread before it first enters KVM_RUN and cleared before
        // the VcpuFd (and so the mapping) is dropped. Writing one byte is
        // async-signal-safe.
        unsafe { std::ptr::write_volatile(&mut (*run).immediate_exit, 1) };
    }
}

/// Errors of vCPU threads.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
    /// The thread could not be started.
    #[error("cannot start the thread of vCPU {0}")]
    Spawn(u8, #[source] std::io::Error),
    /// The thread could not be signalled.
    #[error("cannot kick vCPU {0}")]
    Kick(u8, #[source] vmm_sys_util::errno::Error),
    /// The thread did not answer in time.
    #[error("vCPU {0} did not answer a {1} request")]
    NoAck(u8, &'static str),
}

/// Installs the kick signal handler (idempotent).
pub fn register_kick_signal() -> Result<(), VcpuError> {
    static REGISTERED: std::sync::OnceLock<Result<(), vmm_sys_util::errno::Error>> =
        std::sync::OnceLock::new();
    (*REGISTERED
        .get_or_init(|| register_signal_handler(SIGRTMIN() + KICK_SIGNAL_OFFSET, kick_handler)))
    .map_err(VcpuError::Signal)
}

/// What a controller asks of a vCPU thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuCommand {
    /// Leave `KVM_RUN` and wait.
    Pause,
    /// Continue running the guest.
    Resume,
    /// End the thread.
    Exit,
}

/// The state machine's states.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuState {
    /// Running guest code.
    Running,
    /// Frozen on request.
    Paused,
    /// Stopped because the guest failed or asked to end.
    Stopped,
    /// Ending.
    Exiting,
}

/// The next state for `command` in `state`. A stopped vCPU stays stopped
/// whatever it is asked, except to exit.
pub fn transition(state: VcpuState, command: VcpuCommand) -> VcpuState {
    match (state, command) {
        (_, VcpuCommand::Exit) => VcpuState::Exiting,
        (VcpuState::Stopped, _) => VcpuState::Stopped,
        (_, VcpuCommand::Pause) => VcpuState::Paused,
        (_, VcpuCommand::Resume) => VcpuState::Running,
    }
}

/// A request to a vCPU thread: a state-machine command, or reading or
/// writing the vCPU's state (done between `KVM_RUN`s, on the thread that
/// owns the vCPU; the controller pauses the vCPU first).
#[derive(Debug)]
pub enum VcpuRequest {
    /// Change state.
    Command(VcpuCommand),
    /// Read the vCPU's state.
    SaveState,
    /// Write the vCPU's state.
    LoadState(Box<VcpuSnapshot>),
}

impl VcpuRequest {
    fn name(&self) -> &'static str {
        match self {
            VcpuRequest::Command(VcpuCommand::Pause) => "pause",
            VcpuRequest::Command(VcpuCommand::Resume) => "resume",
            VcpuRequest::Command(VcpuCommand::Exit) => "exit",
            VcpuRequest::SaveState => "save-state",
            VcpuRequest::LoadState(_) => "load-state",
        }
    }
}

/// A vCPU thread's answer to a [`VcpuRequest`].
#[derive(Debug)]
pub enum VcpuReply {
    /// The state after a command.
    State(VcpuState),
    /// The vCPU's state.
    Saved(Box<VcpuSnapshot>),
    /// The state was written.
    Loaded,
    /// Reading or writing the state failed.
    Failed(StateError),
}

/// What one exit from `KVM_RUN` means for the loop.
enum Step {
    Continue,
    Interrupted,
    Stop(VmEvent),
}

/// A vCPU and what it needs to serve its exits.
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    memory: GuestMemoryMmap,
    events: Sender<VmEvent>,
    msr_list: Vec<u32>,
    /// The last exit was a port or MMIO access that KVM completes (stores
    /// what a read returned, moves RIP past the instruction) only when
    /// KVM_RUN is entered again.
    io_pending: bool,
}

impl Vcpu {
    /// Wraps a configured vCPU.
    pub fn new(
        index: u8,
        fd: VcpuFd,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        memory: GuestMemoryMmap,
        events: Sender<VmEvent>,
        msr_list: Vec<u32>,
    ) -> Self {
        Vcpu {
            index,
            fd,
            pio,
            mmio,
            memory,
            events,
            msr_list,
            io_pending: false,
        }
    }

    /// Starts the vCPU's thread in `initial` state (running or paused).
    pub fn start(self, initial: VcpuState) -> Result<VcpuHandle, VcpuError> {
        register_kick_signal()?;
        let index = self.index;
        let (cmd_tx, cmd_rx) = channel();
        let (ack_tx, ack_rx) = channel();
        let tid = Arc::new(AtomicI32::new(0));
        let thread_tid = tid.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                // SAFETY: gettid has no preconditions.
                thread_tid.store(unsafe { libc::gettid() }, Ordering::SeqCst);
                self.thread_main(initial, cmd_rx, ack_tx)
            })
            .map_err(|e| VcpuError::Spawn(index, e))?;
        Ok(VcpuHandle {
            index,
            commands: cmd_tx,
            acks: ack_rx,
            thread: Some(thread),
            tid,
        })
    }

    fn thread_main(
        mut self,
        mut state: VcpuState,
        commands: Receiver<VcpuRequest>,
        acks: Sender<VcpuReply>,
    ) {
        KVM_RUN.with(|c| c.set(self.fd.get_kvm_run()));
        loop {
            match state {
                VcpuState::Running => {
                    // Commands that arrived while serving the previous exit.
                    if let Ok(request) = commands.try_recv() {
                        // Whatever the command, the vCPU's state must be
                        // whole before it pauses or its state is touched.
                        if let Some(event) = self.complete_pending_io() {
                            state = VcpuState::Stopped;
                            let _ = self.events.send(event);
                        }
                        let _ = acks.send(self.handle(request, &mut state));
                        if state == VcpuState::Running {
                            normal_priority();
                        }
                        continue;
                    }
                    match self.run_once() {
                        Step::Continue => {}
                        Step::Interrupted => self.fd.set_kvm_immediate_exit(0),
                        Step::Stop(event) => {
                            state = VcpuState::Stopped;
                            let _ = self.events.send(event);
                        }
                    }
                }
                VcpuState::Paused | VcpuState::Stopped => match commands.recv() {
                    Ok(request) => {
                        let _ = acks.send(self.handle(request, &mut state));
                        if state == VcpuState::Running {
                            normal_priority();
                        }
                    }
                    Err(_) => state = VcpuState::Exiting,
                },
                VcpuState::Exiting => break,
            }
        }
        KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
    }

    fn handle(&mut self, request: VcpuRequest, state: &mut VcpuState) -> VcpuReply {
        match request {
            VcpuRequest::Command(cmd) => {
                *state = transition(*state, cmd);
                VcpuReply::State(*state)
            }
            VcpuRequest::SaveState => match save_vcpu(&self.fd, &self.msr_list) {
                Ok(s) => VcpuReply::Saved(Box::new(s)),
                Err(e) => VcpuReply::Failed(e),
            },
            VcpuRequest::LoadState(s) => match load_vcpu(&self.fd, &s) {
                Ok(()) => VcpuReply::Loaded,
                Err(e) => VcpuReply::Failed(e),
            },
        }
    }

    /// Finishes the port or MMIO instruction of the last exit, running no
    /// further guest code: KVM_RUN entered with `immediate_exit` set
    /// completes the pending operation and returns at once (KVM's
    /// documented way to make a vCPU's state consistent before it is read
    /// or replaced). Without it, a state read now would miss the
    /// instruction's result, and a state loaded now would be overwritten by
    /// the completion on the next KVM_RUN (the registers KVM's emulator
    /// held for the instruction, RIP and RFLAGS among them, written over the
    /// loaded ones). A string instruction may exit again for its next
    /// piece; those exits are served too.
    fn complete_pending_io(&mut self) -> Option<VmEvent> {
        // A `rep ins/outs` exits once per piece; this bounds a guest that
        // could otherwise keep the vCPU here.
        const MAX_EXITS: usize = 4096;
        let mut stop = None;
        for _ in 0..MAX_EXITS {
            if !self.io_pending {
                break;
            }
            self.fd.set_kvm_immediate_exit(1);
            match self.run_once() {
                Step::Continue => {}
                Step::Interrupted => self.io_pending = false,
                Step::Stop(event) => {
                    stop = Some(event);
                    break;
                }
            }
        }
        self.fd.set_kvm_immediate_exit(0);
        if self.io_pending && stop.is_none() {
            tracing::warn!(
                "vCPU {}: a string I/O instruction did not complete before the pause",
                self.index
            );
        }
        stop
    }

    fn run_once(&mut self) -> Step {
        self.io_pending = false;
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                return Step::Interrupted;
            }
            Err(e) => {
                return Step::Stop(VmEvent::Crash(format!(
                    "vCPU {}: KVM_RUN failed: {e}",
                    self.index
                )));
            }
        };
        self.io_pending = matches!(
            exit,
            VcpuExit::IoIn(..)
                | VcpuExit::IoOut(..)
                | VcpuExit::MmioRead(..)
                | VcpuExit::MmioWrite(..)
        );
        match exit {
            VcpuExit::IoIn(port, data) => {
                if !self.pio.read(u64::from(port), data) {
                    tracing::trace!("unhandled port read {port:#x}");
                }
                Step::Continue
            }
            VcpuExit::IoOut(port, data) => {
                if !self.pio.write(u64::from(port), data) {
                    tracing::trace!("unhandled port write {port:#x}");
                }
                Step::Continue
            }
            VcpuExit::MmioRead(addr, data) => {
                if !self.mmio.read(addr, data) {
                    tracing::debug!("unhandled MMIO read {addr:#x}");
                    data.fill(0);
                }
                Step::Continue
            }
            VcpuExit::MmioWrite(addr, data) => {
                if !self.mmio.write(addr, data) {
                    tracing::debug!("unhandled MMIO write {addr:#x}");
                }
                Step::Continue
            }
            VcpuExit::Intr => Step::Interrupted,
            VcpuExit::Hlt => Step::Stop(VmEvent::PowerOff),
            VcpuExit::Shutdown => Step::Stop(VmEvent::Crash(
                self.describe("the guest triple-faulted (a CPU exception it could not handle)"),
            )),
            VcpuExit::SystemEvent(kind, _) => match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => Step::Stop(VmEvent::PowerOff),
                KVM_SYSTEM_EVENT_RESET => Step::Stop(VmEvent::Reset),
                KVM_SYSTEM_EVENT_CRASH => Step::Stop(VmEvent::GuestPanic),
                other => Step::Stop(VmEvent::Crash(format!(
                    "vCPU {}: unknown system event {other}",
                    self.index
                ))),
            },
            VcpuExit::InternalError => {
                let run = self.fd.get_kvm_run();
                // SAFETY: after KVM_EXIT_INTERNAL_ERROR the `internal` member
                // of the exit union is the one KVM filled in.
                let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
                let what = if suberror == KVM_INTERNAL_ERROR_EMULATION {
                    "emulation failure: KVM cannot execute the guest instruction".to_string()
                } else {
                    format!("KVM internal error (suberror {suberror})")
                };
                Step::Stop(VmEvent::Crash(self.describe(&what)))
            }
            VcpuExit::FailEntry(reason, cpu) => Step::Stop(VmEvent::Crash(self.describe(
                &format!("KVM could not enter the guest (reason {reason:#x}, host cpu {cpu})"),
            ))),
            other => {
                let what = format!("unexpected vCPU exit {other:?}");
                Step::Stop(VmEvent::Crash(self.describe(&what)))
            }
        }
    }

    /// `what`, with the vCPU, the instruction address and the bytes there.
    fn describe(&self, what: &str) -> String {
        let Ok(regs) = self.fd.get_regs() else {
            return format!("vCPU {}: {what}", self.index);
        };
        let mut text = format!("vCPU {}: {what} at rip {:#x}", self.index, regs.rip);
        if let Ok(t) = self.fd.translate_gva(regs.rip)
            && t.valid != 0
        {
            let mut bytes = [0u8; 15];
            if self
                .memory
                .read_slice(&mut bytes, GuestAddress(t.physical_address))
                .is_ok()
            {
                let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
                text.push_str(&format!(
                    " (guest-physical {:#x}, bytes {})",
                    t.physical_address,
                    hex.join(" ")
                ));
            }
        }
        text
    }
}

/// Puts the calling thread back to normal scheduling if a controller
/// raised it ([`VcpuHandle::send`]): guest code never runs at real-time
/// priority.
fn normal_priority() {
    // SAFETY: queries the calling thread's policy; no memory involved.
    if unsafe { libc::sched_getscheduler(0) } == libc::SCHED_OTHER {
        return;
    }
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: changes only the calling thread's policy; `param` is valid.
    unsafe {
        libc::sched_setscheduler(0, libc::SCHED_OTHER, &param);
    }
}

/// Whether the calling thread runs at real-time priority.
fn caller_is_realtime() -> bool {
    // SAFETY: queries the calling thread's policy; no memory involved.
    matches!(
        unsafe { libc::sched_getscheduler(0) },
        libc::SCHED_FIFO | libc::SCHED_RR
    )
}

/// The controller's side of a vCPU thread.
pub struct VcpuHandle {
    index: u8,
    commands: Sender<VcpuRequest>,
    acks: Receiver<VcpuReply>,
    thread: Option<JoinHandle<()>>,
    /// The thread's kernel id (0 until it has started).
    tid: Arc<AtomicI32>,
}

impl VcpuHandle {
    /// The vCPU's index.
    pub fn index(&self) -> u8 {
        self.index
    }

    /// Sends `request` and kicks the thread out of `KVM_RUN`.
    ///
    /// A controller at real-time priority (a checkpoint pausing the VM)
    /// lends it to the vCPU thread first, so that the thread does not queue
    /// behind other busy threads while the controller — and a paused
    /// guest — wait for it; the thread drops back to normal priority
    /// before it runs guest code again.
    pub fn send(&self, request: VcpuRequest) -> Result<(), VcpuError> {
        let tid = self.tid.load(Ordering::SeqCst);
        if tid != 0 && caller_is_realtime() {
            let param = libc::sched_param { sched_priority: 1 };
            // SAFETY: changes the scheduling policy of this vCPU's own
            // thread (its id, recorded by the thread); `param` is valid.
            // Failure leaves its priority as it was.
            unsafe {
                libc::sched_setscheduler(tid, libc::SCHED_FIFO, &param);
            }
        }
        if self.commands.send(request).is_err() {
            // The thread is gone; nothing left to command.
            return Ok(());
        }
        if let Some(t) = &self.thread
            && !t.is_finished()
        {
            t.kill(SIGRTMIN() + KICK_SIGNAL_OFFSET)
                .map_err(|e| VcpuError::Kick(self.index, e))?;
        }
        Ok(())
    }

    /// Waits for the thread's answer to the last request (`what` names it
    /// in errors).
    pub fn wait_reply(&self, what: &'static str) -> Result<VcpuReply, VcpuError> {
        self.acks
            .recv_timeout(ACK_TIMEOUT)
            .map_err(|_| VcpuError::NoAck(self.index, what))
    }

    /// Sends `request` and waits for the answer.
    pub fn request(&self, request: VcpuRequest) -> Result<VcpuReply, VcpuError> {
        let what = request.name();
        self.send(request)?;
        self.wait_reply(what)
    }

    /// Ends the thread and waits for it.
    pub fn exit(&mut self) {
        let _ = self.send(VcpuRequest::Command(VcpuCommand::Exit));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        self.exit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use VcpuCommand::*;
    use VcpuState::*;

    #[test]
    fn state_machine() {
        assert_eq!(transition(Running, Pause), Paused);
        assert_eq!(transition(Paused, Resume), Running);
        assert_eq!(transition(Paused, Pause), Paused);
        assert_eq!(transition(Running, Resume), Running);
        assert_eq!(transition(Stopped, Resume), Stopped);
        assert_eq!(transition(Stopped, Pause), Stopped);
        for s in [Running, Paused, Stopped] {
            assert_eq!(transition(s, Exit), Exiting);
        }
    }
}
