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

use std::collections::{HashMap, VecDeque};
use std::future::poll_fn;
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
    Response, TensorFrame, TensorReceiver, Welcome, DEFAULT_MAX_FRAME, PROTOCOL_VERSION,
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
    /// Largest frame accepted or sent; never below a streamed chunk's
    /// frame ([`crate::stream::CHUNK_FRAME`]), which the daemon sends.
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

/// Takes the frames of a call's streamed outputs as they arrive (see
/// [`Client::start_with_sink`]).
pub type OutputSink = Box<dyn FnMut(TensorFrame) + Send>;

struct Submit {
    id: RequestId,
    request: Request,
    updates: mpsc::UnboundedSender<Update>,
    sink: Option<OutputSink>,
}

/// A call sent and not yet answered.
struct Pending {
    updates: mpsc::UnboundedSender<Update>,
    sink: Option<OutputSink>,
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
        let mut connection = Framed::new(stream, FrameCodec::streaming(options.max_frame));
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
        let stream_tensors = welcome.protocol.streams_tensors();
        let owner = tokio::spawn(async move {
            let _on_close = on_close;
            own_connection(connection, submissions, stream_tensors).await;
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
        self.submit_call(request, None).await
    }

    /// Like [`Client::start`], but the outputs the daemon streams (those
    /// over 1 MiB) go to `sink` frame by frame as they arrive, and stay
    /// placeholders in the response: a caller that converts them as they
    /// come (gpuctl interleaves pixels for the encoder) holds them once.
    pub async fn start_with_sink(
        &self,
        request: Request,
        sink: OutputSink,
    ) -> Result<Call, ClientError> {
        self.submit_call(request, Some(sink)).await
    }

    async fn submit_call(
        &self,
        request: Request,
        sink: Option<OutputSink>,
    ) -> Result<Call, ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (updates, receiver) = mpsc::unbounded_channel();
        self.submit
            .send(Submit {
                id,
                request,
                updates,
                sink,
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

/// A request on its way out: the frames of the tensors it streams, then
/// itself.
struct Outgoing {
    id: RequestId,
    frames: Box<dyn Iterator<Item = TensorFrame> + Send>,
    request: Request,
    pending: Pending,
}

impl Outgoing {
    fn new(submit: Submit, stream: bool) -> Outgoing {
        let Submit {
            id,
            mut request,
            updates,
            sink,
        } = submit;
        let streamed = match request.generate_mut() {
            Some(generate) if stream => crate::stream::take_streamed(generate.tensors_mut()),
            _ => Vec::new(),
        };
        Outgoing {
            id,
            frames: Box::new(streamed.into_iter().flat_map(crate::stream::frames)),
            request,
            pending: Pending { updates, sink },
        }
    }

    /// The next frame of the tensors streamed ahead of the request; `None`
    /// once only the request itself is left.
    fn next_stream_frame(&mut self) -> Option<ClientMessage> {
        let frame = self.frames.next()?;
        Some(ClientMessage::tensor_frame(self.id, frame))
    }
}

/// Writes frames only when the socket takes them, so that reading never
/// waits behind a large upload (the daemon may be sending us as much).
async fn own_connection(
    connection: Connection,
    mut submissions: mpsc::Receiver<Submit>,
    stream_tensors: bool,
) {
    let (mut sink, mut frames) = connection.split();
    let mut outbox: VecDeque<Outgoing> = VecDeque::new();
    let mut unflushed = false;
    let mut pending: HashMap<RequestId, Pending> = HashMap::new();
    let mut receiving: HashMap<RequestId, TensorReceiver> = HashMap::new();
    let closing_reason = loop {
        // One branch for the sink: room for the next frame while there is
        // one to send, else the flush of what was sent.
        let sending = !outbox.is_empty();
        tokio::select! {
            ready = poll_fn(|cx| if sending { sink.poll_ready_unpin(cx) } else { sink.poll_flush_unpin(cx) }), if sending || unflushed => {
                if !sending {
                    if ready.is_err() {
                        break None;
                    }
                    unflushed = false;
                    continue;
                }
                let Some(front) = outbox.front_mut() else { continue };
                let sent = match (ready, front.next_stream_frame()) {
                    (Err(error), _) => Err(error),
                    (Ok(()), Some(frame)) => sink.start_send_unpin(frame),
                    (Ok(()), None) => {
                        let Some(Outgoing { id, request, pending: call, .. }) = outbox.pop_front() else { continue };
                        match sink.start_send_unpin(ClientMessage::Request { id, request }) {
                            Ok(()) => {
                                pending.insert(id, call);
                                Ok(())
                            }
                            Err(FrameError::TooLarge { max }) => {
                                let _ = call.updates.send(Update::Done(Err(FrameError::TooLarge { max }.into())));
                                Ok(())
                            }
                            Err(error) => {
                                let _ = call.updates.send(Update::Done(Err(error.duplicate().into())));
                                Err(error)
                            }
                        }
                    }
                };
                if sent.is_err() {
                    break None;
                }
                unflushed = true;
            }
            submitted = submissions.recv() => {
                let Some(submit) = submitted else {
                    return; // every handle dropped: close the socket
                };
                outbox.push_back(Outgoing::new(submit, stream_tensors));
            }
            received = frames.next() => match received {
                Some(Ok(message)) => {
                    if let Some(reason) = route(message, &mut pending, &mut receiving) {
                        break Some(reason);
                    }
                }
                Some(Err(error)) => {
                    for (_, call) in pending.drain() {
                        let _ = call.updates.send(Update::Done(Err(ClientError::Frame(error.duplicate()))));
                    }
                    break None;
                }
                None => break None,
            },
        }
    };
    let unsent = outbox.into_iter().map(|o| o.pending);
    for call in pending.into_values().chain(unsent) {
        let reason = closing_reason.clone();
        let _ = call
            .updates
            .send(Update::Done(Err(ClientError::Closed { reason })));
    }
}

/// Delivers one daemon message; returns the reason if the daemon is closing.
fn route(
    message: DaemonMessage,
    pending: &mut HashMap<RequestId, Pending>,
    receiving: &mut HashMap<RequestId, TensorReceiver>,
) -> Option<Error> {
    match message {
        DaemonMessage::Response { id, mut response } => {
            let Some(call) = pending.remove(&id) else {
                receiving.remove(&id);
                return None;
            };
            let streamed = receiving.remove(&id).unwrap_or_default();
            let filled = match response.generate_mut() {
                // A sink has had the streamed outputs: placeholders stay.
                Some(_) if call.sink.is_some() => Ok(()),
                Some(generate) => streamed.fill(&mut generate.outputs),
                None => Ok(()),
            };
            let done = filled
                .map(|()| response)
                .map_err(|problem| ClientError::Unexpected(format!("request {id}: {problem}")));
            let _ = call.updates.send(Update::Done(done));
        }
        DaemonMessage::Error { id, error } => {
            receiving.remove(&id);
            if let Some(call) = pending.remove(&id) {
                let _ = call
                    .updates
                    .send(Update::Done(Err(ClientError::Daemon(error))));
            }
        }
        DaemonMessage::Event { id, event } => {
            if let Some(call) = pending.get(&id) {
                let _ = call.updates.send(Update::Event(event));
            }
        }
        DaemonMessage::TensorBegin { id, dtype, shape } => {
            stream_frame(id, TensorFrame::Begin { dtype, shape }, pending, receiving)
        }
        DaemonMessage::TensorChunk { id, data } => {
            stream_frame(id, TensorFrame::Chunk(data), pending, receiving)
        }
        DaemonMessage::TensorEnd { id } => stream_frame(id, TensorFrame::End, pending, receiving),
        DaemonMessage::Closing(error) => return Some(error),
        DaemonMessage::Welcome(_) => {}
    }
    None
}

/// Hands a streamed output frame to its call's sink, or keeps it for the
/// response (checked when the response comes).
fn stream_frame(
    id: RequestId,
    frame: TensorFrame,
    pending: &mut HashMap<RequestId, Pending>,
    receiving: &mut HashMap<RequestId, TensorReceiver>,
) {
    let Some(call) = pending.get_mut(&id) else {
        return; // a call already answered (or never made) has no use for it
    };
    if let Some(sink) = call.sink.as_mut() {
        return sink(frame);
    }
    receiving.entry(id).or_default().frame(&frame, usize::MAX);
}
