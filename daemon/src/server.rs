//! The main loop: accept, reload, watchdog, shutdown — one `select!`.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gpuctl_protocol::{Error, ErrorCode, ReloadTrigger};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio::time::Interval;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::budget::Budget;
use crate::config::{ConfigSource, DaemonConfig, Loaded};
use crate::connection;
use crate::context::{ConnectionCount, Context};
use crate::listener::{self, SocketFile};
use crate::slots::{self, Slots};
use crate::{access, notify, registry};

/// How often gpuctld checks that its socket file is still there.
const SOCKET_CHECK: Duration = Duration::from_secs(10);

/// After the grace period, how long connections get to say goodbye.
const GOODBYE_GRACE: Duration = Duration::from_secs(2);

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
    pub loaded: Loaded,
    /// One message per reload request (SIGHUP).
    pub reloads: mpsc::Receiver<()>,
    /// Cancelled to stop (SIGTERM, SIGINT).
    pub shutdown: CancellationToken,
}

/// Serves until `shutdown` is cancelled, then drains and returns.
pub async fn run(setup: Setup) {
    let Setup {
        mut listener,
        socket,
        mut socket_file,
        source,
        loaded,
        mut reloads,
        shutdown,
    } = setup;
    let config = &loaded.config;
    let slots = Slots::new(slots::Limits {
        total: config.daemon.max_connections,
        per_uid: config.daemon.max_connections_per_uid,
        admin_only: config.daemon.admin_connections,
    });
    let stop_connections = CancellationToken::new();
    let hard_stop = CancellationToken::new();
    let budget = Budget::new(config.daemon.max_upload_total.0 as usize);
    let config_path = source.path().map(std::path::Path::to_path_buf);
    let registry = registry::spawn(source, loaded);
    crate::watch::spawn(registry.clone(), config_path);
    let ctx = Arc::new(Context {
        registry,
        started: Instant::now(),
        socket: socket.clone(),
        connections: ConnectionCount::default(),
        stopping: stop_connections.clone(),
        budget,
    });
    let connections = TaskTracker::new();
    let mut watchdog = notify::watchdog_interval().map(tokio::time::interval);
    // The socket was just bound: the first check is one period from now
    // (an interval's first tick is immediate, and would run whenever the
    // loop first polls, racing anyone who looks at the file meanwhile).
    let mut socket_check =
        tokio::time::interval_at(tokio::time::Instant::now() + SOCKET_CHECK, SOCKET_CHECK);
    socket_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    tracing::info!(socket = %socket, pid = std::process::id(), version = env!("CARGO_PKG_VERSION"), "gpuctld ready");
    notify::ready(&format!("serving on {socket}"));

    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(()) = reloads.recv() => {
                recreate_socket(&mut listener, &mut socket_file, &ctx.registry.config().daemon);
                ctx.registry.request_reload(ReloadTrigger::Signal);
            }
            accepted = listener.accept() => {
                let stops = (stop_connections.clone(), hard_stop.clone());
                admit(accepted, &ctx, &slots, &connections, stops).await;
            }
            _ = tick(&mut watchdog) => notify::watchdog(),
            _ = socket_check.tick(), if socket_file.is_some() => {
                recreate_socket(&mut listener, &mut socket_file, &ctx.registry.config().daemon);
            }
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
            "grace period over; telling the remaining connections and closing them"
        );
        hard_stop.cancel();
        let _ = tokio::time::timeout(GOODBYE_GRACE, connections.wait()).await;
    }
    drop(socket_file);
    tracing::info!("gpuctld stopped");
}

/// A socket file removed by someone (a clean-up of /run or /tmp, a
/// mistaken `rm`) leaves the daemon unreachable: listen on a new one at
/// the same path. A path that now holds something else is left alone, and
/// an inherited (socket-activated) socket is systemd's to keep.
fn recreate_socket(
    listener: &mut UnixListener,
    file: &mut Option<SocketFile>,
    config: &DaemonConfig,
) {
    let Some(current) = file.as_ref().filter(|f| f.missing()) else {
        return;
    };
    let path = current.path().to_path_buf();
    let rebound = listener::bind(&path, config)
        .map_err(|e| e.to_string())
        .and_then(|listening| listening.into_tokio().map_err(|e| e.to_string()));
    match rebound {
        Ok((new_listener, _, new_file)) => {
            tracing::warn!(path = %path.display(), "the socket file had been removed; listening on a new one");
            *listener = new_listener;
            *file = new_file;
        }
        Err(error) => {
            tracing::error!(path = %path.display(), %error, "the socket file has been removed and cannot be made again");
        }
    }
}

async fn admit(
    accepted: io::Result<(UnixStream, tokio::net::unix::SocketAddr)>,
    ctx: &Arc<Context>,
    slots: &Slots,
    connections: &TaskTracker,
    (stop, hard_stop): (CancellationToken, CancellationToken),
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
    let peer = connection::peer_of(&stream);
    match slots.take(peer.uid, || access::is_admin(&peer, &config)) {
        Ok(slot) => {
            let ctx = ctx.clone();
            connections.spawn(async move {
                connection::serve(stream, ctx, stop, hard_stop).await;
                drop(slot);
            });
        }
        Err(refusal) => {
            tracing::warn!(uid = peer.uid, pid = peer.pid, reason = %refusal, "connection refused");
            let reason = Error::new(ErrorCode::Busy, refusal.to_string());
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
