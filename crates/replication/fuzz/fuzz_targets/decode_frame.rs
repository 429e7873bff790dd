//! Feeds arbitrary bytes to the frame decoder and to the handshake payload
//! decoders: none may panic, and a decoded frame never exceeds the limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use replication::frame::{self, HEADER_LEN};
use replication::handshake::{self, Hello};

fuzz_target!(|data: &[u8]| {
    let max = 1 << 16;
    let mut rest = data;
    while let Ok((f, used)) = frame::decode_frame(rest, max) {
        assert!(f.payload.len() <= max as usize);
        assert_eq!(used, HEADER_LEN + f.payload.len());
        let _ = Hello::decode(&f.payload);
        let _ = handshake::decode_refuse(&f.payload);
        rest = &rest[used..];
    }
    let _ = Hello::decode(data);
    let _ = handshake::decode_refuse(data);
});
