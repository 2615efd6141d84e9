//! The price of tiling and of going through gpuctld: one run prints the
//! time of a tiled request through gpuctld, the time of a direct in-process
//! untiled forward of the same module on the same image, their ratio, and
//! tiles per second.
//!
//! `cargo bench -p gpuctl-worker --bench tiling [-- SIZE [TILE]]` (default
//! 2048 and 1024: 2048² → 4096² with the waifu2x model; needs `cargo build`
//! first, for gpuctld, and the models from models/make_models.py).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use gpuctl_protocol::{Client, DType, GenerateRequest, Request, Response, WireTensor};
use tch::{CModule, Device, Kind, Tensor};

const OVERLAP: i64 = 32;
const BATCH: i64 = 1;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The same picture for both paths: smooth gradients with some texture.
fn pixels(size: usize) -> Vec<u8> {
    let mut data = Vec::with_capacity(3 * size * size);
    for c in 0..3 {
        for y in 0..size {
            for x in 0..size {
                data.push(((x * (c + 1) + y * 3 + (x * y) % 17) % 256) as u8);
            }
        }
    }
    data
}

/// Tiles along an axis and their edge, as worker/src/tiling.rs plans them.
fn plan(length: i64, tile: i64) -> (i64, i64) {
    if length <= tile {
        return (1, length);
    }
    let widest = tile - OVERLAP;
    let count = (length - OVERLAP + widest - 1) / widest;
    (count, (length + (count - 1) * OVERLAP + count - 1) / count)
}

fn main() {
    let numbers: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let size = numbers.first().copied().unwrap_or(2048);
    let tile = numbers.get(1).copied().unwrap_or(1024) as i64;
    let models = root().join("target/models");
    let model = models.join("waifu2x-upconv7-x2.pt");
    let gpuctld = ["release", "debug"]
        .iter()
        .map(|p| root().join("target").join(p).join("gpuctld"))
        .find(|p| p.exists())
        .expect("no gpuctld: run `cargo build` first");
    let image = pixels(size);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "waifu2x x2, {size}x{size} -> {0}x{0}, CPU, {threads} threads",
        size * 2
    );

    // Direct: the module in this process, the whole image in one forward.
    tch::set_num_threads(threads as i32);
    let module = CModule::load_on_device(&model, Device::Cpu).expect("load waifu2x");
    let direct = {
        let _no_grad = tch::no_grad_guard();
        let x = Tensor::from_slice(&image)
            .view([1, 3, size as i64, size as i64])
            .to_kind(Kind::Float)
            / 255.0;
        let started = Instant::now();
        let y = module.forward_ts(&[x]).expect("forward");
        let _ = (y * 255.0).round().clamp(0.0, 255.0).to_kind(Kind::Uint8);
        started.elapsed()
    };
    drop(module);

    // Through gpuctld: a tiled request from a client, RGB8 in and out.
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("gpuctld.sock");
    let config = dir.path().join("gpuctld.toml");
    std::fs::write(
        &config,
        format!(
            "model_root = \"{}\"\n[daemon]\nmax_frame = \"64MiB\"\n[gpu]\nbackend = \"none\"\n\
             [models.up]\npath = \"waifu2x-upconv7-x2.pt\"\nkind = \"image\"\nscale = 2\n\
             tile = {tile}\noverlap = {OVERLAP}\nbatch = {BATCH}\n",
            models.display()
        ),
    )
    .unwrap();
    let mut daemon = Command::new(&gpuctld)
        .arg("--config")
        .arg(&config)
        .arg("--socket")
        .arg(&socket)
        .env("RUST_LOG", "warn")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (load, through) = runtime.block_on(async {
        let mut client = None;
        for _ in 0..200 {
            if let Ok(c) = Client::connect(&socket).await {
                client = Some(c);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let client = client.expect("gpuctld did not start");
        let started = Instant::now();
        client
            .call(Request::Load(gpuctl_protocol::LoadRequest {
                model: "up".into(),
                keep_alive: None,
            }))
            .await
            .unwrap();
        let load = started.elapsed();
        let input =
            WireTensor::new(DType::U8, vec![1, 3, size as u64, size as u64], image).unwrap();
        let request = GenerateRequest {
            input: Some(input),
            // No time limit: this is what is being measured.
            timeout_ms: Some(0),
            ..GenerateRequest::new("up")
        };
        let started = Instant::now();
        match client.call(Request::Generate(request)).await.unwrap() {
            Response::Generate(answer) => {
                assert_eq!(
                    answer.outputs[0].shape,
                    vec![1, size as u64 * 2, size as u64 * 2, 3]
                );
            }
            other => panic!("{other:?}"),
        }
        (load, started.elapsed())
    });
    let _ = daemon.kill();
    let _ = daemon.wait();

    let (per_axis, edge) = plan(size as i64, tile);
    let tiles = per_axis * per_axis;
    println!(
        "direct untiled forward, in process:  {:>8.2} s",
        direct.as_secs_f64()
    );
    println!(
        "tiled request through gpuctld:       {:>8.2} s  ({tiles} tiles of {edge}² (tile = {tile}), overlap {OVERLAP}, batch {BATCH}; model load {:.2} s not included)",
        through.as_secs_f64(),
        load.as_secs_f64()
    );
    println!(
        "ratio through/direct:                {:>8.3}",
        through.as_secs_f64() / direct.as_secs_f64()
    );
    println!(
        "tiles per second:                    {:>8.2}",
        tiles as f64 / through.as_secs_f64()
    );
}
