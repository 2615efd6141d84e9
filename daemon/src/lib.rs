//! gpuctld: the daemon that arbitrates a shared GPU.
//!
//! `main` parses flags, finds the listener and calls [`server::run`]; tests
//! may call the same function.

pub mod access;
pub mod arbitration;
mod budget;
pub mod config;
mod connection;
mod context;
pub mod gpu;
mod handlers;
pub mod listener;
pub mod logging;
pub mod measurements;
mod noise;
pub mod notify;
mod outbox;
mod pixels;
pub mod policy;
mod registry;
pub mod server;
pub mod signals;
mod slots;
mod uploads;
mod watch;
mod worker;
