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
mod noise;
pub mod notify;
mod pixels;
pub mod policy;
mod registry;
pub mod server;
pub mod signals;
mod slots;
pub mod state;
mod uploads;
mod worker;
