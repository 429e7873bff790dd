//! The secondary's side of COLO checkpointing.
//!
//! One receiver thread per channel reads page batches — straight into
//! guest memory while the secondary is first brought up (its guest has
//! not run), into the channel's staging area afterwards — and passes
//! everything else to the coordinator (the caller's thread), which pauses
//! and resumes the VM, reports its dirty pages, and applies checkpoints
//! once they are whole.

use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::time::{Duration, Instant};

use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm::{StateDigest, Vm, VmId};

use super::staging::Staging;
use super::wire::{self, RoundAck, SvmDirty};
use super::{ColoRole, Discarded, Error, Handle, Params, State, link_err, lock, ms, vm_err};
use crate::frame::{HEADER_LEN, Header, MsgType};
use crate::handshake::{self, HandshakeConfig, Peer, Role};
use crate::link::{Link, LinkConfig, LinkSender};
use crate::migration::wire::{PAGE_SIZE, channel_of};

/// How often the coordinator looks at the stop flag while idle.
const STOP_POLL: Duration = Duration::from_millis(200);

/// Binds the address the primary will connect to.
pub fn listen(addr: &str) -> Result<TcpListener, Error> {
    TcpListener::bind(addr).map_err(|source| Error::Listen {
        addr: addr.to_string(),
        source,
    })
}

fn link_config(params: &Params) -> LinkConfig {
    LinkConfig {
        read_timeout: Some(params.io_timeout),
        write_timeout: Some(params.io_timeout),
        ..LinkConfig::default()
    }
}

fn protocol(e: impl std::fmt::Display) -> Error {
    Error::Protocol(e.to_string())
}

/// Waits on `listener` for the primary, receives the VM into `vm` (built
/// with [`Vm::new_incoming`]: paused, back ends detached), and keeps it in
/// step with the primary's checkpoints: after the first checkpoint its
/// network devices get a back end that discards (the guest does not reach
/// the network until a failover), its disks are opened and the guest runs.
///
/// Returns `Ok` when the primary is lost after the guest ran — the guest
/// goes on from its last complete checkpoint — or when `handle` is
/// stopped; an error if the primary is lost or misbehaves before the first
/// checkpoint completed (the guest never ran).
pub fn run_secondary(
    vm: &Vm,
    listener: &TcpListener,
    params: &Params,
    handle: &Handle,
) -> Result<(), Error> {
    params.check()?;
    let Some((control, peer, begin)) = wait_for_primary(vm, listener, params, handle)? else {
        handle.set_state(State::Stopped);
        return Ok(());
    };
    let result = serve(vm, listener, params, handle, control, &peer, &begin);
    if let Err(e) = &result {
        let text = crate::error_text(e);
        tracing::error!("replication: {text}");
        handle.update(|s| s.last_error = Some(text));
        handle.set_state(State::Stopped);
    }
    result
}

fn handshake_config(vm: &Vm, params: &Params, expect: Option<[u8; 16]>) -> HandshakeConfig {
    let mut hs = HandshakeConfig::new(Role::Secondary, vm.identity().0);
    hs.expect_peer_vm = expect;
    hs.auth_key = params.auth_key.clone();
    hs.timeout = params.connect_timeout;
    hs
}

/// Accepts connections until one is a primary that passes the handshake
/// and protects a VM of this shape; `None` if stopped first.
fn wait_for_primary(
    vm: &Vm,
    listener: &TcpListener,
    params: &Params,
    handle: &Handle,
) -> Result<Option<(Link, Peer, wire::Begin)>, Error> {
    loop {
        if handle.stopped() {
            return Ok(None);
        }
        if !crate::pageio::wait_readable(listener, STOP_POLL) {
            continue;
        }
        let (stream, addr) = match listener.accept() {
            Ok(v) => v,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(source) => {
                return Err(Error::Listen {
                    addr: listener
                        .local_addr()
                        .map(|a| a.to_string())
                        .unwrap_or_default(),
                    source,
                });
            }
        };
        match greet(vm, stream, params) {
            Ok((link, peer, begin)) => {
                tracing::info!(
                    peer = %addr,
                    channels = begin.channels,
                    identity = %VmId(peer.vm_id),
                    "primary connected"
                );
                handle.update(|s| {
                    s.peer = addr.to_string();
                    s.channels = begin.channels;
                    s.verify = begin.flags & wire::BEGIN_VERIFY != 0;
                });
                return Ok(Some((link, peer, begin)));
            }
            Err(e) => {
                let text = crate::error_text(&e);
                tracing::warn!("refused a replication connection from {addr}: {text}");
                handle.update(|s| s.last_error = Some(format!("refused {addr}: {text}")));
            }
        }
    }
}

/// Handshake and `ColoBegin` on a new connection.
fn greet(vm: &Vm, stream: TcpStream, params: &Params) -> Result<(Link, Peer, wire::Begin), Error> {
    let mut link = Link::from_stream(stream, link_config(params)).map_err(link_err("setup"))?;
    let peer = handshake::server(&mut link, &handshake_config(vm, params, params.vm_id))
        .map_err(Error::Handshake)?;
    link.set_timeouts(Some(params.connect_timeout), Some(params.connect_timeout))
        .map_err(link_err("setup"))?;
    let f = link.recv().map_err(link_err("setup"))?;
    if f.msg_type() != MsgType::ColoBegin {
        return Err(Error::Protocol(format!(
            "expected ColoBegin, got {:?}",
            f.msg_type()
        )));
    }
    let begin = wire::Begin::decode(&f.payload).map_err(protocol)?;
    let refusal = if begin.channels == 0 || begin.channels > super::MAX_CHANNELS {
        Some(format!("{} channels asked for", begin.channels))
    } else if let Err(e) = vmm::snapshot::check_fingerprint(&begin.fingerprint, &vm.fingerprint()) {
        Some(e.to_string())
    } else {
        None
    };
    if let Some(text) = refusal {
        let _ = link.send(MsgType::ColoAbort, &wire::encode_abort(&text));
        return Err(Error::Mismatch(text));
    }
    let cfg = link_config(params);
    link.set_timeouts(cfg.read_timeout, cfg.write_timeout)
        .map_err(link_err("setup"))?;
    Ok((link, peer, begin))
}

/// Accepts the extra channels of `begin`'s session.
fn accept_channels(
    vm: &Vm,
    listener: &TcpListener,
    params: &Params,
    peer: &Peer,
    begin: &wire::Begin,
) -> Result<Vec<Link>, Error> {
    crate::pageio::accept_channels(
        listener,
        begin,
        params.connect_timeout,
        "a replication channel",
        &link_config(params),
        &handshake_config(vm, params, Some(peer.vm_id)),
        MsgType::ColoJoin,
    )
    .map_err(Error::Protocol)
}

/// What a receiver tells the coordinator.
enum Event {
    /// Channel `channel` passed the end of round `round`.
    RoundEnd { channel: usize, round: u64 },
    /// The primary paused for checkpoint `epoch`.
    Pause(u64),
    /// The state of a checkpoint (the `ColoState` payload).
    State(Vec<u8>),
    /// The primary ended protection in order.
    Goodbye,
    /// A receiver failed, or the primary aborted.
    Failed(Error),
}

/// What the receivers share.
struct Shared<'a> {
    vm: &'a Vm,
    /// Until the first checkpoint is loaded pages go straight into guest
    /// memory; from then on into staging.
    direct: AtomicBool,
    /// One staging area per channel (a page always travels on the same
    /// channel, so each is written by one receiver only).
    staging: Vec<Mutex<Staging>>,
    /// Pages received, for the test hook and the status.
    pages: AtomicU64,
    bytes: AtomicU64,
    /// The checkpoint whose pause is in progress (0: none), for the hook.
    pause_epoch: AtomicU64,
    /// Pages received since that pause began.
    pause_pages: AtomicU64,
    die: Option<(u64, u64)>,
}

/// Runs the session with the primary whose control link is `control`.
fn serve(
    vm: &Vm,
    listener: &TcpListener,
    params: &Params,
    handle: &Handle,
    mut control: Link,
    peer: &Peer,
    begin: &wire::Begin,
) -> Result<(), Error> {
    handle.set_state(State::Syncing);
    super::realtime_thread();
    // The RAM holds the kernel this VM loaded when it was built; the
    // primary sends every page that may be non-zero.
    vm.discard_ram().map_err(vm_err("clear guest RAM"))?;
    control
        .send(MsgType::ColoReady, &[])
        .map_err(link_err("setup"))?;
    let extra = accept_channels(vm, listener, params, peer, begin)?;
    let tx = control.split().map_err(link_err("setup"))?;
    let mut links = vec![control];
    links.extend(extra);
    let streams: Vec<TcpStream> = links
        .iter()
        .map(|l| l.stream().try_clone())
        .collect::<Result<_, _>>()
        .map_err(Error::Thread)?;
    let shared = Shared {
        vm,
        direct: AtomicBool::new(true),
        staging: links.iter().map(|_| Mutex::new(Staging::new())).collect(),
        pages: AtomicU64::new(0),
        bytes: AtomicU64::new(0),
        pause_epoch: AtomicU64::new(0),
        pause_pages: AtomicU64::new(0),
        die: super::die_hook(ColoRole::Secondary),
    };
    let (events_tx, events) = channel();
    let serving = AtomicBool::new(true);
    std::thread::scope(|s| {
        let mut handles = Vec::new();
        for (i, link) in links.into_iter().enumerate() {
            let events = events_tx.clone();
            let shared = &shared;
            let h = std::thread::Builder::new()
                .name(format!("colo-rx{i}"))
                .spawn_scoped(s, move || {
                    super::realtime_thread();
                    receive(shared, link, i, &events)
                })
                .map_err(Error::Thread);
            match h {
                Ok(h) => handles.push(h),
                Err(e) => {
                    shut(&streams);
                    return Err(e);
                }
            }
        }
        drop(events_tx);
        // A second primary is refused while this one is served.
        let serving = &serving;
        let refuser = std::thread::Builder::new()
            .name("colo-refuse".into())
            .spawn_scoped(s, move || refuse_others(listener, serving));
        let mut c = Coordinator {
            vm,
            handle,
            shared: &shared,
            tx,
            events,
            peer_id: peer.vm_id,
            verify: begin.flags & wire::BEGIN_VERIFY != 0,
            reached: vec![0; shared.staging.len()],
            ack_due: None,
            state: None,
            paused_for: None,
            ran: false,
            epoch: 0,
            applying: None,
            digest_at_pause: None,
        };
        let result = c.run();
        serving.store(false, Ordering::SeqCst);
        shut(&streams);
        for h in handles {
            let _ = h.join();
        }
        if let Ok(h) = refuser {
            let _ = h.join();
        }
        result
    })
}

fn shut(streams: &[TcpStream]) {
    for s in streams {
        let _ = s.shutdown(Shutdown::Both);
    }
}

/// Accepts and drops connections while `serving`: one primary at a time.
fn refuse_others(listener: &TcpListener, serving: &AtomicBool) {
    while serving.load(Ordering::SeqCst) {
        if !crate::pageio::wait_readable(listener, STOP_POLL) {
            continue;
        }
        if let Ok((stream, addr)) = listener.accept() {
            tracing::warn!(
                "refused a replication connection from {addr}: this secondary is serving a primary"
            );
            drop(stream);
        }
    }
}

/// A receiver: pages into their sink, everything else to the coordinator.
fn receive(shared: &Shared<'_>, mut link: Link, channel: usize, events: &Sender<Event>) {
    let result = (|| -> Result<(), Error> {
        loop {
            let h = link.recv_header().map_err(link_err("page transfer"))?;
            match h.msg_type {
                MsgType::ColoPages => receive_pages(shared, &mut link, channel, &h)?,
                MsgType::ColoRoundEnd => {
                    let [round, _epoch] =
                        wire::decode_u64s::<2>("ColoRoundEnd", &payload(&mut link, &h)?)
                            .map_err(protocol)?;
                    let _ = events.send(Event::RoundEnd { channel, round });
                }
                MsgType::ColoPause if channel == 0 => {
                    let [epoch] = wire::decode_u64s::<1>("ColoPause", &payload(&mut link, &h)?)
                        .map_err(protocol)?;
                    shared.pause_pages.store(0, Ordering::SeqCst);
                    shared.pause_epoch.store(epoch, Ordering::SeqCst);
                    let _ = events.send(Event::Pause(epoch));
                }
                MsgType::ColoState if channel == 0 => {
                    let _ = events.send(Event::State(payload(&mut link, &h)?));
                }
                MsgType::Goodbye if channel == 0 => {
                    let _ = events.send(Event::Goodbye);
                    return Ok(());
                }
                MsgType::ColoAbort => {
                    return Err(Error::PeerAborted(wire::decode_abort(&payload(
                        &mut link, &h,
                    )?)));
                }
                other => {
                    return Err(Error::Protocol(format!(
                        "unexpected {other:?} on replication channel {channel}"
                    )));
                }
            }
        }
    })();
    if let Err(e) = result {
        let _ = events.send(Event::Failed(e));
    }
}

/// Reads the payload of a non-page message.
fn payload(link: &mut Link, h: &Header) -> Result<Vec<u8>, Error> {
    let mut buf = vec![0u8; h.payload_len as usize];
    link.read_payload(&mut buf)
        .map_err(link_err("page transfer"))?;
    Ok(buf)
}

/// Reads one `ColoPages` batch into its sink: every address is checked
/// against guest RAM (and the channel) before any page data is read.
fn receive_pages(
    shared: &Shared<'_>,
    link: &mut Link,
    channel: usize,
    h: &Header,
) -> Result<(), Error> {
    let len = h.payload_len as usize;
    let mut count = [0u8; 4];
    if len < count.len() {
        return Err(Error::Protocol(format!("ColoPages payload of {len} bytes")));
    }
    link.read_payload(&mut count)
        .map_err(link_err("page transfer"))?;
    let n = u32::from_le_bytes(count) as usize;
    if n > wire::MAX_BATCH || len < 4 + 8 * n {
        return Err(Error::Protocol(format!(
            "ColoPages with {n} pages in {len} bytes"
        )));
    }
    let mut raw = vec![0u8; 8 * n];
    link.read_payload(&mut raw)
        .map_err(link_err("page transfer"))?;
    let entries = wire::decode_page_entries(len, &raw).map_err(protocol)?;
    let mem = shared.vm.memory();
    let channels = shared.staging.len() as u16;
    for &(gpa, _) in &entries {
        if mem.get_slice(GuestAddress(gpa), PAGE_SIZE).is_err() {
            return Err(Error::Protocol(format!(
                "page {gpa:#x} is outside guest RAM"
            )));
        }
        if channels > 1 && usize::from(channel_of(gpa, channels)) != channel {
            return Err(Error::Protocol(format!(
                "page {gpa:#x} arrived on channel {channel}, not its own"
            )));
        }
    }
    let read = |iov: &mut [libc::iovec]| {
        // SAFETY: each iovec is one page, either of guest RAM (checked
        // above to lie in a live mapping the VM owns; the guest has not
        // run yet while pages go straight into memory, and nothing else
        // writes it) or of a staging slot borrowed for this call; they
        // stay valid until it returns.
        unsafe { crate::pageio::read_into_iovecs(link, iov) }.map_err(link_err("page transfer"))
    };
    if shared.direct.load(Ordering::SeqCst) {
        let mut iov = Vec::with_capacity(n);
        for &(gpa, zero) in &entries {
            let slice = mem
                .get_slice(GuestAddress(gpa), PAGE_SIZE)
                .map_err(|_| Error::Protocol(format!("page {gpa:#x} is outside guest RAM")))?;
            slice.bitmap().mark_dirty(0, PAGE_SIZE);
            if zero {
                // The RAM was discarded: the page is zero unless an
                // earlier round sent data for it.
                super::staging::clear_page(mem, gpa).map_err(Error::Memory)?;
            } else {
                iov.push(libc::iovec {
                    iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                    iov_len: PAGE_SIZE,
                });
            }
        }
        read(&mut iov)?;
    } else {
        lock(&shared.staging[channel]).receive(&entries, read)?;
    }
    shared.pages.fetch_add(n as u64, Ordering::Relaxed);
    shared
        .bytes
        .fetch_add((len + HEADER_LEN) as u64, Ordering::Relaxed);
    let in_pause = shared.pause_pages.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
    super::maybe_die(
        shared.die,
        shared.pause_epoch.load(Ordering::SeqCst),
        in_pause,
    );
    Ok(())
}

/// A checkpoint's state that arrived, waiting for its last pages.
struct PendingState {
    epoch: u64,
    round: u64,
    digest: Option<StateDigest>,
    /// Decoded and checked against this VM when it arrived.
    state: vmm::vm::VmState,
    /// Its encoded size.
    bytes: usize,
}

/// The secondary's decisions, on the caller's thread.
struct Coordinator<'a, 'b> {
    vm: &'a Vm,
    handle: &'a Handle,
    shared: &'b Shared<'a>,
    tx: LinkSender,
    events: Receiver<Event>,
    peer_id: [u8; 16],
    verify: bool,
    /// Per channel: the last round whose end it passed.
    reached: Vec<u64>,
    /// A background round to acknowledge once every channel passed it.
    ack_due: Option<u64>,
    /// A checkpoint's state, waiting for its pages.
    state: Option<PendingState>,
    /// The checkpoint this side paused for.
    paused_for: Option<u64>,
    /// Whether the guest has run (a checkpoint was loaded).
    ran: bool,
    /// Checkpoints loaded.
    epoch: u64,
    /// The checkpoint acknowledged and being applied.
    applying: Option<u64>,
    /// Verify mode: the digest when this side paused.
    digest_at_pause: Option<String>,
}

impl Coordinator<'_, '_> {
    fn run(&mut self) -> Result<(), Error> {
        loop {
            let event = match self.events.recv_timeout(STOP_POLL) {
                Ok(e) => e,
                Err(RecvTimeoutError::Timeout) => {
                    if self.handle.stopped() {
                        let _ = self.tx.send(
                            MsgType::ColoAbort,
                            &wire::encode_abort("the secondary stopped"),
                        );
                        self.handle.set_state(State::Stopped);
                        return Ok(());
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => {
                    Event::Failed(Error::Protocol("every replication channel closed".into()))
                }
            };
            let step = match event {
                Event::RoundEnd { channel, round } => {
                    if let Some(r) = self.reached.get_mut(channel) {
                        *r = round;
                    }
                    if channel == 0 && self.paused_for.is_none() {
                        self.ack_due = Some(round);
                    }
                    self.progress()
                }
                Event::Pause(epoch) => self.pause(epoch),
                Event::State(payload) => self.take_state(&payload),
                Event::Goodbye => return self.end_in_order(),
                Event::Failed(e) => Err(e),
            };
            if let Err(e) = step {
                if let Some(epoch) = self.applying {
                    return self.stop_broken(epoch, e);
                }
                return self.lose(e);
            }
        }
    }

    /// Acts on rounds every channel has passed.
    fn progress(&mut self) -> Result<(), Error> {
        let min = self.reached.iter().copied().min().unwrap_or(0);
        if let Some(round) = self.ack_due
            && min >= round
        {
            self.ack_due = None;
            let dirty = self.own_dirty_pages()?;
            let staged_bytes = self.staged_bytes();
            self.handle.update(|s| {
                s.background_rounds += 1;
                s.background_pages = self.shared.pages.load(Ordering::Relaxed);
                s.background_bytes = self.shared.bytes.load(Ordering::Relaxed);
                s.staging_bytes = staged_bytes;
                s.staging_peak_bytes = s.staging_peak_bytes.max(staged_bytes);
            });
            self.tx
                .send(
                    MsgType::ColoRoundAck,
                    &RoundAck {
                        round,
                        staged_bytes,
                        dirty,
                    }
                    .encode(),
                )
                .map_err(link_err("a background round"))?;
        }
        if let Some(st) = self.state.take_if(|st| min >= st.round) {
            self.complete(st)?;
        }
        Ok(())
    }

    fn staged_bytes(&self) -> u64 {
        self.shared
            .staging
            .iter()
            .map(|s| lock(s).data_bytes())
            .sum()
    }

    /// The pages this side's guest (or VMM) wrote since the last call that
    /// are not staged: the primary must send them. Empty before the guest
    /// ran.
    fn own_dirty_pages(&mut self) -> Result<Vec<u64>, Error> {
        if !self.ran {
            return Ok(Vec::new());
        }
        let dirty = self.vm.take_dirty().map_err(vm_err("read the dirty log"))?;
        let channels = self.shared.staging.len() as u16;
        let mut out = Vec::new();
        for gpa in dirty.pages() {
            let ch = usize::from(channel_of(gpa.0, channels));
            if !lock(&self.shared.staging[ch]).contains(gpa.0) {
                out.push(gpa.0);
            }
        }
        Ok(out)
    }

    /// The primary paused for checkpoint `epoch`: pause too, and report.
    fn pause(&mut self, epoch: u64) -> Result<(), Error> {
        if epoch != self.epoch + 1 || self.paused_for.is_some() {
            return Err(Error::Protocol(format!(
                "checkpoint {epoch} announced after checkpoint {}",
                self.epoch
            )));
        }
        if self.ran {
            self.vm.pause().map_err(vm_err("pause the VM"))?;
        }
        self.paused_for = Some(epoch);
        self.ack_due = None;
        let dirty = self.own_dirty_pages()?;
        self.tx
            .send(MsgType::ColoSvmDirty, &SvmDirty { epoch, dirty }.encode())
            .map_err(link_err("a checkpoint"))?;
        if self.verify && self.ran {
            self.digest_at_pause = Some(
                self.vm
                    .page_digest()
                    .map_err(vm_err("compute the digest"))?
                    .hex(),
            );
        }
        Ok(())
    }

    /// The state of the checkpoint arrived.
    fn take_state(&mut self, payload: &[u8]) -> Result<(), Error> {
        let msg = wire::StateMsg::decode(payload).map_err(protocol)?;
        if Some(msg.epoch) != self.paused_for || self.state.is_some() {
            return Err(Error::Protocol(format!(
                "state of checkpoint {} arrived unannounced",
                msg.epoch
            )));
        }
        if self.verify != msg.digest.is_some() {
            return Err(Error::Protocol(
                "the digest does not match the verify flag".into(),
            ));
        }
        let digest = match msg.digest {
            Some(b) => Some(
                postcard::from_bytes::<StateDigest>(b)
                    .map_err(|e| Error::Protocol(format!("bad digest: {e}")))?,
            ),
            None => None,
        };
        // A state this VM cannot take is refused before it is acknowledged:
        // the checkpoint is then dropped like a half-received one.
        let fingerprint = self.vm.fingerprint();
        let (_, state) = vmm::snapshot::decode::<vmm::vm::VmState>(
            msg.state,
            &vmm::snapshot::Expected {
                identity: Some(VmId(self.peer_id)),
                fingerprint: Some(&fingerprint),
            },
        )
        .map_err(|e| Error::Mismatch(crate::error_text(&e)))?;
        self.vm
            .check_state(&state)
            .map_err(|e| Error::Mismatch(crate::error_text(&e)))?;
        self.state = Some(PendingState {
            epoch: msg.epoch,
            round: msg.round,
            digest,
            state,
            bytes: msg.state.len(),
        });
        self.progress()
    }

    /// The whole checkpoint is here: acknowledge, apply, load, run.
    fn complete(&mut self, st: PendingState) -> Result<(), Error> {
        let vm = self.vm;
        self.tx
            .send(MsgType::ColoReceived, &wire::encode_u64s(&[st.epoch]))
            .map_err(link_err("a checkpoint"))?;
        // From here the checkpoint is the secondary's state: a primary
        // lost now changes nothing of what follows, and a failure to apply
        // it leaves a VM that must not run.
        self.applying = Some(st.epoch);
        let t = Instant::now();
        let mut staged = 0;
        for s in &self.shared.staging {
            let mut s = lock(s);
            staged += s.apply(vm.memory()).map_err(Error::Memory)?;
            s.clear();
        }
        let apply = t.elapsed();
        let t = Instant::now();
        vm.load_state(st.state)
            .map_err(vm_err("load the checkpoint's state"))?;
        if !self.ran {
            vm.set_identity(VmId(self.peer_id));
        }
        // What was just written is the primary's, not this guest's.
        vm.take_dirty().map_err(vm_err("reset the dirty log"))?;
        let load = t.elapsed();
        let digest = match &st.digest {
            Some(theirs) => {
                let mine = vm.page_digest().map_err(vm_err("compute the digest"))?;
                if let Some(diff) = mine.first_difference(theirs) {
                    let e = Error::DigestMismatch {
                        epoch: st.epoch,
                        detail: format!(
                            "{diff:?} (primary {}, secondary {})",
                            theirs.hex(),
                            mine.hex()
                        ),
                    };
                    let _ = self.tx.send(
                        MsgType::ColoAbort,
                        &wire::encode_abort(&crate::error_text(&e)),
                    );
                    return Err(e);
                }
                Some(mine.hex())
            }
            None => None,
        };
        if !self.ran {
            self.start_guest()?;
        } else {
            vm.resume().map_err(vm_err("resume the VM"))?;
        }
        self.shared.direct.store(false, Ordering::SeqCst);
        self.shared.pause_epoch.store(0, Ordering::SeqCst);
        self.paused_for = None;
        self.digest_at_pause = None;
        self.epoch = st.epoch;
        self.applying = None;
        let rss = super::process_rss_bytes();
        self.tx
            .send(
                MsgType::ColoLoaded,
                &wire::Loaded {
                    epoch: st.epoch,
                    apply_us: apply.as_micros() as u64,
                    load_us: load.as_micros() as u64,
                    staged_pages: staged,
                    rss_bytes: rss,
                }
                .encode(),
            )
            .map_err(link_err("a checkpoint"))?;
        self.handle.record(&super::CheckpointInfo {
            epoch: st.epoch,
            apply_ms: ms(apply),
            load_ms: ms(load),
            staged_pages: staged,
            secondary_rss_bytes: rss,
            state_bytes: st.bytes as u64,
            digest,
            ..super::CheckpointInfo::default()
        });
        self.handle.update(|s| {
            s.staging_bytes = 0;
        });
        if self.ran {
            return Ok(());
        }
        self.ran = true;
        self.handle.set_state(State::Protected);
        tracing::info!("the secondary runs in step with the primary");
        Ok(())
    }

    /// A checkpoint acknowledged could not be applied, or (verify mode)
    /// does not match the primary's: this VM's state cannot be trusted, so
    /// it stays paused and replication ends with the error.
    fn stop_broken(&mut self, epoch: u64, e: Error) -> Result<(), Error> {
        let e = match e {
            e @ Error::DigestMismatch { .. } => e,
            other => Error::ApplyFailed {
                epoch,
                source: Box::new(other),
            },
        };
        let text = crate::error_text(&e);
        let _ = self.tx.send(MsgType::ColoAbort, &wire::encode_abort(&text));
        tracing::error!("{text}; the secondary's VM stays stopped");
        self.handle.update(|s| s.last_error = Some(text));
        self.handle.set_state(State::Stopped);
        Err(e)
    }

    /// First checkpoint loaded: give the devices their back ends and run.
    fn start_guest(&mut self) -> Result<(), Error> {
        let vm = self.vm;
        for i in 0..vm.net_count() {
            let discard = vmm::DiscardNet::new()
                .map_err(|e| Error::Thread(std::io::Error::other(e.to_string())))?;
            vm.set_net_backend(i, Box::new(discard))
                .map_err(vm_err("give the network devices their back end"))?;
        }
        vm.attach_backends().map_err(vm_err("open the disks"))?;
        // Dirty tracking was reset after loading: from here on it sees the
        // guest's own writes, the first ones included.
        vm.resume().map_err(vm_err("start the VM"))?;
        Ok(())
    }

    /// The primary's VM ended in order (its guest powered off, or it was
    /// stopped through its API): the protected VM is off, so this copy
    /// ends too. Nothing of the epoch in progress is applied.
    fn end_in_order(&mut self) -> Result<(), Error> {
        for s in &self.shared.staging {
            lock(s).clear();
        }
        tracing::info!("the primary's VM ended: the secondary's ends too");
        self.handle.update(|s| s.staging_bytes = 0);
        self.handle.set_state(State::Stopped);
        if self.ran {
            // The receiver lives in the VM: the send cannot fail.
            let _ = self.vm.event_sender().send(vmm::VmEvent::PowerOff);
            return Ok(());
        }
        Err(Error::PeerAborted(
            "the primary's VM ended before the first checkpoint".into(),
        ))
    }

    /// The primary is gone (or broke the protocol). Before the guest ran
    /// that is the end; after, a half-received checkpoint is dropped and
    /// the guest goes on from its own consistent state.
    fn lose(&mut self, e: Error) -> Result<(), Error> {
        if !self.ran {
            return Err(Error::LostBeforeRunning(Box::new(e)));
        }
        let text = crate::error_text(&e);
        let _ = self.tx.send(MsgType::ColoAbort, &wire::encode_abort(&text));
        let mut staged = 0;
        for s in &self.shared.staging {
            let mut s = lock(s);
            staged += s.len() as u64;
            s.clear();
        }
        let discarded = match self.paused_for {
            Some(epoch) => {
                let after = if self.verify {
                    self.vm.page_digest().ok().map(|d| d.hex())
                } else {
                    None
                };
                tracing::warn!(
                    epoch,
                    staged,
                    "dropped the half-received checkpoint: nothing of it reached the guest"
                );
                Some(Discarded {
                    epoch,
                    staged_pages: staged,
                    reason: text.clone(),
                    digest_at_pause: self.digest_at_pause.take(),
                    digest_after_discard: after,
                })
            }
            None => None,
        };
        if self.vm.is_paused() {
            self.vm.resume().map_err(vm_err("resume the VM"))?;
        }
        tracing::error!(
            "primary lost: {text}; the guest goes on from checkpoint {}",
            self.epoch
        );
        self.handle.update(|s| {
            s.last_error = Some(text);
            if discarded.is_some() {
                s.discarded = discarded;
            }
            s.staging_bytes = 0;
        });
        self.handle.set_state(State::PrimaryLost);
        Ok(())
    }
}
