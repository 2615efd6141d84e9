//! One client connection: handshake, then requests served concurrently,
//! each answered under its id. A bad frame closes this connection only.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use gpuctl_protocol::stream::take_streamed;
use gpuctl_protocol::{
    ClientMessage, DaemonMessage, Error, ErrorCode, FrameCodec, FrameError, Hello, ProtocolVersion,
    RequestId, Response, Welcome, WireTensor, PROTOCOL_VERSION,
};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::access::Peer;
use crate::context::Context;
use crate::handlers;
use crate::outbox::{EventSink, Outgoing, Shared};
use crate::uploads::Uploads;

type Connection = Framed<UnixStream, FrameCodec<ClientMessage, DaemonMessage>>;

/// Requests a connection may have streamed tensors for without sending
/// them yet; past it the client is misbehaving and is disconnected.
const MAX_STREAMS: usize = 1024;

fn too_many_streams() -> Error {
    Error::new(
        ErrorCode::InvalidRequest,
        format!("tensors streamed for more than {MAX_STREAMS} requests that were never sent; closing the connection"),
    )
}

/// How long a goodbye frame may take to write before we just hang up.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(1);

/// The peer's credentials; a socket that reports none is treated as a
/// stranger with no privileges.
pub fn peer_of(stream: &UnixStream) -> Peer {
    match stream.peer_cred() {
        Ok(cred) => Peer {
            uid: cred.uid(),
            gid: cred.gid(),
            pid: cred.pid(),
        },
        Err(error) => {
            tracing::warn!(%error, "cannot read peer credentials");
            Peer {
                uid: u32::MAX,
                gid: u32::MAX,
                pid: None,
            }
        }
    }
}

/// Serves one connection until the client leaves, misbehaves, or the
/// daemon shuts down (then requests in flight finish first, until
/// `hard_stop` says the grace is over).
pub async fn serve(
    stream: UnixStream,
    ctx: Arc<Context>,
    shutdown: CancellationToken,
    hard_stop: CancellationToken,
) {
    let peer = peer_of(&stream);
    let span = tracing::info_span!("connection", uid = peer.uid, pid = peer.pid.unwrap_or(0));
    async move {
        let _counted = ctx.connections.open();
        let config = ctx.registry.config();
        let max_frame = config.daemon.max_frame.0 as usize;
        let mut connection = Framed::new(stream, FrameCodec::new(max_frame));
        let hello = tokio::select! {
            _ = shutdown.cancelled() => Err(shutting_down()),
            hello = handshake(&mut connection, config.daemon.handshake_timeout.0) => hello,
        };
        match hello {
            Ok(Some(hello)) => {
                tracing::debug!(client = %hello.client, version = %hello.protocol, "client connected");
                let stops = Stops {
                    shutdown: &shutdown,
                    hard_stop: &hard_stop,
                };
                serve_requests(&mut connection, peer, &ctx, stops, hello.protocol).await;
            }
            Ok(None) => {}
            Err(reason) => say_goodbye(&mut connection, reason).await,
        }
        tracing::debug!("connection closed");
    }
    .instrument(span)
    .await
}

/// Turns away a connection over the limit, telling it why.
pub async fn refuse(stream: UnixStream, max_frame: usize, reason: Error) {
    let mut connection: Connection = Framed::new(stream, FrameCodec::new(max_frame));
    // Read the Hello that is usually already on its way: closing a Unix
    // socket with unread input makes the peer's reads fail with ECONNRESET,
    // and the client would never see why it was turned away.
    let _ = tokio::time::timeout(GOODBYE_TIMEOUT / 4, connection.next()).await;
    say_goodbye(&mut connection, reason).await;
}

/// Waits for Hello and answers it. `Ok(None)`: the client left quietly.
async fn handshake(connection: &mut Connection, limit: Duration) -> Result<Option<Hello>, Error> {
    let first = tokio::time::timeout(limit, connection.next())
        .await
        .map_err(|_| {
            Error::new(
                ErrorCode::Timeout,
                format!("no Hello within {limit:?}; closing the connection"),
            )
        })?;
    let hello = match first {
        None => return Ok(None),
        Some(Err(error)) => return Err(frame_error(&error).unwrap_or_else(|| closed_error(&error))),
        Some(Ok(ClientMessage::Hello(hello))) => hello,
        Some(Ok(_)) => {
            return Err(Error::new(
                ErrorCode::InvalidRequest,
                "the first frame must be Hello",
            ));
        }
    };
    if !PROTOCOL_VERSION.is_compatible_with(hello.protocol) {
        tracing::info!(client = %hello.client, version = %hello.protocol, "incompatible client");
        return Err(Error::new(
            ErrorCode::Incompatible,
            format!(
                "client {:?} speaks protocol {}, gpuctld {} speaks {}; use a gpuctl of the same major version",
                hello.client,
                hello.protocol,
                env!("CARGO_PKG_VERSION"),
                PROTOCOL_VERSION
            ),
        ));
    }
    let welcome = Welcome {
        protocol: PROTOCOL_VERSION,
        daemon_version: env!("CARGO_PKG_VERSION").to_owned(),
        capabilities: handlers::CAPABILITIES
            .iter()
            .map(|c| (*c).to_owned())
            .collect(),
    };
    connection
        .send(DaemonMessage::Welcome(welcome))
        .await
        .map_err(|e| closed_error(&e))?;
    Ok(Some(hello))
}

/// The daemon's two ways of ending a connection: stop taking requests
/// (shutdown), and stop waiting for those in flight (the grace is over).
#[derive(Clone, Copy)]
struct Stops<'a> {
    shutdown: &'a CancellationToken,
    hard_stop: &'a CancellationToken,
}

/// A request's task's result: its id, its answer, and the bytes of that
/// answer counted as unread until it is written.
type Finished = (RequestId, Result<Response, Error>, usize);

async fn serve_requests(
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
    let bytes = match &result {
        Ok(Response::Generate(generate)) => generate.outputs.iter().map(|t| t.data.len()).sum(),
        _ => 0,
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

/// How everything is written to one client: as its protocol version can
/// decode it, each frame within `daemon.send_timeout` (a client that reads
/// nothing must not hold its connection's task, nor the memory waiting for
/// it, for ever).
#[derive(Clone, Copy)]
struct Out {
    protocol: ProtocolVersion,
    limit: Duration,
}

impl Out {
    async fn feed(
        &self,
        connection: &mut Connection,
        message: DaemonMessage,
    ) -> Result<(), FrameError> {
        let message = message.for_peer(self.protocol);
        self.within(connection.feed(message)).await
    }

    async fn send(
        &self,
        connection: &mut Connection,
        message: DaemonMessage,
    ) -> Result<(), FrameError> {
        let message = message.for_peer(self.protocol);
        self.within(connection.send(message)).await
    }

    async fn flush(&self, connection: &mut Connection) -> Result<(), FrameError> {
        self.within(connection.flush()).await
    }

    async fn within(
        &self,
        write: impl std::future::Future<Output = Result<(), FrameError>>,
    ) -> Result<(), FrameError> {
        match tokio::time::timeout(self.limit, write).await {
            Ok(written) => written,
            Err(_) => {
                tracing::info!(
                    limit_ms = self.limit.as_millis() as u64,
                    "the client reads nothing of what it is sent; disconnecting it (daemon.send_timeout)"
                );
                Err(FrameError::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the client did not read within daemon.send_timeout",
                )))
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}

/// Sends a final answer, its large output tensors streamed ahead of it
/// when the client takes streams; an answer still too large for a frame
/// becomes an error for that request alone. `false`: the connection is gone.
async fn send_answer(connection: &mut Connection, out: Out, mut message: DaemonMessage) -> bool {
    let id = match &message {
        DaemonMessage::Response { id, .. } | DaemonMessage::Error { id, .. } => Some(*id),
        _ => None,
    };
    let (of, streamed) = match &mut message {
        DaemonMessage::Response {
            id,
            response: Response::Generate(generate),
        } if out.protocol.streams_tensors() => (*id, take_streamed(&mut generate.outputs)),
        _ => (0, Vec::new()),
    };
    for tensor in streamed {
        if send_stream(connection, out, of, tensor).await.is_err() {
            return false;
        }
    }
    match out.send(connection, message).await {
        Ok(()) => true,
        Err(FrameError::TooLarge { max }) => {
            let Some(id) = id else { return true };
            let error = Error::new(
                ErrorCode::Internal,
                format!("the answer exceeds the frame limit of {max} bytes"),
            );
            out.send(connection, DaemonMessage::Error { id, error })
                .await
                .is_ok()
        }
        Err(error) => {
            tracing::debug!(%error, "cannot write to client");
            false
        }
    }
}

/// Streams one output tensor: begin, chunks, end.
async fn send_stream(
    connection: &mut Connection,
    out: Out,
    id: RequestId,
    tensor: WireTensor,
) -> Result<(), FrameError> {
    for frame in gpuctl_protocol::stream::frames(tensor) {
        out.feed(connection, DaemonMessage::tensor_frame(id, frame))
            .await?;
    }
    out.flush(connection).await
}

/// Sends `Closing(reason)` if the client still listens, then returns so the
/// caller drops the socket.
async fn say_goodbye(connection: &mut Connection, reason: Error) {
    tracing::debug!(code = %reason.code, reason = %reason.message, "closing connection");
    let _ = tokio::time::timeout(
        GOODBYE_TIMEOUT,
        connection.send(DaemonMessage::Closing(reason)),
    )
    .await;
}

/// The error to send for a bad incoming frame; `None` when the socket itself failed.
fn frame_error(error: &FrameError) -> Option<Error> {
    match error {
        FrameError::TooLarge { .. } => {
            Some(Error::new(ErrorCode::FrameTooLarge, error.to_string()))
        }
        FrameError::Malformed(_) | FrameError::Truncated { .. } => {
            Some(Error::new(ErrorCode::MalformedFrame, error.to_string()))
        }
        FrameError::Io(_) | FrameError::Encode(_) => None,
    }
}

fn closed_error(error: &FrameError) -> Error {
    Error::new(ErrorCode::Internal, error.to_string())
}

fn shutting_down() -> Error {
    Error::new(ErrorCode::ShuttingDown, "gpuctld is shutting down")
}
