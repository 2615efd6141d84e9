//! The unit files pass `systemd-analyze verify` (scripts/setup installs it)
//! and say what the daemon relies on.

use std::path::Path;
use std::process::Command;

use crate::fixture::*;

fn unit(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../systemd")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn units_pass_systemd_analyze_verify() {
    let dir = tempfile::tempdir().unwrap();
    // verify checks that ExecStart exists: point it at the binary we built.
    let service = unit("gpuctld.service").replace(
        "/usr/local/bin/gpuctld",
        &bin("gpuctld").display().to_string(),
    );
    std::fs::write(dir.path().join("gpuctld.service"), service).unwrap();
    std::fs::write(dir.path().join("gpuctld.socket"), unit("gpuctld.socket")).unwrap();
    let output = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path().join("gpuctld.service"))
        .arg(dir.path().join("gpuctld.socket"))
        .output()
        .expect(
            "systemd-analyze is missing: run scripts/setup (it installs Debian's systemd package)",
        );
    let complaints = stderr(&output);
    assert!(
        output.status.success(),
        "systemd-analyze verify failed:\n{complaints}"
    );
    let ours: Vec<&str> = complaints
        .lines()
        .filter(|l| l.contains("gpuctld"))
        .collect();
    assert!(
        ours.is_empty(),
        "systemd-analyze verify complained:\n{}",
        ours.join("\n")
    );
}

#[test]
fn units_say_what_gpuctld_relies_on() {
    let service = unit("gpuctld.service");
    for line in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "RuntimeDirectory=gpuctl",
        "StateDirectory=gpuctl",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "ExecStart=/usr/local/bin/gpuctld --config /etc/gpuctl/gpuctld.toml",
    ] {
        assert!(
            service.lines().any(|l| l == line),
            "gpuctld.service lacks {line}"
        );
    }
    assert!(service.lines().any(|l| l.starts_with("WatchdogSec=")));
    // /dev/nvidia* must stay reachable.
    let settings: Vec<&str> = service.lines().filter(|l| !l.starts_with('#')).collect();
    assert!(
        !settings.contains(&"PrivateDevices=yes") && !settings.contains(&"DevicePolicy=closed")
    );
    let socket = unit("gpuctld.socket");
    for line in [
        "ListenStream=/run/gpuctl/gpuctld.sock",
        "SocketMode=0660",
        "SocketGroup=gpu",
    ] {
        assert!(
            socket.lines().any(|l| l == line),
            "gpuctld.socket lacks {line}"
        );
    }
}
