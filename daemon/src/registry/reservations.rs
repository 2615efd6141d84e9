//! Reservations: another program asks gpuctld to keep memory free for it.
//! Idle models are evicted until the memory is free; while the reservation
//! lives, the part its holder does not use yet is kept out of gpuctld's own
//! admissions. It ends with its connection, `Release`, or its ttl.

use std::time::{Duration, Instant};

use gpuctl_protocol::units::{format_bytes, format_duration_ms};
use gpuctl_protocol::{
    Error, ErrorCode, NoticeKind, ReleaseResponse, ReserveRequest, ReserveResponse, UnloadReason,
};
use tokio::sync::oneshot;

use super::{Command, Registry};
use crate::arbitration::{self, Placement, WaitingLoad};
use crate::outbox::EventSink;

pub struct Reservation {
    pub id: u64,
    pub bytes: u64,
    /// The device asked for.
    preferred: Option<u32>,
    /// Where it was granted; `None` while it waits.
    pub device: Option<u32>,
    /// The process that asked; it and its children may use the memory.
    pub pid: Option<u32>,
    pub since: Instant,
    timeout: Duration,
    ttl: Option<Duration>,
    connection: EventSink,
    /// Answered when granted (or on timeout).
    reply: Option<oneshot::Sender<Result<ReserveResponse, Error>>>,
}

impl Registry {
    pub(super) fn reserve(
        &mut self,
        request: ReserveRequest,
        pid: Option<u32>,
        connection: EventSink,
        reply: oneshot::Sender<Result<ReserveResponse, Error>>,
    ) {
        if request.bytes == 0 {
            let _ = reply.send(Err(Error::new(
                ErrorCode::InvalidRequest,
                "a reservation must be for more than 0 bytes",
            )));
            return;
        }
        if !self.gpu.active() {
            let _ = reply.send(Err(Error::new(
                ErrorCode::InvalidRequest,
                format!(
                    "gpuctld watches no GPU ({}): there is nothing to reserve",
                    self.gpu_reason()
                ),
            )));
            return;
        }
        let id = self.next_reservation;
        self.next_reservation += 1;
        tracing::info!(
            reservation = id,
            bytes = %format_bytes(request.bytes),
            device = request.device,
            pid,
            "reservation asked for"
        );
        self.reservations.insert(
            id,
            Reservation {
                id,
                bytes: request.bytes,
                preferred: request.device,
                device: None,
                pid,
                since: Instant::now(),
                timeout: Duration::from_millis(request.timeout_ms),
                ttl: request.ttl_ms.map(Duration::from_millis),
                connection,
                reply: Some(reply),
            },
        );
        self.request_sample();
    }

    pub(super) fn release(
        &mut self,
        id: u64,
        why: &'static str,
        connection: Option<&EventSink>,
    ) -> Result<ReleaseResponse, Error> {
        let Some(reservation) = self.reservations.get(&id) else {
            return Err(Error::new(
                ErrorCode::NotFound,
                format!("there is no reservation {id}"),
            ));
        };
        if connection.is_some_and(|c| !c.same_connection(&reservation.connection)) {
            return Err(Error::new(
                ErrorCode::Unauthorized,
                format!("reservation {id} was made on another connection"),
            ));
        }
        let Some(mut reservation) = self.reservations.remove(&id) else {
            return Err(Error::new(
                ErrorCode::NotFound,
                format!("there is no reservation {id}"),
            ));
        };
        if let Some(waiting) = reservation.reply.take() {
            let _ = waiting.send(Err(Error::new(
                ErrorCode::Cancelled,
                format!("reservation {id} was released before it was granted"),
            )));
        }
        if let Some(device) = reservation.device {
            reservation.connection.drop_reservation();
            tracing::info!(reservation = id, device, bytes = %format_bytes(reservation.bytes), why, "reservation ended");
            self.notice(NoticeKind::Released {
                reservation: id,
                device,
                bytes: reservation.bytes,
                why: why.to_owned(),
            });
        }
        // Loads that waited for this memory may fit now.
        self.request_sample();
        Ok(ReleaseResponse {
            bytes: reservation.bytes,
        })
    }

    /// Grants what fits, evicts idle models for what would, and times out
    /// the rest; in the order they were asked for.
    pub(super) fn settle_reservations(&mut self) {
        let waiting: Vec<u64> = self
            .reservations
            .values()
            .filter(|r| r.device.is_none())
            .map(|r| r.id)
            .collect();
        let mut asked = Vec::new();
        for id in waiting {
            let Some(reservation) = self.reservations.get(&id) else {
                continue;
            };
            if reservation.reply.as_ref().is_none_or(|r| r.is_closed()) {
                tracing::info!(
                    reservation = id,
                    "reservation abandoned before it was granted"
                );
                self.reservations.remove(&id);
                continue;
            }
            asked.push((
                id,
                reservation.since,
                reservation.timeout,
                WaitingLoad {
                    name: format!("reservation {id}"),
                    need: reservation.bytes,
                    preferred: reservation.preferred,
                },
            ));
        }
        // One snapshot for the whole pass, as for loads waiting for memory.
        let requests: Vec<WaitingLoad> = asked.iter().map(|(.., r)| r.clone()).collect();
        let placements =
            arbitration::place_waiting(&self.device_views(), &self.residents(), &requests, 0);
        for ((id, since, timeout, request), placement) in asked.into_iter().zip(placements) {
            let bytes = request.need;
            let device = match placement {
                Placement::Fits { device } => {
                    self.grant(id, device);
                    continue;
                }
                Placement::NoSuchDevice { device } => {
                    let error = Error::new(
                        ErrorCode::InvalidRequest,
                        format!(
                            "there is no GPU {device} ({} GPUs)",
                            self.device_views().len()
                        ),
                    );
                    self.refuse(id, error);
                    continue;
                }
                Placement::Evict { device, victims } => {
                    for victim in victims {
                        self.unload(&victim, UnloadReason::Reservation, false);
                    }
                    device
                }
                Placement::AwaitRelease { device } | Placement::Wait { device, .. } => device,
            };
            if since.elapsed() >= timeout {
                let free = self
                    .device_views()
                    .iter()
                    .find(|d| d.index == device)
                    .map_or(0, |d| d.free);
                let error = Error::new(
                    ErrorCode::InsufficientVram,
                    format!(
                        "cannot keep {} free on GPU {device} within {}: {} is free; {}",
                        format_bytes(bytes),
                        format_duration_ms(timeout.as_millis() as u64),
                        format_bytes(free),
                        self.who_holds(device)
                    ),
                );
                self.refuse(id, error);
            }
        }
    }

    fn grant(&mut self, id: u64, device: u32) {
        let commands = self.commands.clone();
        let Some(reservation) = self.reservations.get_mut(&id) else {
            return;
        };
        reservation.device = Some(device);
        // A connection that holds a reservation is not idle.
        reservation.connection.hold_reservation();
        let answer = ReserveResponse {
            reservation: id,
            device,
            bytes: reservation.bytes,
        };
        if let Some(reply) = reservation.reply.take() {
            let _ = reply.send(Ok(answer));
        }
        let (bytes, pid, ttl, connection) = (
            reservation.bytes,
            reservation.pid,
            reservation.ttl,
            reservation.connection.clone(),
        );
        tracing::info!(reservation = id, device, bytes = %format_bytes(bytes), pid, "reservation granted");
        self.notice(NoticeKind::Reserved {
            reservation: id,
            device,
            bytes,
            pid,
        });
        // It ends with its connection, or its ttl.
        tokio::spawn(async move {
            let why = match ttl {
                Some(ttl) => tokio::select! {
                    _ = connection.closed() => "connection closed",
                    _ = tokio::time::sleep(ttl) => "ttl expired",
                },
                None => {
                    connection.closed().await;
                    "connection closed"
                }
            };
            if let Some(commands) = commands.upgrade() {
                let _ = commands
                    .send(Command::Release {
                        reservation: id,
                        why,
                        connection: None,
                        reply: None,
                    })
                    .await;
            }
        });
    }

    fn refuse(&mut self, id: u64, error: Error) {
        tracing::warn!(reservation = id, error = %error.message, "reservation refused");
        if let Some(mut reservation) = self.reservations.remove(&id) {
            if let Some(reply) = reservation.reply.take() {
                let _ = reply.send(Err(error));
            }
        }
    }
}
