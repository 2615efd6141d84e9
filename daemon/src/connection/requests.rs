//! The requests of one connection: read, spawned, tracked in one map by
//! id until answered, cancelled on request; its events and streamed
//! outputs written ahead of the answers.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use futures_util::StreamExt;
use gpuctl_protocol::{
    ClientMessage, DaemonMessage, Error, ErrorCode, ProtocolVersion, RequestId, Response,
};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::access::Peer;
use crate::context::Context;
use crate::handlers;
use crate::outbox::{EventSink, Outgoing, Shared};
use crate::uploads::Uploads;

use super::out::{send_answer, Out};
use super::{frame_error, say_goodbye, shutting_down, too_many_streams, Connection, MAX_STREAMS};

/// The daemon's two ways of ending a connection: stop taking requests
/// (shutdown), and stop waiting for those in flight (the grace is over).
#[derive(Clone, Copy)]
pub(super) struct Stops<'a> {
    pub(super) shutdown: &'a CancellationToken,
    pub(super) hard_stop: &'a CancellationToken,
}

/// A request's task's result: its id, its answer, and the bytes of that
/// answer counted as unread until it is written.
type Finished = (RequestId, Result<Response, Error>, usize);

pub(super) async fn serve_requests(
    connection: &mut Connection,
    peer: Peer,
    ctx: &Arc<Context>,
    stops: Stops<'_>,
    protocol: ProtocolVersion,
) {
    let config = ctx.registry.config();
    let out = Out {
        protocol,
        limit: config.daemon.send_timeout.0,
    };
    let idle_timeout = config.daemon.idle_timeout.0;
    let shared = Arc::new(Shared::new(config.daemon.max_unread.0 as usize));
    let mut uploads = Uploads::new(
        config.daemon.max_upload.0 as usize,
        config.daemon.upload_timeout.0,
        ctx.budget.clone(),
    );
    drop(config);
    let mut running: JoinSet<Finished> = JoinSet::new();
    // The one record of this connection's requests, by id, until answered.
    let mut requests: HashMap<RequestId, InFlight> = HashMap::new();
    let mut draining = false;
    let mut last_active = Instant::now();
    let (events, mut event_inbox) = mpsc::unbounded_channel();
    loop {
        if draining && running.is_empty() {
            say_goodbye(connection, shutting_down()).await;
            return;
        }
        if uploads.streams() > MAX_STREAMS {
            say_goodbye(connection, too_many_streams()).await;
            return;
        }
        // Waiting legitimately: a request (a watch among them), an upload,
        // a reservation held. Anything else is idle.
        let idle = running.is_empty() && uploads.streams() == 0 && shared.reservations() == 0;
        let idle_until = (idle && !idle_timeout.is_zero()).then(|| last_active + idle_timeout);
        let uploads_expire = uploads.next_expiry();
        tokio::select! {
            // Events first: a request's events, sent before it ended, must
            // reach the client before its answer.
            biased;
            Some((id, outgoing)) = event_inbox.recv() => {
                let sent = match outgoing {
                    Outgoing::Event(event) => out.send(connection, DaemonMessage::Event { id, event }).await,
                    // A request already answered (timed out, cancelled)
                    // sends its client nothing more.
                    Outgoing::Output(frame) if !requests.get(&id).is_some_and(InFlight::answers) => {
                        shared.written(chunk_bytes(&frame));
                        continue;
                    }
                    Outgoing::Output(frame) => {
                        let bytes = chunk_bytes(&frame);
                        let sent = out.send(connection, DaemonMessage::tensor_frame(id, frame)).await;
                        shared.written(bytes);
                        sent
                    }
                    Outgoing::Overflow => {
                        if !requests.get(&id).is_some_and(InFlight::answers) {
                            continue;
                        }
                        if let Some(request) = requests.remove(&id) {
                            request.task.abort();
                        }
                        tracing::info!(request = id, unread = shared.unread(), "output refused: the client has not read earlier answers");
                        out.send(connection, DaemonMessage::Error { id, error: unread_error(&shared) }).await
                    }
                    Outgoing::Cancel { target, found } => {
                        let stopped = requests.get_mut(&target).filter(|r| r.answers()).map(|r| {
                            tracing::info!(request = target, "cancelled by its client");
                            r.cancelled = true;
                            r.task.abort();
                        });
                        let _ = found.send(stopped.is_some());
                        continue;
                    }
                };
                if sent.is_err() {
                    return;
                }
            }
            _ = stops.hard_stop.cancelled(), if draining => {
                let unfinished: Vec<String> = requests.keys().map(|id| id.to_string()).collect();
                tracing::warn!(requests = %unfinished.join(","), "grace period over; closing with requests unfinished");
                say_goodbye(connection, Error::new(
                    ErrorCode::ShuttingDown,
                    format!("gpuctld is shutting down and its grace period (daemon.shutdown_grace) is over; request(s) {} did not finish", unfinished.join(", ")),
                )).await;
                return;
            }
            _ = stops.shutdown.cancelled(), if !draining => draining = true,
            _ = sleep_until(idle_until), if idle_until.is_some() => {
                let after = gpuctl_protocol::units::format_duration_ms(idle_timeout.as_millis() as u64);
                tracing::debug!(idle = %after, "closing an idle connection");
                say_goodbye(connection, Error::new(
                    ErrorCode::Timeout,
                    format!("the connection was idle for {after} with nothing in flight (daemon.idle_timeout); connect again to go on"),
                )).await;
                return;
            }
            _ = sleep_until(uploads_expire), if uploads_expire.is_some() => uploads.expire(Instant::now()),
            frame = connection.next(), if !draining => {
                last_active = Instant::now();
                match frame {
                    Some(Ok(ClientMessage::TensorBegin { id, dtype, shape })) => uploads.begin(id, dtype, shape),
                    Some(Ok(ClientMessage::TensorChunk { id, data })) => uploads.chunk(id, &data),
                    Some(Ok(ClientMessage::TensorEnd { id })) => uploads.end(id),
                    Some(Ok(ClientMessage::Request { id, mut request })) => {
                        let permit = match uploads.attach(id, &mut request) {
                            Ok(permit) => permit,
                            Err(error) => {
                                tracing::info!(request = id, code = %error.code, error = %error.message, "streamed tensors refused");
                                if !send_answer(connection, out, DaemonMessage::Error { id, error }).await {
                                    return;
                                }
                                continue;
                            }
                        };
                        if requests.contains_key(&id) {
                            let error = Error::new(ErrorCode::InvalidRequest, format!("request id {id} is already in flight on this connection"));
                            if out.send(connection, DaemonMessage::Error { id, error }).await.is_err() {
                                return;
                            }
                            continue;
                        }
                        shared.take_overflowed(id);
                        let ctx = ctx.clone();
                        let shared = shared.clone();
                        let sink = EventSink::new(id, events.clone(), protocol, shared.clone());
                        let span = tracing::debug_span!("request", id, op = request.operation());
                        let task = running.spawn(async move {
                            // Its streamed inputs count against the daemon-wide
                            // budget until it ends.
                            let _inputs = permit;
                            let started = Instant::now();
                            tracing::debug!("started");
                            let result = handlers::handle(request, peer, &ctx, sink).await;
                            match &result {
                                Ok(_) => tracing::debug!(elapsed_ms = started.elapsed().as_millis() as u64, "done"),
                                Err(error) => tracing::info!(code = %error.code, error = %error.message, "request failed"),
                            }
                            let (result, unread) = count_unread(result, &shared);
                            (id, result, unread)
                        }.instrument(span));
                        requests.insert(id, InFlight { task, cancelled: false });
                    }
                    Some(Ok(ClientMessage::Hello(_))) => {
                        say_goodbye(connection, Error::new(ErrorCode::InvalidRequest, "Hello may only be sent once, as the first frame")).await;
                        return;
                    }
                    Some(Err(error)) => {
                        tracing::info!(%error, "bad frame from client; closing its connection");
                        if let Some(reason) = frame_error(&error) {
                            say_goodbye(connection, reason).await;
                        }
                        return;
                    }
                    None => return,
                }
            }
            Some(joined) = running.join_next_with_id() => {
                last_active = Instant::now();
                let message = match joined {
                    Ok((task, (id, result, unread))) => {
                        // Not there: answered already (its output overflowed),
                        // and its id may be in use again.
                        if requests.get(&id).is_none_or(|r| r.task.id() != task) {
                            shared.written(unread);
                            continue;
                        }
                        requests.remove(&id);
                        let message = match result {
                            Ok(response) => DaemonMessage::Response { id, response },
                            Err(error) => DaemonMessage::Error { id, error },
                        };
                        let sent = send_answer(connection, out, message).await;
                        shared.written(unread);
                        if !sent {
                            return;
                        }
                        continue;
                    }
                    Err(failure) if failure.is_cancelled() => {
                        let Some(id) = take_task(&mut requests, failure.id()) else { continue };
                        let error = Error::new(ErrorCode::Cancelled, format!("request {id} was cancelled by its client"));
                        DaemonMessage::Error { id, error }
                    }
                    Err(failure) => {
                        tracing::error!(error = %failure, "request handler failed");
                        let Some(id) = take_task(&mut requests, failure.id()) else { continue };
                        let error = Error::new(ErrorCode::Internal, "gpuctld failed while handling this request; its log says why");
                        DaemonMessage::Error { id, error }
                    }
                };
                if !send_answer(connection, out, message).await {
                    return;
                }
            }
        }
    }
}

/// A request in flight on a connection.
struct InFlight {
    task: tokio::task::AbortHandle,
    /// Its client cancelled it: it is answered `Cancelled` once its task
    /// has ended, and sends nothing before.
    cancelled: bool,
}

impl InFlight {
    /// Whether what it sends still reaches its client.
    fn answers(&self) -> bool {
        !self.cancelled
    }
}

/// Forgets the request whose task is `task`; its id.
fn take_task(
    requests: &mut HashMap<RequestId, InFlight>,
    task: tokio::task::Id,
) -> Option<RequestId> {
    let id = requests
        .iter()
        .find(|(_, r)| r.task.id() == task)
        .map(|(id, _)| *id)?;
    requests.remove(&id);
    Some(id)
}

/// The data bytes a streamed frame carries.
fn chunk_bytes(frame: &gpuctl_protocol::TensorFrame) -> usize {
    match frame {
        gpuctl_protocol::TensorFrame::Chunk(data) => data.len(),
        _ => 0,
    }
}

/// Counts a finished request's outputs as unread until they are written;
/// an answer that does not fit becomes an error, and its outputs go now.
fn count_unread(
    result: Result<Response, Error>,
    shared: &Shared,
) -> (Result<Response, Error>, usize) {
    let mut result = result;
    let bytes = match &mut result {
        Ok(response) => response.generate_mut().map_or(0, |generate| {
            generate.outputs.iter().map(|t| t.data.len()).sum()
        }),
        Err(_) => 0,
    };
    if bytes == 0 {
        return (result, 0);
    }
    if shared.queue(bytes) {
        (result, bytes)
    } else {
        (Err(unread_error(shared)), 0)
    }
}

fn unread_error(shared: &Shared) -> Error {
    let fmt = gpuctl_protocol::units::format_bytes;
    Error::new(
        ErrorCode::TooLarge,
        format!(
            "this connection's client has left {} of answers unread, and this request's output does not fit under daemon.max_unread ({}); read answers as they come, or use another connection",
            fmt(shared.unread() as u64),
            fmt(shared.max_unread() as u64)
        ),
    )
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}
