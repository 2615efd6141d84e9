//! Framing: a 4-byte big-endian length, then that many bytes of bincode.
//!
//! ```text
//! +----------------+------------------------------------+
//! | length: u32 BE | payload: bincode, `length` bytes   |
//! +----------------+------------------------------------+
//! ```
//!
//! The length is checked against the maximum before any buffer is grown for
//! the payload, so a hostile prefix (say 4 GiB) costs nothing but an error.

use std::io;
use std::marker::PhantomData;

use bincode::config::{Configuration, Fixint, Limit, LittleEndian};
use bytes::{Bytes, BytesMut};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec, LengthDelimitedCodecError};

/// The default maximum frame payload: 16 MiB.
pub const DEFAULT_MAX_FRAME: usize = 16 * 1024 * 1024;

/// No frame may be larger than this, whatever is configured: 64 MiB. It is
/// also the most a single decoded value may claim, so a forged length inside
/// a payload (a string "of 2^40 bytes") cannot make us allocate more.
pub const MAX_FRAME_CEILING: usize = 64 * 1024 * 1024;

type WireConfig = Configuration<LittleEndian, Fixint, Limit<MAX_FRAME_CEILING>>;

/// The bincode configuration of the wire: little-endian, fixed-width
/// integers, and a decode limit.
pub fn wire_config() -> WireConfig {
    bincode::config::standard()
        .with_little_endian()
        .with_fixed_int_encoding()
        .with_limit::<MAX_FRAME_CEILING>()
}

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The socket failed.
    #[error("socket error: {0}")]
    Io(#[from] io::Error),
    /// A length prefix or an outgoing payload exceeds the maximum.
    #[error("frame exceeds the maximum of {max} bytes")]
    TooLarge {
        /// The maximum in force.
        max: usize,
    },
    /// The payload is not a message of the expected type.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The stream ended in the middle of a frame.
    #[error("connection closed in the middle of a frame ({buffered} bytes buffered)")]
    Truncated {
        /// Bytes of the unfinished frame that had arrived.
        buffered: usize,
    },
    /// A message could not be encoded.
    #[error("cannot encode message: {0}")]
    Encode(String),
}

impl FrameError {
    /// A copy for every call that a broken connection fails at once.
    pub fn duplicate(&self) -> FrameError {
        match self {
            FrameError::Io(e) => FrameError::Io(io::Error::new(e.kind(), e.to_string())),
            FrameError::TooLarge { max } => FrameError::TooLarge { max: *max },
            FrameError::Malformed(m) => FrameError::Malformed(m.clone()),
            FrameError::Truncated { buffered } => FrameError::Truncated {
                buffered: *buffered,
            },
            FrameError::Encode(m) => FrameError::Encode(m.clone()),
        }
    }
}

/// Encodes one message's payload (without the length prefix).
pub fn encode_payload<T: Serialize>(message: &T) -> Result<Vec<u8>, FrameError> {
    bincode::serde::encode_to_vec(message, wire_config())
        .map_err(|e| FrameError::Encode(e.to_string()))
}

/// Decodes one payload (without the length prefix); trailing bytes are an error.
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    let (message, used) = bincode::serde::decode_from_slice(payload, wire_config())
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    if used != payload.len() {
        return Err(FrameError::Malformed(format!(
            "{} trailing bytes after the message",
            payload.len() - used
        )));
    }
    Ok(message)
}

/// Reads frames of `In` and writes frames of `Out`, both bounded by one maximum.
#[derive(Debug)]
pub struct FrameCodec<In, Out> {
    frames: LengthDelimitedCodec,
    max: usize,
    types: PhantomData<fn(Out) -> In>,
}

impl<In, Out> FrameCodec<In, Out> {
    /// A codec with the given maximum payload, capped at [`MAX_FRAME_CEILING`].
    pub fn new(max_frame: usize) -> Self {
        let max = max_frame.min(MAX_FRAME_CEILING);
        let frames = LengthDelimitedCodec::builder()
            .length_field_length(4)
            .big_endian()
            .max_frame_length(max)
            .new_codec();
        FrameCodec {
            frames,
            max,
            types: PhantomData,
        }
    }

    /// A codec for a connection on which tensors stream: `max_frame` bounds
    /// its messages, but a frame that carries a chunk ([`crate::stream::CHUNK_FRAME`])
    /// always passes, or a peer with a limit under 1 MiB could stream nothing.
    pub fn streaming(max_frame: usize) -> Self {
        Self::new(max_frame.max(crate::stream::CHUNK_FRAME))
    }

    /// The maximum payload in force.
    pub fn max_frame(&self) -> usize {
        self.max
    }

    fn map_error(&self, error: io::Error) -> FrameError {
        if error
            .get_ref()
            .is_some_and(|e| e.is::<LengthDelimitedCodecError>())
        {
            FrameError::TooLarge { max: self.max }
        } else {
            FrameError::Io(error)
        }
    }
}

impl<In, Out> Default for FrameCodec<In, Out> {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_FRAME)
    }
}

impl<In: DeserializeOwned, Out> Decoder for FrameCodec<In, Out> {
    type Item = In;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<In>, FrameError> {
        match self.frames.decode(src) {
            Ok(Some(payload)) => decode_payload(&payload).map(Some),
            Ok(None) => Ok(None),
            Err(error) => Err(self.map_error(error)),
        }
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<In>, FrameError> {
        match self.decode(src)? {
            Some(message) => Ok(Some(message)),
            None if src.is_empty() => Ok(None),
            None => Err(FrameError::Truncated {
                buffered: src.len(),
            }),
        }
    }
}

impl<In, Out: Serialize> Encoder<Out> for FrameCodec<In, Out> {
    type Error = FrameError;

    fn encode(&mut self, message: Out, dst: &mut BytesMut) -> Result<(), FrameError> {
        let payload = encode_payload(&message)?;
        if payload.len() > self.max {
            return Err(FrameError::TooLarge { max: self.max });
        }
        self.frames
            .encode(Bytes::from(payload), dst)
            .map_err(|e| self.map_error(e))
    }
}
