//! The services against a client smoltcp interface, over an in-memory wire.

use super::*;
use crate::workload::{SEED, Xorshift64};
use std::collections::VecDeque;

use smoltcp::phy::{DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetFrame, EthernetProtocol, EthernetRepr, Icmpv4Packet,
    Icmpv4Repr, IpProtocol, Ipv4Packet, Ipv4Repr,
};

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const CLIENT_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
const GUEST_IP: [u8; 4] = [10, 0, 0, 2];
const CLIENT_IP: [u8; 4] = [10, 0, 0, 1];

#[test]
fn counter_protocol() {
    let mut total = 0;
    let mut out = [0u8; REPLY_MAX];
    let mut reply = |req: &[u8], total: &mut u64| {
        let n = counter_reply(req, total, &mut out);
        String::from_utf8(out[..n].to_vec()).unwrap()
    };
    assert_eq!(reply(b"5", &mut total), "6 1\n");
    assert_eq!(reply(b" 41\r", &mut total), "42 2\n");
    assert_eq!(reply(b"", &mut total), "error\n");
    assert_eq!(reply(b"x", &mut total), "error\n");
    assert_eq!(reply(b"-1", &mut total), "error\n");
    assert_eq!(reply(b"18446744073709551615", &mut total), "error\n");
    assert_eq!(total, 2);
    assert_eq!(
        reply(b"18446744073709551614", &mut total),
        "18446744073709551615 3\n"
    );
    let mut big = u64::MAX - 1;
    assert_eq!(
        reply(b"18446744073709551614", &mut big),
        "18446744073709551615 18446744073709551615\n"
    );
}

#[test]
fn line_assembler() {
    let mut l = LineAssembler::new();
    assert_eq!(l.feed(b"12"), (2, false));
    assert_eq!(l.feed(b"3\n45\n"), (2, true));
    assert_eq!(l.line(), b"123");
    l.clear();
    assert_eq!(l.feed(b"45\n"), (3, true));
    assert_eq!(l.line(), b"45");
    l.clear();
    assert_eq!(l.feed(b"\n"), (1, true));
    assert_eq!(l.line(), b"");
    l.clear();
    let long = [b'1'; REQUEST_MAX + 5];
    assert_eq!(l.feed(&long), (long.len(), false));
    assert_eq!(l.feed(b"1\n"), (2, true));
    let mut total = 0;
    let mut out = [0u8; REPLY_MAX];
    let n = counter_reply(l.line(), &mut total, &mut out);
    assert_eq!(&out[..n], b"error\n");
    l.clear();
    // Exactly REQUEST_MAX bytes still fit.
    assert_eq!(l.feed(&[b'7'; REQUEST_MAX]), (REQUEST_MAX, false));
    assert_eq!(l.feed(b"\n"), (1, true));
    assert_eq!(l.line().len(), REQUEST_MAX);
}

#[test]
fn usable_macs() {
    assert!(mac_is_usable(GUEST_MAC));
    assert!(!mac_is_usable([0; 6]));
    assert!(!mac_is_usable([1, 0, 0, 0, 0, 0]));
    assert!(!mac_is_usable([0xff; 6]));
}

/// One end of an in-memory Ethernet wire.
#[derive(Default)]
struct Wire {
    rx: VecDeque<Vec<u8>>,
    tx: Vec<Vec<u8>>,
}

struct Rx(Vec<u8>);
struct Tx<'a>(&'a mut Vec<Vec<u8>>);

impl RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = vec![0u8; len];
        let r = f(&mut frame);
        self.0.push(frame);
        r
    }
}

impl Device for Wire {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _: Instant) -> Option<(Rx, Tx<'_>)> {
        let frame = self.rx.pop_front()?;
        Some((Rx(frame), Tx(&mut self.tx)))
    }

    fn transmit(&mut self, _: Instant) -> Option<Tx<'_>> {
        Some(Tx(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = 1514;
        caps
    }
}

/// The guest stack and a client interface, wired together. Every frame
/// the guest sends is kept in `guest_out`.
struct Net {
    guest: NetStack<'static>,
    gwire: Wire,
    client: Interface,
    cwire: Wire,
    csockets: SocketSet<'static>,
    now: i64,
    /// Milliseconds added per pump round (varies the timing in tests).
    step: i64,
    guest_out: Vec<Vec<u8>>,
}

fn leak<T>(v: T) -> &'static mut T {
    Box::leak(Box::new(v))
}

/// A zeroed buffer living for the rest of the test run.
fn buf(n: usize) -> &'static mut [u8] {
    Vec::leak(vec![0u8; n])
}

fn meta(n: usize) -> &'static mut [udp::PacketMetadata] {
    Vec::leak(vec![udp::PacketMetadata::EMPTY; n])
}

impl Net {
    fn new(step: i64) -> Self {
        let mut gwire = Wire::default();
        let settings = NetSettings {
            mac: GUEST_MAC,
            ip: Ipv4Cidr {
                addr: GUEST_IP,
                prefix: 24,
            },
            gw: Some([10, 0, 0, 254]),
        };
        let guest = NetStack::new(
            &settings,
            &mut gwire,
            leak(NetMemory::new()),
            buf(ARENA_BYTES),
            Instant::from_millis(0),
        );
        let mut cwire = Wire::default();
        let mut config = IfaceConfig::new(EthernetAddress(CLIENT_MAC).into());
        config.random_seed = 99;
        let mut client = Interface::new(config, &mut cwire, Instant::from_millis(0));
        client.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(Ipv4Address::from(CLIENT_IP).into(), 24));
        });
        let storage: &'static mut [SocketStorage<'static>] =
            Vec::leak((0..16).map(|_| SocketStorage::EMPTY).collect());
        Net {
            guest,
            gwire,
            client,
            cwire,
            csockets: SocketSet::new(storage),
            now: 0,
            step,
            guest_out: Vec::new(),
        }
    }

    fn instant(&self) -> Instant {
        Instant::from_millis(self.now)
    }

    /// Exchanges frames until both sides are quiet (bounded).
    fn pump(&mut self) {
        for _ in 0..10_000 {
            self.now += self.step;
            let now = self.instant();
            self.client.poll(now, &mut self.cwire, &mut self.csockets);
            let to_guest: Vec<_> = self.cwire.tx.drain(..).collect();
            let moved = !to_guest.is_empty();
            self.gwire.rx.extend(to_guest);
            while self.guest.poll_frame(now, &mut self.gwire) {}
            self.guest.poll_timers(now, &mut self.gwire);
            let to_client: Vec<_> = self.gwire.tx.drain(..).collect();
            let moved = moved || !to_client.is_empty();
            self.guest_out.extend(to_client.iter().cloned());
            self.cwire.rx.extend(to_client);
            if !moved {
                return;
            }
        }
        panic!("the network did not settle");
    }

    fn tcp_client(&mut self, port: u16, local_port: u16) -> SocketHandle {
        let socket = tcp::Socket::new(
            tcp::SocketBuffer::new(buf(65536)),
            tcp::SocketBuffer::new(buf(65536)),
        );
        // Like the guest, the client acknowledges at once, so that its
        // frames do not depend on the clock either.
        let mut socket = socket;
        socket.set_ack_delay(None);
        socket.set_nagle_enabled(false);
        let handle = self.csockets.add(socket);
        let cx = self.client.context();
        self.csockets
            .get_mut::<tcp::Socket>(handle)
            .connect(cx, (Ipv4Address::from(GUEST_IP), port), local_port)
            .unwrap();
        self.pump();
        assert_eq!(
            self.csockets.get::<tcp::Socket>(handle).state(),
            tcp::State::Established
        );
        handle
    }

    /// Sends `data` on a client socket and collects `expect` bytes back.
    fn exchange(&mut self, handle: SocketHandle, data: &[u8], expect: usize) -> Vec<u8> {
        let mut sent = 0;
        let mut got = Vec::new();
        for _ in 0..10_000 {
            let s = self.csockets.get_mut::<tcp::Socket>(handle);
            if sent < data.len() {
                sent += s.send_slice(&data[sent..]).unwrap();
            }
            let mut buf = [0u8; 4096];
            while let Ok(n) = s.recv_slice(&mut buf) {
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            if sent == data.len() && got.len() >= expect {
                return got;
            }
            self.pump();
        }
        panic!("exchange did not finish: sent {sent}, got {}", got.len());
    }

    fn close(&mut self, handle: SocketHandle) {
        self.csockets.get_mut::<tcp::Socket>(handle).close();
        self.pump();
        // Let the client's TIME-WAIT pass.
        self.now += 60_000;
        self.pump();
        self.csockets.remove(handle);
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn tcp_echo_returns_every_byte_and_relistens() {
    let mut net = Net::new(1);
    for round in 0..3u8 {
        let c = net.tcp_client(ECHO_PORT, 40000 + u16::from(round));
        let data = pattern(100_000, round);
        let back = net.exchange(c, &data, data.len());
        assert_eq!(back, data, "round {round}");
        net.close(c);
    }
    assert_eq!(net.guest.stats().echo_bytes, 300_000);
}

#[test]
fn tcp_echo_concurrent_connections() {
    let mut net = Net::new(1);
    let clients: Vec<_> = (0..ECHO_SOCKETS as u16)
        .map(|i| net.tcp_client(ECHO_PORT, 41000 + i))
        .collect();
    let datas: Vec<_> = (0..ECHO_SOCKETS)
        .map(|i| pattern(20_000, i as u8))
        .collect();
    // Interleave: everyone sends, then everyone reads.
    for (c, d) in clients.iter().zip(&datas) {
        net.csockets
            .get_mut::<tcp::Socket>(*c)
            .send_slice(d)
            .unwrap();
    }
    for (c, d) in clients.iter().zip(&datas) {
        let back = net.exchange(*c, &[], d.len());
        assert_eq!(&back, d);
    }
    // One connection more gets refused while all echo sockets are busy.
    let extra = net.csockets.add(tcp::Socket::new(
        tcp::SocketBuffer::new(buf(1024)),
        tcp::SocketBuffer::new(buf(1024)),
    ));
    let cx = net.client.context();
    net.csockets
        .get_mut::<tcp::Socket>(extra)
        .connect(cx, (Ipv4Address::from(GUEST_IP), ECHO_PORT), 41100)
        .unwrap();
    net.pump();
    assert_eq!(
        net.csockets.get::<tcp::Socket>(extra).state(),
        tcp::State::Closed
    );
    for c in clients {
        net.close(c);
    }
    // All sockets listen again.
    let c = net.tcp_client(ECHO_PORT, 41200);
    assert_eq!(net.exchange(c, b"again", 5), b"again");
}

#[test]
fn tcp_counter_answers_each_line() {
    let mut net = Net::new(1);
    let a = net.tcp_client(TCP_COUNTER_PORT, 42000);
    let back = net.exchange(a, b"5\n10\r\nabc\n\n", 20);
    assert_eq!(back, b"6 1\n11 2\nerror\nerror\n");
    // A second connection shares the total; a line split over segments.
    let b = net.tcp_client(TCP_COUNTER_PORT, 42001);
    net.exchange(b, b"99", 0);
    let back = net.exchange(b, b"9\n", 7);
    assert_eq!(back, b"1000 3\n");
    let back = net.exchange(a, b"0\n", 4);
    assert_eq!(back, b"1 4\n");
    // Many requests in one go.
    let mut req = Vec::new();
    let mut want = Vec::new();
    for i in 0..500u64 {
        req.extend_from_slice(format!("{i}\n").as_bytes());
        want.extend_from_slice(format!("{} {}\n", i + 1, 5 + i).as_bytes());
    }
    let back = net.exchange(b, &req, want.len());
    assert_eq!(
        String::from_utf8(back).unwrap(),
        String::from_utf8(want).unwrap()
    );
    assert_eq!(net.guest.stats().tcp_requests, 504);
    net.close(a);
    net.close(b);
}

#[test]
fn udp_counter_answers_each_datagram() {
    let mut net = Net::new(1);
    let socket = udp::Socket::new(
        udp::PacketBuffer::new(meta(16), buf(4096)),
        udp::PacketBuffer::new(meta(16), buf(4096)),
    );
    let h = net.csockets.add(socket);
    net.csockets.get_mut::<udp::Socket>(h).bind(50000).unwrap();
    let guest = (Ipv4Address::from(GUEST_IP), UDP_COUNTER_PORT);
    let mut replies = Vec::new();
    for req in [&b"7"[..], b"8\n", b"nope", b"41"] {
        net.csockets
            .get_mut::<udp::Socket>(h)
            .send_slice(req, guest)
            .unwrap();
        net.pump();
        let s = net.csockets.get_mut::<udp::Socket>(h);
        let (data, meta) = s.recv().unwrap();
        assert_eq!(meta.endpoint.port, UDP_COUNTER_PORT);
        replies.push(String::from_utf8(data.to_vec()).unwrap());
    }
    assert_eq!(replies, ["8 1\n", "9 2\n", "error\n", "42 3\n"]);
    assert_eq!(net.guest.stats().udp_requests, 3);
}

/// An Ethernet frame from the client to `dst` carrying `payload` of type
/// `ethertype`.
fn ethernet(dst: [u8; 6], ethertype: EthernetProtocol, payload: &[u8]) -> Vec<u8> {
    let repr = EthernetRepr {
        src_addr: EthernetAddress(CLIENT_MAC),
        dst_addr: EthernetAddress(dst),
        ethertype,
    };
    let mut frame = vec![0u8; repr.buffer_len() + payload.len()];
    let mut f = EthernetFrame::new_unchecked(&mut frame[..]);
    repr.emit(&mut f);
    f.payload_mut().copy_from_slice(payload);
    frame
}

#[test]
fn answers_arp_and_ping() {
    let mut net = Net::new(1);
    let arp = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: EthernetAddress(CLIENT_MAC),
        source_protocol_addr: Ipv4Address::from(CLIENT_IP),
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: Ipv4Address::from(GUEST_IP),
    };
    let mut buf = vec![0u8; arp.buffer_len()];
    arp.emit(&mut ArpPacket::new_unchecked(&mut buf[..]));
    net.gwire
        .rx
        .push_back(ethernet([0xff; 6], EthernetProtocol::Arp, &buf));
    assert!(
        net.guest
            .poll_frame(Instant::from_millis(1), &mut net.gwire)
    );
    let reply = net.gwire.tx.pop().expect("ARP reply");
    let frame = EthernetFrame::new_checked(&reply[..]).unwrap();
    let arp = ArpRepr::parse(&ArpPacket::new_checked(frame.payload()).unwrap()).unwrap();
    match arp {
        ArpRepr::EthernetIpv4 {
            operation,
            source_hardware_addr,
            source_protocol_addr,
            ..
        } => {
            assert_eq!(operation, ArpOperation::Reply);
            assert_eq!(source_hardware_addr, EthernetAddress(GUEST_MAC));
            assert_eq!(source_protocol_addr, Ipv4Address::from(GUEST_IP));
        }
        _ => panic!("not an IPv4 ARP reply"),
    }

    // ICMP echo request, 64 bytes of data.
    let data = pattern(64, 3);
    let icmp = Icmpv4Repr::EchoRequest {
        ident: 0x1234,
        seq_no: 7,
        data: &data,
    };
    let ip = Ipv4Repr {
        src_addr: Ipv4Address::from(CLIENT_IP),
        dst_addr: Ipv4Address::from(GUEST_IP),
        next_header: IpProtocol::Icmp,
        payload_len: icmp.buffer_len(),
        hop_limit: 64,
    };
    let mut packet = vec![0u8; ip.buffer_len() + icmp.buffer_len()];
    let caps = smoltcp::phy::ChecksumCapabilities::default();
    ip.emit(&mut Ipv4Packet::new_unchecked(&mut packet[..]), &caps);
    icmp.emit(
        &mut Icmpv4Packet::new_unchecked(&mut packet[ip.buffer_len()..]),
        &caps,
    );
    net.gwire
        .rx
        .push_back(ethernet(GUEST_MAC, EthernetProtocol::Ipv4, &packet));
    assert!(
        net.guest
            .poll_frame(Instant::from_millis(2), &mut net.gwire)
    );
    let reply = net.gwire.tx.pop().expect("echo reply");
    let frame = EthernetFrame::new_checked(&reply[..]).unwrap();
    assert_eq!(frame.dst_addr(), EthernetAddress(CLIENT_MAC));
    let ipp = Ipv4Packet::new_checked(frame.payload()).unwrap();
    assert!(ipp.verify_checksum());
    let icmpp = Icmpv4Packet::new_checked(ipp.payload()).unwrap();
    let repr = Icmpv4Repr::parse(&icmpp, &caps).unwrap();
    assert_eq!(
        repr,
        Icmpv4Repr::EchoReply {
            ident: 0x1234,
            seq_no: 7,
            data: &data
        }
    );
}

/// A session touching every service: ARP, TCP echo, TCP and UDP counters,
/// connection close. Returns the frames the guest sent.
fn session(step: i64) -> Vec<Vec<u8>> {
    let mut net = Net::new(step);
    let e = net.tcp_client(ECHO_PORT, 43000);
    net.exchange(e, &pattern(30_000, 9), 30_000);
    let c = net.tcp_client(TCP_COUNTER_PORT, 43001);
    net.exchange(c, b"1\n2\n3\n", 12);
    let u = net.csockets.add(udp::Socket::new(
        udp::PacketBuffer::new(meta(4), buf(512)),
        udp::PacketBuffer::new(meta(4), buf(512)),
    ));
    net.csockets.get_mut::<udp::Socket>(u).bind(50001).unwrap();
    net.csockets
        .get_mut::<udp::Socket>(u)
        .send_slice(b"77", (Ipv4Address::from(GUEST_IP), UDP_COUNTER_PORT))
        .unwrap();
    net.pump();
    net.close(e);
    net.close(c);
    net.guest_out
}

/// Asserts two frame sequences are equal, reporting the first difference
/// briefly.
fn assert_same_frames(a: &[Vec<u8>], b: &[Vec<u8>]) {
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        if x != y {
            let at = x
                .iter()
                .zip(y)
                .position(|(p, q)| p != q)
                .unwrap_or(x.len().min(y.len()));
            panic!(
                "frame {i} differs at byte {at} (lengths {} and {}): {:02x?} vs {:02x?}",
                x.len(),
                y.len(),
                &x[..x.len().min(64)],
                &y[..y.len().min(64)]
            );
        }
    }
    assert_eq!(a.len(), b.len(), "frame counts differ");
}

#[test]
fn same_input_frames_give_same_output_frames() {
    let a = session(1);
    let b = session(1);
    assert!(a.len() > 20, "only {} frames", a.len());
    assert_same_frames(&a, &b);
    // A different clock (every poll 3 ms later than before) changes no
    // frame: time only drives timers, none of which fire here.
    let c = session(3);
    assert_same_frames(&a, &c);
}

#[test]
fn guest_output_does_not_depend_on_frame_batching() {
    // Feed the same recorded client frames to two guests: one frame per
    // poll, and all queued before polling.
    let mut net = Net::new(1);
    let e = net.tcp_client(ECHO_PORT, 44000);
    let client_frames: Vec<Vec<u8>> = {
        // Record what the client sends for a burst of data.
        let s = net.csockets.get_mut::<tcp::Socket>(e);
        s.send_slice(&pattern(8000, 1)).unwrap();
        net.client.poll(
            Instant::from_millis(net.now),
            &mut net.cwire,
            &mut net.csockets,
        );
        net.cwire.tx.drain(..).collect()
    };
    assert!(client_frames.len() > 3);

    let replay = |batched: bool| {
        let mut n2 = Net::new(1);
        let e2 = n2.tcp_client(ECHO_PORT, 44000);
        let _ = e2;
        n2.guest_out.clear();
        let mut out = Vec::new();
        if batched {
            n2.gwire.rx.extend(client_frames.iter().cloned());
            while n2
                .guest
                .poll_frame(Instant::from_millis(5000), &mut n2.gwire)
            {}
            out.append(&mut n2.gwire.tx);
        } else {
            for (i, f) in client_frames.iter().enumerate() {
                n2.gwire.rx.push_back(f.clone());
                n2.guest
                    .poll_frame(Instant::from_millis(6000 + i as i64), &mut n2.gwire);
                out.append(&mut n2.gwire.tx);
            }
        }
        out
    };
    let one_by_one = replay(false);
    let batched = replay(true);
    assert!(!one_by_one.is_empty());
    assert_same_frames(&one_by_one, &batched);
}

/// The source stream, built the slow way: xorshift64 words from the
/// documented seed, little-endian, cut at `len`.
fn source_bytes(len: usize) -> Vec<u8> {
    let mut rng = Xorshift64::new(SEED);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    out.truncate(len);
    out
}

#[test]
fn byte_stream_is_the_same_in_any_pieces() {
    let want = source_bytes(1000);
    for piece in [1, 3, 7, 8, 9, 64, 333, 1000] {
        let mut stream = ByteStream::new();
        let mut got = vec![0u8; 1000];
        for chunk in got.chunks_mut(piece) {
            stream.fill(chunk);
        }
        assert_eq!(got, want, "pieces of {piece}");
    }
}

impl Net {
    /// Whether the guest closed its side of the client's connection (and
    /// everything it sent was read).
    fn peer_closed(&mut self, handle: SocketHandle) -> bool {
        let s = self.csockets.get_mut::<tcp::Socket>(handle);
        !s.may_recv() && !s.can_recv()
    }
}

#[test]
fn tcp_discard_drops_and_counts_everything() {
    let mut net = Net::new(1);
    for round in 0..2u16 {
        let c = net.tcp_client(DISCARD_PORT, 45000 + round);
        let back = net.exchange(c, &pattern(50_000, 1), 0);
        assert!(back.is_empty(), "discard sent data back");
        // Closing our side makes the guest close too.
        net.csockets.get_mut::<tcp::Socket>(c).close();
        net.pump();
        assert!(net.peer_closed(c));
        net.close(c);
    }
    assert_eq!(net.guest.stats().discard_bytes, 100_000);
    // Two at once.
    let a = net.tcp_client(DISCARD_PORT, 45100);
    let b = net.tcp_client(DISCARD_PORT, 45101);
    net.exchange(a, b"12345", 0);
    net.exchange(b, b"678", 0);
    net.pump();
    assert_eq!(net.guest.stats().discard_bytes, 100_008);
}

#[test]
fn tcp_source_sends_the_requested_stream_then_closes() {
    let mut net = Net::new(1);
    for (round, len) in [100_000usize, 1, 0, 8193].into_iter().enumerate() {
        let c = net.tcp_client(SOURCE_PORT, 46000 + round as u16);
        let back = net.exchange(c, format!("{len}\n").as_bytes(), len);
        // Nothing more arrives: the guest closed after `len` bytes.
        net.pump();
        let mut rest = Vec::new();
        let s = net.csockets.get_mut::<tcp::Socket>(c);
        while let Ok(n) = s.recv(|d| (d.len(), d.len())) {
            if n == 0 {
                break;
            }
            rest.push(n);
        }
        assert!(rest.is_empty(), "extra bytes after {len}");
        assert_eq!(back, source_bytes(len), "stream of {len}");
        assert!(net.peer_closed(c), "no close after {len} bytes");
        net.close(c);
    }
    assert_eq!(net.guest.stats().source_bytes, 108_194);

    // A request that is no number, split over segments and followed by
    // more bytes, gets `error` and the close.
    let c = net.tcp_client(SOURCE_PORT, 46100);
    net.exchange(c, b"12", 0);
    let back = net.exchange(c, b"x4\nmore", 6);
    assert_eq!(back, b"error\n");
    net.pump();
    assert!(net.peer_closed(c));
    net.close(c);
}

/// The new services leave the older ones' frames alone: a session that
/// also uses discard and source sends, for the older services, exactly
/// the frames a guest without them would (checked by determinism: the
/// same session twice gives the same frames).
#[test]
fn bulk_services_are_deterministic() {
    let run = || {
        let mut net = Net::new(2);
        let d = net.tcp_client(DISCARD_PORT, 47000);
        net.exchange(d, &pattern(20_000, 4), 0);
        let s = net.tcp_client(SOURCE_PORT, 47001);
        net.exchange(s, b"30000\n", 30_000);
        net.close(d);
        net.close(s);
        net.guest_out
    };
    let a = run();
    assert!(a.len() > 20);
    assert_same_frames(&a, &run());
}
