//! Feeds arbitrary bytes to the state decoder: as a whole input (header,
//! checksums, body), and as a body framed with a valid header and valid
//! checksums, so that the body decoder sees every input too. Decoding must
//! end in a value or an error, never a panic or an allocation the input
//! does not back.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::VmState;
use vmm::snapshot::dir::SnapshotFile;
use vmm::snapshot::{ConfigFingerprint, Expected, PayloadKind, VmId, decode, encode_body};

fuzz_target!(|data: &[u8]| {
    let fingerprint = ConfigFingerprint {
        memory_bytes: 128 << 20,
        vcpus: 1,
        devices: vec![1, 2],
    };
    let expected = Expected {
        identity: None,
        fingerprint: Some(&fingerprint),
    };
    let _ = decode::<VmState>(data, &expected);
    let _ = decode::<SnapshotFile>(data, &expected);
    let id = VmId([0; 16]);
    let framed = encode_body(PayloadKind::VmState, id, &fingerprint, data);
    if let Ok((_, state)) = decode::<VmState>(&framed, &expected) {
        // Whatever decodes encodes again.
        vmm::snapshot::encode(id, &fingerprint, &state).expect("re-encode");
    }
    let framed = encode_body(PayloadKind::Snapshot, id, &fingerprint, data);
    let _ = decode::<SnapshotFile>(&framed, &expected);
});
