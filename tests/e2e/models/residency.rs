//! What keeps a model loaded and what unloads it: keep-alive, the LRU cap and pins, groups, explicit and forced unloads, preload.

use super::*;

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
