//! Fuzz target: the migration message decoders must reject any payload
//! cleanly (an error, never a panic). The first two bytes choose the
//! message type among the migration types.
#![no_main]

use libfuzzer_sys::fuzz_target;
use replication::migration::wire;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let ty = 0x0101 + u16::from_le_bytes([data[0], data[1]]) % 16;
    let _ = wire::decode_any(ty, &data[2..]);
});
