//! Any payload decodes to a `WorkerToDaemon` or to an error (see `gpuctl_fuzz::decodes`).
#![no_main]

use gpuctl_protocol::worker::WorkerToDaemon;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = gpuctl_fuzz::decodes::<WorkerToDaemon>(data);
});
