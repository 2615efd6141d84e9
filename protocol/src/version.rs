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
pub const PROTOCOL_VERSION: ProtocolVersion = ProtocolVersion { major: 1, minor: 1 };

/// The first version whose peers stream large tensors (`TensorBegin`,
/// `TensorChunk`, `TensorEnd`).
pub const STREAMING: ProtocolVersion = ProtocolVersion { major: 1, minor: 1 };

impl ProtocolVersion {
    /// Whether a peer speaking `other` can talk to one speaking `self`.
    pub fn is_compatible_with(self, other: ProtocolVersion) -> bool {
        self.major == other.major
    }

    /// Whether a peer speaking this version streams large tensors.
    pub fn streams_tensors(self) -> bool {
        self.major == STREAMING.major && self.minor >= STREAMING.minor
    }
}

impl fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}
