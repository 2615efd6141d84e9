//! What a daemon sends a peer of an older minor version. bincode cannot
//! skip a variant it does not know, so values appended since that peer's
//! version become the nearest value it knows.

use crate::UnloadReason;
use crate::{DaemonMessage, Error, ErrorCode, Event, NoticeKind, ProtocolVersion, Response};

impl DaemonMessage {
    /// This message as a peer speaking `peer` can decode it.
    pub fn for_peer(self, peer: ProtocolVersion) -> DaemonMessage {
        if peer.knows_load_failed() {
            return self;
        }
        match self {
            DaemonMessage::Error { id, error } => DaemonMessage::Error {
                id,
                error: error.before_load_failed(),
            },
            DaemonMessage::Closing(error) => DaemonMessage::Closing(error.before_load_failed()),
            DaemonMessage::Event {
                id,
                event: Event::Notice(mut notice),
            } => {
                if let NoticeKind::Unloaded { reason, .. } = &mut notice.what {
                    *reason = reason.clone().before_stuck();
                }
                DaemonMessage::Event {
                    id,
                    event: Event::Notice(notice),
                }
            }
            DaemonMessage::Response {
                id,
                response: Response::Status(mut status),
            } => {
                for model in &mut status.models {
                    model.last_unload = model.last_unload.take().map(UnloadReason::before_stuck);
                }
                DaemonMessage::Response {
                    id,
                    response: Response::Status(status),
                }
            }
            other => other,
        }
    }
}

impl Error {
    fn before_load_failed(self) -> Error {
        match self.code {
            ErrorCode::LoadFailed => Error {
                code: ErrorCode::InvalidRequest,
                ..self
            },
            _ => self,
        }
    }
}

impl UnloadReason {
    fn before_stuck(self) -> UnloadReason {
        match self {
            UnloadReason::Stuck { description } => UnloadReason::Crash {
                description: format!("stuck: {description}"),
            },
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Notice, PROTOCOL_VERSION};

    const OLD: ProtocolVersion = ProtocolVersion { major: 1, minor: 2 };

    #[test]
    fn older_peers_get_values_they_know() {
        let error = DaemonMessage::Error {
            id: 1,
            error: Error::new(ErrorCode::LoadFailed, "model x: broken"),
        };
        assert_eq!(error.clone().for_peer(PROTOCOL_VERSION), error);
        match error.for_peer(OLD) {
            DaemonMessage::Error { error, .. } => {
                assert_eq!(error.code, ErrorCode::InvalidRequest);
                assert_eq!(error.message, "model x: broken");
            }
            other => panic!("{other:?}"),
        }
        let notice = DaemonMessage::Event {
            id: 2,
            event: Event::Notice(Notice {
                at_unix_ms: 0,
                what: NoticeKind::Unloaded {
                    model: "x".into(),
                    pid: 1,
                    reason: UnloadReason::Stuck {
                        description: "job 1 went on".into(),
                    },
                    reclaimed: 0,
                    took_ms: 0,
                },
            }),
        };
        match notice.for_peer(OLD) {
            DaemonMessage::Event {
                event: Event::Notice(notice),
                ..
            } => match notice.what {
                NoticeKind::Unloaded { reason, .. } => assert_eq!(
                    reason,
                    UnloadReason::Crash {
                        description: "stuck: job 1 went on".into()
                    }
                ),
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
    }
}
