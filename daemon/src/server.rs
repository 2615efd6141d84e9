//! The main loop: accept, reload, watchdog, shutdown — one `select!`.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gpuctl_protocol::{Error, ErrorCode, ReloadTrigger};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Interval;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, ConfigSource};
use crate::connection;
use crate::context::{ConnectionCount, Context};
use crate::listener::SocketFile;
use crate::{notify, registry};

/// What `run` needs from its caller, so tests can drive it in-process.
pub struct Setup {
    /// The listening socket.
    pub listener: UnixListener,
    /// Its path, for `Status` and logs.
    pub socket: String,
    /// Removes the socket file when `run` returns; `None` under systemd.
    pub socket_file: Option<SocketFile>,
    /// Where the configuration comes from, for reloads.
    pub source: ConfigSource,
    /// The configuration loaded at start-up.
    pub config: Config,
    /// One message per reload request (SIGHUP).
    pub reloads: mpsc::Receiver<()>,
    /// Cancelled to stop (SIGTERM, SIGINT).
    pub shutdown: CancellationToken,
}

/// Serves until `shutdown` is cancelled, then drains and returns.
pub async fn run(setup: Setup) {
    let Setup {
        listener,
        socket,
        socket_file,
        source,
        config,
        mut reloads,
        shutdown,
    } = setup;
    let slots = ConnectionSlots::new(config.daemon.max_connections);
    let stop_connections = CancellationToken::new();
    let ctx = Arc::new(Context {
        registry: registry::spawn(source, config),
        started: Instant::now(),
        socket: socket.clone(),
        connections: ConnectionCount::default(),
        stopping: stop_connections.clone(),
    });
    let connections = TaskTracker::new();
    let mut watchdog = notify::watchdog_interval().map(tokio::time::interval);

    tracing::info!(socket = %socket, pid = std::process::id(), version = env!("CARGO_PKG_VERSION"), "gpuctld ready");
    notify::ready(&format!("serving on {socket}"));

    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(()) = reloads.recv() => ctx.registry.request_reload(ReloadTrigger::Signal),
            accepted = listener.accept() => admit(accepted, &ctx, &slots, &connections, &stop_connections).await,
            _ = tick(&mut watchdog) => notify::watchdog(),
        }
    }

    drop(listener);
    notify::stopping();
    let grace = ctx.registry.config().daemon.shutdown_grace.0;
    tracing::info!(
        connections = ctx.connections.current(),
        grace_ms = grace.as_millis() as u64,
        "stopping: finishing requests in flight"
    );
    stop_connections.cancel();
    connections.close();
    if tokio::time::timeout(grace, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            connections = ctx.connections.current(),
            "grace period over; dropping remaining connections"
        );
    }
    drop(socket_file);
    tracing::info!("gpuctld stopped");
}

/// The connection limit, fixed at start-up.
struct ConnectionSlots {
    free: Arc<Semaphore>,
    limit: u32,
}

impl ConnectionSlots {
    fn new(limit: u32) -> Self {
        ConnectionSlots {
            free: Arc::new(Semaphore::new(limit as usize)),
            limit,
        }
    }
}

async fn admit(
    accepted: io::Result<(UnixStream, tokio::net::unix::SocketAddr)>,
    ctx: &Arc<Context>,
    slots: &ConnectionSlots,
    connections: &TaskTracker,
    stop: &CancellationToken,
) {
    let stream = match accepted {
        Ok((stream, _)) => stream,
        Err(error) => {
            // Out of descriptors and the like: back off instead of spinning.
            tracing::warn!(%error, "accept failed");
            tokio::time::sleep(Duration::from_millis(100)).await;
            return;
        }
    };
    let config = ctx.registry.config();
    match slots.free.clone().try_acquire_owned() {
        Ok(slot) => {
            let (ctx, stop) = (ctx.clone(), stop.clone());
            connections.spawn(async move {
                connection::serve(stream, ctx, stop).await;
                drop(slot);
            });
        }
        Err(_) => {
            let limit = slots.limit;
            tracing::warn!(limit, "connection refused: too many connections");
            let reason = Error::new(
                ErrorCode::Busy,
                format!("gpuctld serves at most {limit} connections at once; try again later"),
            );
            connections.spawn(connection::refuse(
                stream,
                config.daemon.max_frame.0 as usize,
                reason,
            ));
        }
    }
}

async fn tick(watchdog: &mut Option<Interval>) {
    match watchdog {
        Some(interval) => {
            interval.tick().await;
        }
        None => std::future::pending().await,
    }
}
