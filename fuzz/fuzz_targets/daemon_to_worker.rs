//! Any payload decodes to a `DaemonToWorker` or to an error (see `gpuctl_fuzz::decodes`).
#![no_main]

use gpuctl_protocol::worker::DaemonToWorker;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = gpuctl_fuzz::decodes::<DaemonToWorker>(data);
});
