use crate::fixture::*;
use crate::TWO_MODELS;

#[test]
fn ping_status_and_models() {
    let daemon = Daemon::start(TWO_MODELS);

    let ping = daemon.gpuctl(&["ping"]);
    assert!(ping.status.success(), "{}", stderr(&ping));
    assert!(
        stdout(&ping).starts_with("pong from gpuctld "),
        "{}",
        stdout(&ping)
    );
    assert!(stdout(&ping).contains(" ms"), "{}", stdout(&ping));
    let ping = daemon.gpuctl_json(&["ping"]);
    assert_eq!(
        ping["protocol"],
        gpuctl_protocol::PROTOCOL_VERSION.to_string()
    );
    assert!(ping["round_trips_ms"][0].as_f64().unwrap() >= 0.0);

    daemon.wait_idle();
    let status = daemon.status();
    assert_eq!(status["pid"], daemon.pid());
    assert_eq!(status["daemon_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(status["socket"], daemon.socket.display().to_string());
    assert_eq!(
        status["config"]["path"],
        daemon.config.display().to_string()
    );
    assert_eq!(status["config"]["generation"], 1);
    assert!(status["config"]["last_reload"].is_null());
    assert!(status["uptime_ms"].as_u64().is_some());

    let human = stdout(&daemon.gpuctl(&["status"]));
    assert!(
        human.contains(&format!(
            "daemon       gpuctld {} (pid {})",
            env!("CARGO_PKG_VERSION"),
            daemon.pid()
        )),
        "{human}"
    );
    assert!(human.contains("generation   1 (applied"), "{human}");

    let models = daemon.gpuctl_json(&["models"]);
    let models = models["models"].as_array().unwrap();
    assert_eq!(models.len(), 2);
    assert_eq!(models[0]["name"], "portrait");
    assert_eq!(models[0]["kind"], "Generate");
    assert_eq!(models[0]["path"], "/abs/portrait.pt");
    assert_eq!(models[0]["keep_alive"], "Forever");
    assert_eq!(models[0]["group"], "diffusion");
    assert_eq!(
        models[0]["defaults"]["size"],
        serde_json::json!([896, 1152])
    );
    assert_eq!(models[1]["name"], "upscale");
    assert_eq!(models[1]["path"], "/srv/models/up/x4.pt");
    assert_eq!(
        models[1]["keep_alive"]["Millis"], 600_000,
        "inherits policy.keep_alive"
    );
    assert_eq!(models[1]["pin"], true);
    assert_eq!(models[1]["tile"], 256);

    let table = stdout(&daemon.gpuctl(&["models"]));
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(
        lines[0].starts_with("NAME      KIND      DEVICE  KEEP ALIVE  PRELOAD  PIN  GROUP"),
        "{table}"
    );
    assert!(
        lines[1].starts_with("portrait  generate  auto    forever"),
        "{table}"
    );
    assert!(
        lines[2].starts_with("upscale   image     auto    10m"),
        "{table}"
    );
}

#[test]
fn cannot_connect_exits_3_naming_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nobody-home.sock");
    let output = gpuctl_at(&socket, &["status"]);
    assert_eq!(output.status.code(), Some(3));
    let message = stderr(&output);
    assert!(message.contains(&socket.display().to_string()), "{message}");
    assert!(message.contains("gpuctld --socket"), "{message}");
}

#[test]
fn usage_errors_exit_2_and_completions_print() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s");
    assert_eq!(gpuctl_at(&socket, &["frobnicate"]).status.code(), Some(2));
    let completions = gpuctl_at(&socket, &["completions", "bash"]);
    assert!(completions.status.success());
    assert!(
        stdout(&completions).contains("gpuctl"),
        "{}",
        stdout(&completions)
    );
}

#[test]
fn a_daemon_error_exits_1() {
    let daemon = Daemon::start("");
    std::fs::remove_file(&daemon.config).unwrap();
    let output = daemon.gpuctl(&["reload"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("cannot read the file"),
        "{}",
        stderr(&output)
    );
    daemon.assert_serving();
}

#[test]
fn check_config_validates_without_starting() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, crate::TWO_MODELS).unwrap();
    let output = gpuctld_once(|c| c.arg("--check-config").arg("--config").arg(&good));
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(
        stdout(&output).contains("ok (2 models)"),
        "{}",
        stdout(&output)
    );

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[models.x]\npath = \"x.pt\"\nkind = \"image\"\ntile = \"big\"\n",
    )
    .unwrap();
    let output = gpuctld_once(|c| c.arg("--check-config").arg("--config").arg(&bad));
    assert_eq!(output.status.code(), Some(1));
    let message = stderr(&output);
    assert!(message.contains(&bad.display().to_string()), "{message}");
    assert!(message.contains("models.x.tile"), "{message}");

    let output = gpuctld_once(|c| c.arg("--check-config"));
    if !std::path::Path::new("/etc/gpuctl/gpuctld.toml").exists() {
        assert!(
            stdout(&output).contains("<embedded default config>: ok"),
            "{}",
            stdout(&output)
        );
    }
}

#[test]
fn several_requests_in_flight_on_one_connection() {
    use gpuctl_protocol::{DaemonMessage, PingRequest, Request, StatusRequest};
    let daemon = Daemon::start("");
    let mut client = RawClient::handshaken(&daemon.socket);
    client.request(10, Request::Status(StatusRequest {}));
    client.request(11, Request::Ping(PingRequest {}));
    client.request(12, Request::Status(StatusRequest {}));
    let mut ids: Vec<u64> = (0..3)
        .map(|_| match client.receive() {
            Some(DaemonMessage::Response { id, .. }) => id,
            other => panic!("expected a response, got {other:?}"),
        })
        .collect();
    ids.sort();
    assert_eq!(ids, vec![10, 11, 12]);
}

/// `gpuctl … | head` : a reader that went away ends gpuctl quietly (exit 141,
/// as SIGPIPE would), without a panic message.
#[test]
fn a_closed_stdout_ends_gpuctl_quietly() {
    use std::os::fd::FromRawFd;
    let daemon = Daemon::start("");
    for args in [&["completions", "bash"][..], &["status"][..]] {
        let mut fds = [0; 2];
        // SAFETY: pipe fills two descriptors we then own.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both descriptors are fresh and owned here.
        let (reader, writer) = unsafe {
            (
                std::fs::File::from_raw_fd(fds[0]),
                std::fs::File::from_raw_fd(fds[1]),
            )
        };
        drop(reader);
        let output = std::process::Command::new(bin("gpuctl"))
            .arg("--socket")
            .arg(&daemon.socket)
            .args(args)
            .stdout(writer)
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(141), "gpuctl {args:?}");
        assert_eq!(stderr(&output), "", "gpuctl {args:?}");
    }
}
