//! Unix signals, turned into messages for the main loop.

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// What the signals ask of the daemon.
pub struct SignalChannels {
    /// One message per SIGHUP.
    pub reload: mpsc::Receiver<()>,
    /// Cancelled by SIGTERM or SIGINT.
    pub shutdown: CancellationToken,
}

/// Starts a thread that receives SIGHUP, SIGTERM and SIGINT. A second
/// SIGTERM/SIGINT during shutdown exits at once.
pub fn listen() -> std::io::Result<SignalChannels> {
    let mut signals = Signals::new([SIGHUP, SIGTERM, SIGINT])?;
    let (reload_tx, reload) = mpsc::channel(4);
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                match signal {
                    SIGHUP => {
                        // A full channel already holds a pending reload: one is enough.
                        let _ = reload_tx.try_send(());
                    }
                    _ if token.is_cancelled() => {
                        tracing::warn!(signal, "second stop signal: exiting without waiting");
                        std::process::exit(1);
                    }
                    _ => {
                        tracing::info!(signal, "stop signal received");
                        token.cancel();
                    }
                }
            }
        })?;
    Ok(SignalChannels { reload, shutdown })
}
