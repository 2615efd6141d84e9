//! The gpuctl wire protocol: message types, framing, and an async client.
//!
//! # Wire flow
//!
//! A client connects to gpuctld's Unix stream socket and exchanges frames:
//!
//! ```text
//! +----------------+--------------------------------------------+
//! | length: u32 BE | payload: bincode (LE, fixed-width ints)    |
//! +----------------+--------------------------------------------+
//!
//! client                                   gpuctld
//!   | -- ClientMessage::Hello ------------>  |   first frame, always
//!   | <-------------- DaemonMessage::Welcome |   or Closing(Incompatible), then EOF
//!   | -- Request { id: 1, Status } -------> |
//!   | -- Request { id: 2, Ping } ---------> |   many in flight at once
//!   | <------------ Response { id: 2, .. }  |   answers in any order
//!   | <------------ Event { id: 1, .. }     |   zero or more events per request,
//!   | <------------ Response { id: 1, .. }  |   then one Response or Error
//! ```
//!
//! The daemon sends `Closing(error)` before it drops a connection for a
//! reason of its own: a malformed or oversized frame, a handshake that did
//! not come in time, too many connections, shutdown.
//!
//! `protocol/README.md` describes the bytes precisely, for clients written
//! in other languages.

#![warn(missing_docs)]

use std::fmt;

mod client;
mod codec;
mod downgrade;
mod error;
mod image;
mod message;
mod socket;
pub mod stream;
mod tensor;
pub mod units;
mod version;
pub mod worker;

pub use client::{Call, Client, ClientError, ClientOptions, OutputSink};
pub use codec::{
    decode_payload, encode_payload, wire_config, FrameCodec, FrameError, DEFAULT_MAX_FRAME,
    MAX_FRAME_CEILING,
};
pub use error::{Error, ErrorCode};
pub use image::{ImageLayout, IMAGE_SHAPES};
pub use message::*;
pub use socket::{
    client_default_socket, daemon_default_socket, user_socket, SOCKET_ENV, SYSTEM_SOCKET,
};
pub use stream::{StreamError, TensorFrame, TensorReceiver, CHUNK_BYTES};
pub use tensor::{DType, WireTensor};
pub use version::{
    ProtocolVersion, FILE_CHANGE, LOAD_FAILED, PIXEL_ROWS, PIXEL_ROWS_IN, PROTOCOL_VERSION,
    RETRY_LATER,
};

impl fmt::Display for KeepAlive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeepAlive::Millis(ms) => f.write_str(&units::format_duration_ms(*ms)),
            KeepAlive::Forever => f.write_str("forever"),
        }
    }
}
