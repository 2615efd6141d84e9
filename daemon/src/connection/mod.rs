//! One client connection: handshake, then requests served concurrently,
//! each answered under its id. A bad frame closes this connection only.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use gpuctl_protocol::{
    ClientMessage, DaemonMessage, Error, ErrorCode, FrameCodec, FrameError, Hello, Welcome,
    PROTOCOL_VERSION,
};
use tokio::net::UnixStream;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::access::Peer;
use crate::context::Context;
use crate::handlers;

mod out;
mod requests;

use requests::{serve_requests, Stops};

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
