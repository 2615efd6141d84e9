//! Models hosted by programs of their own (`command`), here real Python
//! processes using the worker SDK: python/tests/workers/numpy_worker.py
//! (numpy only, quick to start) and python/examples/ddpm_worker.py (a real
//! diffusers pipeline). Their Python is the venv scripts/setup made.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use gpuctl_protocol::{Client, ErrorCode, Event, GenerateRequest, Request};

use super::*;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap()
}

/// The venv's Python (scripts/env exports VIRTUAL_ENV).
fn python() -> String {
    let venv = std::env::var("VIRTUAL_ENV").map_or_else(
        |_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/gpuctl/venv"),
        PathBuf::from,
    );
    let python = venv.join("bin/python");
    assert!(
        python.exists(),
        "no Python at {}: run scripts/setup",
        python.display()
    );
    python.display().to_string()
}

/// A `[models.NAME]` served by a worker-SDK script, with the gpuctl package
/// on its path and `dir` for what the test worker writes.
fn sdk_model(name: &str, kind: &str, script: &str, dir: &std::path::Path, more: &str) -> String {
    let command = format!("\"{}\", \"{}\"", python(), repo().join(script).display());
    model_running(name, kind, &command, dir, more)
}

/// The numpy worker started by `sh -c SHELL` (the worker as `$0 $1`).
fn shell_wrapped(name: &str, shell: &str, dir: &std::path::Path) -> String {
    let command = format!(
        "\"sh\", \"-c\", {shell:?}, \"{}\", \"{}\"",
        python(),
        repo().join(NUMPY_WORKER).display()
    );
    model_running(name, "tensor", &command, dir, "")
}

fn model_running(
    name: &str,
    kind: &str,
    command: &str,
    dir: &std::path::Path,
    more: &str,
) -> String {
    format!(
        r#"
[models.{name}]
kind = "{kind}"
command = [{command}]
env = {{ PYTHONPATH = "{src}", GPUCTL_TEST_DIR = "{dir}" }}
{more}
"#,
        src = repo().join("python/src").display(),
        dir = dir.display(),
    )
}

const NUMPY_WORKER: &str = "python/tests/workers/numpy_worker.py";
const DDPM_WORKER: &str = "python/examples/ddpm_worker.py";

fn ddpm_request(seed: u64) -> GenerateRequest {
    GenerateRequest {
        prompt: "a test".into(),
        seed: Some(seed),
        ..request("ddpm")
    }
}

#[test]
fn a_diffusers_pipeline_loads_once_for_concurrent_first_requests_and_a_seed_reproduces_it_across_reloads(
) {
    let dir = open_tempdir();
    let daemon = Daemon::start(&config(
        "",
        &sdk_model(
            "ddpm",
            "generate",
            DDPM_WORKER,
            dir.path(),
            "defaults = { size = \"24x16\", steps = 4 }\noptions = { init_seed = 3 }",
        ),
    ));
    let first = runtime().block_on(async {
        let client = Client::connect(&daemon.socket).await.unwrap();
        let mut calls = Vec::new();
        for seed in [7, 7, 7, 8] {
            calls.push(
                client
                    .start(Request::Generate(ddpm_request(seed)))
                    .await
                    .unwrap(),
            );
        }
        let mut outputs = Vec::new();
        for mut call in calls {
            let mut steps = Vec::new();
            while let Some(event) = call.event().await {
                if let Event::Progress(progress) = event {
                    steps.push((progress.done, progress.total, progress.message));
                }
            }
            let response = match call.response().await.unwrap() {
                gpuctl_protocol::Response::Generate(response) => response,
                other => panic!("{other:?}"),
            };
            assert_eq!(
                response.outputs[0].shape,
                [1, 16, 24, 3],
                "the model's default size"
            );
            assert_eq!(
                steps.last(),
                Some(&(4, 4, "step 4/4".to_owned())),
                "each denoising step is a progress event: {steps:?}"
            );
            outputs.push(response.outputs[0].data.clone());
        }
        assert!(
            outputs[0] == outputs[1] && outputs[1] == outputs[2],
            "one seed, one image"
        );
        assert_ne!(outputs[0], outputs[3], "another seed, another image");
        outputs.swap_remove(0)
    });
    let status = model_status(&daemon, "ddpm");
    assert_eq!(
        status["loads"], 1,
        "four first requests, one load: {status}"
    );
    assert!(
        status["device_bytes"].as_u64().unwrap() > 0,
        "reports what it holds: {status}"
    );
    let pid = status["pid"].as_u64().unwrap();
    assert!(daemon.gpuctl(&["unload", "ddpm"]).status.success());
    wait_until(
        "the pipeline's process to end",
        Duration::from_secs(10),
        || !pid_alive(pid),
    );
    runtime().block_on(async {
        let client = Client::connect(&daemon.socket).await.unwrap();
        let again = generate(&client, ddpm_request(7)).await.unwrap();
        assert_eq!(
            again.outputs[0].data, first,
            "the seed reproduces the image in a new process"
        );
    });
    assert_eq!(model_status(&daemon, "ddpm")["loads"], 2);
}

#[test]
fn a_python_model_and_what_it_started_are_gone_when_its_keep_alive_ends() {
    let dir = open_tempdir();
    let child_file = dir.path().join("child.pid");
    let daemon = Daemon::start(&config(
        "",
        &sdk_model(
            "np",
            "tensor",
            NUMPY_WORKER,
            dir.path(),
            &format!(
                "keep_alive = \"1s\"\noptions = {{ child_pid_file = \"{}\" }}",
                child_file.display()
            ),
        ),
    ));
    runtime().block_on(async {
        let client = Client::connect(&daemon.socket).await.unwrap();
        let response = generate(
            &client,
            GenerateRequest {
                model: "np".into(),
                ..tensor_request()
            },
        )
        .await
        .unwrap();
        // x * 2 for each input, then their element count.
        assert_eq!(response.outputs.len(), 3);
        assert_eq!(response.outputs[2].data, 4i64.to_le_bytes());
    });
    let status = model_status(&daemon, "np");
    let pid = status["pid"].as_u64().unwrap();
    let child: u64 = std::fs::read_to_string(&child_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        pid_alive(child),
        "the worker's child runs while it is loaded"
    );
    wait_for_state(&daemon, "np", "Unloaded");
    assert_eq!(model_status(&daemon, "np")["last_unload"], "IdleTimeout");
    wait_until(
        "the worker and its child to be gone",
        Duration::from_secs(10),
        || !pid_alive(pid) && !pid_alive(child),
    );
}

/// gpuctld with `np`, a numpy `generate` model whose steps take 50 ms each.
fn slow_numpy_generator(dir: &std::path::Path) -> Daemon {
    Daemon::start(&config(
        "",
        &sdk_model(
            "np",
            "generate",
            NUMPY_WORKER,
            dir,
            "defaults = { size = \"8x8\", steps = 1 }\noptions = { step_s = 0.05 }",
        ),
    ))
}

#[test]
fn a_python_worker_killed_mid_request_fails_it_by_name_and_the_next_request_loads_it_again() {
    let dir = open_tempdir();
    let daemon = slow_numpy_generator(dir.path());
    let np = |steps| GenerateRequest {
        steps: Some(steps),
        seed: Some(1),
        ..request("np")
    };
    runtime().block_on(async {
        let client = Client::connect(&daemon.socket).await.unwrap();
        let call = client.start(Request::Generate(np(400))).await.unwrap();
        wait_until("the job to run", Duration::from_secs(30), || {
            let status = model_status(&daemon, "np");
            status["in_flight"] == 1 && status["pid"].is_u64()
        });
        let pid = model_status(&daemon, "np")["pid"].as_u64().unwrap();
        // SAFETY: kill takes plain integers.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        let error = daemon_error(call.response().await);
        assert_eq!(error.code, ErrorCode::Internal);
        assert!(
            error.message.starts_with(&format!(
                "model np: its worker (pid {pid}) died while running this request: signal 9 (SIGKILL"
            )),
            "{}",
            error.message
        );
        let again = generate(&client, np(1)).await.unwrap();
        assert_eq!(again.outputs[0].shape, [1, 8, 8, 3]);
    });
    daemon.assert_serving();
    assert_eq!(model_status(&daemon, "np")["loads"], 2);
}

#[test]
fn a_cancelled_python_job_stops_at_its_next_step_and_its_worker_stays() {
    let dir = open_tempdir();
    let daemon = slow_numpy_generator(dir.path());
    assert!(daemon.gpuctl(&["load", "np"]).status.success());
    runtime().block_on(async {
        let client = Client::connect(&daemon.socket).await.unwrap();
        let slow = GenerateRequest {
            steps: Some(2000),
            timeout_ms: Some(1500),
            ..request("np")
        };
        let started = Instant::now();
        let error = daemon_error(generate(&client, slow).await);
        assert_eq!(error.code, ErrorCode::Timeout, "{}", error.message);
        assert!(started.elapsed() < Duration::from_secs(20));
    });
    // Stopped at a step boundary, not killed: the same worker goes on.
    wait_until("the cancelled job to end", Duration::from_secs(10), || {
        model_status(&daemon, "np")["in_flight"] == 0
    });
    let status = model_status(&daemon, "np");
    assert_eq!(
        (status["state"].as_str(), status["loads"].as_u64()),
        (Some("Ready"), Some(1)),
        "{status}"
    );
    assert!(status["last_unload"].is_null(), "{status}");
}

#[test]
fn a_python_worker_that_does_not_exit_on_unload_is_killed_with_its_group_after_the_grace() {
    let dir = open_tempdir();
    // The worker exits on Unload, but the shell around it then sleeps on.
    let lingering = shell_wrapped("stubborn", "\"$0\" \"$1\"; exec sleep 1000", dir.path());
    let daemon = Daemon::start(&config("", &lingering));
    assert!(daemon.gpuctl(&["load", "stubborn"]).status.success());
    let pid = model_status(&daemon, "stubborn")["pid"].as_u64().unwrap();
    let started = Instant::now();
    assert!(daemon.gpuctl(&["unload", "stubborn"]).status.success());
    wait_for_state(&daemon, "stubborn", "Unloaded");
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "killed after the grace, not before: {:?}",
        started.elapsed()
    );
    wait_until("the group to be gone", Duration::from_secs(10), || {
        !pid_alive(pid)
    });
    assert!(
        daemon
            .log_text()
            .contains("worker did not exit after Unload; killing it"),
        "{}",
        daemon.log_text()
    );
}

#[test]
fn command_models_that_cannot_serve_fail_by_name_and_nothing_else_is_disturbed() {
    use std::os::unix::fs::PermissionsExt;
    let dir = open_tempdir();
    let other = dir.path().join("other-protocol-worker");
    std::fs::write(&other, super::failures::OTHER_PROTOCOL_WORKER).unwrap();
    std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o755)).unwrap();
    let broken = [
        (
            "missing",
            "command = [\"/nonexistent/worker\"]".to_owned(),
            "model missing: cannot start /nonexistent/worker: No such file or directory",
        ),
        (
            "quits",
            "command = [\"sh\", \"-c\", \"exit 3\"]".to_owned(),
            "model quits: its worker exited before saying which protocol it speaks",
        ),
        (
            "other",
            format!("command = [\"{}\"]", other.display()),
            "model other: its worker (fake 9) speaks worker protocol 9.0, this gpuctld speaks 1.1",
        ),
    ];
    let mut extra: String = broken
        .iter()
        .map(|(name, command, _)| format!("[models.{name}]\nkind = \"tensor\"\n{command}\n"))
        .collect();
    extra += &sdk_model(
        "slow",
        "tensor",
        NUMPY_WORKER,
        dir.path(),
        "load_timeout = \"2s\"\noptions = { load_s = 60 }",
    );
    extra += &sdk_model(
        "raises",
        "tensor",
        NUMPY_WORKER,
        dir.path(),
        "options = { load_error = \"conv1.weight: expected [64, 3], got [32, 3]\" }",
    );
    let daemon = Daemon::start(&config("", &extra));
    let expected = broken
        .iter()
        .map(|(name, _, message)| (*name, message.to_string()))
        .chain([
            ("slow", "model slow: its worker (pid ".to_owned()),
            (
                "raises",
                "model raises: loading failed: ValueError: conv1.weight: expected [64, 3], got [32, 3]".to_owned(),
            ),
        ]);
    runtime().block_on(async {
        let client = Client::connect(&daemon.socket).await.unwrap();
        for (name, message) in expected {
            let error = daemon_error(
                generate(
                    &client,
                    GenerateRequest {
                        model: name.into(),
                        ..tensor_request()
                    },
                )
                .await,
            );
            assert_eq!(
                error.code,
                ErrorCode::LoadFailed,
                "{name}: {}",
                error.message
            );
            assert!(
                error.message.starts_with(&message),
                "{name}: {}",
                error.message
            );
            if name == "slow" {
                assert!(
                    error
                        .message
                        .contains("did not say it loaded within load_timeout (2s); it was killed"),
                    "{}",
                    error.message
                );
            }
            assert!(
                model_status(&daemon, name)["pid"].is_null(),
                "{name}: nothing left running"
            );
        }
        // A TorchScript model beside them answers as ever.
        generate(&client, tensor_request()).await.unwrap();
    });
    daemon.assert_serving();
}

#[test]
fn pressure_on_the_simulated_gpu_unloads_an_idle_python_model() {
    let dir = open_tempdir();
    let foreign = dir.path().join("foreign.json");
    std::fs::write(&foreign, "[]").unwrap();
    let gpu = format!(
        "[gpu]\nbackend = \"sim\"\npoll_interval = \"250ms\"\nmin_free_vram = \"300MiB\"\n\
         [gpu.sim]\nforeign_usage_file = \"{}\"\n[[gpu.sim.devices]]\nname = \"Sim 1G\"\ntotal = \"1GiB\"\n",
        foreign.display()
    );
    let model = sdk_model(
        "np",
        "tensor",
        NUMPY_WORKER,
        dir.path(),
        "options = { holds = 419430400 }",
    );
    let daemon = Daemon::start(&config(
        "keep_alive = \"forever\"",
        &format!("{gpu}{model}"),
    ));
    assert!(daemon.gpuctl(&["load", "np"]).status.success());
    let status = model_status(&daemon, "np");
    assert_eq!(
        status["device_bytes"],
        400u64 << 20,
        "the simulated GPU counts what the worker reported: {status}"
    );
    // Another program takes 700 MiB of the 1 GiB: the idle model yields.
    std::fs::write(
        &foreign,
        r#"[{ "pid": 4121, "name": "ollama", "device": 0, "bytes": 734003200 }]"#,
    )
    .unwrap();
    wait_for_state(&daemon, "np", "Unloaded");
    assert!(
        model_status(&daemon, "np")["last_unload"]["Pressure"].is_object(),
        "{}",
        model_status(&daemon, "np")
    );
}

#[test]
fn a_python_worker_behind_a_wrapper_dies_with_gpuctld() {
    let dir = open_tempdir();
    // The shell stays (no exec), so the Python process is gpuctld's grandchild.
    let wrapped = shell_wrapped("wrapped", "\"$0\" \"$1\"; true", dir.path());
    let mut daemon = Daemon::start(&config("", &wrapped));
    assert!(daemon.gpuctl(&["load", "wrapped"]).status.success());
    let shell = model_status(&daemon, "wrapped")["pid"].as_u64().unwrap();
    let python: u64 = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            name.strip_prefix("loaded-wrapped-")?.parse().ok()
        })
        .next()
        .expect("the worker wrote its pid");
    assert_ne!(shell, python);
    assert!(pid_alive(shell) && pid_alive(python));
    daemon.signal(libc::SIGKILL);
    daemon.wait_exit(Duration::from_secs(10));
    wait_until(
        "the shell and the Python worker to die with gpuctld",
        Duration::from_secs(10),
        || !pid_alive(shell) && !pid_alive(python),
    );
}
