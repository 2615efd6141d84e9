//! What a daemon sends a peer of an older minor version. bincode cannot
//! skip a variant it does not know, so values appended since that peer's
//! version become the nearest value it knows.

use crate::UnloadReason;
use crate::{
    DaemonMessage, Error, ErrorCode, Event, NoticeKind, ProtocolVersion, ReloadTrigger, Response,
    StatusResponse,
};

impl DaemonMessage {
    /// This message as a peer speaking `peer` can decode it.
    pub fn for_peer(self, peer: ProtocolVersion) -> DaemonMessage {
        if peer.knows_file_change() {
            return self;
        }
        // 1.6 appended the reload trigger FileChange and the notice ReloadedBy.
        let message = self
            .map_notice(|what| {
                if let NoticeKind::ReloadedBy {
                    generation, error, ..
                } = what
                {
                    *what = NoticeKind::Reloaded {
                        generation: *generation,
                        error: error.take(),
                    };
                }
            })
            .map_status(|status| {
                if let Some(outcome) = &mut status.config.last_reload {
                    if outcome.trigger == ReloadTrigger::FileChange {
                        outcome.trigger = ReloadTrigger::Signal;
                    }
                }
            });
        if peer.knows_retry_later() {
            return message;
        }
        let message = match message {
            DaemonMessage::Error { id, error } => DaemonMessage::Error {
                id,
                error: error.for_peer(peer),
            },
            DaemonMessage::Closing(error) => DaemonMessage::Closing(error.for_peer(peer)),
            other => other,
        };
        if peer.knows_load_failed() {
            return message;
        }
        // 1.3 appended the unload reason Stuck.
        message
            .map_notice(|what| {
                if let NoticeKind::Unloaded { reason, .. } = what {
                    *reason = reason.clone().before_stuck();
                }
            })
            .map_status(|status| {
                for model in &mut status.models {
                    model.last_unload = model.last_unload.take().map(UnloadReason::before_stuck);
                }
            })
    }

    /// This message with `change` applied to its notice, if it carries one.
    fn map_notice(self, change: impl FnOnce(&mut NoticeKind)) -> DaemonMessage {
        match self {
            DaemonMessage::Event {
                id,
                event: Event::Notice(mut notice),
            } => {
                change(&mut notice.what);
                DaemonMessage::Event {
                    id,
                    event: Event::Notice(notice),
                }
            }
            other => other,
        }
    }

    /// This message with `change` applied to its status, if it is one.
    fn map_status(self, change: impl FnOnce(&mut StatusResponse)) -> DaemonMessage {
        match self {
            DaemonMessage::Response {
                id,
                response: Response::Status(mut status),
            } => {
                change(&mut status);
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
    /// The nearest code an older peer knows: `RetryLater` was `LoadFailed`
    /// before 1.5, and both were `InvalidRequest` before 1.3.
    fn for_peer(self, peer: ProtocolVersion) -> Error {
        let code = match self.code {
            ErrorCode::RetryLater | ErrorCode::LoadFailed if !peer.knows_load_failed() => {
                ErrorCode::InvalidRequest
            }
            ErrorCode::RetryLater if !peer.knows_retry_later() => ErrorCode::LoadFailed,
            code => code,
        };
        Error { code, ..self }
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

    #[test]
    fn a_reload_by_file_change_is_a_signal_before_1_6() {
        let status = |trigger| DaemonMessage::Response {
            id: 1,
            response: Response::Status(crate::StatusResponse {
                daemon_version: "0.1.0".into(),
                pid: 1,
                uptime_ms: 0,
                socket: "s".into(),
                config: crate::ConfigStatus {
                    path: None,
                    generation: 2,
                    applied_at_unix_ms: 0,
                    last_reload: Some(crate::ReloadOutcome {
                        at_unix_ms: 0,
                        trigger,
                        error: None,
                    }),
                },
                connections: 1,
                models: vec![],
            }),
        };
        let file_change = status(ReloadTrigger::FileChange);
        assert_eq!(file_change.clone().for_peer(PROTOCOL_VERSION), file_change);
        for older in [crate::RETRY_LATER, OLD] {
            assert_eq!(
                file_change.clone().for_peer(older),
                status(ReloadTrigger::Signal)
            );
        }
        let request = status(ReloadTrigger::Request);
        assert_eq!(request.clone().for_peer(OLD), request);
        let notice = |what| DaemonMessage::Event {
            id: 0,
            event: Event::Notice(Notice {
                at_unix_ms: 5,
                what,
            }),
        };
        let by_file = notice(NoticeKind::ReloadedBy {
            generation: 3,
            trigger: ReloadTrigger::FileChange,
            error: None,
        });
        assert_eq!(by_file.clone().for_peer(PROTOCOL_VERSION), by_file);
        assert_eq!(
            by_file.for_peer(crate::RETRY_LATER),
            notice(NoticeKind::Reloaded {
                generation: 3,
                error: None
            })
        );
    }

    #[test]
    fn retry_later_is_load_failed_before_1_5_and_invalid_request_before_1_3() {
        let backing_off = DaemonMessage::Error {
            id: 3,
            error: Error::new(
                ErrorCode::RetryLater,
                "model x: broken; the next attempt is allowed in 10s",
            ),
        };
        let code_for = |peer| match backing_off.clone().for_peer(peer) {
            DaemonMessage::Error { error, .. } => error.code,
            other => panic!("{other:?}"),
        };
        assert_eq!(code_for(PROTOCOL_VERSION), ErrorCode::RetryLater);
        assert_eq!(
            code_for(ProtocolVersion { major: 1, minor: 4 }),
            ErrorCode::LoadFailed
        );
        assert_eq!(code_for(crate::LOAD_FAILED), ErrorCode::LoadFailed);
        assert_eq!(code_for(OLD), ErrorCode::InvalidRequest);
        let closing = DaemonMessage::Closing(Error::new(ErrorCode::RetryLater, "x"));
        assert!(matches!(
            closing.for_peer(ProtocolVersion { major: 1, minor: 4 }),
            DaemonMessage::Closing(Error {
                code: ErrorCode::LoadFailed,
                ..
            })
        ));
    }
}
