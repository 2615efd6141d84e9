//! An async client: connect, handshake, then any number of calls in flight.
//!
//! ```no_run
//! # async fn demo() -> Result<(), gpuctl_protocol::ClientError> {
//! use gpuctl_protocol::{Client, Request, Response, StatusRequest};
//!
//! let client = Client::connect("/run/gpuctl/gpuctld.sock").await?;
//! match client.call(Request::Status(StatusRequest {})).await? {
//!     Response::Status(status) => println!("gpuctld {} up {} ms", status.daemon_version, status.uptime_ms),
//!     other => println!("unexpected: {other:?}"),
//! }
//! # Ok(()) }
//! ```
//!
//! One task owns the socket; [`Client`] is a cheap handle that posts calls to
//! it, so calls may be made from several tasks at once. A call's events and
//! its final answer come back on a [`Call`].

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio_util::codec::Framed;

use crate::{
    ClientMessage, DaemonMessage, Error, Event, FrameCodec, FrameError, Hello, Request, RequestId,
    Response, Welcome, DEFAULT_MAX_FRAME, PROTOCOL_VERSION,
};

/// Why a call or a connection failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing answered at the socket path.
    #[error("cannot connect to gpuctld at {}: {source}", path.display())]
    Connect {
        /// The path tried.
        path: PathBuf,
        /// Why it failed.
        source: io::Error,
    },
    /// The daemon refused the connection (incompatible version, too many
    /// connections, shutting down, …).
    #[error("gpuctld refused the connection: {0}")]
    Rejected(Error),
    /// The daemon answered the request with an error.
    #[error("{0}")]
    Daemon(Error),
    /// Reading or writing a frame failed, or a reply could not be decoded.
    #[error("{0}")]
    Frame(#[from] FrameError),
    /// The connection ended before the call was answered.
    #[error("gpuctld closed the connection{}", reason.as_ref().map(|e| format!(": {e}")).unwrap_or_default())]
    Closed {
        /// The reason the daemon gave, if it gave one.
        reason: Option<Error>,
    },
    /// The daemon sent something the protocol does not allow here.
    #[error("unexpected message from gpuctld: {0}")]
    Unexpected(String),
    /// The daemon did not answer the handshake in time.
    #[error("gpuctld did not answer the handshake within {0:?}")]
    HandshakeTimeout(Duration),
}

/// Options for [`Client::connect_with`].
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Sent in `Hello`, shown in the daemon's logs.
    pub name: String,
    /// Largest frame accepted or sent.
    pub max_frame: usize,
    /// How long to wait for `Welcome`.
    pub handshake_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            name: format!("gpuctl-protocol {}", env!("CARGO_PKG_VERSION")),
            max_frame: DEFAULT_MAX_FRAME,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// What a call receives: events, then one final answer.
#[derive(Debug)]
enum Update {
    Event(Event),
    Done(Result<Response, ClientError>),
}

struct Submit {
    id: RequestId,
    request: Request,
    updates: mpsc::UnboundedSender<Update>,
}

/// A connected, handshaken client. It is `Sync`: share it by reference.
pub struct Client {
    submit: mpsc::Sender<Submit>,
    next_id: AtomicU64,
    welcome: Welcome,
    socket: PathBuf,
    owner: tokio::task::JoinHandle<()>,
    closed: tokio_util::sync::CancellationToken,
}

type Connection = Framed<UnixStream, FrameCodec<DaemonMessage, ClientMessage>>;

impl Client {
    /// Connects to `path` with default options.
    pub async fn connect(path: impl AsRef<Path>) -> Result<Client, ClientError> {
        Client::connect_with(path, ClientOptions::default()).await
    }

    /// Connects to `path` and performs the handshake.
    pub async fn connect_with(
        path: impl AsRef<Path>,
        options: ClientOptions,
    ) -> Result<Client, ClientError> {
        let path = path.as_ref().to_path_buf();
        let stream = UnixStream::connect(&path)
            .await
            .map_err(|source| ClientError::Connect {
                path: path.clone(),
                source,
            })?;
        let mut connection = Framed::new(stream, FrameCodec::new(options.max_frame));
        let hello = Hello {
            protocol: PROTOCOL_VERSION,
            client: options.name.clone(),
        };
        if let Err(error) = connection.send(ClientMessage::Hello(hello)).await {
            // The daemon may have hung up with a reason (too many
            // connections, shutting down) before reading our Hello.
            return match tokio::time::timeout(options.handshake_timeout, connection.next()).await {
                Ok(Some(Ok(DaemonMessage::Closing(reason)))) => Err(ClientError::Rejected(reason)),
                _ => Err(error.into()),
            };
        }
        let first = tokio::time::timeout(options.handshake_timeout, connection.next())
            .await
            .map_err(|_| ClientError::HandshakeTimeout(options.handshake_timeout))?;
        let welcome = match first {
            Some(Ok(DaemonMessage::Welcome(welcome))) => welcome,
            Some(Ok(DaemonMessage::Closing(error))) => return Err(ClientError::Rejected(error)),
            Some(Ok(other)) => return Err(ClientError::Unexpected(format!("{other:?}"))),
            Some(Err(error)) => return Err(error.into()),
            None => return Err(ClientError::Closed { reason: None }),
        };
        let (submit, submissions) = mpsc::channel(64);
        let closed = tokio_util::sync::CancellationToken::new();
        let on_close = closed.clone().drop_guard();
        let owner = tokio::spawn(async move {
            let _on_close = on_close;
            own_connection(connection, submissions).await;
        });
        Ok(Client {
            submit,
            next_id: AtomicU64::new(1),
            welcome,
            socket: path,
            owner,
            closed,
        })
    }

    /// The daemon's `Welcome`.
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    /// The socket this client is connected to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends `request` and returns its [`Call`], to read events and the answer.
    pub async fn start(&self, request: Request) -> Result<Call, ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (updates, receiver) = mpsc::unbounded_channel();
        self.submit
            .send(Submit {
                id,
                request,
                updates,
            })
            .await
            .map_err(|_| ClientError::Closed { reason: None })?;
        Ok(Call {
            id,
            updates: receiver,
            done: None,
        })
    }

    /// Resolves when the connection has ended (the daemon hung up).
    pub async fn closed(&self) {
        self.closed.cancelled().await;
    }

    /// Sends `request` and waits for its answer, ignoring events.
    pub async fn call(&self, request: Request) -> Result<Response, ClientError> {
        self.start(request).await?.response().await
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // Closing the connection is what the daemon sees as "client gone".
        self.owner.abort();
    }
}

/// One request in flight: its events, then its answer.
pub struct Call {
    id: RequestId,
    updates: mpsc::UnboundedReceiver<Update>,
    done: Option<Result<Response, ClientError>>,
}

impl Call {
    /// The request's id on the wire.
    pub fn id(&self) -> RequestId {
        self.id
    }

    /// The next event, or `None` once the call has ended; then
    /// [`Call::response`] returns at once.
    pub async fn event(&mut self) -> Option<Event> {
        if self.done.is_some() {
            return None;
        }
        match self.updates.recv().await {
            Some(Update::Event(event)) => Some(event),
            Some(Update::Done(result)) => {
                self.done = Some(result);
                None
            }
            None => {
                self.done = Some(Err(ClientError::Closed { reason: None }));
                None
            }
        }
    }

    /// Waits for the answer, discarding events not yet read.
    pub async fn response(mut self) -> Result<Response, ClientError> {
        while self.event().await.is_some() {}
        self.done
            .unwrap_or(Err(ClientError::Closed { reason: None }))
    }
}

async fn own_connection(mut connection: Connection, mut submissions: mpsc::Receiver<Submit>) {
    let mut pending: HashMap<RequestId, mpsc::UnboundedSender<Update>> = HashMap::new();
    let closing_reason = loop {
        tokio::select! {
            submitted = submissions.recv() => {
                let Some(Submit { id, request, updates }) = submitted else {
                    return; // every handle dropped: close the socket
                };
                match connection.send(ClientMessage::Request { id, request }).await {
                    Ok(()) => {
                        pending.insert(id, updates);
                    }
                    Err(FrameError::TooLarge { max }) => {
                        let _ = updates.send(Update::Done(Err(FrameError::TooLarge { max }.into())));
                    }
                    Err(error) => {
                        let _ = updates.send(Update::Done(Err(error.into())));
                        break None;
                    }
                }
            }
            received = connection.next() => match received {
                Some(Ok(message)) => {
                    if let Some(reason) = route(message, &mut pending) {
                        break Some(reason);
                    }
                }
                Some(Err(error)) => {
                    for (_, updates) in pending.drain() {
                        let _ = updates.send(Update::Done(Err(ClientError::Frame(error.duplicate()))));
                    }
                    break None;
                }
                None => break None,
            },
        }
    };
    for (_, updates) in pending.drain() {
        let reason = closing_reason.clone();
        let _ = updates.send(Update::Done(Err(ClientError::Closed { reason })));
    }
}

/// Delivers one daemon message; returns the reason if the daemon is closing.
fn route(
    message: DaemonMessage,
    pending: &mut HashMap<RequestId, mpsc::UnboundedSender<Update>>,
) -> Option<Error> {
    match message {
        DaemonMessage::Response { id, response } => {
            if let Some(updates) = pending.remove(&id) {
                let _ = updates.send(Update::Done(Ok(response)));
            }
        }
        DaemonMessage::Error { id, error } => {
            if let Some(updates) = pending.remove(&id) {
                let _ = updates.send(Update::Done(Err(ClientError::Daemon(error))));
            }
        }
        DaemonMessage::Event { id, event } => {
            if let Some(updates) = pending.get(&id) {
                let _ = updates.send(Update::Event(event));
            }
        }
        DaemonMessage::Closing(error) => return Some(error),
        DaemonMessage::Welcome(_) => {}
    }
    None
}
