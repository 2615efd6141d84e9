//! Protocol versioning: the first frame of every connection carries one.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A protocol version. Peers with the same `major` are compatible; `minor`
/// grows when variants or fields are appended, which older peers never send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProtocolVersion {
    /// Incremented on any change an older peer could misread.
    pub major: u16,
    /// Incremented when messages are appended.
    pub minor: u16,
}

/// The version this crate speaks.
pub const PROTOCOL_VERSION: ProtocolVersion = ProtocolVersion { major: 1, minor: 6 };

/// The first version whose peers stream large tensors (`TensorBegin`,
/// `TensorChunk`, `TensorEnd`).
pub const STREAMING: ProtocolVersion = ProtocolVersion { major: 1, minor: 1 };

/// The first version whose peers get `image` and `generate` outputs
/// channels-last (`[N,H,W,3]` RGB8: rows of pixels, as image files hold
/// them) and get a tiled image's rows streamed while its job still runs.
pub const PIXEL_ROWS: ProtocolVersion = ProtocolVersion { major: 1, minor: 2 };

/// The first version that knows the error code `LoadFailed` and the
/// unload reason `Stuck`; older peers get `InvalidRequest` and `Crash`.
pub const LOAD_FAILED: ProtocolVersion = ProtocolVersion { major: 1, minor: 3 };

/// The first version whose peers may send an `image` input as rows of
/// pixels, `[N,H,W,3]` (see [`crate::ImageLayout`]); daemons of this
/// version take them, so clients check the `Welcome` before sending them.
pub const PIXEL_ROWS_IN: ProtocolVersion = ProtocolVersion { major: 1, minor: 4 };

/// The first version that knows the error code `RetryLater`; older peers
/// get `LoadFailed` (or, before 1.3, `InvalidRequest`).
pub const RETRY_LATER: ProtocolVersion = ProtocolVersion { major: 1, minor: 5 };

/// The first version that knows the reload trigger `FileChange`; older
/// peers get `Signal`, the other trigger that nobody asked for over the socket.
pub const FILE_CHANGE: ProtocolVersion = ProtocolVersion { major: 1, minor: 6 };

impl ProtocolVersion {
    /// Whether a peer speaking `other` can talk to one speaking `self`.
    pub fn is_compatible_with(self, other: ProtocolVersion) -> bool {
        self.major == other.major
    }

    /// Whether a peer speaking this version streams large tensors.
    pub fn streams_tensors(self) -> bool {
        self.at_least(STREAMING)
    }

    /// Whether a peer speaking this version takes pixel rows (see
    /// [`PIXEL_ROWS`]).
    pub fn takes_pixel_rows(self) -> bool {
        self.at_least(PIXEL_ROWS)
    }

    /// Whether a peer speaking this version knows what 1.3 appended (see
    /// [`LOAD_FAILED`]).
    pub fn knows_load_failed(self) -> bool {
        self.at_least(LOAD_FAILED)
    }

    /// Whether a peer speaking this version takes (as a daemon) or may
    /// send (as a client) image inputs as pixel rows (see [`PIXEL_ROWS_IN`]).
    pub fn sends_pixel_rows(self) -> bool {
        self.at_least(PIXEL_ROWS_IN)
    }

    /// Whether a peer speaking this version knows what 1.5 appended (see
    /// [`RETRY_LATER`]).
    pub fn knows_retry_later(self) -> bool {
        self.at_least(RETRY_LATER)
    }

    /// Whether a peer speaking this version knows what 1.6 appended (see
    /// [`FILE_CHANGE`]).
    pub fn knows_file_change(self) -> bool {
        self.at_least(FILE_CHANGE)
    }

    fn at_least(self, version: ProtocolVersion) -> bool {
        self.major == version.major && self.minor >= version.minor
    }
}

impl fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}
