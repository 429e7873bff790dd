//! The receiving side of a live migration.

use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm::{StateDigest, Vm, VmId};

use super::wire::{self, PAGE_SIZE};
use super::{Error, Params, Phase, ProgressHandle, Report, link_err, ms, vm_err};
use crate::frame::{Frame, Header, MsgType};
use crate::handshake::{self, HandshakeConfig, Peer, Role};
use crate::link::{Link, LinkConfig};

/// How long the destination waits for the source's summary after the
/// guest runs.
const SUMMARY_WAIT: Duration = Duration::from_secs(2);

/// Binds the address an incoming migration will arrive on.
pub fn listen(addr: &str) -> Result<TcpListener, Error> {
    TcpListener::bind(addr).map_err(|source| Error::Listen {
        addr: addr.to_string(),
        source,
    })
}

/// Pages and bytes received, shared by the channel threads.
#[derive(Default)]
struct Counters {
    pages: AtomicU64,
    zero: AtomicU64,
    bytes: AtomicU64,
}

fn link_config(params: &Params) -> LinkConfig {
    LinkConfig {
        read_timeout: Some(params.io_timeout),
        write_timeout: Some(params.io_timeout),
        ..LinkConfig::default()
    }
}

fn protocol(e: wire::WireError) -> Error {
    Error::Protocol(e.to_string())
}

/// Waits on `listener` for a migration source, receives the VM into `vm`
/// (built with [`Vm::new_incoming`], paused, back ends not attached) and
/// starts it.
///
/// A peer that fails the handshake (wrong key, version or role) or asks
/// for a VM of another shape is refused and logged, and the wait goes on:
/// nothing of the VM has changed. Once a migration has begun, any failure
/// returns an error and the VM has not run; on success the guest runs here
/// with the source's identity, or stays paused if it was paused there.
pub fn incoming(
    vm: &Vm,
    listener: &TcpListener,
    params: &Params,
    progress: &ProgressHandle,
) -> Result<Report, Error> {
    let (mut control, peer, begin) = wait_for_source(vm, listener, params, progress)?;
    let started = Instant::now();
    let result = receive(
        vm,
        listener,
        params,
        progress,
        &mut control,
        &peer,
        &begin,
        started,
    );
    match result {
        Ok(report) => {
            progress.update(|p| {
                p.phase = Phase::Completed;
                p.elapsed_ms = ms(started.elapsed());
                p.report = Some(report.clone());
            });
            Ok(report)
        }
        Err(e) => {
            let text = crate::error_text(&e);
            // The source learns why (if it still listens) and keeps its VM.
            let _ = control.send(MsgType::MigAbort, &wire::encode_abort(&text));
            progress.update(|p| {
                p.phase = Phase::Failed;
                p.elapsed_ms = ms(started.elapsed());
                p.error = Some(text);
            });
            Err(e)
        }
    }
}

fn handshake_config(vm: &Vm, params: &Params, expect: Option<[u8; 16]>) -> HandshakeConfig {
    let mut hs = HandshakeConfig::new(Role::Destination, vm.identity().0);
    hs.expect_peer_vm = expect;
    hs.auth_key = params.auth_key.clone();
    hs.timeout = params.connect_timeout;
    hs
}

/// Accepts connections until one is a source that passes the handshake
/// and asks for a VM of this shape.
fn wait_for_source(
    vm: &Vm,
    listener: &TcpListener,
    params: &Params,
    progress: &ProgressHandle,
) -> Result<(Link, Peer, wire::Begin), Error> {
    loop {
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
                progress.update(|p| {
                    p.peer = addr.to_string();
                    p.phase = Phase::Precopy;
                    p.channels = begin.channels;
                });
                tracing::info!(
                    peer = %addr,
                    channels = begin.channels,
                    identity = %VmId(peer.vm_id),
                    "incoming migration started"
                );
                return Ok((link, peer, begin));
            }
            Err(e) => {
                tracing::warn!(
                    "refused a migration connection from {addr}: {}",
                    crate::error_text(&e)
                );
            }
        }
    }
}

/// Handshake and `MigBegin` on a new connection.
fn greet(vm: &Vm, stream: TcpStream, params: &Params) -> Result<(Link, Peer, wire::Begin), Error> {
    let mut link = Link::from_stream(stream, link_config(params)).map_err(link_err("setup"))?;
    let peer = handshake::server(&mut link, &handshake_config(vm, params, None))
        .map_err(Error::Handshake)?;
    // A source that passed the handshake answers quickly.
    link.set_timeouts(Some(params.connect_timeout), Some(params.connect_timeout))
        .map_err(link_err("setup"))?;
    let f = link.recv().map_err(link_err("setup"))?;
    if f.msg_type() != MsgType::MigBegin {
        return Err(Error::Protocol(format!(
            "expected MigBegin, got {:?}",
            f.msg_type()
        )));
    }
    let begin = wire::Begin::decode(&f.payload).map_err(protocol)?;
    let here = vm.fingerprint();
    let refusal = match vmm::snapshot::check_fingerprint(&begin.fingerprint, &here) {
        Err(e) => Some(e.to_string()),
        Ok(()) if params.verify && begin.flags & wire::BEGIN_VERIFY == 0 => Some(
            "this destination verifies migrations; the source must compute a digest too (migrate with verify)"
                .to_string(),
        ),
        Ok(()) => None,
    };
    if let Some(text) = refusal {
        let _ = link.send(MsgType::MigAbort, &wire::encode_abort(&text));
        return Err(Error::Mismatch(text));
    }
    let cfg = link_config(params);
    link.set_timeouts(cfg.read_timeout, cfg.write_timeout)
        .map_err(link_err("setup"))?;
    Ok((link, peer, begin))
}

/// Accepts the extra channels of `begin`'s session within the connect
/// timeout. Connections that fail the handshake or name another session
/// are refused and do not count.
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
        "a migration channel",
        &link_config(params),
        &handshake_config(vm, params, Some(peer.vm_id)),
        MsgType::MigJoin,
    )
    .map_err(Error::Protocol)
}

/// Reads the payload of a non-page message (bounded by the link's
/// maximum payload).
fn payload(link: &mut Link, h: &Header) -> Result<Vec<u8>, Error> {
    let mut buf = vec![0u8; h.payload_len as usize];
    link.read_payload(&mut buf)
        .map_err(link_err("page transfer"))?;
    Ok(buf)
}

/// Reads one `MigPages` batch, whose frame has a payload of `len` bytes,
/// from `link` straight into guest memory: the count and entries first,
/// every address checked before any data is read, then the pages'
/// contents with `readv` into their places (marked dirty like every VMM
/// write) — from the rest of the payload, or from the stream after the
/// frame, as the source sends them ([`wire::decode_page_head`]; both come
/// next on the stream). The pages are faulted in before or while the data
/// arrives: by `helper` on its own thread if the channel has one, else
/// here ([`populate`]). Zero pages are written only where the page is not
/// zero already, so untouched pages stay unallocated.
fn receive_pages(
    vm: &Vm,
    link: &mut Link,
    len: u32,
    counters: &Counters,
    helper: Option<&Populator>,
) -> Result<(), Error> {
    static ZERO: [u8; PAGE_SIZE] = [0; PAGE_SIZE];
    let len = len as usize;
    let read =
        |link: &mut Link, buf: &mut [u8]| link.read_payload(buf).map_err(link_err("page transfer"));
    let mut count = [0u8; 4];
    if len < count.len() {
        return Err(Error::Protocol(format!("MigPages payload of {len} bytes")));
    }
    read(link, &mut count)?;
    let n = u32::from_le_bytes(count) as usize;
    if n > wire::MAX_BATCH || len < 4 + 8 * n {
        return Err(Error::Protocol(format!(
            "MigPages with {n} pages in {len} bytes"
        )));
    }
    let mut raw = [0u8; 8 * wire::MAX_BATCH];
    read(link, &mut raw[..8 * n])?;
    let entries = wire::decode_page_head(len, &raw[..8 * n]).map_err(protocol)?;
    let mem = vm.memory();
    let mut iov: Vec<libc::iovec> = Vec::with_capacity(n);
    for &(gpa, zero) in &entries {
        // Page-aligned addresses in page-aligned regions: a page whose
        // start is in RAM lies wholly in one region.
        let slice = mem
            .get_slice(GuestAddress(gpa), PAGE_SIZE)
            .map_err(|_| Error::Protocol(format!("page {gpa:#x} is outside guest RAM")))?;
        if !zero {
            slice.bitmap().mark_dirty(0, PAGE_SIZE);
            let ptr = slice.ptr_guard_mut().as_ptr();
            // Adjacent pages become one buffer.
            match iov.last_mut() {
                Some(last) if last.iov_base.cast::<u8>().wrapping_add(last.iov_len) == ptr => {
                    last.iov_len += PAGE_SIZE;
                }
                _ => iov.push(libc::iovec {
                    iov_base: ptr.cast(),
                    iov_len: PAGE_SIZE,
                }),
            }
        }
    }
    match helper {
        Some(p) => p.post(&iov),
        None => {
            for v in &iov {
                populate(v.iov_base as usize, v.iov_len);
            }
        }
    }
    // SAFETY: every iovec covers whole pages of guest RAM, each checked by
    // get_slice in a live mapping the VM owns and that outlives the call
    // (adjacent ones merged); no two overlap, as the pages are distinct
    // (decode_page_head checked that their addresses ascend); the guest
    // does not run while an incoming migration writes its memory.
    unsafe { crate::pageio::read_into_iovecs(link, &mut iov) }
        .map_err(link_err("page transfer"))?;
    for &(gpa, zero) in &entries {
        if zero {
            let addr = GuestAddress(gpa);
            let mut cur = [0u8; PAGE_SIZE];
            mem.read_slice(&mut cur, addr)
                .map_err(|e| Error::Protocol(format!("cannot read page {gpa:#x}: {e}")))?;
            if !wire::is_zero(&cur) {
                mem.write_slice(&ZERO, addr)
                    .map_err(|e| Error::Protocol(format!("cannot write page {gpa:#x}: {e}")))?;
            }
        }
    }
    let data = entries.iter().filter(|(_, z)| !z).count() as u64;
    counters.pages.fetch_add(data, Ordering::Relaxed);
    counters
        .zero
        .fetch_add(entries.len() as u64 - data, Ordering::Relaxed);
    counters.bytes.fetch_add(
        (4 + 8 * n) as u64 + data * PAGE_SIZE as u64 + crate::frame::HEADER_LEN as u64,
        Ordering::Relaxed,
    );
    super::maybe_die(
        super::die_after_pages(),
        counters.pages.load(Ordering::Relaxed) + counters.zero.load(Ordering::Relaxed),
    );
    Ok(())
}

/// Faults in `len` bytes of guest RAM at host address `addr` (whole pages
/// of one batch, see [`receive_pages`]), writable, before the data is read
/// into them: `madvise(MADV_POPULATE_WRITE)` allocates (and zeroes) a run
/// of pages in one call, where letting `readv` touch them takes a page
/// fault per page. Only a hint: the pages' contents do not change, and if
/// the kernel cannot (before Linux 5.14 — then it is not tried again — or
/// short of memory), `readv` faults the pages in as before.
fn populate(addr: usize, len: usize) {
    static UNSUPPORTED: AtomicBool = AtomicBool::new(false);
    if UNSUPPORTED.load(Ordering::Relaxed) {
        return;
    }
    // SAFETY: the range is whole pages of guest RAM in a live mapping the
    // VM owns (checked by `receive_pages`; the VM outlives every page
    // receiver and its helper). MADV_POPULATE_WRITE only populates page
    // tables, as a write fault would, without writing: present pages keep
    // their contents and absent ones become the zero pages they read as
    // already. No Rust reference into guest memory exists.
    let r = unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_POPULATE_WRITE) };
    if r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
        UNSUPPORTED.store(true, Ordering::Relaxed);
    }
}

/// Pages a helper thread faults in per call: small enough that it soon
/// notices a newer batch, large enough that the calls cost little.
const HELPER_CHUNK: usize = 16 * PAGE_SIZE;

/// The helper of one page channel: a thread of its own that faults in the
/// pages of the channel's current batch ([`populate`]) while the channel's
/// thread reads their data in, so that the kernel's page allocation and
/// zeroing — most of the destination's work — runs on another core. The
/// channel posts each batch's buffers before its `readv` ([`Self::post`]);
/// the helper works through them from the end backwards while `readv`
/// fills them from the start, faulting in itself what the helper has not
/// reached yet, until the two meet. A newer batch replaces an unfinished
/// one, whose remaining pages `readv` is faulting in already. The helper
/// only ever populates pages, so when it gets to a page does not matter.
struct Populator {
    job: Mutex<Job>,
    /// Batches posted so far; the helper compares it with the one it works on.
    posted: AtomicU64,
    wake: Condvar,
}

#[derive(Default)]
struct Job {
    /// The latest batch's buffers: host address and length, whole pages.
    runs: Vec<(usize, usize)>,
    /// The page transfer is over; the helper returns.
    stop: bool,
}

impl Populator {
    fn new() -> Self {
        Populator {
            job: Mutex::new(Job::default()),
            posted: AtomicU64::new(0),
            wake: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Job> {
        self.job.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands the helper the buffers of the batch about to be read.
    fn post(&self, iov: &[libc::iovec]) {
        let mut job = self.lock();
        job.runs.clear();
        job.runs
            .extend(iov.iter().map(|v| (v.iov_base as usize, v.iov_len)));
        self.posted.fetch_add(1, Ordering::SeqCst);
        self.wake.notify_one();
    }

    /// Ends [`Self::run`].
    fn stop(&self) {
        self.lock().stop = true;
        self.wake.notify_one();
    }

    /// The helper thread: populates each posted batch until stopped.
    fn run(&self) {
        let mut done = 0;
        let mut runs = Vec::new();
        loop {
            {
                let mut job = self.lock();
                loop {
                    if job.stop {
                        return;
                    }
                    let posted = self.posted.load(Ordering::SeqCst);
                    if posted != done {
                        done = posted;
                        std::mem::swap(&mut runs, &mut job.runs);
                        break;
                    }
                    job = self.wake.wait(job).unwrap_or_else(|e| e.into_inner());
                }
            }
            'batch: for &(addr, len) in runs.iter().rev() {
                let mut end = addr + len;
                while end > addr {
                    let start = end.saturating_sub(HELPER_CHUNK).max(addr);
                    populate(start, end - start);
                    end = start;
                    if self.posted.load(Ordering::Relaxed) != done {
                        break 'batch;
                    }
                }
            }
        }
    }
}

/// Stops the helpers when the page transfer ends, however it ends.
struct StopHelpers<'a>(&'a [Populator]);

impl Drop for StopHelpers<'_> {
    fn drop(&mut self) {
        for p in self.0 {
            p.stop();
        }
    }
}

/// How far each page channel has got: the control channel acknowledges a
/// round only when every channel has passed its end marker.
struct RoundSync {
    rounds: Mutex<Vec<u32>>,
    changed: Condvar,
    failed: AtomicBool,
}

impl RoundSync {
    fn new(channels: usize) -> Self {
        RoundSync {
            rounds: Mutex::new(vec![0; channels]),
            changed: Condvar::new(),
            failed: AtomicBool::new(false),
        }
    }

    fn reached(&self, channel: usize, round: u32) {
        let mut r = self.rounds.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = r.get_mut(channel) {
            *slot = round;
        }
        self.changed.notify_all();
    }

    fn fail(&self) {
        self.failed.store(true, Ordering::SeqCst);
        self.changed.notify_all();
    }

    /// Waits until every channel has passed round `round`.
    fn wait(&self, round: u32, timeout: Duration) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        let mut r = self.rounds.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if self.failed.load(Ordering::SeqCst) {
                return Err(Error::Protocol("a page channel failed".into()));
            }
            if r.iter().all(|&x| x >= round) {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Protocol(format!(
                    "the page channels did not finish round {round} within {timeout:?}"
                )));
            }
            r = self
                .changed
                .wait_timeout(r, left.min(Duration::from_millis(100)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// Receives pages on extra channel `index` until its `MigChannelEnd`.
fn receive_channel(
    vm: &Vm,
    link: &mut Link,
    index: usize,
    counters: &Counters,
    sync: &RoundSync,
    helper: Option<&Populator>,
) -> Result<(), Error> {
    loop {
        let h = link.recv_header().map_err(link_err("page transfer"))?;
        match h.msg_type {
            MsgType::MigPages => receive_pages(vm, link, h.payload_len, counters, helper)?,
            MsgType::MigRoundEnd => {
                let r = wire::RoundEnd::decode(&payload(link, &h)?).map_err(protocol)?;
                sync.reached(index, r.round);
            }
            MsgType::MigChannelEnd => {
                wire::decode_u64s::<1>("MigChannelEnd", &payload(link, &h)?).map_err(protocol)?;
                return Ok(());
            }
            MsgType::MigAbort => {
                return Err(Error::PeerAborted(wire::decode_abort(&payload(link, &h)?)));
            }
            other => {
                return Err(Error::Protocol(format!(
                    "unexpected {other:?} on a page channel"
                )));
            }
        }
    }
}

/// Everything after the source's `MigBegin`.
#[allow(clippy::too_many_arguments)]
fn receive(
    vm: &Vm,
    listener: &TcpListener,
    params: &Params,
    progress: &ProgressHandle,
    control: &mut Link,
    peer: &Peer,
    begin: &wire::Begin,
    started: Instant,
) -> Result<Report, Error> {
    // The RAM holds what building the VM put there (the kernel); the
    // source sends only pages that may be non-zero.
    vm.discard_ram().map_err(vm_err("clear guest RAM"))?;
    control
        .send(MsgType::MigReady, &[])
        .map_err(link_err("setup"))?;
    let mut extra = accept_channels(vm, listener, params, peer, begin)?;
    let counters = Counters::default();
    // When one side fails, the others must stop: the page channels are
    // shut down both ways, the control channel only for reading (that
    // wakes its receiver, and the abort can still be sent on it).
    let control_stream = control.stream().try_clone().map_err(Error::Thread)?;
    let mut streams = Vec::new();
    for l in &extra {
        streams.push(l.stream().try_clone().map_err(Error::Thread)?);
    }
    let stop_channels = || {
        for s in &streams {
            let _ = s.shutdown(Shutdown::Both);
        }
    };
    let shutdown_all = || {
        stop_channels();
        let _ = control_stream.shutdown(Shutdown::Read);
    };

    let sync = RoundSync::new(usize::from(begin.channels));
    // With a core to spare per channel, each channel gets a helper that
    // faults its pages in (see `Populator`); prefaulted RAM needs none.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let helped = cores > usize::from(begin.channels) && !vm.ram_prefaulted();
    let populators: Vec<Populator> = (0..begin.channels).map(|_| Populator::new()).collect();
    let (state_frame, transfer) = std::thread::scope(|s| {
        let _stop = StopHelpers(&populators);
        let helpers: Vec<Option<&Populator>> = populators
            .iter()
            .enumerate()
            .map(|(i, p)| {
                // A helper that cannot start is only a missed speed-up.
                let started = helped
                    && std::thread::Builder::new()
                        .name(format!("migrate-pf{i}"))
                        .spawn_scoped(s, || p.run())
                        .is_ok();
                started.then_some(p)
            })
            .collect();
        let mut handles = Vec::new();
        for (i, link) in extra.iter_mut().enumerate() {
            let counters = &counters;
            let shutdown_all = &shutdown_all;
            let sync = &sync;
            let helper = helpers[i + 1];
            let h = std::thread::Builder::new()
                .name(format!("migrate-rx{}", i + 1))
                .spawn_scoped(s, move || {
                    let r = receive_channel(vm, link, i + 1, counters, sync, helper);
                    if r.is_err() {
                        sync.fail();
                        shutdown_all();
                    }
                    r
                })
                .map_err(Error::Thread);
            handles.push(h);
        }
        if handles.iter().any(|h| h.is_err()) {
            sync.fail();
        }
        let control_result = receive_control(
            vm, control, helpers[0], &counters, &sync, params, progress, started,
        );
        if control_result.is_err() || handles.iter().any(|h| h.is_err()) {
            stop_channels();
        }
        let mut channel_result = Ok(());
        for h in handles {
            let r = match h {
                Ok(h) => h
                    .join()
                    .unwrap_or_else(|_| Err(Error::Protocol("a channel thread panicked".into()))),
                Err(e) => Err(e),
            };
            if channel_result.is_ok() {
                channel_result = r;
            }
        }
        // A failing channel shuts the control link down: its error is the
        // cause, the control channel's the consequence.
        let (frame, end_at) = match (control_result, channel_result) {
            (Ok(v), Ok(())) => v,
            (_, Err(e)) | (Err(e), Ok(())) => return Err(e),
        };
        Ok((frame, end_at.elapsed()))
    })?;

    // Every page is here; now the state.
    progress.update(|p| p.phase = Phase::Switchover);
    let msg = wire::StateMsg::decode(&state_frame.payload).map_err(protocol)?;
    let verify = begin.flags & wire::BEGIN_VERIFY != 0;
    if verify != msg.digest.is_some() {
        return Err(Error::Protocol(
            "the digest does not match the verify flag".into(),
        ));
    }
    let t = Instant::now();
    vm.load_state_bytes(msg.state, Some(VmId(peer.vm_id)))
        .map_err(|e| Error::Mismatch(crate::error_text(&e)))?;
    vm.set_identity(VmId(peer.vm_id));
    let load = t.elapsed();
    let digest = match msg.digest {
        Some(bytes) => {
            let theirs: StateDigest = postcard::from_bytes(bytes)
                .map_err(|e| Error::Protocol(format!("bad digest: {e}")))?;
            let mine = vm.digest().map_err(vm_err("compute the digest"))?;
            if let Some(diff) = mine.first_difference(&theirs) {
                return Err(Error::DigestMismatch(format!(
                    "{diff:?} (source {}, destination {})",
                    theirs.hex(),
                    mine.hex()
                )));
            }
            tracing::info!(digest = %mine.hex(), "migration digest matches the source's");
            Some(mine.hex())
        }
        None => None,
    };
    control
        .send(
            MsgType::MigLoaded,
            &wire::encode_u64s(&[transfer.as_micros() as u64, load.as_micros() as u64]),
        )
        .map_err(link_err("switchover"))?;

    let f = control.recv().map_err(link_err("handover"))?;
    match f.msg_type() {
        MsgType::MigHandover => wire::decode_empty("MigHandover", &f.payload).map_err(protocol)?,
        MsgType::MigAbort => return Err(Error::PeerAborted(wire::decode_abort(&f.payload))),
        other => {
            return Err(Error::Protocol(format!(
                "expected MigHandover, got {other:?}"
            )));
        }
    }
    progress.update(|p| p.phase = Phase::Handover);
    let t = Instant::now();
    vm.attach_backends()
        .map_err(vm_err("attach the taps and disks"))?;
    let attach = t.elapsed();
    let t = Instant::now();
    if begin.flags & wire::BEGIN_RUNNING != 0 {
        if let Err(e) = vm.resume() {
            let _ = vm.release_backends();
            return Err(vm_err("resume the VM")(e));
        }
    }
    let resume = t.elapsed();
    if let Err(e) = control.send(
        MsgType::MigResumed,
        &wire::encode_u64s(&[attach.as_micros() as u64, resume.as_micros() as u64]),
    ) {
        // The guest runs here now; the source stays paused without an answer.
        tracing::warn!("could not confirm the migration to the source: {e}");
    }
    let (pages, zero, bytes) = (
        counters.pages.load(Ordering::Relaxed),
        counters.zero.load(Ordering::Relaxed),
        counters.bytes.load(Ordering::Relaxed),
    );
    let mut report = Report {
        total_ms: ms(started.elapsed()),
        channels: begin.channels,
        pages_sent: pages,
        zero_pages: zero,
        bytes_sent: bytes,
        digest: digest.clone(),
        ..Report::default()
    };
    report.split.state_transfer_ms = ms(transfer);
    report.split.state_load_ms = ms(load);
    report.split.handover_ms = ms(attach);
    report.split.resume_ms = ms(resume);
    // The source's view (downtime, rounds, its part of the split) comes in
    // its summary.
    let _ = control.set_timeouts(Some(SUMMARY_WAIT), Some(SUMMARY_WAIT));
    match control.recv() {
        Ok(f) if f.msg_type() == MsgType::MigSummary => match wire::decode_summary(&f.payload) {
            Ok(summary) => {
                report = Report {
                    digest: report.digest.or(summary.digest.clone()),
                    ..summary
                }
            }
            Err(e) => tracing::warn!("ignoring the source's migration summary: {e}"),
        },
        Ok(f) => tracing::debug!("no migration summary: got {:?}", f.msg_type()),
        Err(e) => tracing::debug!("no migration summary: {e}"),
    }
    Ok(report)
}

/// Receives the control channel's pages and messages until the state
/// arrives. Returns the state frame and when the channel's pages ended.
#[allow(clippy::too_many_arguments)]
fn receive_control(
    vm: &Vm,
    control: &mut Link,
    helper: Option<&Populator>,
    counters: &Counters,
    sync: &RoundSync,
    params: &Params,
    progress: &ProgressHandle,
    started: Instant,
) -> Result<(Frame, Instant), Error> {
    let mut ended: Option<Instant> = None;
    loop {
        let h = control.recv_header().map_err(link_err("page transfer"))?;
        match h.msg_type {
            MsgType::MigPages if ended.is_none() => {
                receive_pages(vm, control, h.payload_len, counters, helper)?
            }
            MsgType::MigRoundEnd if ended.is_none() => {
                let r = wire::RoundEnd::decode(&payload(control, &h)?).map_err(protocol)?;
                sync.reached(0, r.round);
                sync.wait(r.round, params.io_timeout)?;
                control
                    .send(MsgType::MigRoundAck, &wire::encode_round_ack(r.round))
                    .map_err(link_err("page transfer"))?;
                let (pages, zero, bytes) = (
                    counters.pages.load(Ordering::Relaxed),
                    counters.zero.load(Ordering::Relaxed),
                    counters.bytes.load(Ordering::Relaxed),
                );
                progress.update(|p| {
                    p.round = r.round;
                    p.pages = pages;
                    p.zero_pages = zero;
                    p.bytes = bytes;
                    p.elapsed_ms = ms(started.elapsed());
                });
            }
            MsgType::MigChannelEnd if ended.is_none() => {
                wire::decode_u64s::<1>("MigChannelEnd", &payload(control, &h)?)
                    .map_err(protocol)?;
                ended = Some(Instant::now());
            }
            MsgType::MigState => match ended {
                Some(at) => {
                    let payload = payload(control, &h)?;
                    return Ok((Frame { header: h, payload }, at));
                }
                None => {
                    return Err(Error::Protocol(
                        "the state arrived before the last pages".into(),
                    ));
                }
            },
            MsgType::MigAbort => {
                return Err(Error::PeerAborted(wire::decode_abort(&payload(
                    control, &h,
                )?)));
            }
            other => {
                return Err(Error::Protocol(format!(
                    "unexpected {other:?} during the page transfer"
                )));
            }
        }
    }
}
