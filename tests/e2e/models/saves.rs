//! Reload on save (`daemon.watch_config`): the configuration file saved in
//! place, by rename, by a symlink swap, broken, in a burst; a loaded
//! model's file replaced.

use super::*;

fn generation(daemon: &Daemon) -> u64 {
    daemon.status()["config"]["generation"].as_u64().unwrap()
}

fn keep_alive_of(daemon: &Daemon, model: &str) -> Value {
    model_status(daemon, model)["keep_alive"].clone()
}

/// Waits for generation `n`, then lets a second pass of events settle and
/// checks that nothing more was reloaded.
fn wait_for_generation(daemon: &Daemon, n: u64) {
    wait_until(&format!("generation {n}"), Duration::from_secs(10), || {
        generation(daemon) >= n
    });
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(generation(daemon), n, "one reload per save");
    let last = &daemon.status()["config"]["last_reload"];
    assert_eq!(last["trigger"], "FileChange", "{last}");
}

#[test]
fn a_save_in_place_by_rename_or_by_symlink_swap_reloads_once() {
    let daemon = Daemon::start(&config("keep_alive = \"1m\"", ""));
    assert_eq!(keep_alive_of(&daemon, "ten")["Millis"], 60_000);
    // In place.
    std::fs::write(&daemon.config, config("keep_alive = \"2m\"", "")).unwrap();
    wait_for_generation(&daemon, 2);
    assert_eq!(keep_alive_of(&daemon, "ten")["Millis"], 120_000);
    // By rename, as editors save.
    let fresh = daemon.config.with_extension("toml.tmp");
    std::fs::write(&fresh, config("keep_alive = \"3m\"", "")).unwrap();
    std::fs::rename(&fresh, &daemon.config).unwrap();
    wait_for_generation(&daemon, 3);
    assert_eq!(keep_alive_of(&daemon, "ten")["Millis"], 180_000);
    // The same bytes again, and another file in the folder: nothing.
    std::fs::write(&daemon.config, config("keep_alive = \"3m\"", "")).unwrap();
    std::fs::write(daemon.config.with_extension("bak"), "unrelated").unwrap();
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(generation(&daemon), 3);
    // A symlink swap, as configuration tools do: the path becomes a link
    // to one version, then the link is replaced by one to the next.
    let dir = daemon.config.parent().unwrap().to_path_buf();
    let (a, b) = (dir.join("v1.toml"), dir.join("v2.toml"));
    std::fs::write(&a, config("keep_alive = \"4m\"", "")).unwrap();
    std::fs::write(&b, config("keep_alive = \"5m\"", "")).unwrap();
    let link = dir.join("link.tmp");
    std::os::unix::fs::symlink(&a, &link).unwrap();
    std::fs::rename(&link, &daemon.config).unwrap();
    wait_for_generation(&daemon, 4);
    assert_eq!(keep_alive_of(&daemon, "ten")["Millis"], 240_000);
    std::os::unix::fs::symlink(&b, &link).unwrap();
    std::fs::rename(&link, &daemon.config).unwrap();
    wait_for_generation(&daemon, 5);
    assert_eq!(keep_alive_of(&daemon, "ten")["Millis"], 300_000);
    assert!(
        stdout(&daemon.gpuctl(&["status"])).contains("ok, by file change"),
        "{}",
        stdout(&daemon.gpuctl(&["status"]))
    );
}

#[test]
fn a_broken_save_keeps_the_running_config_and_says_so_and_a_burst_is_one_reload() {
    let daemon = Daemon::start(&config("keep_alive = \"1m\"", ""));
    std::fs::write(&daemon.config, "[policy]\nkeep_alive = \"soon\"\n").unwrap();
    wait_until(
        "the failed reload in status",
        Duration::from_secs(10),
        || !daemon.status()["config"]["last_reload"]["error"].is_null(),
    );
    let status = daemon.status();
    let last = &status["config"]["last_reload"];
    assert_eq!(last["trigger"], "FileChange");
    assert!(
        last["error"]
            .as_str()
            .unwrap()
            .contains("invalid duration \"soon\""),
        "{last}"
    );
    assert_eq!(
        status["config"]["generation"], 1,
        "the running config stays"
    );
    assert_eq!(keep_alive_of(&daemon, "ten")["Millis"], 60_000);
    daemon.assert_serving();
    // Ten writes in a row, as a script or a slow editor makes them: one reload.
    for i in 0..10 {
        std::fs::write(
            &daemon.config,
            config(&format!("keep_alive = \"{}m\"", i + 1), ""),
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(10));
    }
    wait_for_generation(&daemon, 2);
    assert_eq!(keep_alive_of(&daemon, "ten")["Millis"], 10 * 60_000);
    assert!(daemon.status()["config"]["last_reload"]["error"].is_null());
}

#[test]
fn a_replaced_model_file_reloads_that_model_on_its_next_request() {
    let root = open_tempdir();
    std::fs::copy(
        models_dir().join("tiny-tensor.pt"),
        root.path().join("ten.pt"),
    )
    .unwrap();
    std::fs::copy(
        models_dir().join("tiny-tensor.pt"),
        root.path().join("other.pt"),
    )
    .unwrap();
    let text = format!(
        "model_root = \"{}\"\n[policy]\nkeep_alive = \"forever\"\n\
         [models.ten]\npath = \"ten.pt\"\nkind = \"tensor\"\n\
         [models.other]\npath = \"other.pt\"\nkind = \"tensor\"\n",
        root.path().display()
    );
    let daemon = Daemon::start(&text);
    assert!(daemon.gpuctl(&["load", "ten"]).status.success());
    assert!(daemon.gpuctl(&["load", "other"]).status.success());
    let other_pid = model_status(&daemon, "other")["pid"].clone();
    // A new version copied in and renamed over the old, as deployments do.
    let staged = root.path().join("ten.pt.new");
    std::fs::copy(models_dir().join("tiny-tensor.pt"), &staged).unwrap();
    std::fs::rename(&staged, root.path().join("ten.pt")).unwrap();
    wait_for_state(&daemon, "ten", "Unloaded");
    assert_eq!(model_status(&daemon, "ten")["last_unload"], "Reload");
    assert_eq!(
        generation(&daemon),
        1,
        "a model file is not the configuration"
    );
    runtime().block_on(async {
        let client = Client::connect(&daemon.socket).await.unwrap();
        generate(&client, tensor_request()).await.unwrap();
    });
    assert_eq!(model_status(&daemon, "ten")["loads"], 2);
    assert_eq!(
        model_status(&daemon, "other")["pid"],
        other_pid,
        "the other model is untouched"
    );
}

#[test]
fn with_watch_config_off_a_save_waits_for_sighup() {
    let daemon = Daemon::start(&config(
        "keep_alive = \"1m\"",
        "[daemon]\nwatch_config = false\n",
    ));
    std::fs::write(
        &daemon.config,
        config("keep_alive = \"2m\"", "[daemon]\nwatch_config = false\n"),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(generation(&daemon), 1);
    daemon.signal(libc::SIGHUP);
    wait_until("the SIGHUP reload", Duration::from_secs(10), || {
        generation(&daemon) == 2
    });
    assert_eq!(keep_alive_of(&daemon, "ten")["Millis"], 120_000);
}
