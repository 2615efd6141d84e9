//! End-to-end tests: real gpuctld and gpuctl processes on temporary sockets.
#![allow(clippy::unwrap_used)]

mod abuse;
mod access;
mod activation;
mod arbitration;
mod basics;
mod fixture;
mod generate_cli;
mod hygiene;
mod journald;
mod large_images;
mod lifecycle;
mod models;
mod notify;
mod reload;
mod systemd;

/// Two models, so `Models` has something to show.
pub const TWO_MODELS: &str = r#"
model_root = "/srv/models"

[policy]
keep_alive = "10m"

[models.upscale]
path = "up/x4.pt"
kind = "image"
scale = 4
tile = 256
overlap = 16
pin = true

[models.portrait]
path = "/abs/portrait.pt"
kind = "generate"
group = "diffusion"
keep_alive = "forever"
defaults = { size = "896x1152", steps = 40, guidance = 8.0 }
"#;
