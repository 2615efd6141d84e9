use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use gpuctl_protocol::ErrorCode;

use crate::fixture::*;

#[test]
fn sigterm_with_a_client_connected_exits_0_and_removes_the_socket() {
    let mut daemon = Daemon::start("");
    let mut client = RawClient::handshaken(&daemon.socket);
    let status = daemon.stop();
    assert!(
        status.success(),
        "exit status {status}: {}",
        daemon.log_text()
    );
    client.expect_closing(ErrorCode::ShuttingDown);
    assert!(!daemon.socket.exists(), "socket file left behind");
    assert!(daemon.log_text().contains("gpuctld stopped"));
}

#[test]
fn sigint_stops_too() {
    let mut daemon = Daemon::start("");
    daemon.signal(libc::SIGINT);
    assert!(daemon.wait_exit(Duration::from_secs(15)).success());
    assert!(!daemon.socket.exists());
}

#[test]
fn a_stale_socket_is_replaced() {
    let dir = open_tempdir();
    let socket = dir.path().join("gpuctld.sock");
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap()); // file stays, nobody listens
    assert!(socket.exists());
    let daemon = Daemon::start_in(dir, DaemonSpec::new(""));
    daemon.assert_serving();
    assert!(daemon.log_text().contains("replacing a stale socket file"));
}

#[test]
fn a_second_daemon_on_a_live_socket_is_refused() {
    let first = Daemon::start("");
    let output = gpuctld_once(|c| c.arg("--socket").arg(&first.socket));
    assert_eq!(output.status.code(), Some(1));
    let message = stderr(&output);
    assert!(
        message.contains("another gpuctld is already listening on"),
        "{message}"
    );
    assert!(
        message.contains(&first.socket.display().to_string()),
        "{message}"
    );
    first.assert_serving();
}

#[test]
fn a_file_that_is_not_a_socket_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("precious.txt");
    std::fs::write(&path, "data").unwrap();
    let output = gpuctld_once(|c| c.arg("--socket").arg(&path));
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("is not a socket"),
        "{}",
        stderr(&output)
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "data");
}

#[test]
fn socket_mode_and_parent_directory() {
    let dir = open_tempdir();
    let socket = dir.path().join("nested/run/gpuctld.sock");
    let config = format!(
        "[daemon]\nsocket = \"{}\"\nsocket_mode = \"0600\"\n",
        socket.display()
    );
    let mut spec = DaemonSpec::new(&config);
    spec.socket_flag = false;
    spec.wait_ready = false;
    let daemon = Daemon::start_in(dir, spec);
    wait_until("the configured socket", Duration::from_secs(10), || {
        gpuctl_at(&socket, &["ping"]).status.success()
    });
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    drop(daemon);
}

#[test]
fn socket_precedence_flag_then_config_then_environment() {
    let dir = open_tempdir();
    let from_env = dir.path().join("env.sock");
    let mut spec = DaemonSpec::new("").env("GPUCTL_SOCKET", from_env.display().to_string());
    spec.socket_flag = false;
    spec.wait_ready = false;
    let _by_env = Daemon::start_in(dir, spec);
    wait_until("the $GPUCTL_SOCKET socket", Duration::from_secs(10), || {
        gpuctl_at(&from_env, &["ping"]).status.success()
    });

    let dir = open_tempdir();
    let from_config = dir.path().join("config.sock");
    let ignored = dir.path().join("ignored.sock");
    let mut spec = DaemonSpec::new(&format!(
        "[daemon]\nsocket = \"{}\"\n",
        from_config.display()
    ))
    .env("GPUCTL_SOCKET", ignored.display().to_string());
    spec.socket_flag = false;
    spec.wait_ready = false;
    let _by_config = Daemon::start_in(dir, spec);
    wait_until("the configured socket", Duration::from_secs(10), || {
        gpuctl_at(&from_config, &["ping"]).status.success()
    });
    assert!(!ignored.exists());

    // --socket beats the config (the fixture passes it).
    let flagged = Daemon::start(&format!(
        "[daemon]\nsocket = \"{}\"\n",
        from_config.display()
    ));
    assert_eq!(
        flagged.status()["socket"],
        flagged.socket.display().to_string()
    );
}

#[test]
fn socket_group_is_applied() {
    use std::os::unix::fs::MetadataExt;
    // The group must differ from the daemon's own, or the test proves nothing;
    // only root may hand a file to a group it is not in.
    // SAFETY: geteuid and getegid cannot fail.
    let (uid, own_gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let gid = 65534;
    let group = match group_name(gid) {
        Some(group) if uid == 0 && own_gid != gid => group,
        _ => {
            eprintln!("SKIPPED socket_group_is_applied: needs root and a group with gid {gid}");
            return;
        }
    };
    let daemon = Daemon::start(&format!("[daemon]\nsocket_group = \"{group}\"\n"));
    assert_eq!(std::fs::metadata(&daemon.socket).unwrap().gid(), gid);

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[daemon]\nsocket_group = \"no-such-group-xyz\"\n").unwrap();
    let output = gpuctld_once(|c| {
        c.arg("--socket")
            .arg(dir.path().join("s"))
            .arg("--config")
            .arg(&bad)
    });
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("key `daemon.socket_group`: there is no group named"),
        "{}",
        stderr(&output)
    );
}

/// A config "file" that is a FIFO makes `gpuctl reload` block until the test
/// writes to it: a request held in flight for as long as the test wants.
fn reload_in_flight(daemon: &Daemon) -> std::process::Child {
    std::fs::remove_file(&daemon.config).unwrap();
    let path = std::ffi::CString::new(daemon.config.display().to_string()).unwrap();
    // SAFETY: path is a valid C string.
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
    let reload = std::process::Command::new(bin("gpuctl"))
        .arg("--socket")
        .arg(&daemon.socket)
        .arg("reload")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(
        "the reload to be in flight",
        Duration::from_secs(10),
        || daemon.log_text().contains("op=\"reload\"") || daemon.log_text().contains("op=reload"),
    );
    reload
}

#[test]
fn sigterm_lets_requests_in_flight_finish() {
    let mut daemon = Daemon::start("");
    let reload = reload_in_flight(&daemon);
    daemon.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        daemon.child.try_wait().unwrap().is_none(),
        "gpuctld exited with a request in flight"
    );
    std::fs::write(&daemon.config, "[policy]\nkeep_alive = \"1m\"\n").unwrap();
    let output = reload.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "the request in flight failed: {}",
        stderr(&output)
    );
    assert!(
        stdout(&output).starts_with("reloaded: config generation 2"),
        "{}",
        stdout(&output)
    );
    assert!(daemon.wait_exit(Duration::from_secs(10)).success());
    assert!(!daemon.socket.exists());
}

#[test]
fn the_grace_period_bounds_shutdown() {
    let mut daemon = Daemon::start("[daemon]\nshutdown_grace = \"300ms\"\n");
    let reload = reload_in_flight(&daemon);
    let started = std::time::Instant::now();
    let status = daemon.stop();
    assert!(status.success(), "{status}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "shutdown took {:?}",
        started.elapsed()
    );
    assert!(
        daemon.log_text().contains("grace period over"),
        "{}",
        daemon.log_text()
    );
    assert!(!daemon.socket.exists());
    let output = reload.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
}

#[test]
fn log_level_comes_from_rust_log_else_the_config() {
    let quiet =
        Daemon::start_with(DaemonSpec::new("[daemon]\nlog_level = \"warn\"\n").env("RUST_LOG", ""));
    quiet.assert_serving();
    let chatty = Daemon::start_with(
        DaemonSpec::new("[daemon]\nlog_level = \"warn\"\n").env("RUST_LOG", "info"),
    );
    chatty.assert_serving();
    assert!(
        !quiet.log_text().contains("gpuctld ready"),
        "{}",
        quiet.log_text()
    );
    assert!(
        chatty.log_text().contains("gpuctld ready"),
        "{}",
        chatty.log_text()
    );
}
