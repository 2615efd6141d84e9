use std::time::Duration;

use crate::fixture::*;
use crate::TWO_MODELS;

const ONE_MODEL: &str = "[models.only]\npath = \"only.pt\"\nkind = \"tensor\"\n";

/// `config` with reload on save off: these tests count the reloads that
/// SIGHUP and `gpuctl reload` make.
fn unwatched(config: &str) -> String {
    format!("{config}\n[daemon]\nwatch_config = false\n")
}

fn generation(daemon: &Daemon) -> u64 {
    daemon.status()["config"]["generation"].as_u64().unwrap()
}

fn model_names(daemon: &Daemon) -> Vec<String> {
    daemon.gpuctl_json(&["models"])["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn sighup_and_gpuctl_reload_apply_a_new_config() {
    let daemon = Daemon::start(&unwatched(ONE_MODEL));
    assert_eq!(model_names(&daemon), vec!["only"]);

    std::fs::write(&daemon.config, unwatched(TWO_MODELS)).unwrap();
    daemon.signal(libc::SIGHUP);
    wait_until("generation 2 after SIGHUP", Duration::from_secs(10), || {
        generation(&daemon) == 2
    });
    assert_eq!(model_names(&daemon), vec!["portrait", "upscale"]);
    let status = daemon.status();
    assert_eq!(status["config"]["last_reload"]["trigger"], "Signal");
    assert!(status["config"]["last_reload"]["error"].is_null());

    std::fs::write(&daemon.config, unwatched(ONE_MODEL)).unwrap();
    let output = daemon.gpuctl(&["reload"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(
        stdout(&output),
        "reloaded: config generation 3 (changed, 1 models)\n"
    );
    assert_eq!(model_names(&daemon), vec!["only"]);

    let unchanged = daemon.gpuctl_json(&["reload"]);
    assert_eq!(unchanged["generation"], 4);
    assert_eq!(unchanged["changed"], false);
}

#[test]
fn an_invalid_file_keeps_the_running_config() {
    let daemon = Daemon::start(&unwatched(TWO_MODELS));
    std::fs::write(&daemon.config, "[policy]\nkeep_alive = \"soon\"\n").unwrap();

    let output = daemon.gpuctl(&["reload"]);
    assert_eq!(output.status.code(), Some(1));
    let message = stderr(&output);
    assert!(
        message.contains(&daemon.config.display().to_string()),
        "{message}"
    );
    assert!(message.contains("policy.keep_alive"), "{message}");
    assert!(message.contains("invalid duration \"soon\""), "{message}");
    assert!(message.contains("(invalid_config)"), "{message}");

    let status = daemon.status();
    assert_eq!(
        status["config"]["generation"], 1,
        "old config still in force"
    );
    assert_eq!(status["config"]["last_reload"]["trigger"], "Request");
    assert!(status["config"]["last_reload"]["error"]
        .as_str()
        .unwrap()
        .contains("policy.keep_alive"));
    assert_eq!(model_names(&daemon), vec!["portrait", "upscale"]);

    // The same through SIGHUP: logged, shown by status, daemon alive.
    std::fs::write(&daemon.config, "this is not toml = = =\n").unwrap();
    daemon.signal(libc::SIGHUP);
    wait_until(
        "a failed SIGHUP reload in status",
        Duration::from_secs(10),
        || daemon.status()["config"]["last_reload"]["trigger"] == "Signal",
    );
    let status = daemon.status();
    assert!(
        status["config"]["last_reload"]["error"]
            .as_str()
            .unwrap()
            .contains("invalid TOML"),
        "{status}"
    );
    assert_eq!(status["config"]["generation"], 1);
    let human = stdout(&daemon.gpuctl(&["status"]));
    assert!(human.contains("last reload  FAILED, by SIGHUP"), "{human}");
    assert!(daemon
        .log_text()
        .contains("reload failed; keeping the running configuration"));
    daemon.assert_serving();
}
