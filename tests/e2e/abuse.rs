//! What one client can do to a shared daemon, and what it must not: each
//! test runs an attack (sizes, stuck jobs, departures, hoarded connections,
//! uploads, unread answers, reservations) beside a victim whose requests
//! must still be answered correctly. Tests that act as another user need
//! root (setpriv); they say so and skip otherwise.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gpuctl_protocol::{
    CancelRequest, Client, ClientMessage, DType, DaemonMessage, ErrorCode, GenerateRequest,
    PingRequest, Request, Response, WireTensor,
};
use serde_json::Value;

use crate::fixture::*;
use crate::models::{
    config, daemon_error, generate, model_status, pid_alive, runtime, start_slow_job,
    tensor_request,
};

const NOBODY: u32 = 65534;

/// Steps that keep tiny-generate busy for many minutes: a job that only
/// ends when it is stopped.
const FOREVER_STEPS: u32 = 90_000_000;
const FOREVER: &str = "90000000";

fn running_as_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// `gpuctl ARGS` run as `uid`, with no groups.
fn gpuctl_as(uid: u32, socket: &Path, args: &[&str]) -> Command {
    let mut command = Command::new("setpriv");
    command
        .args([
            "--reuid",
            &uid.to_string(),
            "--regid",
            &uid.to_string(),
            "--clear-groups",
        ])
        .arg(bin("gpuctl"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .env_remove("GPUCTL_SOCKET");
    command
}

/// The victim: a tensor request answered with the model's exact result.
async fn victim_is_served(client: &Client) {
    let answer = generate(client, tensor_request()).await.unwrap();
    // tiny-tensor: (a * 2 + b, sum(a * b)) for a = [0, 1], b = [1, 1].
    let first: Vec<f32> = answer.outputs[0]
        .data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    assert_eq!(first, vec![1.0, 3.0], "the victim's answer is correct");
}

fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn sizes_and_steps_a_client_chooses_are_bounded_before_anything_is_allocated() {
    let mut daemon = Daemon::start(&config("max_steps = 1000", ""));
    // The size that made gpuctld abort on a 4.6 EB allocation.
    let huge = daemon.gpuctl(&[
        "generate",
        "gen",
        "--prompt",
        "x",
        "--size",
        "4294967288x4294967288",
        "-o",
        "/dev/null",
    ]);
    assert_eq!(huge.status.code(), Some(1), "{}", stderr(&huge));
    let message = stderr(&huge);
    assert!(
        message.contains("a 4294967288x4294967288 image")
            && message.contains("over daemon.max_output (4.0 GiB)")
            && message.contains("(too_large)"),
        "{message}"
    );
    // One that used to cost a gigabyte and 50 s of a runtime thread.
    let large = daemon.gpuctl(&["generate", "gen", "--prompt", "x", "--size", "65536x65536"]);
    assert!(stderr(&large).contains("(too_large)"), "{}", stderr(&large));
    let steps = daemon.gpuctl(&[
        "generate",
        "gen",
        "--prompt",
        "x",
        "--size",
        "64x64",
        "--steps",
        "4294967295",
    ]);
    assert_eq!(steps.status.code(), Some(1));
    assert!(
        stderr(&steps).contains("steps 4294967295 is more than policy.max_steps (1000)"),
        "{}",
        stderr(&steps)
    );
    runtime().block_on(async {
        let client = Client::connect(&daemon.socket).await.unwrap();
        victim_is_served(&client).await;
        // Within the bounds, the request runs.
        let made = generate(
            &client,
            GenerateRequest {
                prompt: "x".into(),
                size: Some((64, 64)),
                steps: Some(1000),
                ..GenerateRequest::new("gen")
            },
        )
        .await
        .unwrap();
        assert_eq!(made.outputs[0].shape, vec![1, 64, 64, 3]);
    });
    daemon.assert_serving();
    assert!(
        daemon.child.try_wait().unwrap().is_none(),
        "gpuctld is alive"
    );
}

/// Waits until `gen`'s worker is gone, unloaded as stuck, and returns the
/// model's status then.
fn wait_until_unstuck(daemon: &Daemon, pid: u64) -> Value {
    let mut status = Value::Null;
    wait_until(
        "the stuck worker to be killed",
        Duration::from_secs(20),
        || {
            status = model_status(daemon, "gen");
            // The registry lists the worker until it has heard of its exit,
            // and until then its stopped job still counts as in flight
            // (last_unload may be Stuck from an earlier worker already).
            !pid_alive(pid)
                && status["pid"].as_u64() != Some(pid)
                && status["last_unload"]["Stuck"].is_object()
        },
    );
    status
}

#[test]
fn a_stopped_job_that_goes_on_has_its_worker_killed_and_the_model_comes_back() {
    let daemon = Daemon::start(&config("cancel_grace = \"1s\"", ""));
    runtime().block_on(async {
        let client = Client::connect(&daemon.socket).await.unwrap();
        let mut watch = client
            .start(Request::Watch(Default::default()))
            .await
            .unwrap();

        // A timeout: the client is told at once, the job goes on inside
        // the forward, and its worker is killed after the grace. The model
        // is loaded first, so that the job runs well within the timeout.
        let loaded = daemon.gpuctl(&["load", "gen"]);
        assert!(loaded.status.success(), "{}", stderr(&loaded));
        let started = Instant::now();
        let timed_out = daemon.gpuctl(&[
            "generate",
            "gen",
            "--prompt",
            "x",
            "--size",
            "64x64",
            "--steps",
            FOREVER,
            "--timeout",
            "3s",
            "-o",
            "/dev/null",
        ]);
        assert_eq!(timed_out.status.code(), Some(1));
        assert!(
            stderr(&timed_out).contains("(timeout)"),
            "{}",
            stderr(&timed_out)
        );
        let pid = model_status(&daemon, "gen")["pid"].as_u64();
        let status = match pid {
            Some(pid) => wait_until_unstuck(&daemon, pid),
            None => model_status(&daemon, "gen"),
        };
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "killed soon after the grace"
        );
        assert!(
            status["last_unload"]["Stuck"]["description"]
                .as_str()
                .is_some_and(|d| d.contains("after it was cancelled")),
            "{status}"
        );
        assert!(
            status["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("policy.cancel_grace")),
            "{status}"
        );
        loop {
            let Some(gpuctl_protocol::Event::Notice(notice)) = watch.event().await else {
                panic!("the watch ended");
            };
            if let gpuctl_protocol::NoticeKind::Unloaded { model, reason, .. } = notice.what {
                assert_eq!(model, "gen");
                assert!(
                    matches!(reason, gpuctl_protocol::UnloadReason::Stuck { .. }),
                    "{reason:?}"
                );
                break;
            }
        }
        // The next request loads the model again and gets its answer.
        let answer = generate(
            &client,
            GenerateRequest {
                seed: Some(1),
                ..GenerateRequest::new("gen")
            },
        )
        .await
        .unwrap();
        assert_eq!(answer.outputs[0].shape, vec![1, 48, 64, 3]);
        victim_is_served(&client).await;

        // Cancel and a client that disconnects stop a job the same way.
        for leave in ["cancel", "disconnect"] {
            let leaver = Client::connect(&daemon.socket).await.unwrap();
            let job = start_slow_job(&leaver, &daemon, FOREVER_STEPS).await;
            let status = model_status(&daemon, "gen");
            let pid = status["pid"]
                .as_u64()
                .unwrap_or_else(|| panic!("{leave}: no worker: {status}\n{}", daemon.log_text()));
            if leave == "cancel" {
                let cancelled = leaver
                    .call(Request::Cancel(CancelRequest { id: job.id() }))
                    .await
                    .unwrap();
                assert!(matches!(cancelled, Response::Cancel(c) if c.cancelled));
                drop(job);
            } else {
                drop(job);
                drop(leaver);
            }
            let status = wait_until_unstuck(&daemon, pid);
            assert!(
                status["last_unload"]["Stuck"].is_object(),
                "{leave}: {status}"
            );
            victim_is_served(&client).await;
        }
        generate(&client, GenerateRequest::new("gen"))
            .await
            .unwrap();
    });
    assert!(
        daemon.log_text().contains("a cancelled job did not stop"),
        "the log says why"
    );
}

#[test]
fn unload_force_kills_a_draining_or_stopped_worker() {
    let daemon = Daemon::start(&config("", ""));
    runtime().block_on(async {
        let client = Client::connect(&daemon.socket).await.unwrap();
        let job = start_slow_job(&client, &daemon, FOREVER_STEPS).await;
        let pid = model_status(&daemon, "gen")["pid"].as_u64().unwrap();
        // A plain unload drains: it waits for the job, which never ends.
        let mut draining = Command::new(bin("gpuctl"))
            .args(["--socket", daemon.socket.to_str().unwrap(), "unload", "gen"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_until("gen to drain", Duration::from_secs(10), || {
            model_status(&daemon, "gen")["state"] == "Draining"
        });
        let _ = draining.kill();
        let _ = draining.wait();
        // --force from the draining state ends it at once.
        let forced = daemon.gpuctl_within(&["unload", "gen", "--force"], Duration::from_secs(10));
        assert!(forced.status.success(), "{}", stderr(&forced));
        assert!(!pid_alive(pid), "the worker is gone");
        let error = daemon_error(job.response().await);
        assert_eq!(error.code, ErrorCode::Cancelled);
        generate(&client, GenerateRequest::new("gen"))
            .await
            .unwrap();

        // A worker stopped with SIGSTOP in the middle of a request.
        let job = start_slow_job(&client, &daemon, FOREVER_STEPS).await;
        let pid = model_status(&daemon, "gen")["pid"].as_u64().unwrap();
        // SAFETY: kill has no memory-safety preconditions.
        assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGSTOP) }, 0);
        let forced = daemon.gpuctl_within(&["unload", "gen", "--force"], Duration::from_secs(10));
        assert!(forced.status.success(), "{}", stderr(&forced));
        wait_until(
            "the stopped worker to be gone",
            Duration::from_secs(10),
            || !pid_alive(pid),
        );
        assert_eq!(
            daemon_error(job.response().await).code,
            ErrorCode::Cancelled
        );
        victim_is_served(&client).await;
        generate(&client, GenerateRequest::new("gen"))
            .await
            .unwrap();
    });
}

#[test]
fn clients_that_leave_give_up_their_place_in_the_queue() {
    let daemon = Daemon::start(&config("queue_max = 8", ""));
    runtime().block_on(async {
        let client = Client::connect(&daemon.socket).await.unwrap();
        let job = start_slow_job(&client, &daemon, FOREVER_STEPS).await;
        // Five clients queue a request and leave: raw connections that
        // close, and gpuctl processes ended by SIGTERM and SIGINT.
        let mut raw: Vec<RawClient> = (0..3)
            .map(|_| RawClient::handshaken(&daemon.socket))
            .collect();
        for (i, leaver) in raw.iter_mut().enumerate() {
            leaver.request(i as u64 + 1, Request::Generate(GenerateRequest::new("gen")));
        }
        let mut killed: Vec<Child> = [libc::SIGTERM, libc::SIGINT]
            .iter()
            .map(|_| {
                Command::new(bin("gpuctl"))
                    .args([
                        "--socket",
                        daemon.socket.to_str().unwrap(),
                        "generate",
                        "gen",
                        "-o",
                        "/dev/null",
                    ])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect();
        wait_until("five requests to queue", Duration::from_secs(10), || {
            model_status(&daemon, "gen")["queued"] == 5
        });
        // The victim queues behind them: sixth in line.
        let mut victim = client
            .start(Request::Generate(GenerateRequest::new("gen")))
            .await
            .unwrap();
        let position = |event: Option<gpuctl_protocol::Event>| match event {
            Some(gpuctl_protocol::Event::Queued(queued)) => queued.position,
            other => panic!("expected a Queued event, got {other:?}"),
        };
        assert_eq!(position(victim.event().await), 6);
        drop(raw);
        for (child, signal) in killed.iter_mut().zip([libc::SIGTERM, libc::SIGINT]) {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(child.id() as i32, signal) };
            let _ = child.wait();
        }
        wait_until(
            "the departed to leave the queue",
            Duration::from_secs(10),
            || model_status(&daemon, "gen")["queued"] == 1,
        );
        // The victim moved up, and the freed places take new requests.
        let mut last = 6;
        while last != 1 {
            last = position(victim.event().await);
        }
        let mut more = Vec::new();
        for _ in 0..6 {
            more.push(
                client
                    .start(Request::Generate(GenerateRequest::new("gen")))
                    .await
                    .unwrap(),
            );
        }
        wait_until("six more to queue", Duration::from_secs(10), || {
            model_status(&daemon, "gen")["queued"] == 7
        });
        let full = daemon_error(generate(&client, GenerateRequest::new("gen")).await);
        assert_eq!(full.code, ErrorCode::QueueFull, "{}", full.message);
        assert!(daemon
            .gpuctl_within(&["unload", "gen", "--force"], Duration::from_secs(10))
            .status
            .success());
        drop(job);
        drop(more);
    });
    assert!(daemon.log_text().contains("it left the queue"));
}

/// Connections open now, asked on a connection held for the purpose (so
/// that asking opens none).
fn connections(admin: &mut RawClient) -> u64 {
    admin.request(9, Request::Status(Default::default()));
    match answer_of(admin, 9) {
        Ok(Response::Status(status)) => u64::from(status.connections),
        other => panic!("{other:?}"),
    }
}

#[test]
fn one_user_cannot_take_every_connection() {
    if !running_as_root() {
        eprintln!(
            "SKIPPED one_user_cannot_take_every_connection: needs root to act as other users"
        );
        return;
    }
    let daemon = Daemon::start(
        "[daemon]\nsocket_mode = \"0666\"\nmax_connections = 7\nmax_connections_per_uid = 3\nadmin_connections = 2\nidle_timeout = \"0s\"\n",
    );
    daemon.wait_idle();
    let mut admin = RawClient::handshaken(&daemon.socket);
    let watch_as = |uid: u32| {
        gpuctl_as(uid, &daemon.socket, &["watch"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut held: Vec<Child> = (0..3).map(|_| watch_as(NOBODY)).collect();
    wait_until("nobody's three watches", Duration::from_secs(10), || {
        connections(&mut admin) == 4
    });
    let fourth = gpuctl_as(NOBODY, &daemon.socket, &["ping"])
        .output()
        .unwrap();
    assert_eq!(fourth.status.code(), Some(1));
    assert!(
        stderr(&fourth).contains("uid 65534 already holds 3 connections"),
        "{}",
        stderr(&fourth)
    );
    // Another user takes the last slot that is not kept for administrators.
    held.push(watch_as(54_321));
    wait_until("the other user's watch", Duration::from_secs(10), || {
        connections(&mut admin) == 5
    });
    let refused = gpuctl_as(54_322, &daemon.socket, &["ping"])
        .output()
        .unwrap();
    assert!(
        stderr(&refused).contains("keeps the last 2 for administrators"),
        "{}",
        stderr(&refused)
    );
    // root still gets in, and is served.
    daemon.assert_serving();
    for mut child in held {
        let _ = child.kill();
        let _ = child.wait();
    }
    wait_until("slots given back", Duration::from_secs(10), || {
        gpuctl_as(NOBODY, &daemon.socket, &["ping"])
            .output()
            .unwrap()
            .status
            .success()
    });
}

#[test]
fn idle_connections_are_closed_but_watches_and_reservations_are_not() {
    let sim = open_tempdir();
    let daemon = Daemon::start(&format!(
        "[daemon]\nidle_timeout = \"1s\"\n[gpu]\nbackend = \"sim\"\n[gpu.sim]\nforeign_usage_file = \"{}\"\n[[gpu.sim.devices]]\nname = \"Sim\"\ntotal = \"4GiB\"\n",
        sim.path().join("foreign.json").display()
    ));
    let mut idle = RawClient::handshaken(&daemon.socket);
    let mut watcher = RawClient::handshaken(&daemon.socket);
    watcher.request(1, Request::Watch(Default::default()));
    let mut holder = RawClient::handshaken(&daemon.socket);
    holder.request(
        1,
        Request::Reserve(gpuctl_protocol::ReserveRequest {
            bytes: 1 << 30,
            device: None,
            timeout_ms: 5000,
            ttl_ms: None,
        }),
    );
    let granted = loop {
        match holder.receive() {
            Some(DaemonMessage::Response { response, .. }) => break response,
            Some(_) => continue,
            None => panic!("the holder was closed"),
        }
    };
    assert!(matches!(granted, Response::Reserve(_)), "{granted:?}");
    let started = Instant::now();
    let message = idle.expect_closing(ErrorCode::Timeout);
    assert!(message.contains("daemon.idle_timeout"), "{message}");
    assert!(started.elapsed() < Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(1500));
    // The watch and the reservation still stand.
    let vram = daemon.gpuctl_json(&["vram"]);
    assert_eq!(vram["reservations"].as_array().unwrap().len(), 1, "{vram}");
    holder.request(2, Request::Ping(PingRequest {}));
    loop {
        match holder.receive() {
            Some(DaemonMessage::Response { id: 2, .. }) => break,
            Some(DaemonMessage::Closing(error)) => panic!("the holder was closed: {error:?}"),
            Some(_) => continue,
            None => panic!("the holder was closed"),
        }
    }
    watcher.request(2, Request::Ping(PingRequest {}));
    loop {
        match watcher.receive() {
            Some(DaemonMessage::Response { id: 2, .. }) => break,
            Some(DaemonMessage::Closing(error)) => panic!("the watcher was closed: {error:?}"),
            Some(_) => continue,
            None => panic!("the watcher was closed"),
        }
    }
    daemon.assert_serving();
}

/// Starts streaming a u8 tensor of `bytes` for request `id`: its size is
/// announced, no data follows.
fn announce(client: &mut RawClient, id: u64, bytes: u64) {
    client.send(&ClientMessage::TensorBegin {
        id,
        dtype: DType::U8,
        shape: vec![bytes],
    });
}

fn answer_of(client: &mut RawClient, id: u64) -> Result<Response, gpuctl_protocol::Error> {
    loop {
        match client.receive() {
            Some(DaemonMessage::Response { id: got, response }) if got == id => {
                return Ok(response)
            }
            Some(DaemonMessage::Error { id: got, error }) if got == id => return Err(error),
            Some(DaemonMessage::Closing(error)) => panic!("closed: {error:?}"),
            Some(_) => continue,
            None => panic!("the connection ended"),
        }
    }
}

fn tensor_request_for(bytes: u64) -> Request {
    Request::Generate(GenerateRequest {
        inputs: vec![WireTensor::placeholder(DType::U8, vec![bytes])],
        ..GenerateRequest::new("ten")
    })
}

#[test]
fn uploads_are_capped_daemon_wide_and_dropped_when_unclaimed() {
    let daemon = Daemon::start(&config(
        "",
        "[daemon]\nmax_upload = \"64MiB\"\nmax_upload_total = \"96MiB\"\nupload_timeout = \"2s\"\n",
    ));
    let mut first = RawClient::handshaken(&daemon.socket);
    let mut second = RawClient::handshaken(&daemon.socket);
    announce(&mut first, 1, 60 << 20);
    // Connections are served concurrently: the first's announcement must
    // have been taken (a connection's messages are handled in order, so
    // its ping's answer says so) before the second's comes.
    first.request(9, Request::Ping(PingRequest {}));
    assert!(answer_of(&mut first, 9).is_ok());
    announce(&mut second, 1, 60 << 20);
    second.request(1, tensor_request_for(60 << 20));
    let refused = answer_of(&mut second, 1).unwrap_err();
    assert_eq!(refused.code, ErrorCode::Busy, "{}", refused.message);
    assert!(
        refused
            .message
            .contains("daemon.max_upload_total (96.0 MiB; 60.0 MiB held"),
        "{}",
        refused.message
    );
    // The victim, meanwhile, is served.
    runtime().block_on(async {
        let client = Client::connect(&daemon.socket).await.unwrap();
        victim_is_served(&client).await;
    });
    // Unclaimed, the first stream is dropped after daemon.upload_timeout...
    std::thread::sleep(Duration::from_millis(2500));
    first.request(1, tensor_request_for(60 << 20));
    let expired = answer_of(&mut first, 1).unwrap_err();
    assert_eq!(expired.code, ErrorCode::Timeout, "{}", expired.message);
    assert!(
        expired.message.contains("daemon.upload_timeout"),
        "{}",
        expired.message
    );
    // ... and its room is free again.
    announce(&mut second, 2, 60 << 20);
    second.send(&ClientMessage::TensorChunk {
        id: 2,
        data: vec![0; 1 << 20],
    });
    second.request(2, Request::Ping(PingRequest {}));
    let error = answer_of(&mut second, 2).unwrap_err();
    assert!(
        error.message.contains("ping takes none"),
        "accepted, then found to be for the wrong request: {}",
        error.message
    );
    // A chunk over 1 MiB breaks the protocol: its request alone fails.
    announce(&mut second, 3, 2 << 20);
    second.send(&ClientMessage::TensorChunk {
        id: 3,
        data: vec![0; (1 << 20) + 1],
    });
    second.request(3, tensor_request_for(2 << 20));
    let error = answer_of(&mut second, 3).unwrap_err();
    assert_eq!(error.code, ErrorCode::InvalidRequest);
    assert!(
        error.message.contains("over the limit of 1048576"),
        "{}",
        error.message
    );
    second.request(4, Request::Ping(PingRequest {}));
    assert!(answer_of(&mut second, 4).is_ok());
    daemon.assert_serving();
}

/// A `gen` request whose answer is a 1024x1024 RGB8 image: 3 MiB out for
/// a few bytes in.
fn request_a_picture(client: &mut RawClient, id: u64) {
    client.request(
        id,
        Request::Generate(GenerateRequest {
            prompt: "p".into(),
            size: Some((1024, 1024)),
            steps: Some(1),
            seed: Some(id),
            ..GenerateRequest::new("gen")
        }),
    );
}

fn pictures_made(daemon: &Daemon) -> bool {
    let gen = model_status(daemon, "gen");
    gen["queued"] == 0 && gen["in_flight"] == 0
}

#[test]
fn answers_a_client_leaves_unread_are_bounded_per_connection() {
    let daemon = Daemon::start(&config("", "[daemon]\nmax_unread = \"8MiB\"\n"));
    // Five 3 MiB answers, not read until all are made: two or so fit.
    let mut slow = RawClient::handshaken(&daemon.socket);
    for id in 1..=5 {
        request_a_picture(&mut slow, id);
    }
    runtime().block_on(async {
        let client = Client::connect(&daemon.socket).await.unwrap();
        victim_is_served(&client).await;
    });
    wait_until("the pictures to be made", Duration::from_secs(60), || {
        pictures_made(&daemon)
    });
    let (mut answered, mut refused) = (Vec::new(), Vec::new());
    while answered.len() + refused.len() < 5 {
        match slow.receive() {
            Some(DaemonMessage::Response { id, .. }) => answered.push(id),
            Some(DaemonMessage::Error { id, error }) => {
                assert_eq!(error.code, ErrorCode::TooLarge, "{}", error.message);
                assert!(
                    error.message.contains("daemon.max_unread (8.0 MiB)"),
                    "{}",
                    error.message
                );
                refused.push(id);
            }
            Some(DaemonMessage::Closing(error)) => panic!("closed: {error:?}"),
            Some(_) => {}
            None => panic!("the connection ended"),
        }
    }
    assert!(
        answered.len() >= 2 && !refused.is_empty(),
        "{answered:?} answered, {refused:?} refused"
    );
    // The connection goes on.
    slow.request(9, Request::Ping(PingRequest {}));
    assert!(answer_of(&mut slow, 9).is_ok());
}

#[test]
fn a_client_that_reads_nothing_is_bounded_then_dropped() {
    let daemon = Daemon::start(&config(
        "",
        "[daemon]\nmax_unread = \"8MiB\"\nsend_timeout = \"5s\"\n",
    ));
    runtime().block_on(async {
        let client = Client::connect(&daemon.socket).await.unwrap();
        victim_is_served(&client).await;
        generate(&client, GenerateRequest::new("gen"))
            .await
            .unwrap();
    });
    let baseline = rss_kib(daemon.pid());
    // Twenty answers of 3 MiB, 60 MiB, to a client that never reads.
    let mut deaf = RawClient::handshaken(&daemon.socket);
    for id in 1..=20 {
        request_a_picture(&mut deaf, id);
    }
    runtime().block_on(async {
        let client = Client::connect(&daemon.socket).await.unwrap();
        victim_is_served(&client).await;
    });
    wait_until("the pictures to be made", Duration::from_secs(60), || {
        pictures_made(&daemon)
    });
    // It held at most max_unread for it (and frames on their way), not 60 MiB.
    let grown = rss_kib(daemon.pid()).saturating_sub(baseline);
    assert!(grown < 40 * 1024, "gpuctld grew by {grown} KiB");
    wait_until(
        "the deaf client to be dropped",
        Duration::from_secs(30),
        || daemon.log_text().contains("daemon.send_timeout"),
    );
    drop(deaf);
    daemon.assert_serving();
}

#[test]
fn reservations_follow_the_operators_policy() {
    if !running_as_root() {
        eprintln!(
            "SKIPPED reservations_follow_the_operators_policy: needs root to act as other users"
        );
        return;
    }
    let sim = open_tempdir();
    let gpu = |extra: &str| {
        format!(
            "[daemon]\nsocket_mode = \"0666\"\n[gpu]\nbackend = \"sim\"\n{extra}\n[gpu.sim]\nforeign_usage_file = \"{}\"\n[[gpu.sim.devices]]\nname = \"Sim\"\ntotal = \"8GiB\"\n",
            sim.path().join("foreign.json").display()
        )
    };
    let daemon = Daemon::start(&gpu(""));
    let refused = gpuctl_as(
        NOBODY,
        &daemon.socket,
        &["reserve", "1GiB", "--timeout", "1s"],
    )
    .output()
    .unwrap();
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        stderr(&refused).contains("others may not reserve (gpu.reserve_max = \"0\")")
            && stderr(&refused).contains("(unauthorized)"),
        "{}",
        stderr(&refused)
    );
    assert!(daemon.gpuctl_json(&["vram"])["reservations"]
        .as_array()
        .unwrap()
        .is_empty());
    drop(daemon);

    let daemon = Daemon::start(&gpu("reserve_max = \"2GiB\"\nreserve_max_ttl = \"2s\""));
    let too_big = gpuctl_as(
        NOBODY,
        &daemon.socket,
        &["reserve", "3GiB", "--timeout", "1s"],
    )
    .output()
    .unwrap();
    assert!(
        stderr(&too_big).contains("others up to 2.0 GiB"),
        "{}",
        stderr(&too_big)
    );
    // Within the limit, granted, and ended by the operator's ttl although
    // its holder stays.
    let mut holder = gpuctl_as(
        NOBODY,
        &daemon.socket,
        &["reserve", "1GiB", "--timeout", "5s"],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    wait_until("nobody's reservation", Duration::from_secs(10), || {
        daemon.gpuctl_json(&["vram"])["reservations"]
            .as_array()
            .unwrap()
            .len()
            == 1
    });
    wait_until("its ttl to end it", Duration::from_secs(10), || {
        daemon.gpuctl_json(&["vram"])["reservations"]
            .as_array()
            .unwrap()
            .is_empty()
    });
    assert!(
        holder.try_wait().unwrap().is_none(),
        "the holder is still there"
    );
    let _ = holder.kill();
    let _ = holder.wait();
    // root reserves as it asks.
    let output = daemon.gpuctl(&["reserve", "6GiB", "--timeout", "2s", "--", "true"]);
    assert!(output.status.success(), "{}", stderr(&output));
}

#[test]
fn an_absurd_measurement_is_ignored() {
    let dir = open_tempdir();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let models = crate::models::models_dir();
    let path = models.join("tiny-tensor.pt");
    std::fs::write(
        state.join("measured.json"),
        serde_json::json!({ "models": { "ten": {
            "path": path.display().to_string(),
            "file_bytes": std::fs::metadata(&path).unwrap().len(),
            "vram_bytes": u64::MAX,
        }}})
        .to_string(),
    )
    .unwrap();
    let config = format!(
        "model_root = \"{}\"\n[gpu]\nbackend = \"sim\"\nload_wait = \"2s\"\n[gpu.sim]\nforeign_usage_file = \"{}\"\n[[gpu.sim.devices]]\nname = \"Sim\"\ntotal = \"4GiB\"\n[models.ten]\npath = \"tiny-tensor.pt\"\nkind = \"tensor\"\n",
        models.display(),
        dir.path().join("foreign.json").display()
    );
    let daemon = Daemon::start_in(dir, DaemonSpec::new(&config));
    runtime().block_on(async {
        let client = Client::connect(&daemon.socket).await.unwrap();
        victim_is_served(&client).await;
    });
}

#[test]
fn the_end_of_the_shutdown_grace_is_said_not_just_hung_up() {
    let mut daemon = Daemon::start(&config("", "[daemon]\nshutdown_grace = \"1s\"\n"));
    let mut client = RawClient::handshaken(&daemon.socket);
    client.request(
        1,
        Request::Generate(GenerateRequest {
            prompt: "slow".into(),
            steps: Some(FOREVER_STEPS),
            size: Some((8, 8)),
            ..GenerateRequest::new("gen")
        }),
    );
    wait_until("the job to run", Duration::from_secs(30), || {
        model_status(&daemon, "gen")["in_flight"] == 1
    });
    daemon.signal(libc::SIGTERM);
    let closing = loop {
        match client.receive() {
            Some(DaemonMessage::Closing(error)) => break error,
            Some(_) => continue,
            None => panic!("EOF without Closing"),
        }
    };
    assert_eq!(closing.code, ErrorCode::ShuttingDown);
    assert!(
        closing.message.contains("grace period"),
        "{}",
        closing.message
    );
    assert!(daemon.wait_exit(Duration::from_secs(10)).success());
}

#[test]
fn a_removed_socket_file_is_made_again() {
    let daemon = Daemon::start("");
    std::fs::remove_file(&daemon.socket).unwrap();
    assert!(!daemon.gpuctl(&["ping"]).status.success());
    daemon.signal(libc::SIGHUP);
    wait_until("the socket to be back", Duration::from_secs(10), || {
        daemon.gpuctl(&["ping"]).status.success()
    });
    assert!(daemon.log_text().contains("listening on a new one"));
}
