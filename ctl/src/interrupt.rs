//! Ctrl-C, heard from the moment a command starts listening. A
//! `tokio::signal::ctrl_c()` future made anew in each turn of a loop misses
//! a SIGINT that lands between two turns, and as its handler has replaced
//! the default one, nothing else hears it either: gpuctl would go on.

use tokio::signal::unix::{signal, Signal, SignalKind};

/// SIGINT, kept from the first one on until it is read.
pub struct Interrupt(Option<Signal>);

impl Interrupt {
    /// Starts listening. Should that fail, SIGINT keeps its default action
    /// (gpuctl ends at once) and [`Interrupt::recv`] never returns.
    pub fn listen() -> Interrupt {
        Interrupt(signal(SignalKind::interrupt()).ok())
    }

    /// Resolves at the next SIGINT, or at once for one not yet read.
    pub async fn recv(&mut self) {
        match &mut self.0 {
            Some(signal) => {
                signal.recv().await;
            }
            None => std::future::pending().await,
        }
    }
}
