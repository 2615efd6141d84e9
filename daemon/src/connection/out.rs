//! How everything is written to one client: as its protocol version can
//! decode it, each frame within `daemon.send_timeout`, large outputs
//! streamed ahead of their answer.

use std::time::Duration;

use futures_util::SinkExt;
use gpuctl_protocol::stream::take_streamed;
use gpuctl_protocol::{
    DaemonMessage, Error, ErrorCode, FrameError, ProtocolVersion, RequestId, WireTensor,
};

use super::Connection;

/// How everything is written to one client: as its protocol version can
/// decode it, each frame within `daemon.send_timeout` (a client that reads
/// nothing must not hold its connection's task, nor the memory waiting for
/// it, for ever).
#[derive(Clone, Copy)]
pub(super) struct Out {
    pub(super) protocol: ProtocolVersion,
    pub(super) limit: Duration,
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

    pub(super) async fn send(
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

/// Sends a final answer, its large output tensors streamed ahead of it
/// when the client takes streams; an answer still too large for a frame
/// becomes an error for that request alone. `false`: the connection is gone.
pub(super) async fn send_answer(
    connection: &mut Connection,
    out: Out,
    mut message: DaemonMessage,
) -> bool {
    let id = match &message {
        DaemonMessage::Response { id, .. } | DaemonMessage::Error { id, .. } => Some(*id),
        _ => None,
    };
    let (of, streamed) = match &mut message {
        DaemonMessage::Response { id, response } if out.protocol.streams_tensors() => {
            match response.generate_mut() {
                Some(generate) => (*id, take_streamed(&mut generate.outputs)),
                None => (0, Vec::new()),
            }
        }
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
