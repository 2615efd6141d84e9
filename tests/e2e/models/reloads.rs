//! What a configuration reload does to loaded models.

use super::*;

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
