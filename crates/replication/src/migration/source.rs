//! The sending side of a live migration.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{GuestAddress, GuestMemoryBackend, VolatileMemory, VolatileSlice};
use vmm::Vm;
use vmm::memory::DirtyBitmap;

use super::wire::{self, PAGE_SIZE};
use super::{DowntimeSplit, Error, Params, Phase, ProgressHandle, Report, link_err, ms, vm_err};
use crate::frame::MsgType;
use crate::handshake::{self, HandshakeConfig, Role};
use crate::link::{Link, LinkConfig};

/// Bandwidth assumed until a round has moved enough data to measure it.
const ASSUMED_BANDWIDTH: f64 = 100e6;
/// A round must move at least this much for its bandwidth to count.
const MIN_MEASURED_BYTES: u64 = 1 << 20;
/// Bytes on the wire per page with data (entry + contents).
const WIRE_PAGE: f64 = (PAGE_SIZE + 8) as f64;

/// Page and byte counts shared by the channel threads.
#[derive(Default)]
struct Counters {
    pages: AtomicU64,
    zero: AtomicU64,
    bytes: AtomicU64,
}

impl Counters {
    fn get(&self) -> (u64, u64, u64) {
        (
            self.pages.load(Ordering::Relaxed),
            self.zero.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        )
    }
}

/// What the source holds while a migration runs.
struct Run<'a> {
    vm: &'a Vm,
    params: &'a Params,
    progress: &'a ProgressHandle,
    /// Channel 0 is the control channel; all carry pages.
    links: Vec<Link>,
    counters: Counters,
    /// Set by a failing channel so that the others stop early.
    abort: AtomicBool,
    started: Instant,
}

/// Migrates `vm` to the destination at `to` (a `twinvm run --incoming`
/// process), reporting progress into `progress`.
///
/// On success the guest runs on the destination; here the VM is paused
/// with its taps and disks released, and the caller should end it
/// ([`Vm::end_migrated`]). On failure the VM goes on as before the
/// migration (resumed if the migration paused it, its back ends attached
/// again), except after [`Error::OutcomeUnknown`].
pub fn migrate(
    vm: &Vm,
    to: &str,
    params: &Params,
    progress: &ProgressHandle,
) -> Result<Report, Error> {
    if params.channels == 0 || params.channels > super::MAX_CHANNELS {
        return Err(Error::Params(format!(
            "{} channels: 1 to {} are allowed",
            params.channels,
            super::MAX_CHANNELS
        )));
    }
    progress.update(|p| {
        p.peer = to.to_string();
        p.phase = Phase::Connecting;
        p.channels = params.channels;
    });
    let started = Instant::now();
    let was_running = !vm.is_paused();
    let result = connect_all(vm, to, params).and_then(|links| {
        let mut run = Run {
            vm,
            params,
            progress,
            links,
            counters: Counters::default(),
            abort: AtomicBool::new(false),
            started,
        };
        run.run(was_running)
    });
    match result {
        Ok(report) => {
            progress.update(|p| {
                p.phase = Phase::Completed;
                p.elapsed_ms = report.total_ms;
                p.report = Some(report.clone());
            });
            Ok(report)
        }
        Err(e) => {
            let text = crate::error_text(&e);
            tracing::warn!("migration to {to} failed: {text}");
            progress.update(|p| {
                p.phase = Phase::Failed;
                p.elapsed_ms = ms(started.elapsed());
                p.error = Some(text);
            });
            Err(e)
        }
    }
}

fn link_config(params: &Params) -> LinkConfig {
    LinkConfig {
        read_timeout: Some(params.io_timeout),
        write_timeout: Some(params.io_timeout),
        ..LinkConfig::default()
    }
}

/// Connects one channel and runs the handshake as the source.
fn connect_one(vm: &Vm, to: &str, params: &Params) -> Result<Link, Error> {
    let mut link = Link::connect(to, params.connect_timeout, link_config(params)).map_err(|e| {
        Error::Connect {
            addr: to.to_string(),
            source: Box::new(e),
        }
    })?;
    let mut hs = HandshakeConfig::new(Role::Source, vm.identity().0);
    hs.expect_peer_vm = None;
    hs.auth_key = params.auth_key.clone();
    hs.timeout = params.connect_timeout;
    handshake::client(&mut link, &hs).map_err(Error::Handshake)?;
    Ok(link)
}

/// Opens the control channel, asks for the migration, then opens the
/// extra channels.
fn connect_all(vm: &Vm, to: &str, params: &Params) -> Result<Vec<Link>, Error> {
    let mut control = connect_one(vm, to, params)?;
    let mut session = [0u8; 16];
    getrandom::fill(&mut session)
        .map_err(|e| Error::Thread(std::io::Error::other(e.to_string())))?;
    let mut flags = 0;
    if params.verify {
        flags |= wire::BEGIN_VERIFY;
    }
    if !vm.is_paused() {
        flags |= wire::BEGIN_RUNNING;
    }
    let begin = wire::Begin {
        session,
        channels: params.channels,
        flags,
        fingerprint: vm.fingerprint(),
    };
    control
        .send(MsgType::MigBegin, &begin.encode())
        .map_err(link_err("setup"))?;
    let reply = control.recv().map_err(link_err("setup"))?;
    match reply.msg_type() {
        MsgType::MigReady => wire::decode_empty("MigReady", &reply.payload)
            .map_err(|e| Error::Protocol(e.to_string()))?,
        MsgType::MigAbort => {
            return Err(Error::PeerAborted(wire::decode_abort(&reply.payload)));
        }
        other => {
            return Err(Error::Protocol(format!("expected MigReady, got {other:?}")));
        }
    }
    let mut links = vec![control];
    for index in 1..params.channels {
        let mut link = connect_one(vm, to, params)?;
        link.send(MsgType::MigJoin, &wire::Join { session, index }.encode())
            .map_err(link_err("channel setup"))?;
        links.push(link);
    }
    Ok(links)
}

impl Run<'_> {
    fn run(&mut self, was_running: bool) -> Result<Report, Error> {
        let vm = self.vm;
        self.progress.update(|p| p.phase = Phase::Precopy);
        // Start tracking, then list every page that may hold data: a page
        // written after this point is in the next dirty bitmap.
        vm.take_dirty().map_err(vm_err("start dirty tracking"))?;
        let mut set = vm.populated_pages().map_err(vm_err("list guest pages"))?;
        let mut round = 1u32;
        let mut bandwidth = ASSUMED_BANDWIDTH;
        let mut precopy_data = 0u64;
        let mut precopy_time = Duration::ZERO;
        let leftover = loop {
            let t = Instant::now();
            let (pages_before, _, bytes_before) = self.counters.get();
            // The destination's RAM starts zeroed: round 1 skips zero pages.
            self.send_pages(&set, round == 1)?;
            self.end_round(round, set.count() as u64)?;
            let took = t.elapsed();
            let (pages_after, _, bytes_after) = self.counters.get();
            let moved = bytes_after - bytes_before;
            precopy_data += (pages_after - pages_before) * PAGE_SIZE as u64;
            precopy_time += took;
            if moved >= MIN_MEASURED_BYTES {
                bandwidth = moved as f64 / took.as_secs_f64().max(1e-6);
            }
            let dirty = vm.take_dirty().map_err(vm_err("read the dirty log"))?;
            let count = dirty.count() as u64;
            let estimate = count as f64 * WIRE_PAGE / bandwidth;
            let (pages, zero, bytes) = self.counters.get();
            let elapsed = ms(self.started.elapsed());
            self.progress.update(|p| {
                p.round = round;
                p.pages = pages;
                p.zero_pages = zero;
                p.bytes = bytes;
                p.dirty_rate_pages_per_s = count as f64 / took.as_secs_f64().max(1e-6);
                p.remaining_dirty_pages = count;
                p.bandwidth_bytes_per_s = bandwidth;
                p.estimated_downtime_ms = estimate * 1000.0;
                p.elapsed_ms = elapsed;
            });
            tracing::debug!(round, dirty = count, bandwidth, estimate, "migration round");
            if estimate <= self.params.downtime_budget.as_secs_f64()
                || round >= self.params.max_rounds
            {
                break dirty;
            }
            set = dirty;
            round += 1;
        };
        self.switchover(was_running, leftover, round + 1, precopy_data, precopy_time)
    }

    /// Marks the end of round `round` on every channel and waits until the
    /// destination has all its pages in guest memory.
    fn end_round(&mut self, round: u32, pages: u64) -> Result<(), Error> {
        let marker = wire::RoundEnd {
            round,
            pages,
            dirty: 0,
        }
        .encode();
        for link in self.links.iter_mut().rev() {
            link.send(MsgType::MigRoundEnd, &marker)
                .map_err(link_err("pre-copy"))?;
        }
        let reply = self.links[0].recv().map_err(link_err("pre-copy"))?;
        match reply.msg_type() {
            MsgType::MigRoundAck => {
                let acked = wire::decode_round_ack(&reply.payload)
                    .map_err(|e| Error::Protocol(e.to_string()))?;
                if acked != round {
                    return Err(Error::Protocol(format!(
                        "the destination acknowledged round {acked}, not {round}"
                    )));
                }
                Ok(())
            }
            MsgType::MigAbort => Err(Error::PeerAborted(wire::decode_abort(&reply.payload))),
            other => Err(Error::Protocol(format!(
                "expected MigRoundAck, got {other:?}"
            ))),
        }
    }

    /// Pauses the guest, sends what is left and the state, and hands the
    /// VM over. Undoes the pause (and the release of the back ends) if the
    /// destination fails before it confirms.
    fn switchover(
        &mut self,
        was_running: bool,
        leftover: DirtyBitmap,
        rounds: u32,
        precopy_data: u64,
        precopy_time: Duration,
    ) -> Result<Report, Error> {
        let vm = self.vm;
        self.progress.update(|p| {
            p.phase = Phase::Switchover;
            p.round = rounds;
        });
        let mut split = DowntimeSplit::default();
        let paused_at = Instant::now();
        if was_running {
            vm.pause().map_err(vm_err("pause the VM"))?;
        }
        split.vcpu_stop_ms = ms(paused_at.elapsed());
        let mut released = false;
        let outcome = self.finish(&mut split, leftover, &mut released);
        match outcome {
            Ok((last_round_pages, digest)) => {
                let downtime = paused_at.elapsed();
                let (pages, zero, bytes) = self.counters.get();
                let report = Report {
                    total_ms: ms(self.started.elapsed()),
                    downtime_ms: ms(downtime),
                    rounds,
                    channels: self.params.channels,
                    pages_sent: pages,
                    zero_pages: zero,
                    bytes_sent: bytes,
                    last_round_pages,
                    throughput_bytes_per_s: precopy_data as f64
                        / precopy_time.as_secs_f64().max(1e-6),
                    split,
                    digest,
                };
                // The destination shows the whole report too; it runs the
                // guest whether or not this arrives.
                if let Err(e) =
                    self.links[0].send(MsgType::MigSummary, &wire::encode_summary(&report))
                {
                    tracing::debug!("migration summary not delivered: {e}");
                }
                let _ = self.links[0].send(MsgType::Goodbye, &[]);
                Ok(report)
            }
            Err(e @ Error::OutcomeUnknown(_)) => Err(e),
            Err(e) => {
                // Tell the destination (if it still listens) and take the
                // guest back.
                let _ = self.links[0].send(
                    MsgType::MigAbort,
                    &wire::encode_abort(&crate::error_text(&e)),
                );
                if released && let Err(a) = vm.attach_backends() {
                    tracing::error!(
                        "after the failed migration the VM cannot get its taps and disks back: {}",
                        crate::error_text(&a)
                    );
                    return Err(e);
                }
                if was_running && let Err(r) = vm.resume() {
                    tracing::error!(
                        "after the failed migration the VM cannot resume: {}",
                        crate::error_text(&r)
                    );
                }
                Err(e)
            }
        }
    }

    /// The paused part: last pages, state, handover. Returns the pages sent
    /// while paused and the digest (verify mode).
    fn finish(
        &mut self,
        split: &mut DowntimeSplit,
        leftover: DirtyBitmap,
        released: &mut bool,
    ) -> Result<(u64, Option<String>), Error> {
        let vm = self.vm;
        let t = Instant::now();
        let mut last = vm.take_dirty().map_err(vm_err("read the dirty log"))?;
        last.union_with(&leftover);
        split.dirty_log_ms = ms(t.elapsed());

        let t = Instant::now();
        let last_pages = last.count() as u64;
        self.send_pages(&last, false)?;
        let (pages, _, _) = self.counters.get();
        for link in &mut self.links {
            link.send(MsgType::MigChannelEnd, &wire::encode_u64s(&[pages]))
                .map_err(link_err("switchover"))?;
        }
        split.last_pages_ms = ms(t.elapsed());

        let t = Instant::now();
        let state = vm.save_state_bytes().map_err(vm_err("save the VM state"))?;
        let digest = if self.params.verify {
            Some(vm.digest().map_err(vm_err("compute the digest"))?)
        } else {
            None
        };
        let digest_bytes = digest
            .as_ref()
            .map(|d| postcard::to_allocvec(d).unwrap_or_default());
        let msg = wire::StateMsg::encode(digest_bytes.as_deref(), &state);
        split.state_save_ms = ms(t.elapsed());
        let control = &mut self.links[0];
        control
            .send(MsgType::MigState, &msg)
            .map_err(link_err("switchover"))?;
        let reply = control.recv().map_err(link_err("switchover"))?;
        let [transfer_us, load_us] = match reply.msg_type() {
            MsgType::MigLoaded => wire::decode_u64s::<2>("MigLoaded", &reply.payload)
                .map_err(|e| Error::Protocol(e.to_string()))?,
            MsgType::MigAbort => {
                return Err(Error::PeerAborted(wire::decode_abort(&reply.payload)));
            }
            other => {
                return Err(Error::Protocol(format!(
                    "expected MigLoaded, got {other:?}"
                )));
            }
        };
        split.state_transfer_ms = transfer_us as f64 / 1000.0;
        split.state_load_ms = load_us as f64 / 1000.0;

        self.progress.update(|p| p.phase = Phase::Handover);
        let t = Instant::now();
        *released = true;
        vm.release_backends()
            .map_err(vm_err("release the taps and disks"))?;
        control
            .send(MsgType::MigHandover, &[])
            .map_err(link_err("handover"))?;
        // From here the destination may run the guest: a broken link no
        // longer means the migration failed.
        let reply = control
            .recv()
            .map_err(|e| Error::OutcomeUnknown(e.to_string()))?;
        let [_attach_us, resume_us] = match reply.msg_type() {
            MsgType::MigResumed => wire::decode_u64s::<2>("MigResumed", &reply.payload)
                .map_err(|e| Error::OutcomeUnknown(e.to_string()))?,
            MsgType::MigAbort => {
                return Err(Error::PeerAborted(wire::decode_abort(&reply.payload)));
            }
            other => {
                return Err(Error::OutcomeUnknown(format!(
                    "expected MigResumed, got {other:?}"
                )));
            }
        };
        split.resume_ms = resume_us as f64 / 1000.0;
        split.handover_ms = (ms(t.elapsed()) - split.resume_ms).max(0.0);
        Ok((last_pages, digest.map(|d| d.hex())))
    }

    /// Sends the pages in `set`, each on its channel, the channels in
    /// parallel. With `skip_zero`, zero pages are not sent at all.
    fn send_pages(&mut self, set: &DirtyBitmap, skip_zero: bool) -> Result<(), Error> {
        let channels = self.links.len() as u16;
        let vm = self.vm;
        let counters = &self.counters;
        let abort = &self.abort;
        crate::pageio::on_every_channel(
            &mut self.links,
            "migrate-tx",
            abort,
            thread_failed,
            |i, link| {
                send_stripe(
                    vm, link, i as u16, channels, set, skip_zero, counters, abort,
                )
            },
        )
    }
}

/// Sends the pages of `set` that belong to channel `index` of `channels`,
/// in batches of at most [`wire::MAX_BATCH`]: each a `MigPages` frame with
/// the batch's entries, followed on the stream by the contents of its
/// pages with data, written with `writev` straight from guest memory (no
/// copy in this process).
///
/// The guest keeps running during the pre-copy rounds and may write a page
/// between the zero check and the moment the kernel copies it into the
/// socket, or while it does: the page may then be sent as a zero flag
/// though it is no longer zero, or with contents that are torn or already
/// newer than the check saw. Neither loses a write. Every page of a round
/// is read after the dirty-log harvest that ended the previous round
/// ([`Run::run`] harvests before each `send_pages`; round 1's harvest
/// starts the tracking), so a write that changes a page after (or while)
/// this round reads it is a write after that harvest: KVM's dirty log (or
/// the VMM's dirty bitmap, for the VMM's own writes) holds it, the next
/// harvest returns the page, and it is sent again in the next round — or,
/// after the last pre-copy round, in the paused one, which takes the
/// union of the leftover set and a final harvest. That later copy travels
/// on the same channel (pages keep their channel), so it arrives after
/// this one and overwrites it. While the guest is paused nothing writes
/// guest memory, so the last copy of every page is exact.
#[allow(clippy::too_many_arguments)]
fn send_stripe(
    vm: &Vm,
    link: &mut Link,
    index: u16,
    channels: u16,
    set: &DirtyBitmap,
    skip_zero: bool,
    counters: &Counters,
    abort: &AtomicBool,
) -> Result<(), Error> {
    let mem = vm.memory();
    let die_after = super::die_after_pages();
    let mut batch = OutBatch::new();
    let mut scratch = vec![0u8; PAGE_SIZE];
    for gpa in set.pages() {
        let gpa = gpa.0;
        if channels > 1 && wire::channel_of(gpa, channels) != index {
            continue;
        }
        // Page-aligned addresses in page-aligned regions: a page whose
        // start is in RAM lies wholly in one region.
        let page = mem
            .get_slice(GuestAddress(gpa), PAGE_SIZE)
            .map_err(|e| Error::Protocol(format!("cannot read guest page {gpa:#x}: {e}")))?;
        if page_is_zero(&page, &mut scratch) {
            counters.zero.fetch_add(1, Ordering::Relaxed);
            if skip_zero {
                continue;
            }
            batch.head.push(gpa, true);
        } else {
            counters.pages.fetch_add(1, Ordering::Relaxed);
            batch.head.push(gpa, false);
            batch.add_data(page.ptr_guard().as_ptr());
        }
        if batch.head.is_full() {
            if abort.load(Ordering::Relaxed) {
                return Err(Error::Protocol("another channel failed".into()));
            }
            flush(&mut batch, link, counters, abort, die_after)?;
        }
    }
    flush(&mut batch, link, counters, abort, die_after)
}

/// Whether the guest page `page` reads as all zeros now. A page with data
/// nearly always has a non-zero first word, which settles it without
/// reading on; otherwise the page is copied into `scratch` and checked
/// whole.
fn page_is_zero<B: BitmapSlice>(page: &VolatileSlice<'_, B>, scratch: &mut [u8]) -> bool {
    if page.get_ref::<u64>(0).is_ok_and(|w| w.load() != 0) {
        return false;
    }
    page.copy_to(scratch) == PAGE_SIZE && wire::is_zero(scratch)
}

/// A batch on its way out: its `MigPages` head and where the contents of
/// its pages with data are in guest memory, adjacent pages merged into one
/// buffer.
struct OutBatch {
    head: wire::PagesHead,
    /// Guest memory, in the order of the head's entries with data.
    iov: Vec<libc::iovec>,
}

impl OutBatch {
    fn new() -> Self {
        OutBatch {
            head: wire::PagesHead::new(),
            iov: Vec::with_capacity(wire::MAX_BATCH),
        }
    }

    /// Appends the page at `ptr` (one page of guest memory) to the data.
    fn add_data(&mut self, ptr: *const u8) {
        if let Some(last) = self.iov.last_mut()
            && last.iov_base.cast::<u8>().wrapping_add(last.iov_len) == ptr.cast_mut()
        {
            last.iov_len += PAGE_SIZE;
            return;
        }
        self.iov.push(libc::iovec {
            iov_base: ptr.cast_mut().cast(),
            iov_len: PAGE_SIZE,
        });
    }

    fn clear(&mut self) {
        self.head.clear();
        self.iov.clear();
    }
}

/// Sends `batch` (if it holds any page) and empties it: the `MigPages`
/// frame with its entries, then the pages' contents from guest memory.
fn flush(
    batch: &mut OutBatch,
    link: &mut Link,
    counters: &Counters,
    abort: &AtomicBool,
    die_after: Option<u64>,
) -> Result<(), Error> {
    if batch.head.is_empty() {
        return Ok(());
    }
    let data = batch.head.data_pages() * PAGE_SIZE;
    let payload = batch.head.finish();
    let head_bytes = payload.len() + crate::frame::HEADER_LEN;
    let sent = link
        .send(MsgType::MigPages, payload)
        .and_then(|()| {
            // SAFETY: every iovec covers whole pages of guest RAM, each
            // from a `get_slice` of one page (adjacent ones merged within
            // a region's mapping), which the VM keeps mapped while it
            // lives, longer than this call. `writev` only reads that
            // memory, and no Rust reference to it exists: the guest may
            // write it meanwhile, which at worst sends bytes that a later
            // round replaces (see `send_stripe`).
            unsafe { crate::pageio::write_from_iovecs(link, &mut batch.iov) }
        })
        .map_err(link_err("page transfer"));
    batch.clear();
    if sent.is_err() {
        abort.store(true, Ordering::SeqCst);
    }
    sent?;
    counters
        .bytes
        .fetch_add((head_bytes + data) as u64, Ordering::Relaxed);
    let (pages, zero, _) = counters.get();
    super::maybe_die(die_after, pages + zero);
    Ok(())
}

/// A page-sending thread that could not start (with why) or panicked.
fn thread_failed(start: Option<std::io::Error>) -> Error {
    match start {
        Some(e) => Error::Thread(e),
        None => Error::Protocol("a channel thread panicked".into()),
    }
}
