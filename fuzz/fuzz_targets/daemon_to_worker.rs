//! Any payload decodes to a `worker::DaemonToWorker` or to an error, never a panic or an
//! allocation beyond the decode limit; what decodes encodes, and that
//! encoding decodes and encodes to the same bytes again.
#![no_main]

use gpuctl_protocol::{decode_payload, encode_payload, worker::DaemonToWorker};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(message) = decode_payload::<DaemonToWorker>(data) else {
        return;
    };
    let payload = encode_payload(&message).expect("a decoded message encodes");
    let again: DaemonToWorker = decode_payload(&payload).expect("its encoding decodes");
    // Bytes, not values: a float may be NaN, which equals nothing.
    let encoded_again = encode_payload(&again).expect("it encodes again");
    assert_eq!(encoded_again, payload, "the encoding is stable");
});
