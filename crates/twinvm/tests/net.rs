//! The guest's network through virtio-net and a real tap, driven by the
//! host's own TCP/IP stack from inside a network namespace the test creates
//! (and removes). Every byte the guest returns is checked.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use common::{BANNER, GUEST_IP, NetNs, Twinvm, pattern};

const T: Duration = Duration::from_secs(60);

fn guest(addr_port: u16) -> SocketAddr {
    format!("{GUEST_IP}:{addr_port}").parse().unwrap()
}

fn ready(ns: &NetNs, cmdline: &str) -> Twinvm {
    let mut vm = ns.spawn_guest(cmdline, &[]);
    vm.wait_for_line(|l| l == BANNER, T).unwrap();
    let net = vm.wait_for_line(|l| l.starts_with("net0 "), T).unwrap();
    assert!(net.contains(&format!("ip={GUEST_IP}/24")), "{net}");
    vm
}

fn finish(mut vm: Twinvm) {
    vm.send_line("poweroff");
    let status = vm.wait_exit(T).unwrap();
    assert_eq!(status.code(), Some(0), "{}", vm.transcript());
}

#[test]
fn tcp_echo_returns_every_byte() {
    if !common::kvm_available() || !common::netns_available() {
        return;
    }
    let ns = NetNs::new("echo");
    let vm = ready(&ns, "");
    const LEN: usize = 192 * 1024;
    let (rate, echoed) = ns.run_in(|| {
        let data = pattern(LEN, 0x5eed);
        let stream = TcpStream::connect_timeout(&guest(7), T).expect("connect to echo");
        stream.set_read_timeout(Some(T)).unwrap();
        stream.set_write_timeout(Some(T)).unwrap();
        let mut writer = stream.try_clone().unwrap();
        let to_send = data.clone();
        let start = Instant::now();
        let sender = std::thread::spawn(move || {
            for chunk in to_send.chunks(4096) {
                writer.write_all(chunk).expect("send");
            }
            writer
                .shutdown(std::net::Shutdown::Write)
                .expect("shutdown");
        });
        let mut back = Vec::with_capacity(LEN);
        (&stream)
            .take(LEN as u64 + 1)
            .read_to_end(&mut back)
            .expect("receive");
        let secs = start.elapsed().as_secs_f64();
        sender.join().unwrap();
        assert_eq!(
            back.len(),
            LEN,
            "echo returned {} of {LEN} bytes",
            back.len()
        );
        assert!(back == data, "echoed bytes differ from the bytes sent");
        (LEN as f64 / secs / 1024.0, back.len())
    });
    eprintln!("TCP echo: {echoed} bytes each way at {rate:.0} KiB/s");
    finish(vm);
}

#[test]
fn many_short_tcp_request_response_connections() {
    if !common::kvm_available() || !common::netns_available() {
        return;
    }
    let ns = NetNs::new("rr");
    let vm = ready(&ns, "");
    ns.run_in(|| {
        let mut total = 0u64;
        for conn in 0..30u64 {
            let stream = TcpStream::connect_timeout(&guest(8000), T).expect("connect");
            stream.set_read_timeout(Some(T)).unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut writer = stream;
            for req in 0..3u64 {
                let n = conn * 1000 + req;
                writeln!(writer, "{n}").unwrap();
                let mut line = String::new();
                reader.read_line(&mut line).expect("reply");
                total += 1;
                assert_eq!(line, format!("{} {total}\n", n + 1), "connection {conn}");
            }
            writeln!(writer, "not a number").unwrap();
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            assert_eq!(line, "error\n");
        }
    });
    finish(vm);
}

#[test]
fn udp_request_response_and_ping() {
    if !common::kvm_available() || !common::netns_available() {
        return;
    }
    let ns = NetNs::new("udp");
    let vm = ready(&ns, "");
    ns.run_in(|| {
        let sock = UdpSocket::bind("10.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut total = 0;
        for n in 0..20u64 {
            // UDP may lose a datagram (the first one waits for ARP): retry a
            // bounded number of times; each answered request counts once.
            let mut reply = None;
            for _ in 0..5 {
                sock.send_to(format!("{n}\n").as_bytes(), guest(8001))
                    .unwrap();
                let mut buf = [0u8; 64];
                if let Ok((len, from)) = sock.recv_from(&mut buf) {
                    assert_eq!(from, guest(8001));
                    reply = Some(String::from_utf8_lossy(&buf[..len]).into_owned());
                    break;
                }
            }
            let reply = reply.expect("no UDP reply after 5 tries");
            let mut words = reply.split_whitespace();
            assert_eq!(words.next(), Some((n + 1).to_string().as_str()), "{reply}");
            let t: u64 = words.next().and_then(|w| w.parse().ok()).expect("total");
            assert!(t > total, "total did not grow: {reply}");
            total = t;
        }
    });
    let out = ns
        .command("ping")
        .args([
            "-c", "5", "-i", "0.2", "-W", "5", "-s", "200", "-p", "a5", GUEST_IP,
        ])
        .output()
        .expect("run ping (iputils-ping)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "ping failed: {text}");
    assert!(text.contains("5 received"), "{text}");
    finish(vm);
}
