//! Models end to end: real gpuctld, real gpuctl-worker processes, real
//! TorchScript models made by models/make_models.py (scripts/test runs it).

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
fn slow_request(steps: u32) -> GenerateRequest {
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

#[test]
fn lazy_load_shared_by_concurrent_first_requests() {
    let daemon = Daemon::start(&config("", ""));
    for name in ["gen", "ten", "up"] {
        assert_eq!(
            model_status(&daemon, name)["state"],
            "Unloaded",
            "nothing is loaded at start-up"
        );
    }
    runtime().block_on(async {
        let client = Client::connect(&daemon.socket).await.unwrap();
        // All four are on the wire before the first load can have finished.
        let mut calls = Vec::new();
        for _ in 0..4 {
            calls.push(
                client
                    .start(Request::Generate(tensor_request()))
                    .await
                    .unwrap(),
            );
        }
        for call in calls {
            let Ok(Response::Generate(response)) = call.response().await else {
                panic!("a request failed")
            };
            assert_eq!(response.device, "cpu");
            assert_eq!(response.outputs.len(), 2);
            let expected: Vec<u8> = [1.0f32, 3.0].iter().flat_map(|v| v.to_le_bytes()).collect();
            assert_eq!(response.outputs[0].data, expected);
            assert!(
                response.load_ms.is_some(),
                "each of them waited for the one load"
            );
        }
    });
    let ten = model_status(&daemon, "ten");
    assert_eq!(
        ten["loads"], 1,
        "four concurrent first requests, one load: {ten}"
    );
    assert_eq!(ten["state"], "Ready");
    assert!(pid_alive(ten["pid"].as_u64().unwrap()));
}

#[test]
fn image_generate_and_tensor_contracts() {
    let daemon = Daemon::start(&config("", ""));
    runtime().block_on(async {
        let client = Client::connect(&daemon.socket).await.unwrap();
        let pixels = WireTensor::new(
            DType::U8,
            vec![1, 3, 12, 10],
            (0..360).map(|i| (i % 256) as u8).collect(),
        )
        .unwrap();
        let up = generate(
            &client,
            GenerateRequest {
                input: Some(pixels.clone()),
                ..request("up")
            },
        )
        .await
        .unwrap();
        assert_eq!(
            up.outputs[0].shape,
            vec![1, 24, 20, 3],
            "rows of RGB8 pixels"
        );
        assert!(
            up.load_ms.is_some(),
            "the first request waited for the load"
        );
        // Clients before protocol 1.2 get the same pixels planar.
        let mut old = RawClient::speaking(
            &daemon.socket,
            gpuctl_protocol::ProtocolVersion { major: 1, minor: 1 },
        );
        old.request(
            1,
            Request::Generate(GenerateRequest {
                input: Some(pixels.clone()),
                ..request("up")
            }),
        );
        let planar = loop {
            match old.receive() {
                Some(gpuctl_protocol::DaemonMessage::Response {
                    response: Response::Generate(answer),
                    ..
                }) => break answer.outputs[0].clone(),
                Some(gpuctl_protocol::DaemonMessage::Event { .. }) => {}
                other => panic!("unexpected {other:?}"),
            }
        };
        assert_eq!(planar.shape, vec![1, 3, 24, 20]);
        let plane = 24 * 20;
        for (i, pixel) in up.outputs[0].data.chunks_exact(3).enumerate() {
            for (c, value) in pixel.iter().enumerate() {
                assert_eq!(planar.data[c * plane + i], *value, "pixel {i}, channel {c}");
            }
        }
        // Since 1.4 the input may come as rows of pixels too, as image
        // files and numpy hold it: the same picture, the same output.
        let [_, _, h, w] = pixels.shape[..] else {
            panic!("{:?}", pixels.shape)
        };
        let plane_in = (h * w) as usize;
        let mut row_data = vec![0u8; pixels.data.len()];
        for i in 0..plane_in {
            for c in 0..3 {
                row_data[i * 3 + c] = pixels.data[c * plane_in + i];
            }
        }
        let rows = WireTensor::new(DType::U8, vec![1, h, w, 3], row_data).unwrap();
        let from_rows = generate(
            &client,
            GenerateRequest {
                input: Some(rows.clone()),
                ..request("up")
            },
        )
        .await
        .unwrap();
        assert_eq!(
            from_rows.outputs, up.outputs,
            "rows in, the same pixels out"
        );
        // A client of 1.3 sends planes only: rows from it are named wrong.
        let mut older = RawClient::speaking(
            &daemon.socket,
            gpuctl_protocol::ProtocolVersion { major: 1, minor: 3 },
        );
        older.request(
            1,
            Request::Generate(GenerateRequest {
                input: Some(rows),
                ..request("up")
            }),
        );
        match older.receive() {
            Some(gpuctl_protocol::DaemonMessage::Error { error, .. }) => assert!(
                error
                    .message
                    .contains("must be [N,3,H,W] (planes) or [N,H,W,3]"),
                "{}",
                error.message
            ),
            other => panic!("unexpected {other:?}"),
        }
        let again = generate(
            &client,
            GenerateRequest {
                input: Some(f32_tensor(&[1, 3, 4, 4], |_| 0.5)),
                ..request("up")
            },
        )
        .await
        .unwrap();
        assert_eq!(again.load_ms, None, "the second found it loaded");

        let seeded = GenerateRequest {
            prompt: "a red fox".into(),
            seed: Some(7),
            ..request("gen")
        };
        let first = generate(&client, seeded.clone()).await.unwrap();
        assert_eq!(first.seed, Some(7));
        assert_eq!(
            first.outputs[0].shape,
            vec![1, 48, 64, 3],
            "size from the model's defaults"
        );
        assert_eq!(
            generate(&client, seeded.clone()).await.unwrap().outputs,
            first.outputs,
            "a seed reproduces an image"
        );
        let other = generate(
            &client,
            GenerateRequest {
                seed: Some(8),
                ..seeded.clone()
            },
        )
        .await
        .unwrap();
        assert_ne!(other.outputs, first.outputs);
        let unseeded = generate(
            &client,
            GenerateRequest {
                prompt: "x".into(),
                size: Some((16, 8)),
                ..request("gen")
            },
        )
        .await
        .unwrap();
        assert!(
            unseeded.seed.is_some(),
            "a random seed is chosen and reported"
        );
        assert_eq!(unseeded.outputs[0].shape, vec![1, 8, 16, 3]);

        let error = daemon_error(
            generate(
                &client,
                GenerateRequest {
                    size: Some((10, 10)),
                    ..request("gen")
                },
            )
            .await,
        );
        assert_eq!(error.code, ErrorCode::InvalidRequest);
        assert!(
            error
                .message
                .contains("size 10x10 must be positive multiples of 8"),
            "{}",
            error.message
        );
        let error = daemon_error(generate(&client, request("up")).await);
        assert!(
            error
                .message
                .contains("model up: is an image model: send an input image"),
            "{}",
            error.message
        );
        let wrong = WireTensor::new(DType::F32, vec![1, 1, 4, 4], vec![0; 64]).unwrap();
        let error = daemon_error(
            generate(
                &client,
                GenerateRequest {
                    input: Some(wrong),
                    ..request("up")
                },
            )
            .await,
        );
        assert!(
            error.message.contains("image input must be [N,3,H,W]"),
            "{}",
            error.message
        );
        let error = daemon_error(generate(&client, request("nope")).await);
        assert_eq!(error.code, ErrorCode::NotFound);
        assert!(
            error
                .message
                .contains("no model named \"nope\" (configured: gen, ten, up)"),
            "{}",
            error.message
        );
    });
    daemon.assert_serving();
}

#[test]
fn keep_alive_zero_unloads_when_idle_and_requests_are_clamped() {
    let daemon = Daemon::start(&config("keep_alive = \"0s\"\nmax_keep_alive = \"2s\"", ""));
    let pid = runtime().block_on(async {
        let client = Client::connect(&daemon.socket).await.unwrap();
        generate(&client, tensor_request()).await.unwrap();
        model_status(&daemon, "ten")["pid"].as_u64()
    });
    wait_for_state(&daemon, "ten", "Unloaded");
    if let Some(pid) = pid {
        wait_until(
            "the worker process to exit",
            Duration::from_secs(10),
            || !pid_alive(pid),
        );
    }
    assert!(
        daemon.log_text().contains("reason=\"idle timeout\""),
        "{}",
        daemon.log_text()
    );

    // A request asking for "forever" gets max_keep_alive.
    runtime().block_on(async {
        let client = Client::connect(&daemon.socket).await.unwrap();
        generate(
            &client,
            GenerateRequest {
                keep_alive: Some(KeepAlive::Forever),
                ..tensor_request()
            },
        )
        .await
        .unwrap();
    });
    assert_eq!(model_status(&daemon, "ten")["keep_alive"]["Millis"], 2000);
    wait_for_state(&daemon, "ten", "Unloaded");
}

#[test]
fn the_lru_cap_evicts_the_least_recently_used_idle_model_and_pins_hold() {
    let daemon = Daemon::start(&config("max_loaded = 2", "pin = true"));
    for model in ["ten", "up", "gen"] {
        let output = daemon.gpuctl(&["load", model]);
        assert!(output.status.success(), "{}", stderr(&output));
    }
    // ten is pinned: up, the least recently used unpinned model, made room.
    assert_eq!(model_status(&daemon, "ten")["state"], "Ready");
    wait_for_state(&daemon, "up", "Unloaded");
    assert_eq!(model_status(&daemon, "gen")["state"], "Ready");
    assert!(
        daemon.log_text().contains("model=\"up\"") && daemon.log_text().contains("reason=\"lru\"")
    );
}

#[test]
fn a_group_holds_one_resident_model() {
    let grouped = config("", "group = \"g\"")
        .replace("kind = \"generate\"", "kind = \"generate\"\ngroup = \"g\"");
    let daemon = Daemon::start(&grouped);
    assert!(daemon.gpuctl(&["load", "gen"]).status.success());
    assert!(daemon.gpuctl(&["load", "ten"]).status.success());
    wait_for_state(&daemon, "gen", "Unloaded");
    assert!(
        daemon.log_text().contains("reason=\"group switch\""),
        "{}",
        daemon.log_text()
    );
}

#[test]
fn unload_waits_for_work_and_force_cancels_it() {
    let daemon = Daemon::start(&config("", ""));
    runtime().block_on(async {
        let client = Client::connect(&daemon.socket).await.unwrap();
        // Drain: the running job finishes, then the worker exits.
        let job = start_slow_job(&client, &daemon, 200_000).await;
        let unload = daemon.gpuctl(&["--json", "unload", "gen"]);
        assert!(unload.status.success(), "{}", stderr(&unload));
        assert!(
            matches!(job.response().await, Ok(Response::Generate(_))),
            "the job in flight finished"
        );
        let unloaded: Value = serde_json::from_slice(&unload.stdout).unwrap();
        assert_eq!(unloaded["unloaded"], serde_json::json!(["gen"]));
        assert_eq!(model_status(&daemon, "gen")["state"], "Unloaded");

        // Force: the running job is cancelled with a clear error.
        let job = start_slow_job(&client, &daemon, 5_000_000).await;
        assert!(daemon
            .gpuctl(&["unload", "--all", "--force"])
            .status
            .success());
        let error = daemon_error(job.response().await);
        assert_eq!(error.code, ErrorCode::Cancelled);
        assert!(
            error
                .message
                .contains("model gen was unloaded with --force"),
            "{}",
            error.message
        );
        // The model serves the next request.
        generate(
            &client,
            GenerateRequest {
                seed: Some(1),
                ..request("gen")
            },
        )
        .await
        .unwrap();
    });
    assert_eq!(model_status(&daemon, "gen")["loads"], 3);
}

#[test]
fn a_worker_crash_fails_its_requests_and_the_next_request_reloads() {
    let daemon = Daemon::start(&config("", ""));
    runtime().block_on(async {
        let client = Client::connect(&daemon.socket).await.unwrap();
        let job = start_slow_job(&client, &daemon, 5_000_000).await;
        let pid = model_status(&daemon, "gen")["pid"].as_i64().unwrap() as i32;
        // SAFETY: kill has no memory-safety preconditions.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
        let error = daemon_error(job.response().await);
        assert!(
            error
                .message
                .contains(&format!("model gen: its worker (pid {pid}) died")),
            "{}",
            error.message
        );
        assert!(error.message.contains("signal 9"), "{}", error.message);
        let status = model_status(&daemon, "gen");
        assert_eq!(status["state"], "Unloaded");
        assert!(
            status["last_error"].as_str().unwrap().contains("died"),
            "{status}"
        );
        assert!(
            status["last_unload"]["Crash"]["description"]
                .as_str()
                .is_some_and(|d| d.starts_with("signal 9")),
            "the unload reason is the crash: {status}"
        );
        generate(
            &client,
            GenerateRequest {
                seed: Some(1),
                ..request("gen")
            },
        )
        .await
        .unwrap();
    });
    assert_eq!(model_status(&daemon, "gen")["loads"], 2);
    daemon.assert_serving();
}

#[test]
fn load_failures_are_named_and_retried_only_after_a_backoff() {
    let dir = tempfile::tempdir().unwrap();
    let corrupt = dir.path().join("corrupt.pt");
    std::fs::write(&corrupt, b"PK\x03\x04 not really").unwrap();
    let extra = format!(
        "\n[models.missing]\npath = \"/nonexistent/missing.pt\"\nkind = \"tensor\"\n\n[models.corrupt]\npath = \"{}\"\nkind = \"tensor\"\n",
        corrupt.display()
    );
    let daemon = Daemon::start(
        &config("load_retry = \"30s\"\nmax_loaded = 1", "")
            .replace("[models.ten]", &format!("{extra}\n[models.ten]")),
    );
    runtime().block_on(async {
        let client = Client::connect(&daemon.socket).await.unwrap();
        // A missing file fails before anything is evicted for it.
        generate(&client, tensor_request()).await.unwrap();
        let error = daemon_error(
            generate(
                &client,
                GenerateRequest {
                    inputs: vec![],
                    ..request("missing")
                },
            )
            .await,
        );
        assert_eq!(error.code, ErrorCode::LoadFailed);
        assert!(
            error
                .message
                .contains("model missing: cannot read /nonexistent/missing.pt"),
            "{}",
            error.message
        );
        assert_eq!(
            model_status(&daemon, "ten")["state"],
            "Ready",
            "ten was not evicted for a missing file"
        );
        let error = daemon_error(
            generate(
                &client,
                GenerateRequest {
                    inputs: vec![],
                    ..request("corrupt")
                },
            )
            .await,
        );
        assert!(
            error.message.contains("is not a loadable TorchScript file"),
            "{}",
            error.message
        );

        // Within the backoff, no new load: the request fails at once.
        let again = daemon_error(
            generate(
                &client,
                GenerateRequest {
                    inputs: vec![],
                    ..request("missing")
                },
            )
            .await,
        );
        assert!(
            again.message.contains("the next attempt is allowed in"),
            "{}",
            again.message
        );
        assert_eq!(
            again.code,
            ErrorCode::RetryLater,
            "a code of its own in the backoff, so a client can tell it from a daemon bug"
        );
        // Other models are not disturbed.
        generate(&client, tensor_request()).await.unwrap();
    });
    let missing = model_status(&daemon, "missing");
    assert!(
        missing["state"]["Failed"]["retry_in_ms"].as_u64().unwrap() > 20_000,
        "{missing}"
    );
    assert_eq!(
        daemon
            .log_text()
            .matches("load failed model=\"missing\"")
            .count(),
        1,
        "one attempt, not a loop"
    );
}

#[test]
fn a_full_queue_refuses_at_once() {
    let daemon = Daemon::start(&config("queue_max = 1", ""));
    runtime().block_on(async {
        let client = Client::connect(&daemon.socket).await.unwrap();
        let job = start_slow_job(&client, &daemon, 100_000).await;
        let error = daemon_error(
            generate(
                &client,
                GenerateRequest {
                    seed: Some(1),
                    ..request("gen")
                },
            )
            .await,
        );
        assert_eq!(error.code, ErrorCode::QueueFull);
        assert!(
            error.message.contains("policy.queue_max"),
            "{}",
            error.message
        );
        assert!(job.response().await.is_ok());
    });
}

#[test]
fn a_reload_replaces_a_changed_model_once_idle() {
    let mut daemon = Daemon::start(&config("", ""));
    assert!(daemon.gpuctl(&["load", "ten"]).status.success());
    let first_pid = model_status(&daemon, "ten")["pid"].as_u64().unwrap();
    std::fs::write(&daemon.config, config("", "device = \"cpu\"")).unwrap();
    assert!(daemon.gpuctl(&["reload"]).status.success());
    wait_for_state(&daemon, "ten", "Unloaded");
    assert!(daemon.log_text().contains("reason=\"reload\""));
    assert!(daemon.gpuctl(&["load", "ten"]).status.success());
    assert_ne!(
        model_status(&daemon, "ten")["pid"].as_u64().unwrap(),
        first_pid
    );
    // Workers do not outlive the daemon.
    let pid = model_status(&daemon, "ten")["pid"].as_u64().unwrap();
    assert!(daemon.stop().success());
    wait_until(
        "the worker to exit with the daemon",
        Duration::from_secs(10),
        || !pid_alive(pid),
    );
}

#[test]
fn a_group_serves_its_requests_in_arrival_order() {
    let grouped = config("", "group = \"g\"")
        .replace("kind = \"generate\"", "kind = \"generate\"\ngroup = \"g\"");
    let daemon = Daemon::start(&grouped);
    runtime().block_on(async {
        let client = Client::connect(&daemon.socket).await.unwrap();
        let slow = start_slow_job(&client, &daemon, 400_000).await;
        // While gen is busy: first a request for ten, then one for gen.
        let for_ten = client
            .start(Request::Generate(tensor_request()))
            .await
            .unwrap();
        wait_until("ten's request to queue", Duration::from_secs(10), || {
            model_status(&daemon, "ten")["queued"] == 1
        });
        let for_gen = client
            .start(Request::Generate(GenerateRequest {
                seed: Some(1),
                ..request("gen")
            }))
            .await
            .unwrap();
        assert!(slow.response().await.is_ok());
        assert!(for_ten.response().await.is_ok());
        let Ok(Response::Generate(second)) = for_gen.response().await else {
            panic!("gen's second request failed")
        };
        assert!(
            second.load_ms.is_some(),
            "gen's later request waited for the switch to ten and back"
        );
    });
    assert_eq!(model_status(&daemon, "gen")["loads"], 2);
    assert_eq!(model_status(&daemon, "ten")["loads"], 1);
}

#[test]
fn waiting_clients_are_told_their_place_in_line() {
    use gpuctl_protocol::{Event, QueuedEvent};
    let daemon = Daemon::start(&config("", ""));
    runtime().block_on(async {
        let client = Client::connect(&daemon.socket).await.unwrap();
        let mut first = client
            .start(Request::Generate(slow_request(300_000)))
            .await
            .unwrap();
        match first.event().await {
            Some(Event::Queued(QueuedEvent {
                model,
                position: 1,
                waiting_for,
            })) => {
                assert_eq!(model, "gen");
                assert_eq!(waiting_for, "the model to load");
            }
            other => panic!("expected a queue event, got {other:?}"),
        }
        wait_until("the slow job to run", Duration::from_secs(30), || {
            model_status(&daemon, "gen")["in_flight"] == 1
        });
        let position = |event: Option<Event>| match event {
            Some(Event::Queued(queued)) => queued.position,
            other => panic!("expected a queue event, got {other:?}"),
        };
        // One at a time: requests sent together may reach the queue in any order.
        let mut second = client
            .start(Request::Generate(GenerateRequest {
                seed: Some(1),
                ..request("gen")
            }))
            .await
            .unwrap();
        assert_eq!(position(second.event().await), 1);
        let mut third = client
            .start(Request::Generate(GenerateRequest {
                seed: Some(2),
                ..request("gen")
            }))
            .await
            .unwrap();
        assert_eq!(position(third.event().await), 2);
        assert!(first.response().await.is_ok());
        // The first finished and the second started: the third moved up.
        assert_eq!(position(third.event().await), 1);
        assert!(second.response().await.is_ok());
        assert!(third.response().await.is_ok());
    });
}

#[test]
fn a_reload_rearms_keep_alive_and_replaces_a_model_whose_file_changed() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mine.pt");
    std::fs::copy(models_dir().join("tiny-tensor.pt"), &file).unwrap();
    let mine = format!(
        "\n[models.mine]\npath = \"{}\"\nkind = \"tensor\"\n",
        file.display()
    );
    let daemon = Daemon::start(&config("", &mine));
    assert!(daemon.gpuctl(&["load", "ten"]).status.success());
    assert!(daemon.gpuctl(&["load", "mine"]).status.success());
    let mine_pid = model_status(&daemon, "mine")["pid"].as_u64().unwrap();

    // The file is replaced on disk; the configuration itself is unchanged.
    let later = std::time::SystemTime::now() + Duration::from_secs(60);
    std::fs::File::options()
        .write(true)
        .open(&file)
        .unwrap()
        .set_modified(later)
        .unwrap();
    // ten's keep-alive drops to 0s: its countdown is re-armed, no new worker.
    std::fs::write(
        &daemon.config,
        config("", &mine).replace(
            "kind = \"tensor\"\n\n",
            "kind = \"tensor\"\nkeep_alive = \"0s\"\n\n",
        ),
    )
    .unwrap();
    let reload = daemon.gpuctl(&["reload"]);
    assert!(reload.status.success(), "{}", stderr(&reload));

    wait_for_state(&daemon, "mine", "Unloaded");
    wait_for_state(&daemon, "ten", "Unloaded");
    let log = daemon.log_text();
    assert!(log.contains("model=mine change=FileReplaced"), "{log}");
    assert!(
        log.contains("model=\"ten\"") && log.contains("reason=\"idle timeout\""),
        "{log}"
    );
    assert!(
        !log.contains("model=ten change="),
        "a keep_alive change needs no new worker: {log}"
    );
    assert!(daemon.gpuctl(&["load", "mine"]).status.success());
    assert_ne!(
        model_status(&daemon, "mine")["pid"].as_u64().unwrap(),
        mine_pid
    );
}

#[test]
fn preload_loads_in_the_background_at_start_up() {
    let daemon = Daemon::start(&config("", "preload = true"));
    // ten is preloaded without any request; the others stay unloaded.
    wait_for_state(&daemon, "ten", "Ready");
    assert_eq!(model_status(&daemon, "gen")["state"], "Unloaded");
    assert_eq!(model_status(&daemon, "up")["state"], "Unloaded");
    assert!(
        daemon.log_text().contains("preloading model=ten"),
        "{}",
        daemon.log_text()
    );
}

#[test]
fn repeated_crashes_back_off() {
    let daemon = Daemon::start(&config("load_retry = \"30s\"", ""));
    let kill_worker = || {
        assert!(daemon.gpuctl(&["load", "ten"]).status.success());
        let pid = model_status(&daemon, "ten")["pid"].as_i64().unwrap() as i32;
        // SAFETY: kill has no memory-safety preconditions.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    };
    kill_worker();
    wait_for_state(&daemon, "ten", "Unloaded");
    // One crash: the next request loads it again at once.
    kill_worker();
    wait_until("ten to be failed", Duration::from_secs(30), || {
        model_status(&daemon, "ten")["state"]["Failed"].is_object()
    });
    let status = model_status(&daemon, "ten");
    assert!(
        status["last_error"]
            .as_str()
            .unwrap()
            .contains("signal 9 (SIGKILL"),
        "{status}"
    );
    assert_eq!(status["loads"], 2);
    // A second crash in a row: no new load until the backoff has passed.
    let refused = daemon.gpuctl(&["load", "ten"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        stderr(&refused).contains("the next attempt is allowed in"),
        "{}",
        stderr(&refused)
    );
    assert_eq!(model_status(&daemon, "ten")["loads"], 2);
}

#[test]
fn vram_shows_devices_our_models_and_other_programs() {
    let dir = tempfile::tempdir().unwrap();
    let foreign = dir.path().join("foreign.json");
    let gpu = format!(
        "[gpu]\nbackend = \"sim\"\n[gpu.sim]\nforeign_usage_file = \"{}\"\n[[gpu.sim.devices]]\nname = \"Sim 24G\"\ntotal = \"24GiB\"\n",
        foreign.display()
    );
    let daemon = Daemon::start(&(config("", "") + &gpu));
    // No file yet: nobody else uses the device.
    let vram = daemon.gpuctl_json(&["vram"]);
    assert_eq!(vram["backend"], "sim");
    assert_eq!(vram["devices"][0]["name"], "Sim 24G");
    assert_eq!(vram["devices"][0]["total"], 24u64 << 30);
    assert_eq!(vram["devices"][0]["used"], 0);

    std::fs::write(
        &foreign,
        r#"[{ "pid": 4121, "name": "ollama", "device": 0, "bytes": 19541180416 }]"#,
    )
    .unwrap();
    assert!(daemon.gpuctl(&["load", "up"]).status.success());
    let vram = daemon.gpuctl_json(&["vram"]);
    let device = &vram["devices"][0];
    let processes = device["processes"].as_array().unwrap();
    let ollama = processes.iter().find(|p| p["pid"] == 4121).unwrap();
    assert_eq!(ollama["name"], "ollama");
    assert!(ollama["model"].is_null());
    let ours = processes
        .iter()
        .find(|p| p["model"] == "up")
        .expect("our worker is listed by model");
    assert_eq!(ours["pid"], model_status(&daemon, "up")["pid"]);
    assert_eq!(ours["bytes"], model_status(&daemon, "up")["device_bytes"]);
    let used = device["used"].as_u64().unwrap();
    assert_eq!(used, 19541180416 + ours["bytes"].as_u64().unwrap());
    assert_eq!(device["free"].as_u64().unwrap(), (24u64 << 30) - used);
    let human = stdout(&daemon.gpuctl(&["vram"]));
    assert!(
        human.contains("GPU 0  Sim 24G  total 24.0 GiB  used 18.2 GiB"),
        "{human}"
    );
    assert!(
        human
            .lines()
            .any(|l| l.starts_with("4121 ") && l.contains(" ollama ")),
        "{human}"
    );

    // A broken file is an error naming it, and disturbs nothing else.
    std::fs::write(&foreign, "[{ \"pid\": 1 }").unwrap();
    let broken = daemon.gpuctl(&["vram"]);
    assert_eq!(broken.status.code(), Some(1));
    assert!(
        stderr(&broken).contains(&foreign.display().to_string()),
        "{}",
        stderr(&broken)
    );
    daemon.assert_serving();
}

#[test]
fn auto_runs_without_a_gpu_where_there_is_no_nvidia_driver() {
    let daemon = Daemon::start(&config("", ""));
    let vram = daemon.gpuctl_json(&["vram"]);
    let has_driver = std::path::Path::new("/proc/driver/nvidia").exists();
    if has_driver {
        eprintln!(
            "SKIPPED the no-driver half: this machine has the NVIDIA driver (backend {})",
            vram["backend"]
        );
        return;
    }
    assert_eq!(vram["backend"], "none");
    assert!(
        vram["reason"]
            .as_str()
            .unwrap()
            .starts_with("auto: no NVIDIA GPU"),
        "{vram}"
    );
    assert_eq!(vram["devices"], serde_json::json!([]));
    assert!(
        daemon.log_text().contains("gpu probe backend=\"none\""),
        "{}",
        daemon.log_text()
    );
    assert!(stdout(&daemon.gpuctl(&["vram"])).starts_with("no GPU (auto: no NVIDIA GPU"));
}

#[test]
fn an_image_larger_than_its_tile_is_processed_in_tiles_with_the_same_result() {
    let tiled_config = config("", "").replace(
        "scale = 2\n",
        "scale = 2\ntile = 80\noverlap = 32\nbatch = 2\n",
    );
    let plain = Daemon::start(&config("", ""));
    let tiled = Daemon::start(&tiled_config);
    let image = WireTensor::new(
        DType::U8,
        vec![1, 3, 90, 130],
        (0..3 * 90 * 130).map(|i| ((i * 31) % 251) as u8).collect(),
    )
    .unwrap();
    let upscale = |daemon: &Daemon| {
        let image = image.clone();
        runtime().block_on(async {
            let client = Client::connect(&daemon.socket).await.unwrap();
            let answer = generate(
                &client,
                GenerateRequest {
                    input: Some(image),
                    ..request("up")
                },
            )
            .await
            .unwrap();
            answer.outputs.into_iter().next().unwrap()
        })
    };
    let (whole, pieces) = (upscale(&plain), upscale(&tiled));
    assert_eq!(pieces.shape, vec![1, 180, 260, 3]);
    assert_eq!(pieces.shape, whole.shape);
    let largest = whole
        .data
        .iter()
        .zip(&pieces.data)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    assert!(largest <= 1, "tiled and untiled pixels differ by {largest}");
}

#[test]
fn tiled_requests_report_progress_per_batch() {
    let tiled_config = config("", "").replace(
        "scale = 2\n",
        "scale = 2\ntile = 80\noverlap = 32\nbatch = 2\n",
    );
    let daemon = Daemon::start(&tiled_config);
    let image = WireTensor::new(DType::U8, vec![1, 3, 90, 130], vec![77; 3 * 90 * 130]).unwrap();
    let events = runtime().block_on(async {
        let client = Client::connect(&daemon.socket).await.unwrap();
        let mut call = client
            .start(Request::Generate(GenerateRequest {
                input: Some(image),
                ..request("up")
            }))
            .await
            .unwrap();
        let mut events = Vec::new();
        while let Some(event) = call.event().await {
            if let gpuctl_protocol::Event::Progress(progress) = event {
                events.push(progress);
            }
        }
        assert!(matches!(call.response().await, Ok(Response::Generate(_))));
        events
    });
    // 90x130 in tiles of 80: 2 rows x 3 columns, 2 per forward.
    let seen: Vec<(u64, u64)> = events.iter().map(|e| (e.done, e.total)).collect();
    assert_eq!(seen, [(2, 6), (4, 6), (6, 6)]);
    assert_eq!(events[0].message, "tile 2/6");
    assert!(events
        .windows(2)
        .all(|w| w[0].elapsed_ms <= w[1].elapsed_ms));
    assert_eq!(events[2].eta_ms, Some(0));
}

/// `up` in 64 tiles of 48 (overlap 16), one per forward: a few seconds of work.
fn many_tiles() -> (String, GenerateRequest) {
    let config = config("", "").replace(
        "scale = 2\n",
        "scale = 2\ntile = 48\noverlap = 16\nbatch = 1\n",
    );
    let image = WireTensor::new(DType::U8, vec![1, 3, 256, 256], vec![90; 3 * 256 * 256]).unwrap();
    let request = GenerateRequest {
        input: Some(image),
        ..request("up")
    };
    (config, request)
}

#[test]
fn a_cancelled_or_abandoned_job_stops_at_a_batch_boundary_and_the_model_stays() {
    let (config, job) = many_tiles();
    let daemon = Daemon::start(&config);
    runtime().block_on(async {
        let client = Client::connect(&daemon.socket).await.unwrap();
        // Cancel { id } after the first batch.
        let mut call = client.start(Request::Generate(job.clone())).await.unwrap();
        loop {
            match call.event().await {
                Some(gpuctl_protocol::Event::Progress(_)) => break,
                Some(_) => {}
                None => panic!("no progress"),
            }
        }
        let pid = model_status(&daemon, "up")["pid"].as_u64().unwrap();
        let cancel = Request::Cancel(gpuctl_protocol::CancelRequest { id: call.id() });
        match client.call(cancel).await.unwrap() {
            Response::Cancel(answer) => assert!(answer.cancelled),
            other => panic!("{other:?}"),
        }
        let error = daemon_error(call.response().await);
        assert_eq!(error.code, ErrorCode::Cancelled, "{}", error.message);
        wait_until("the job to stop", Duration::from_secs(30), || {
            daemon
                .log_text()
                .contains("job of a client that left has stopped")
        });
        assert!(
            daemon
                .log_text()
                .contains("the request was cancelled after"),
            "{}",
            daemon.log_text()
        );
        assert_eq!(model_status(&daemon, "up")["in_flight"], 0);
        assert_eq!(
            model_status(&daemon, "up")["pid"],
            pid,
            "the model stays loaded"
        );

        // A client that disconnects mid-job.
        let leaving = Client::connect(&daemon.socket).await.unwrap();
        let mut call = leaving.start(Request::Generate(job.clone())).await.unwrap();
        while !matches!(
            call.event().await,
            Some(gpuctl_protocol::Event::Progress(_))
        ) {}
        drop(call);
        drop(leaving);
        wait_until("the abandoned job to stop", Duration::from_secs(30), || {
            daemon
                .log_text()
                .matches("job of a client that left has stopped")
                .count()
                == 2
        });
        // The model serves the next request, in the same worker.
        let small = GenerateRequest {
            input: Some(WireTensor::new(DType::U8, vec![1, 3, 8, 8], vec![1; 192]).unwrap()),
            ..request("up")
        };
        generate(&client, small).await.unwrap();
        assert_eq!(model_status(&daemon, "up")["pid"], pid);
        assert_eq!(model_status(&daemon, "up")["loads"], 1);
    });
}

#[test]
fn a_request_past_its_timeout_is_stopped_cleanly() {
    let (config, job) = many_tiles();
    let config = config.replace("[policy]\n", "[policy]\nrequest_timeout = \"30m\"\n");
    let daemon = Daemon::start(&config);
    runtime().block_on(async {
        let client = Client::connect(&daemon.socket).await.unwrap();
        // Warm up, so that the limit falls inside the tiles, not the load.
        let small = GenerateRequest {
            input: Some(WireTensor::new(DType::U8, vec![1, 3, 8, 8], vec![1; 192]).unwrap()),
            ..request("up")
        };
        generate(&client, small.clone()).await.unwrap();
        let started = std::time::Instant::now();
        let error = daemon_error(
            generate(
                &client,
                GenerateRequest {
                    timeout_ms: Some(300),
                    ..job
                },
            )
            .await,
        );
        assert_eq!(error.code, ErrorCode::Timeout, "{}", error.message);
        assert!(
            error.message.contains("did not finish within 300ms"),
            "{}",
            error.message
        );
        assert!(started.elapsed() < Duration::from_secs(10));
        wait_until("the job to stop", Duration::from_secs(30), || {
            daemon
                .log_text()
                .contains("the request was cancelled after")
        });
        // Nothing else was disturbed.
        generate(&client, small).await.unwrap();
        assert_eq!(model_status(&daemon, "up")["loads"], 1);
    });
}

#[test]
fn out_of_memory_back_off_is_reported_in_the_response() {
    let faulty = format!(
        "{}\n[models.faulty]\npath = \"tiny-faulty.pt\"\nkind = \"image\"\nscale = 2\ntile = 128\noverlap = 16\nbatch = 4\n",
        config("", "")
    );
    let daemon = Daemon::start(&faulty);
    let answer = runtime().block_on(async {
        let client = Client::connect(&daemon.socket).await.unwrap();
        let image =
            WireTensor::new(DType::U8, vec![1, 3, 150, 200], vec![9; 3 * 150 * 200]).unwrap();
        generate(
            &client,
            GenerateRequest {
                input: Some(image),
                ..request("faulty")
            },
        )
        .await
        .unwrap()
    });
    assert_eq!(answer.outputs[0].shape, vec![1, 300, 400, 3]);
    assert!(answer.outputs[0].data.iter().all(|v| *v == 9));
    assert_eq!(answer.notes.len(), 3, "{:?}", answer.notes);
    assert!(
        answer.notes[2].contains("tile 128 -> 64"),
        "{:?}",
        answer.notes
    );
}
