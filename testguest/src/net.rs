//! The guest's network services on a smoltcp interface: TCP echo (port 7),
//! TCP discard (port 9) and source (port 19) for one-way throughput, a TCP
//! request/response counter (port 8000), a UDP request/response counter
//! (port 8001); ICMP echo and ARP are answered by smoltcp itself.
//!
//! Determinism: the same input frames give the same output frames. The
//! stack's random seed (which picks TCP initial sequence numbers) is fixed;
//! TCP timestamps, delayed ACKs and Nagle's algorithm are off; and every
//! received frame is processed on its own — ingress, then the services, then
//! egress — so the frames sent in reply do not depend on how many frames
//! arrived between two polls. Time only drives timers (retransmission,
//! ARP-cache expiry), never frame content.

use smoltcp::iface::{Config as IfaceConfig, Interface, PollIngressSingleResult, PollResult};
use smoltcp::iface::{SocketHandle, SocketSet, SocketStorage};
use smoltcp::phy::Device;
use smoltcp::socket::{tcp, udp};
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, IpCidr, Ipv4Address};

use crate::config::Ipv4Cidr;
use crate::fmt::Sink;
use crate::workload::{SEED, Xorshift64};

/// TCP echo port.
pub const ECHO_PORT: u16 = 7;
/// TCP request/response counter port.
pub const TCP_COUNTER_PORT: u16 = 8000;
/// UDP request/response counter port.
pub const UDP_COUNTER_PORT: u16 = 8001;
/// TCP discard port: everything received is dropped.
pub const DISCARD_PORT: u16 = 9;
/// TCP source port: sends the number of bytes the client asks for.
pub const SOURCE_PORT: u16 = 19;

/// Concurrent TCP echo connections.
pub const ECHO_SOCKETS: usize = 8;
/// Concurrent TCP counter connections.
pub const COUNTER_SOCKETS: usize = 4;
/// Concurrent TCP discard connections.
pub const DISCARD_SOCKETS: usize = 2;
/// Concurrent TCP source connections.
pub const SOURCE_SOCKETS: usize = 2;
/// Sockets in the socket set: echo, counter, one UDP, discard, source (the
/// last two added after the others, which keeps the handles and order of
/// the older services).
pub const SOCKETS: usize = ECHO_SOCKETS + COUNTER_SOCKETS + 1 + DISCARD_SOCKETS + SOURCE_SOCKETS;

/// Receive and send buffer of each echo socket (the receive buffer is the
/// advertised window).
pub const ECHO_BUFFER: usize = 8 * 1024;
/// Receive and send buffer of each counter socket.
pub const COUNTER_BUFFER: usize = 1024;
/// UDP payload buffer, each direction, and datagrams queued.
pub const UDP_BUFFER: usize = 2048;
pub const UDP_PACKETS: usize = 8;

/// The buffer of a discard socket's receiving side and of a source
/// socket's sending side (the direction that carries the data).
pub const BULK_BUFFER: usize = 8 * 1024;
/// The buffer of the other side of a discard or source socket.
pub const BULK_SMALL_BUFFER: usize = 64;

/// Bytes of buffer memory [`NetStack::new`] needs.
pub const ARENA_BYTES: usize = ECHO_SOCKETS * 2 * ECHO_BUFFER
    + COUNTER_SOCKETS * 2 * COUNTER_BUFFER
    + 2 * UDP_BUFFER
    + (DISCARD_SOCKETS + SOURCE_SOCKETS) * (BULK_BUFFER + BULK_SMALL_BUFFER);

/// The stack's random seed: fixed, so that two guests choose the same TCP
/// initial sequence numbers.
pub const RANDOM_SEED: u64 = 0x7477_696e_766d_0001;

/// Longest counter request line kept (longer lines get `error`).
pub const REQUEST_MAX: usize = 32;
/// Longest counter reply: two 20-digit numbers, a space and `\n`.
pub const REPLY_MAX: usize = 42;

/// Bytes copied from an echo socket's receive buffer per step.
const ECHO_CHUNK: usize = 2048;
/// Bound on egress rounds per poll (each sends at most one frame per socket).
const EGRESS_ROUNDS: usize = 64;
/// Bound on lines served per counter socket per poll.
const LINES_PER_POLL: usize = 64;

/// Counts of what the services did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Bytes echoed on port 7.
    pub echo_bytes: u64,
    /// Requests answered on TCP port 8000 (valid ones, counted).
    pub tcp_requests: u64,
    /// Requests answered on UDP port 8001 (valid ones, counted).
    pub udp_requests: u64,
    /// Bytes received and dropped on port 9.
    pub discard_bytes: u64,
    /// Bytes sent on port 19.
    pub source_bytes: u64,
}

/// The byte stream of the source service: successive outputs of xorshift64
/// seeded with [`SEED`], each as 8 little-endian bytes.
#[derive(Clone, Copy, Debug)]
pub struct ByteStream {
    rng: Xorshift64,
    word: [u8; 8],
    /// Bytes of `word` already handed out.
    used: usize,
}

impl Default for ByteStream {
    fn default() -> Self {
        Self::new()
    }
}

impl ByteStream {
    pub const fn new() -> Self {
        Self {
            rng: Xorshift64::new(SEED),
            word: [0; 8],
            used: 8,
        }
    }

    /// Fills `out` with the next bytes of the stream.
    pub fn fill(&mut self, out: &mut [u8]) {
        let mut start = 0;
        while self.used < 8 && start < out.len() {
            out[start] = self.word[self.used];
            self.used += 1;
            start += 1;
        }
        let mut words = out[start..].chunks_exact_mut(8);
        for chunk in &mut words {
            chunk.copy_from_slice(&self.rng.next_u64().to_le_bytes());
        }
        let tail = words.into_remainder();
        if !tail.is_empty() {
            self.word = self.rng.next_u64().to_le_bytes();
            let n = tail.len();
            tail.copy_from_slice(&self.word[..n]);
            self.used = n;
        }
    }
}

/// Where a source connection is.
#[derive(Clone, Copy, Debug)]
enum SourceState {
    /// Waiting for the request line.
    Request(LineAssembler),
    /// Sending: bytes still to send.
    Sending(u64, ByteStream),
    /// All sent (or the request was bad): the socket is closing.
    Closing,
}

/// A [`Sink`] over a byte buffer (excess bytes are dropped).
struct BufSink<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl Sink for BufSink<'_> {
    fn put(&mut self, byte: u8) {
        if let Some(slot) = self.buf.get_mut(self.len) {
            *slot = byte;
            self.len += 1;
        }
    }
}

/// The counter protocol: `request` is one request without its line end (a
/// TCP line or a UDP datagram). A decimal number `n` (surrounding ASCII
/// whitespace allowed, `n` < 2^64 - 1) is counted and answered with
/// `<n+1> <total>\n`, `total` being the number of valid requests this
/// service has answered, this one included; anything else is answered with
/// `error\n` and not counted. Returns the reply's length in `out`.
pub fn counter_reply(request: &[u8], total: &mut u64, out: &mut [u8; REPLY_MAX]) -> usize {
    let mut sink = BufSink { buf: out, len: 0 };
    match crate::config::parse_decimal(request.trim_ascii()) {
        Some(n) if n < u64::MAX => {
            *total += 1;
            sink.put_u64(n + 1);
            sink.put(b' ');
            sink.put_u64(*total);
            sink.put(b'\n');
        }
        _ => sink.put_str("error\n"),
    }
    sink.len
}

/// Gathers the bytes of one counter request line.
#[derive(Clone, Copy, Debug)]
pub struct LineAssembler {
    buf: [u8; REQUEST_MAX],
    len: usize,
    overflowed: bool,
}

impl Default for LineAssembler {
    fn default() -> Self {
        Self::new()
    }
}

impl LineAssembler {
    pub const fn new() -> Self {
        Self {
            buf: [0; REQUEST_MAX],
            len: 0,
            overflowed: false,
        }
    }

    /// Takes bytes of `data` up to and including the first `\n`. Returns
    /// how many it took and whether a line is complete.
    pub fn feed(&mut self, data: &[u8]) -> (usize, bool) {
        let (take, complete) = match data.iter().position(|&b| b == b'\n') {
            Some(nl) => (nl + 1, true),
            None => (data.len(), false),
        };
        let content = &data[..if complete { take - 1 } else { take }];
        let room = REQUEST_MAX - self.len;
        if content.len() > room {
            self.overflowed = true;
        }
        let keep = content.len().min(room);
        self.buf[self.len..self.len + keep].copy_from_slice(&content[..keep]);
        self.len += keep;
        (take, complete)
    }

    /// The finished line (an overlong line reads as a single byte that is no
    /// number, so it is answered with `error`).
    pub fn line(&self) -> &[u8] {
        if self.overflowed {
            b"-"
        } else {
            &self.buf[..self.len]
        }
    }

    pub fn clear(&mut self) {
        self.len = 0;
        self.overflowed = false;
    }
}

/// Network settings of the stack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetSettings {
    pub mac: [u8; 6],
    pub ip: Ipv4Cidr,
    pub gw: Option<[u8; 4]>,
}

/// Whether `mac` can be an interface's address (unicast, not all zero).
pub fn mac_is_usable(mac: [u8; 6]) -> bool {
    mac[0] & 1 == 0 && mac != [0; 6]
}

/// The memory a [`NetStack`] borrows: socket slots and UDP packet
/// metadata; the byte buffers come as one arena of [`ARENA_BYTES`].
pub struct NetMemory<'a> {
    pub sockets: [SocketStorage<'a>; SOCKETS],
    pub udp_rx_meta: [udp::PacketMetadata; UDP_PACKETS],
    pub udp_tx_meta: [udp::PacketMetadata; UDP_PACKETS],
}

impl NetMemory<'_> {
    pub const fn new() -> Self {
        Self {
            sockets: [SocketStorage::EMPTY; SOCKETS],
            udp_rx_meta: [udp::PacketMetadata::EMPTY; UDP_PACKETS],
            udp_tx_meta: [udp::PacketMetadata::EMPTY; UDP_PACKETS],
        }
    }
}

impl Default for NetMemory<'_> {
    fn default() -> Self {
        Self::new()
    }
}

/// The interface, its sockets and the services' state.
pub struct NetStack<'a> {
    iface: Interface,
    sockets: SocketSet<'a>,
    echo: [SocketHandle; ECHO_SOCKETS],
    counter: [SocketHandle; COUNTER_SOCKETS],
    lines: [LineAssembler; COUNTER_SOCKETS],
    udp: SocketHandle,
    discard: [SocketHandle; DISCARD_SOCKETS],
    source: [SocketHandle; SOURCE_SOCKETS],
    sources: [SourceState; SOURCE_SOCKETS],
    stats: NetStats,
    scratch: [u8; ECHO_CHUNK],
    /// When timers next need a poll (`None`: only on input).
    next_poll: Option<Instant>,
}

/// Splits `n` bytes off the front of `arena`.
fn take<'a>(arena: &mut &'a mut [u8], n: usize) -> &'a mut [u8] {
    let whole = core::mem::take(arena);
    let (head, tail) = whole.split_at_mut(n);
    *arena = tail;
    head
}

fn new_tcp_socket<'a>(arena: &mut &'a mut [u8], size: usize) -> tcp::Socket<'a> {
    new_tcp_socket_with(arena, size, size)
}

fn new_tcp_socket_with<'a>(
    arena: &mut &'a mut [u8],
    rx_size: usize,
    tx_size: usize,
) -> tcp::Socket<'a> {
    let rx = take(arena, rx_size);
    let tx = take(arena, tx_size);
    let mut socket = tcp::Socket::new(tcp::SocketBuffer::new(rx), tcp::SocketBuffer::new(tx));
    socket.set_ack_delay(None);
    socket.set_nagle_enabled(false);
    socket
}

impl<'a> NetStack<'a> {
    /// Sets up the interface on `device` and the listening sockets.
    /// `arena` must hold at least [`ARENA_BYTES`] (its content does not
    /// matter). Panics if `settings.mac` is not [`mac_is_usable`].
    pub fn new<D: Device + ?Sized>(
        settings: &NetSettings,
        device: &mut D,
        memory: &'a mut NetMemory<'a>,
        mut arena: &'a mut [u8],
        now: Instant,
    ) -> Self {
        let mut config = IfaceConfig::new(EthernetAddress(settings.mac).into());
        config.random_seed = RANDOM_SEED;
        let mut iface = Interface::new(config, device, now);
        let [a, b, c, d] = settings.ip.addr;
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(
                Ipv4Address::new(a, b, c, d).into(),
                settings.ip.prefix,
            ));
        });
        if let Some([a, b, c, d]) = settings.gw {
            let _ = iface
                .routes_mut()
                .add_default_ipv4_route(Ipv4Address::new(a, b, c, d));
        }

        let NetMemory {
            sockets: storage,
            udp_rx_meta,
            udp_tx_meta,
        } = memory;
        let mut sockets = SocketSet::new(&mut storage[..]);
        let echo = core::array::from_fn(|_| sockets.add(new_tcp_socket(&mut arena, ECHO_BUFFER)));
        let counter =
            core::array::from_fn(|_| sockets.add(new_tcp_socket(&mut arena, COUNTER_BUFFER)));
        let udp_rx = take(&mut arena, UDP_BUFFER);
        let udp_tx = take(&mut arena, UDP_BUFFER);
        let mut udp_socket = udp::Socket::new(
            udp::PacketBuffer::new(&mut udp_rx_meta[..], udp_rx),
            udp::PacketBuffer::new(&mut udp_tx_meta[..], udp_tx),
        );
        let _ = udp_socket.bind(UDP_COUNTER_PORT);
        let udp = sockets.add(udp_socket);
        let discard = core::array::from_fn(|_| {
            sockets.add(new_tcp_socket_with(
                &mut arena,
                BULK_BUFFER,
                BULK_SMALL_BUFFER,
            ))
        });
        let source = core::array::from_fn(|_| {
            sockets.add(new_tcp_socket_with(
                &mut arena,
                BULK_SMALL_BUFFER,
                BULK_BUFFER,
            ))
        });

        let mut stack = Self {
            iface,
            sockets,
            echo,
            counter,
            lines: [LineAssembler::new(); COUNTER_SOCKETS],
            udp,
            discard,
            source,
            sources: [SourceState::Request(LineAssembler::new()); SOURCE_SOCKETS],
            stats: NetStats::default(),
            scratch: [0; ECHO_CHUNK],
            next_poll: None,
        };
        stack.serve();
        stack
    }

    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// Processes one frame from `device`, if one is waiting: ingress, the
    /// services, egress. Returns whether there was one.
    pub fn poll_frame<D: Device + ?Sized>(&mut self, now: Instant, device: &mut D) -> bool {
        match self
            .iface
            .poll_ingress_single(now, device, &mut self.sockets)
        {
            PollIngressSingleResult::None => false,
            _ => {
                self.serve();
                self.egress(now, device);
                true
            }
        }
    }

    /// Runs the timers if one is due (retransmissions, neighbor discovery),
    /// and whatever the sockets still have to send (e.g. after the device
    /// had no free transmit buffer).
    pub fn poll_timers<D: Device + ?Sized>(&mut self, now: Instant, device: &mut D) {
        if self.next_poll.is_some_and(|at| at <= now) {
            self.serve();
            self.egress(now, device);
        }
    }

    /// Sends what the sockets have queued, then notes when timers next need
    /// a poll.
    fn egress<D: Device + ?Sized>(&mut self, now: Instant, device: &mut D) {
        for _ in 0..EGRESS_ROUNDS {
            if self.iface.poll_egress(now, device, &mut self.sockets) == PollResult::None {
                break;
            }
            // Sending can make room (nothing here waits on that today), but
            // state changes such as a closed socket need a new listen.
            self.serve();
        }
        self.next_poll = self.iface.poll_at(now, &self.sockets);
    }

    /// Moves data through the services and re-arms closed sockets.
    fn serve(&mut self) {
        for &handle in &self.echo {
            let socket = self.sockets.get_mut::<tcp::Socket>(handle);
            self.stats.echo_bytes += serve_echo(socket, &mut self.scratch);
        }
        for (i, &handle) in self.counter.iter().enumerate() {
            let socket = self.sockets.get_mut::<tcp::Socket>(handle);
            serve_counter(socket, &mut self.lines[i], &mut self.stats.tcp_requests);
        }
        let socket = self.sockets.get_mut::<udp::Socket>(self.udp);
        serve_udp(socket, &mut self.stats.udp_requests);
        for &handle in &self.discard {
            let socket = self.sockets.get_mut::<tcp::Socket>(handle);
            self.stats.discard_bytes += serve_discard(socket);
        }
        for (i, &handle) in self.source.iter().enumerate() {
            let socket = self.sockets.get_mut::<tcp::Socket>(handle);
            self.stats.source_bytes += serve_source(socket, &mut self.sources[i]);
        }
    }
}

/// Listens again on a socket whose connection is over.
fn relisten(socket: &mut tcp::Socket, port: u16) -> bool {
    if socket.is_open() {
        return false;
    }
    // Closed or TIME-WAIT: listen() resets the socket.
    let _ = socket.listen(port);
    true
}

/// Closes our side once the peer closed its side and all it sent was
/// consumed.
fn close_when_drained(socket: &mut tcp::Socket) {
    if socket.state() == tcp::State::CloseWait && socket.recv_queue() == 0 {
        socket.close();
    }
}

/// Echoes what arrived, as far as the send buffer has room. Returns the
/// bytes echoed.
fn serve_echo(socket: &mut tcp::Socket, scratch: &mut [u8; ECHO_CHUNK]) -> u64 {
    if relisten(socket, ECHO_PORT) {
        return 0;
    }
    let mut echoed = 0;
    // Bounded: each round moves up to a chunk, buffers are a few chunks.
    for _ in 0..(2 * ECHO_BUFFER / ECHO_CHUNK + 2) {
        let room = socket.send_capacity() - socket.send_queue();
        let n = room.min(socket.recv_queue()).min(ECHO_CHUNK);
        if n == 0 {
            break;
        }
        let got = socket.recv_slice(&mut scratch[..n]).unwrap_or(0);
        let sent = socket.send_slice(&scratch[..got]).unwrap_or(0);
        echoed += sent as u64;
        if got == 0 {
            break;
        }
    }
    close_when_drained(socket);
    echoed
}

/// Answers complete request lines while the send buffer has room for a
/// reply.
fn serve_counter(socket: &mut tcp::Socket, line: &mut LineAssembler, total: &mut u64) {
    if relisten(socket, TCP_COUNTER_PORT) {
        line.clear();
        return;
    }
    for _ in 0..LINES_PER_POLL {
        if socket.send_capacity() - socket.send_queue() < REPLY_MAX {
            break;
        }
        if !recv_line(socket, line, 8) {
            break;
        }
        let mut reply = [0u8; REPLY_MAX];
        let n = counter_reply(line.line(), total, &mut reply);
        line.clear();
        let _ = socket.send_slice(&reply[..n]);
    }
    close_when_drained(socket);
}

/// Feeds received bytes into `line` until it holds a whole line (true) or
/// the socket has nothing more for now (false). Bounded: at most `passes`
/// reads, each of which consumes bytes or stops.
fn recv_line(socket: &mut tcp::Socket, line: &mut LineAssembler, passes: usize) -> bool {
    for _ in 0..passes {
        let Ok((taken, done)) = socket.recv(|data| {
            let (taken, done) = line.feed(data);
            (taken, (taken, done))
        }) else {
            return false;
        };
        if done {
            return true;
        }
        if taken == 0 {
            return false;
        }
    }
    false
}

/// Drops everything received. Returns the bytes dropped.
fn serve_discard(socket: &mut tcp::Socket) -> u64 {
    if relisten(socket, DISCARD_PORT) {
        return 0;
    }
    let dropped = drain(socket);
    close_when_drained(socket);
    dropped
}

/// Takes everything in the receive buffer (at most two contiguous pieces).
fn drain(socket: &mut tcp::Socket) -> u64 {
    let mut dropped = 0;
    for _ in 0..2 {
        match socket.recv(|data| (data.len(), data.len())) {
            Ok(n) if n > 0 => dropped += n as u64,
            _ => break,
        }
    }
    dropped
}

/// The source service: reads the request line `<n>`, sends `n` bytes of
/// [`ByteStream`] (as far as the send buffer has room per call), then
/// closes. A line that is no number gets `error\n` and the close. Bytes
/// after the request line are dropped. Returns the stream bytes sent.
fn serve_source(socket: &mut tcp::Socket, state: &mut SourceState) -> u64 {
    if relisten(socket, SOURCE_PORT) {
        *state = SourceState::Request(LineAssembler::new());
        return 0;
    }
    if let SourceState::Request(line) = state {
        if !recv_line(socket, line, 4) {
            if socket.state() == tcp::State::CloseWait {
                // The peer closed without a whole request.
                socket.close();
                *state = SourceState::Closing;
            }
            return 0;
        }
        *state = match crate::config::parse_decimal(line.line().trim_ascii()) {
            Some(n) => SourceState::Sending(n, ByteStream::new()),
            None => {
                let _ = socket.send_slice(b"error\n");
                SourceState::Closing
            }
        };
        if matches!(state, SourceState::Closing) {
            socket.close();
        }
    }
    drain(socket);
    let mut sent = 0;
    if let SourceState::Sending(left, stream) = state {
        // Bounded: the send buffer is a ring, free space is at most two
        // contiguous pieces.
        for _ in 0..2 {
            if *left == 0 {
                break;
            }
            let n = socket
                .send(|buf| {
                    let n = buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                    stream.fill(&mut buf[..n]);
                    (n, n)
                })
                .unwrap_or(0);
            if n == 0 {
                break;
            }
            *left -= n as u64;
            sent += n as u64;
        }
        if *left == 0 {
            socket.close();
            *state = SourceState::Closing;
        }
    }
    sent
}

/// Answers datagrams while the send buffer has room.
fn serve_udp(socket: &mut udp::Socket, total: &mut u64) {
    for _ in 0..UDP_PACKETS {
        if !socket.can_send() || !socket.can_recv() {
            break;
        }
        let mut reply = [0u8; REPLY_MAX];
        let Ok((n, meta)) = socket
            .recv()
            .map(|(data, meta)| (counter_reply(data, total, &mut reply), meta))
        else {
            break;
        };
        let _ = socket.send_slice(&reply[..n], meta.endpoint);
    }
}

#[cfg(test)]
mod tests;
