//! Any payload decodes to a `DaemonMessage` or to an error (see
//! `gpuctl_fuzz::decodes`), and what an older client is sent of it decodes
//! as well.
#![no_main]

use gpuctl_protocol::{decode_payload, encode_payload, DaemonMessage, ProtocolVersion};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(message) = gpuctl_fuzz::decodes::<DaemonMessage>(data) else {
        return;
    };
    let old = message.for_peer(ProtocolVersion { major: 1, minor: 0 });
    let payload = encode_payload(&old).expect("a downgraded message encodes");
    let _: DaemonMessage = decode_payload(&payload).expect("and decodes");
});
