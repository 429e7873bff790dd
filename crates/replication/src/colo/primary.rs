//! The primary's side of COLO checkpointing.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm::Vm;
use vmm::memory::DirtyBitmap;

use super::wire::{self, RoundAck, SvmDirty};
use super::{
    CheckpointInfo, ColoRole, Corrupt, Error, Handle, Params, PauseSplit, State, Trigger, link_err,
    ms, vm_err,
};
use crate::frame::{HEADER_LEN, MsgType};
use crate::handshake::{self, HandshakeConfig, Role};
use crate::link::{Link, LinkConfig};
use crate::migration::wire::{PAGE_SIZE, PagesBuilder, channel_of};

/// Bandwidth assumed until a sync round has moved enough to measure it.
const ASSUMED_BANDWIDTH: f64 = 100e6;
/// The initial sync ends when the pages left would take this long.
const SYNC_BUDGET: Duration = Duration::from_millis(3);
/// Most rounds of initial sync before the first checkpoint is taken anyway.
const MAX_SYNC_ROUNDS: u32 = 30;

/// Page and byte counts shared by the channel threads.
#[derive(Default)]
struct Counters {
    pages: AtomicU64,
    bytes: AtomicU64,
}

impl Counters {
    fn get(&self) -> (u64, u64) {
        (
            self.pages.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        )
    }
}

/// Protects `vm` with the secondary at `peer` until `handle` is stopped:
/// connects (retrying every [`Params::retry_interval`]), brings the
/// secondary up by live pre-copy while the guest runs, then checkpoints.
/// When the secondary is lost the guest goes on unprotected (state
/// degraded) and the primary tries to reach a secondary again. Never
/// pauses the guest for longer than one checkpoint.
pub fn run_primary(vm: &Vm, peer: &str, params: &Params, handle: &Handle) {
    super::realtime_thread();
    let mut was_protected = false;
    let mut reported_connect_error = false;
    while !handle.stopped() {
        let result = Session::open(vm, peer, params, handle).and_then(|mut s| {
            reported_connect_error = false;
            let r = s.run(&mut was_protected);
            if handle.stopped() {
                // The VM ended (a step it was in may have failed because
                // of it): an orderly end, and the secondary's VM ends too.
                s.close(None);
                return Ok(());
            }
            s.close(r.as_ref().err());
            r
        });
        match result {
            Ok(()) => break,
            Err(e) => {
                let text = crate::error_text(&e);
                handle.fail_requests(&text);
                let quiet = matches!(e, Error::Connect { .. });
                if !quiet || !reported_connect_error {
                    tracing::warn!("replication to {peer}: {text}");
                }
                reported_connect_error |= quiet;
                handle.update(|s| s.last_error = Some(text));
                handle.set_state(if was_protected {
                    State::Degraded
                } else {
                    State::Connecting
                });
            }
        }
        handle.fail_requests("the pair is not protected");
        handle.sleep_until(Instant::now() + params.retry_interval);
    }
    handle.fail_requests("replication was stopped");
    handle.set_state(State::Stopped);
}

fn link_config(params: &Params) -> LinkConfig {
    LinkConfig {
        read_timeout: Some(params.io_timeout),
        write_timeout: Some(params.io_timeout),
        ..LinkConfig::default()
    }
}

/// One connection to a secondary, from setup to loss.
struct Session<'a> {
    vm: &'a Vm,
    params: &'a Params,
    handle: &'a Handle,
    /// Channel 0 is the control channel; all carry pages.
    links: Vec<Link>,
    counters: Counters,
    /// Set by a failing channel so that the others stop early.
    abort: AtomicBool,
    /// Checkpoints completed.
    epoch: u64,
    /// Rounds of pages sent (background and checkpoint).
    round: u64,
    /// Pages to send in the next round besides what the guest dirtied:
    /// those the secondary reported dirty (checked to lie in guest RAM),
    /// or a round's pages held back for the checkpoint. A list, not a
    /// bitmap, so that what the pause does with it costs in proportion to
    /// its length rather than to the size of guest RAM; it may repeat a
    /// page.
    pending: Vec<u64>,
    /// Pages sent since the last checkpoint: what the secondary stages.
    staged: DirtyBitmap,
    /// This epoch's background figures.
    epoch_bg_pages: u64,
    epoch_bg_bytes: u64,
    epoch_svm_pages: u64,
    staging_limit: u64,
    die: Option<(u64, u64)>,
    corrupt: Option<(Corrupt, u64)>,
    /// Verify mode: the digest of the checkpoint in progress.
    last_digest: Option<String>,
    /// Test hook: the page left out of a checkpoint, kept out of the
    /// secondary's report too.
    skipped: Option<u64>,
}

impl<'a> Session<'a> {
    /// Connects every channel and asks the secondary to protect this VM.
    fn open(vm: &'a Vm, peer: &str, params: &'a Params, handle: &'a Handle) -> Result<Self, Error> {
        params.check()?;
        let connect = || -> Result<Link, Error> {
            let mut link = Link::connect(peer, params.connect_timeout, link_config(params))
                .map_err(|source| Error::Connect {
                    addr: peer.to_string(),
                    source,
                })?;
            let mut hs = HandshakeConfig::new(Role::Primary, vm.identity().0);
            hs.expect_peer_vm = None;
            hs.auth_key = params.auth_key.clone();
            hs.timeout = params.connect_timeout;
            handshake::client(&mut link, &hs).map_err(Error::Handshake)?;
            Ok(link)
        };
        let mut control = connect()?;
        let mut session = [0u8; 16];
        getrandom::fill(&mut session)
            .map_err(|e| Error::Thread(std::io::Error::other(e.to_string())))?;
        let begin = wire::Begin {
            session,
            channels: params.channels,
            flags: if params.verify { wire::BEGIN_VERIFY } else { 0 },
            fingerprint: vm.fingerprint(),
        };
        control
            .send(MsgType::ColoBegin, &begin.encode())
            .map_err(link_err("setup"))?;
        let reply = control.recv().map_err(link_err("setup"))?;
        match reply.msg_type() {
            MsgType::ColoReady => wire::decode_empty("ColoReady", &reply.payload)
                .map_err(|e| Error::Protocol(e.to_string()))?,
            MsgType::ColoAbort => {
                return Err(Error::PeerAborted(wire::decode_abort(&reply.payload)));
            }
            other => {
                return Err(Error::Protocol(format!(
                    "expected ColoReady, got {other:?}"
                )));
            }
        }
        let mut links = vec![control];
        for index in 1..params.channels {
            let mut link = connect()?;
            link.send(MsgType::ColoJoin, &wire::Join { session, index }.encode())
                .map_err(link_err("channel setup"))?;
            links.push(link);
        }
        let empty = vm
            .populated_pages()
            .map_err(vm_err("list guest pages"))?
            .empty_like();
        let ram: u64 = vm.fingerprint().memory_bytes;
        let staging_limit = if params.staging_limit == 0 {
            (ram / 8).max(8 << 20)
        } else {
            params.staging_limit
        };
        tracing::info!(peer, channels = params.channels, "replication link up");
        handle.update(|s| {
            s.peer = peer.to_string();
            s.checkpoints = 0;
            s.last_error = None;
        });
        Ok(Session {
            vm,
            params,
            handle,
            links,
            counters: Counters::default(),
            abort: AtomicBool::new(false),
            epoch: 0,
            round: 0,
            pending: Vec::new(),
            staged: empty,
            epoch_bg_pages: 0,
            epoch_bg_bytes: 0,
            epoch_svm_pages: 0,
            staging_limit,
            die: super::die_hook(ColoRole::Primary),
            corrupt: super::corrupt_hook(),
            last_digest: None,
            skipped: None,
        })
    }

    /// Initial sync, then checkpoints until stopped or lost.
    fn run(&mut self, was_protected: &mut bool) -> Result<(), Error> {
        self.handle.set_state(State::Syncing);
        self.sync()?;
        *was_protected = true;
        self.handle.set_state(State::Protected);
        self.protect()
    }

    /// Says goodbye (or why not) on a link that may still work.
    fn close(&mut self, error: Option<&Error>) {
        if let Some(control) = self.links.first_mut() {
            let _ = match error {
                Some(e) => control.send(
                    MsgType::ColoAbort,
                    &wire::encode_abort(&crate::error_text(e)),
                ),
                None => control.send(MsgType::Goodbye, &[]),
            };
        }
        for l in &self.links {
            let _ = l.stream().shutdown(std::net::Shutdown::Both);
        }
    }

    /// Brings the secondary up while the guest runs: pre-copy rounds
    /// until what is left is small, then the first checkpoint.
    fn sync(&mut self) -> Result<(), Error> {
        let vm = self.vm;
        vm.take_dirty().map_err(vm_err("start dirty tracking"))?;
        let mut set = vm.populated_pages().map_err(vm_err("list guest pages"))?;
        let mut bandwidth = ASSUMED_BANDWIDTH;
        for n in 1..=MAX_SYNC_ROUNDS {
            let t = Instant::now();
            let (_, before) = self.counters.get();
            // The secondary's RAM starts zeroed: the first round skips
            // zero pages.
            self.send_pages(PageSet::Bitmap(&set), n == 1, false)?;
            self.end_round()?;
            let (_, after) = self.counters.get();
            let moved = after - before;
            if moved >= 1 << 20 {
                bandwidth = moved as f64 / t.elapsed().as_secs_f64().max(1e-6);
            }
            self.handle.update(|s| {
                s.background_rounds += 1;
                s.background_bytes += moved;
            });
            set = vm.take_dirty().map_err(vm_err("read the dirty log"))?;
            let estimate = set.count() as f64 * (PAGE_SIZE + 8) as f64 / bandwidth;
            tracing::debug!(round = n, dirty = set.count(), estimate, "sync round");
            if estimate <= SYNC_BUDGET.as_secs_f64() {
                break;
            }
        }
        self.pending.extend(set.pages().map(|gpa| gpa.0));
        self.staged.clear();
        let info = self.checkpoint(Trigger::Sync)?;
        tracing::info!(
            pause_ms = info.pause_ms,
            "the secondary is in step: the VM is protected"
        );
        Ok(())
    }

    /// Background rounds and checkpoints until stopped.
    fn protect(&mut self) -> Result<(), Error> {
        let interval = self.params.interval;
        let round_interval = self.params.round_interval();
        let mut next_checkpoint = Instant::now() + interval;
        let mut next_round = Instant::now() + round_interval;
        loop {
            if self.handle.stopped() {
                return Ok(());
            }
            if let Some(req) = self.handle.next_request() {
                let r = self.last_round_then_checkpoint(req.trigger);
                req.finish(
                    r.as_ref()
                        .map(Clone::clone)
                        .map_err(|e| crate::error_text(e)),
                );
                r?;
                next_checkpoint = Instant::now() + interval;
                continue;
            }
            let now = Instant::now();
            if now >= next_checkpoint {
                self.last_round_then_checkpoint(Trigger::Interval)?;
                next_checkpoint = Instant::now() + interval;
                next_round = Instant::now() + round_interval;
                continue;
            }
            if now >= next_round {
                if !self.background_round()? {
                    self.checkpoint(Trigger::StagingFull)?;
                    next_checkpoint = Instant::now() + interval;
                }
                next_round = Instant::now() + round_interval;
                continue;
            }
            self.handle.sleep_until(next_checkpoint.min(next_round));
        }
    }

    /// A checkpoint right after one more background round: the pause then
    /// carries only what was dirtied while that round was on the wire,
    /// however long ago the previous round was.
    fn last_round_then_checkpoint(&mut self, trigger: Trigger) -> Result<CheckpointInfo, Error> {
        let trigger = if self.background_round()? {
            trigger
        } else {
            Trigger::StagingFull
        };
        self.checkpoint(trigger)
    }

    /// Sends what the guest dirtied since the last round and what the
    /// secondary reported, and learns what the secondary's guest dirtied.
    ///
    /// Returns `false`, sending nothing, if the round would take the
    /// secondary's staging area past its limit: its pages then wait for
    /// the checkpoint the caller takes at once.
    fn background_round(&mut self) -> Result<bool, Error> {
        let mut set = self.vm.take_dirty().map_err(vm_err("read the dirty log"))?;
        for &gpa in &self.pending {
            set.insert(GuestAddress(gpa));
        }
        if set.union_count(&self.staged) as u64 * PAGE_SIZE as u64 > self.staging_limit {
            self.pending = set.pages().map(|gpa| gpa.0).collect();
            return Ok(false);
        }
        self.pending.clear();
        let (p0, b0) = self.counters.get();
        self.send_pages(PageSet::Bitmap(&set), false, false)?;
        let ack = self.end_round()?;
        let (p1, b1) = self.counters.get();
        self.staged.union_with(&set);
        self.take_report(&ack.dirty)?;
        self.epoch_bg_pages += p1 - p0;
        self.epoch_bg_bytes += b1 - b0;
        self.handle.update(|s| {
            s.background_rounds += 1;
            s.background_pages += p1 - p0;
            s.background_bytes += b1 - b0;
            s.staging_bytes = ack.staged_bytes;
            s.staging_peak_bytes = s.staging_peak_bytes.max(ack.staged_bytes);
        });
        Ok(true)
    }

    /// Adds pages the secondary reported to those to send next.
    fn take_report(&mut self, pages: &[u64]) -> Result<(), Error> {
        for &gpa in pages {
            if gpa % PAGE_SIZE as u64 != 0 || !self.staged.covers(GuestAddress(gpa)) {
                return Err(Error::Protocol(format!(
                    "the secondary reported page {gpa:#x}, outside guest RAM"
                )));
            }
        }
        self.pending.extend_from_slice(pages);
        self.epoch_svm_pages += pages.len() as u64;
        Ok(())
    }

    /// Ends a round on every channel; returns the secondary's
    /// acknowledgement.
    fn end_round(&mut self) -> Result<RoundAck, Error> {
        self.round += 1;
        self.mark_round_end()?;
        let b = self.expect(MsgType::ColoRoundAck, "a background round")?;
        let ack = RoundAck::decode(&b).map_err(|e| Error::Protocol(e.to_string()))?;
        if ack.round != self.round {
            return Err(Error::Protocol(format!(
                "the secondary acknowledged round {}, not {}",
                ack.round, self.round
            )));
        }
        Ok(ack)
    }

    /// Sends the end marker of the current round on every channel.
    fn mark_round_end(&mut self) -> Result<(), Error> {
        let marker = wire::encode_u64s(&[self.round, self.epoch + 1]);
        for link in self.links.iter_mut().rev() {
            link.send(MsgType::ColoRoundEnd, &marker)
                .map_err(link_err("a round of pages"))?;
        }
        self.counters.bytes.fetch_add(
            (self.links.len() * (HEADER_LEN + 16)) as u64,
            Ordering::Relaxed,
        );
        Ok(())
    }

    /// Receives the next control message, which must be `want`.
    fn expect(&mut self, want: MsgType, during: &'static str) -> Result<Vec<u8>, Error> {
        let f = self.links[0].recv().map_err(link_err(during))?;
        match f.msg_type() {
            t if t == want => Ok(f.payload),
            MsgType::ColoAbort => Err(Error::PeerAborted(wire::decode_abort(&f.payload))),
            other => Err(Error::Protocol(format!(
                "expected {want:?} during {during}, got {other:?}"
            ))),
        }
    }

    /// Takes one checkpoint; the guest is paused only inside it. On any
    /// failure the guest is resumed and the error returned.
    fn checkpoint(&mut self, trigger: Trigger) -> Result<CheckpointInfo, Error> {
        let vm = self.vm;
        let epoch = self.epoch + 1;
        let mut info = CheckpointInfo {
            epoch,
            trigger: Some(trigger),
            background_pages: self.epoch_bg_pages,
            background_bytes: self.epoch_bg_bytes,
            ..CheckpointInfo::default()
        };
        // The secondary pauses while this side does.
        self.links[0]
            .send(MsgType::ColoPause, &wire::encode_u64s(&[epoch]))
            .map_err(link_err("a checkpoint"))?;
        let paused_at = Instant::now();
        vm.pause().map_err(vm_err("pause the VM"))?;
        info.split.vcpu_stop_ms = ms(paused_at.elapsed());
        let result = self.paused_part(epoch, &mut info.split);
        let t = Instant::now();
        let resumed = vm.resume().map_err(vm_err("resume the VM"));
        info.split.resume_ms = ms(t.elapsed());
        info.pause_ms = ms(paused_at.elapsed());
        let (pages, bytes, state_bytes) = result?;
        resumed?;
        info.pages_in_pause = pages;
        info.bytes_in_pause = bytes;
        info.state_bytes = state_bytes;

        // The guest runs again; the secondary applies the checkpoint.
        let b = self.expect(MsgType::ColoLoaded, "a checkpoint")?;
        let loaded = wire::Loaded::decode(&b).map_err(|e| Error::Protocol(e.to_string()))?;
        if loaded.epoch != epoch {
            return Err(Error::Protocol(format!(
                "the secondary loaded checkpoint {}, not {epoch}",
                loaded.epoch
            )));
        }
        info.apply_ms = loaded.apply_us as f64 / 1000.0;
        info.load_ms = loaded.load_us as f64 / 1000.0;
        info.staged_pages = loaded.staged_pages;
        info.secondary_rss_bytes = loaded.rss_bytes;
        info.secondary_dirty_pages = self.epoch_svm_pages;
        if self.params.verify {
            info.digest = self.last_digest.take();
        }
        self.epoch = epoch;
        self.staged.clear();
        self.epoch_bg_pages = 0;
        self.epoch_bg_bytes = 0;
        self.epoch_svm_pages = 0;
        self.handle.record(&info);
        tracing::debug!(
            epoch,
            pause_ms = info.pause_ms,
            pages = info.pages_in_pause,
            "checkpoint"
        );
        Ok(info)
    }

    /// The part of a checkpoint inside the pause: residual pages, the
    /// secondary's dirty pages, state, acknowledgement of receipt. Returns
    /// pages sent, bytes sent and the state's size.
    fn paused_part(
        &mut self,
        epoch: u64,
        split: &mut PauseSplit,
    ) -> Result<(u64, u64, u64), Error> {
        let vm = self.vm;
        let (p0, b0) = self.counters.get();
        let t = Instant::now();
        let mut residual = vm.take_dirty().map_err(vm_err("read the dirty log"))?;
        for &gpa in &self.pending {
            residual.insert(GuestAddress(gpa));
        }
        self.pending.clear();
        split.dirty_log_ms = ms(t.elapsed());
        self.skipped = None;
        if let Some((Corrupt::SkipPage, from)) = self.corrupt
            && epoch >= from
            // The highest page: low ones may be rewritten with what they
            // held.
            && let Some(gpa) = residual.pages().last()
        {
            residual.remove(gpa);
            self.skipped = Some(gpa.0);
            tracing::error!("{}: leaving page {:#x} out", super::CORRUPT_ENV, gpa.0);
        }

        let t = Instant::now();
        self.send_pages(PageSet::Bitmap(&residual), false, true)?;
        let send1 = t.elapsed();
        let t = Instant::now();
        let b = self.expect(MsgType::ColoSvmDirty, "a checkpoint")?;
        split.svm_report_wait_ms = ms(t.elapsed());
        let report = SvmDirty::decode(&b).map_err(|e| Error::Protocol(e.to_string()))?;
        if report.epoch != epoch {
            return Err(Error::Protocol(format!(
                "the secondary reported for checkpoint {}, not {epoch}",
                report.epoch
            )));
        }
        let svm: Vec<u64> = report
            .dirty
            .into_iter()
            .filter(|&p| Some(p) != self.skipped)
            .collect();
        self.take_report(&svm)?;
        // What the secondary reported and the residual did not carry, in
        // ascending order (as every page batch is), once each.
        let t = Instant::now();
        let mut extra = std::mem::take(&mut self.pending);
        extra.retain(|&gpa| !residual.contains(GuestAddress(gpa)));
        extra.sort_unstable();
        extra.dedup();
        self.send_pages(PageSet::List(&extra), false, true)?;
        self.round += 1;
        self.mark_round_end()?;
        split.page_send_ms = ms(send1 + t.elapsed());

        let t = Instant::now();
        let state = vm.save_state_bytes().map_err(vm_err("save the VM state"))?;
        let digest = if self.params.verify {
            let d = vm.page_digest().map_err(vm_err("compute the digest"))?;
            self.last_digest = Some(d.hex());
            Some(postcard::to_allocvec(&d).map_err(|e| Error::Protocol(e.to_string()))?)
        } else {
            None
        };
        let msg = wire::StateMsg::encode(epoch, self.round, digest.as_deref(), &state);
        split.state_save_ms = ms(t.elapsed());

        let t = Instant::now();
        self.links[0]
            .send(MsgType::ColoState, &msg)
            .map_err(link_err("a checkpoint"))?;
        self.counters
            .bytes
            .fetch_add((msg.len() + HEADER_LEN) as u64, Ordering::Relaxed);
        let b = self.expect(MsgType::ColoReceived, "a checkpoint")?;
        let [got] = wire::decode_u64s::<1>("ColoReceived", &b)
            .map_err(|e| Error::Protocol(e.to_string()))?;
        if got != epoch {
            return Err(Error::Protocol(format!(
                "the secondary received checkpoint {got}, not {epoch}"
            )));
        }
        split.ack_wait_ms = ms(t.elapsed());
        let (p1, b1) = self.counters.get();
        Ok((p1 - p0, b1 - b0, state.len() as u64))
    }

    /// Sends the pages in `set`, each on its channel, the channels in
    /// parallel. With `skip_zero`, zero pages are not sent at all.
    /// `in_pause` arms the test hooks.
    fn send_pages(
        &mut self,
        set: PageSet<'_>,
        skip_zero: bool,
        in_pause: bool,
    ) -> Result<(), Error> {
        let channels = self.links.len() as u16;
        let epoch = self.epoch + 1;
        let hooks = Hooks {
            die: self.die.filter(|_| in_pause),
            corrupt: self
                .corrupt
                .filter(|(k, e)| in_pause && *e == epoch && *k != Corrupt::SkipPage),
            epoch,
            base: self.counters.get().0,
        };
        // A hook for 0 pages fires before anything is sent, even when
        // there is nothing to send.
        super::maybe_die(hooks.die, epoch, 0);
        let vm = self.vm;
        let counters = &self.counters;
        let abort = &self.abort;
        crate::pageio::on_every_channel(
            &mut self.links,
            "colo-tx",
            abort,
            thread_failed,
            |i, link| {
                if channels > 1 {
                    // A thread of its own: the pause waits for it too.
                    super::realtime_thread();
                }
                send_stripe(
                    vm, link, i as u16, channels, set, skip_zero, counters, abort, &hooks,
                )
            },
        )
    }
}

/// Pages to send, in ascending order: a bitmap, or a sorted list without
/// repeats.
#[derive(Clone, Copy)]
enum PageSet<'s> {
    Bitmap(&'s DirtyBitmap),
    List(&'s [u64]),
}

impl PageSet<'_> {
    /// The pages' guest addresses, lowest first.
    fn iter(&self) -> Box<dyn Iterator<Item = u64> + '_> {
        match self {
            PageSet::Bitmap(b) => Box::new(b.pages().map(|gpa| gpa.0)),
            PageSet::List(l) => Box::new(l.iter().copied()),
        }
    }
}

/// The test hooks in force for one `send_pages`.
struct Hooks {
    die: Option<(u64, u64)>,
    corrupt: Option<(Corrupt, u64)>,
    epoch: u64,
    /// Pages sent before this call.
    base: u64,
}

/// Sends the pages of `set` that belong to channel `index` of `channels`.
#[allow(clippy::too_many_arguments)]
fn send_stripe(
    vm: &Vm,
    link: &mut Link,
    index: u16,
    channels: u16,
    set: PageSet<'_>,
    skip_zero: bool,
    counters: &Counters,
    abort: &AtomicBool,
    hooks: &Hooks,
) -> Result<(), Error> {
    let mem = vm.memory();
    let mut batch = PagesBuilder::new();
    if let Some((kind, _)) = hooks.corrupt
        && index == 0
    {
        corrupt_batch(link, kind)?;
    }
    let flush = |batch: &mut PagesBuilder, link: &mut Link| -> Result<(), Error> {
        if batch.is_empty() {
            return Ok(());
        }
        let payload = batch.finish();
        let r = link
            .send(MsgType::ColoPages, payload)
            .map_err(link_err("page transfer"));
        if r.is_err() {
            abort.store(true, Ordering::SeqCst);
        }
        r?;
        counters
            .bytes
            .fetch_add((payload.len() + HEADER_LEN) as u64, Ordering::Relaxed);
        let (pages, _) = counters.get();
        super::maybe_die(hooks.die, hooks.epoch, pages - hooks.base);
        Ok(())
    };
    for gpa in set.iter() {
        if channels > 1 && channel_of(gpa, channels) != index {
            continue;
        }
        let page = batch.next_page();
        mem.read_slice(page, GuestAddress(gpa))
            .map_err(|e| Error::Memory(format!("cannot read guest page {gpa:#x}: {e}")))?;
        batch.commit(gpa, skip_zero);
        counters.pages.fetch_add(1, Ordering::Relaxed);
        if batch.is_full() {
            if abort.load(Ordering::Relaxed) {
                return Err(Error::Protocol("another channel failed".into()));
            }
            flush(&mut batch, link)?;
        }
    }
    flush(&mut batch, link)
}

/// Test hook ([`super::CORRUPT_ENV`]): sends one bad page batch.
fn corrupt_batch(link: &mut Link, kind: Corrupt) -> Result<(), Error> {
    tracing::error!(
        "{}: sending a bad page batch ({kind:?})",
        super::CORRUPT_ENV
    );
    let mut batch = PagesBuilder::new();
    let page = batch.next_page();
    page.fill(0xa5);
    match kind {
        // Not a batch: `paused_part` leaves the page out.
        Corrupt::SkipPage => Ok(()),
        Corrupt::PageOutsideRam => {
            batch.commit(1 << 40, false);
            link.send(MsgType::ColoPages, batch.finish())
        }
        Corrupt::Truncated => {
            batch.commit(0, false);
            let payload = batch.finish();
            // Half the page's data, then the connection ends.
            link.send_truncated_for_tests(MsgType::ColoPages, payload, payload.len() - 2048)
        }
    }
    .map_err(link_err("page transfer"))
}

/// A page-sending thread that could not start (with why) or panicked.
fn thread_failed(start: Option<std::io::Error>) -> Error {
    match start {
        Some(e) => Error::Thread(e),
        None => Error::Protocol("a channel thread panicked".into()),
    }
}
