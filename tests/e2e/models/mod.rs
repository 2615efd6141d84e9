//! Models end to end: real gpuctld, real gpuctl-worker processes, real
//! TorchScript models made by models/make_models.py (scripts/test runs it),
//! one file per subject; the helpers they share are here.

mod batching;
mod chains;
mod contracts;
mod devices;
mod failures;
mod python_workers;
mod queueing;
mod reloads;
mod residency;
mod saves;
mod tiling;

use std::path::PathBuf;
use std::time::Duration;

use gpuctl_protocol::{
    Client, ClientError, DType, ErrorCode, GenerateRequest, KeepAlive, Request, Response,
    WireTensor,
};
use serde_json::Value;

use crate::fixture::*;

pub fn models_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/models");
    assert!(
        dir.join("manifest.json").exists(),
        "no test models in {}: run scripts/test (it makes them)",
        dir.display()
    );
    dir.canonicalize().unwrap()
}

/// The three demo models plus `extra` TOML.
pub fn config(policy: &str, extra: &str) -> String {
    format!(
        r#"model_root = "{root}"
[policy]
{steps}
{policy}

[models.up]
path = "waifu2x-upconv7-x2.pt"
kind = "image"
scale = 2

[models.gen]
path = "tiny-generate.pt"
kind = "generate"
defaults = {{ size = "64x48", steps = 2, guidance = 5.0 }}

[models.ten]
path = "tiny-tensor.pt"
kind = "tensor"
{extra}
"#,
        root = models_dir().display(),
        // tiny-generate's steps are how long it runs: slow jobs take millions.
        steps = if policy.contains("max_steps") {
            ""
        } else {
            "max_steps = 100000000"
        },
    )
}

/// A runtime whose tasks (the client's connection) keep running while the
/// test blocks on `gpuctl` subprocesses and `wait_until`.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

pub fn f32_tensor(shape: &[u64], value: impl Fn(usize) -> f32) -> WireTensor {
    let n: u64 = shape.iter().product();
    WireTensor::new(
        DType::F32,
        shape.to_vec(),
        (0..n as usize)
            .flat_map(|i| value(i).to_le_bytes())
            .collect(),
    )
    .unwrap()
}

pub fn request(model: &str) -> GenerateRequest {
    GenerateRequest::new(model)
}

pub fn tensor_request() -> GenerateRequest {
    GenerateRequest {
        inputs: vec![f32_tensor(&[2], |i| i as f32), f32_tensor(&[2], |_| 1.0)],
        ..request("ten")
    }
}

/// A generate job that keeps its worker busy for a while.
pub fn slow_request(steps: u32) -> GenerateRequest {
    GenerateRequest {
        prompt: "slow".into(),
        steps: Some(steps),
        size: Some((8, 8)),
        ..request("gen")
    }
}

/// Starts a slow `gen` job and waits until it runs on the worker.
pub async fn start_slow_job(client: &Client, daemon: &Daemon, steps: u32) -> gpuctl_protocol::Call {
    let job = client
        .start(Request::Generate(slow_request(steps)))
        .await
        .unwrap();
    // In flight counts from admission; a model that has to load first has
    // no worker pid yet, and the callers want the worker that runs it.
    wait_until("the slow job to run", Duration::from_secs(30), || {
        let status = model_status(daemon, "gen");
        status["in_flight"] == 1 && status["pid"].is_u64()
    });
    job
}

pub async fn generate(
    client: &Client,
    request: GenerateRequest,
) -> Result<gpuctl_protocol::GenerateResponse, ClientError> {
    match client.call(Request::Generate(request)).await? {
        Response::Generate(response) => Ok(response),
        other => panic!("unexpected {other:?}"),
    }
}

pub fn daemon_error(result: Result<impl std::fmt::Debug, ClientError>) -> gpuctl_protocol::Error {
    match result {
        Err(ClientError::Daemon(error)) => error,
        other => panic!("expected an error from gpuctld, got {other:?}"),
    }
}

pub fn model_status(daemon: &Daemon, name: &str) -> Value {
    let status = daemon.status();
    status["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == name)
        .cloned()
        .unwrap()
}

pub fn wait_for_state(daemon: &Daemon, name: &str, state: &str) {
    wait_until(
        &format!("{name} to be {state}"),
        Duration::from_secs(30),
        || model_status(daemon, name)["state"] == state,
    );
}

pub fn pid_alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
        !s.lines()
            .any(|l| l.starts_with("State:") && l.contains('Z'))
    })
}
