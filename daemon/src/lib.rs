//! gpuctld: the daemon that arbitrates a shared GPU.

pub mod config;
