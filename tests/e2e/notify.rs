use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use crate::fixture::*;

/// A datagram socket standing in for systemd's NOTIFY_SOCKET.
fn notify_socket(dir: &std::path::Path) -> (std::path::PathBuf, UnixDatagram) {
    let path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    (path, socket)
}

fn receive(socket: &UnixDatagram) -> String {
    let mut buffer = [0u8; 4096];
    let n = socket
        .recv(&mut buffer)
        .expect("a notification within the timeout");
    String::from_utf8_lossy(&buffer[..n]).into_owned()
}

/// Reads notifications until one contains `wanted`; returns it.
fn receive_until(socket: &UnixDatagram, wanted: &str) -> String {
    loop {
        let message = receive(socket);
        if message.lines().any(|line| line == wanted) {
            return message;
        }
        assert!(
            !message.contains("STOPPING=1") || wanted == "STOPPING=1",
            "{wanted} never came before {message}"
        );
    }
}

#[test]
fn ready_reloading_ready_stopping_in_order() {
    let dir = open_tempdir();
    let (notify_path, notifications) = notify_socket(dir.path());

    let spec = DaemonSpec::new("").env("NOTIFY_SOCKET", notify_path.display().to_string());
    let mut daemon = Daemon::start_in(dir, spec);

    let ready = receive_until(&notifications, "READY=1");
    assert!(ready.contains("STATUS=serving on"), "{ready}");

    daemon.signal(libc::SIGHUP);
    let reloading = receive(&notifications);
    let lines: Vec<&str> = reloading.lines().collect();
    assert_eq!(lines.first(), Some(&"RELOADING=1"), "{reloading}");
    let usec: u64 = lines
        .iter()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC in {reloading}"))
        .parse()
        .unwrap();
    assert!(usec > 0);
    let ready_again = receive(&notifications);
    assert!(ready_again.lines().any(|l| l == "READY=1"), "{ready_again}");

    assert!(daemon.stop().success());
    let stopping = receive(&notifications);
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping}");
}

#[test]
fn watchdog_pings_at_half_the_interval() {
    let dir = open_tempdir();
    let (notify_path, notifications) = notify_socket(dir.path());
    let mut spec = DaemonSpec::new("")
        .env("NOTIFY_SOCKET", notify_path.display().to_string())
        .env("WATCHDOG_USEC", "400000");
    spec.pid_env = vec!["WATCHDOG_PID"];
    let _daemon = Daemon::start_in(dir, spec);
    receive_until(&notifications, "READY=1");
    let started = std::time::Instant::now();
    receive_until(&notifications, "WATCHDOG=1");
    receive_until(&notifications, "WATCHDOG=1");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "watchdog pings too slow"
    );
}
