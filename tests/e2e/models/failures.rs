//! Load failures and crashes: named errors, the backoff and its RetryLater code, reloads after a crash.

use super::*;

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

/// A worker program that says it speaks worker protocol 9.0 (a `Hello`
/// frame, written byte by byte), then waits for gpuctld to hang up.
pub(super) const OTHER_PROTOCOL_WORKER: &str = r"#!/bin/sh
printf '\000\000\000\026\005\000\000\000\011\000\000\000\006\000\000\000\000\000\000\000fake 9' >&3
cat <&3 >/dev/null
";

#[test]
fn a_worker_of_another_protocol_or_one_that_says_nothing_is_refused_by_name() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("other-protocol-worker");
    std::fs::write(&other, OTHER_PROTOCOL_WORKER).unwrap();
    std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o755)).unwrap();
    for (program, expected) in [
        (
            other.display().to_string(),
            "model ten: its worker (fake 9) speaks worker protocol 9.0, this gpuctld speaks 1.1",
        ),
        (
            "/bin/true".to_owned(),
            "model ten: its worker exited before saying which protocol it speaks",
        ),
    ] {
        let daemon = Daemon::start(&config("", &format!("[daemon]\nworker = \"{program}\"\n")));
        runtime().block_on(async {
            let client = Client::connect(&daemon.socket).await.unwrap();
            let started = std::time::Instant::now();
            let error = daemon_error(generate(&client, tensor_request()).await);
            assert_eq!(error.code, ErrorCode::LoadFailed, "{}", error.message);
            assert!(error.message.contains(expected), "{}", error.message);
            assert!(
                !error.message.contains("SIGKILL"),
                "the daemon's own kill is not the worker's fault: {}",
                error.message
            );
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "refused at once, not after a timeout"
            );
        });
        daemon.assert_serving();
        let status = model_status(&daemon, "ten");
        assert!(status["pid"].is_null(), "nothing left running: {status}");
    }
}
