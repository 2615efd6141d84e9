#![allow(clippy::unwrap_used)]

//! The shape of every message, as data: `protocol/tests/schema.json` is the
//! serde-reflection registry of the four message types (client ↔ daemon,
//! daemon ↔ worker) and everything they hold — each struct's fields in
//! order, each enum's variants by index — so that a client in another
//! language can drive one table-driven codec from it instead of copying
//! each message by hand. The test fails when a type changes and the file
//! does not; `GPUCTL_BLESS=1 cargo test -p gpuctl-protocol --test schema`
//! rewrites it after a deliberate change.

use gpuctl_protocol::worker::{DaemonToWorker, WorkerToDaemon};
use gpuctl_protocol::*;
use serde_reflection::{Tracer, TracerConfig};

mod pinned;

#[test]
fn the_schema_file_describes_every_message() {
    let mut tracer = Tracer::new(TracerConfig::default());
    tracer.trace_simple_type::<ClientMessage>().unwrap();
    tracer.trace_simple_type::<DaemonMessage>().unwrap();
    tracer.trace_simple_type::<DaemonToWorker>().unwrap();
    tracer.trace_simple_type::<WorkerToDaemon>().unwrap();
    // Deserialization meets one variant of an enum per pass: each enum is
    // traced on its own until all its variants are known.
    tracer.trace_simple_type::<DType>().unwrap();
    tracer.trace_simple_type::<ErrorCode>().unwrap();
    tracer.trace_simple_type::<Event>().unwrap();
    tracer.trace_simple_type::<ImageLayout>().unwrap();
    tracer
        .trace_simple_type::<gpuctl_protocol::worker::Job>()
        .unwrap();
    tracer.trace_simple_type::<ModelKind>().unwrap();
    tracer.trace_simple_type::<Request>().unwrap();
    tracer.trace_simple_type::<Response>().unwrap();
    tracer.trace_simple_type::<NoticeKind>().unwrap();
    tracer.trace_simple_type::<UnloadReason>().unwrap();
    tracer.trace_simple_type::<ModelState>().unwrap();
    tracer.trace_simple_type::<KeepAlive>().unwrap();
    tracer.trace_simple_type::<ReloadTrigger>().unwrap();
    tracer.trace_simple_type::<TensorFrame>().unwrap();
    let registry = tracer.registry().unwrap();
    let text = serde_json::to_string_pretty(&registry).unwrap() + "\n";
    pinned::check_or_bless("tests/schema.json", &text, "schema");
}
