use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;

use crate::fixture::*;

/// systemd passes the listening socket as fd 3 with LISTEN_FDS=1 and
/// LISTEN_PID set to the daemon's pid.
#[test]
fn serves_an_inherited_listener() {
    let dir = open_tempdir();
    let path = dir.path().join("activated.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let mut spec = DaemonSpec::new("").env("LISTEN_FDS", "1");
    spec.pid_env = vec!["LISTEN_PID"];
    spec.inherit_fd3 = Some(listener.as_raw_fd());
    spec.socket_flag = false;
    spec.wait_ready = false;
    let mut daemon = Daemon::start_in(dir, spec);
    drop(listener); // the daemon holds its own copy now

    let mut exited = false;
    wait_until(
        "the activated daemon to answer",
        std::time::Duration::from_secs(10),
        || {
            exited = matches!(daemon.child.try_wait(), Ok(Some(_)));
            exited || gpuctl_at(&path, &["ping"]).status.success()
        },
    );
    assert!(!exited, "gpuctld exited: {}", daemon.log_text());
    let output = gpuctl_at(&path, &["--json", "status"]);
    let status: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(status["socket"], path.display().to_string());
    assert!(daemon.log_text().contains(&path.display().to_string()));

    assert!(daemon.stop().success());
    assert!(
        path.exists(),
        "the socket file belongs to systemd and must be left in place"
    );
}
