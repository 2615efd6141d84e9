//! The one error type that crosses the socket.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A stable, machine-readable error code.
///
/// On the wire a code is its position in this list (a `u32`), so variants
/// are only ever appended, never reordered or removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorCode {
    /// A bug or an unexpected failure inside the daemon.
    Internal,
    /// The request is malformed or its arguments make no sense.
    InvalidRequest,
    /// The named thing (model, request id, …) does not exist.
    NotFound,
    /// The peer is not allowed to perform this operation.
    Unauthorized,
    /// The daemon cannot take this now (for example: too many connections).
    Busy,
    /// The model's wait queue is full.
    QueueFull,
    /// Not enough GPU memory could be found in time.
    InsufficientVram,
    /// The operation did not finish within its time limit.
    Timeout,
    /// The operation was cancelled.
    Cancelled,
    /// The peers speak incompatible protocol versions.
    Incompatible,
    /// A configuration file is invalid.
    InvalidConfig,
    /// The daemon is shutting down.
    ShuttingDown,
    /// A frame's length prefix exceeds the negotiated maximum.
    FrameTooLarge,
    /// A frame could not be decoded.
    MalformedFrame,
    /// A tensor or image exceeds a configured limit (`daemon.max_upload`,
    /// `daemon.max_output`).
    TooLarge,
    /// The model could not be loaded (a missing or corrupt file, a forward
    /// that does not follow its kind's contract): the same code for the
    /// failure itself and, for peers before 1.5, for requests refused
    /// while it backs off (1.3).
    LoadFailed,
    /// The model failed (its load, or its worker crashed repeatedly) and
    /// backs off: requests fail at once until the time the message names,
    /// then the next one tries again (`policy.load_retry`). Peers before
    /// 1.5 get `LoadFailed` (1.5).
    RetryLater,
}

impl ErrorCode {
    /// The code's stable name, as printed by `gpuctl` and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::Internal => "internal",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Busy => "busy",
            ErrorCode::QueueFull => "queue_full",
            ErrorCode::InsufficientVram => "insufficient_vram",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::Incompatible => "incompatible",
            ErrorCode::InvalidConfig => "invalid_config",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::MalformedFrame => "malformed_frame",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::LoadFailed => "load_failed",
            ErrorCode::RetryLater => "retry_later",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An error reported by the daemon: a stable code and a message for humans.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message} ({code})")]
pub struct Error {
    /// What kind of failure this is; match on this, not on the message.
    pub code: ErrorCode,
    /// A sentence that names the problem, for people.
    pub message: String,
}

impl Error {
    /// An error with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Error {
            code,
            message: message.into(),
        }
    }
}
