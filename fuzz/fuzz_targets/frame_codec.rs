//! The daemon's side of the client socket: bytes in any amount and any
//! split must decode to messages or to an error, never a panic, and what
//! decodes must encode again.
#![no_main]

use bytes::BytesMut;
use gpuctl_protocol::{ClientMessage, DaemonMessage, FrameCodec};
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::{Decoder, Encoder};

fuzz_target!(|data: &[u8]| {
    let Some((&split, bytes)) = data.split_first() else {
        return;
    };
    // A small frame limit too, so that the length check is reached.
    let mut codec = if split & 1 == 0 {
        FrameCodec::<ClientMessage, DaemonMessage>::streaming(2 << 20)
    } else {
        FrameCodec::<ClientMessage, DaemonMessage>::new(64)
    };
    let mut buffer = BytesMut::new();
    let step = usize::from(split >> 1).max(1);
    for piece in bytes.chunks(step) {
        buffer.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buffer) {
                Ok(Some(message)) => {
                    let mut out = FrameCodec::<DaemonMessage, ClientMessage>::streaming(64 << 20);
                    let mut encoded = BytesMut::new();
                    out.encode(message, &mut encoded)
                        .expect("a decoded message encodes");
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    let _ = codec.decode_eof(&mut buffer);
});
