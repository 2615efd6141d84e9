//! One file per subcommand, named like the protocol's requests.

pub mod completions;
pub mod generate;
pub mod load;
pub mod models;
pub mod ping;
pub mod reload;
pub mod reserve;
pub mod status;
pub mod unload;
pub mod vram;
pub mod watch;
