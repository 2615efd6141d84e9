//! Real daemons on temporary sockets, and the helpers to drive them.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use gpuctl_protocol::{
    decode_payload, encode_payload, ClientMessage, DaemonMessage, Hello, Request, PROTOCOL_VERSION,
};
use serde_json::Value;

/// A binary of this workspace, built by `cargo build` (scripts/test does it).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/debug/deps/e2e-HASH → target/debug/NAME
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target directory");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace` first (scripts/test does)",
        path.display()
    );
    path
}

/// Polls `condition` until it holds; panics naming `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A temporary directory readable by other users (for the access tests).
pub fn open_tempdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod tempdir");
    dir
}

/// How to start a daemon.
pub struct DaemonSpec {
    pub config: String,
    pub env: Vec<(String, String)>,
    /// Pass `--socket`; otherwise the config or environment decides.
    pub socket_flag: bool,
    /// Run through `sh -c '... exec gpuctld'` with these variables set to the
    /// daemon's own pid (LISTEN_PID, WATCHDOG_PID).
    pub pid_env: Vec<&'static str>,
    /// Inherit this descriptor as fd 3 (socket activation).
    pub inherit_fd3: Option<std::os::fd::RawFd>,
    /// Wait until the socket accepts connections.
    pub wait_ready: bool,
    /// Set JOURNAL_STREAM to the log file's device:inode, as systemd does
    /// when it connects stderr to the journal.
    pub journal_stream: bool,
}

impl DaemonSpec {
    pub fn new(config: &str) -> DaemonSpec {
        DaemonSpec {
            config: config.to_owned(),
            env: Vec::new(),
            socket_flag: true,
            pid_env: Vec::new(),
            inherit_fd3: None,
            wait_ready: true,
            journal_stream: false,
        }
    }

    pub fn env(mut self, key: &str, value: impl AsRef<str>) -> Self {
        self.env.push((key.to_owned(), value.as_ref().to_owned()));
        self
    }
}

/// A running gpuctld, killed when dropped.
pub struct Daemon {
    pub child: Child,
    /// Holds the socket, config and log; removed when the daemon is dropped.
    _dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts gpuctld on `config` with a socket in a fresh directory.
    pub fn start(config: &str) -> Daemon {
        Daemon::start_with(DaemonSpec::new(config))
    }

    pub fn start_with(spec: DaemonSpec) -> Daemon {
        let dir = open_tempdir();
        Daemon::start_in(dir, spec)
    }

    pub fn start_in(dir: tempfile::TempDir, spec: DaemonSpec) -> Daemon {
        let socket = dir.path().join("gpuctld.sock");
        let config = dir.path().join("gpuctld.toml");
        let log = dir.path().join("gpuctld.log");
        std::fs::write(&config, &spec.config).expect("write config");
        let mut args = vec!["--config".to_owned(), config.display().to_string()];
        if spec.socket_flag {
            args.extend(["--socket".to_owned(), socket.display().to_string()]);
        }
        let mut command = if spec.pid_env.is_empty() {
            let mut command = Command::new(bin("gpuctld"));
            command.args(&args);
            command
        } else {
            let exports: String = spec.pid_env.iter().map(|v| format!("{v}=$$ ")).collect();
            let mut command = Command::new("sh");
            command
                .arg("-c")
                .arg(format!("export {exports}; exec \"$0\" \"$@\""))
                .arg(bin("gpuctld"))
                .args(&args);
            command
        };
        command
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("GPUCTL_SOCKET")
            .env_remove("GPUCTL_CONFIG")
            .env_remove("JOURNAL_STREAM")
            .env("RUST_LOG", "debug")
            // Measurements stay with the test, not in the user's state.
            .env("STATE_DIRECTORY", dir.path().join("state"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("create log"));
        if spec.journal_stream {
            use std::os::unix::fs::MetadataExt;
            let meta = std::fs::metadata(&log).expect("log metadata");
            command.env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()));
        }
        for (key, value) in &spec.env {
            command.env(key, value);
        }
        if let Some(fd) = spec.inherit_fd3 {
            use std::os::unix::process::CommandExt;
            // SAFETY: dup2 is async-signal-safe; nothing else runs between fork and exec.
            unsafe {
                command.pre_exec(move || gpuctl_protocol::worker::install_worker_fd(fd));
            }
        }
        let child = command.spawn().expect("spawn gpuctld");
        let mut daemon = Daemon {
            child,
            _dir: dir,
            socket,
            config,
            log,
        };
        if spec.wait_ready {
            let socket = daemon.socket.clone();
            let mut exited = None;
            wait_until(
                "gpuctld to accept connections",
                Duration::from_secs(10),
                || {
                    if let Ok(Some(status)) = daemon.child.try_wait() {
                        exited = Some(status);
                        return true;
                    }
                    UnixStream::connect(&socket).is_ok()
                },
            );
            if let Some(status) = exited {
                panic!("gpuctld exited early ({status}):\n{}", daemon.log_text());
            }
        }
        daemon
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs gpuctl against this daemon.
    pub fn gpuctl(&self, args: &[&str]) -> Output {
        gpuctl_at(&self.socket, args)
    }

    /// Runs gpuctl against this daemon; panics if it has not returned
    /// within `limit` (a command that would hang is a failure, not a wait).
    pub fn gpuctl_within(&self, args: &[&str], limit: Duration) -> Output {
        let mut child = Command::new(bin("gpuctl"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .env_remove("GPUCTL_SOCKET")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run gpuctl");
        let deadline = Instant::now() + limit;
        while child.try_wait().expect("try_wait").is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("gpuctl {args:?} did not return within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child.wait_with_output().expect("gpuctl output")
    }

    /// Runs `gpuctl --json ARGS`, expects success, parses stdout.
    pub fn gpuctl_json(&self, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let output = self.gpuctl(&all);
        assert!(
            output.status.success(),
            "gpuctl {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
            panic!(
                "gpuctl {args:?} printed invalid JSON ({e}): {}",
                String::from_utf8_lossy(&output.stdout)
            )
        })
    }

    /// Waits until no connection but the asking one is open: the readiness
    /// probe and earlier gpuctl runs may still hold a slot for a moment.
    pub fn wait_idle(&self) {
        wait_until(
            "earlier connections to close",
            Duration::from_secs(10),
            || self.status()["connections"] == 1,
        );
    }

    pub fn status(&self) -> Value {
        self.gpuctl_json(&["status"])
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill has no memory-safety preconditions.
        let rc = unsafe { libc::kill(self.pid(), signal) };
        assert_eq!(rc, 0, "kill({}, {signal})", self.pid());
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let mut status = None;
        wait_until("gpuctld to exit", timeout, || {
            status = self.child.try_wait().expect("try_wait");
            status.is_some()
        });
        status.expect("exit status")
    }

    /// SIGTERM, then the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait_exit(Duration::from_secs(15))
    }

    /// A daemon that answers ping: proves it and its other clients are unaffected.
    pub fn assert_serving(&self) {
        let output = self.gpuctl(&["ping"]);
        assert!(
            output.status.success(),
            "gpuctld stopped serving: {}\n{}",
            String::from_utf8_lossy(&output.stderr),
            self.log_text()
        );
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn gpuctl_at(socket: &Path, args: &[&str]) -> Output {
    Command::new(bin("gpuctl"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .env_remove("GPUCTL_SOCKET")
        .output()
        .expect("run gpuctl")
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A hand-driven connection, for feeding the daemon bytes no real client sends.
pub struct RawClient {
    pub stream: UnixStream,
}

impl RawClient {
    pub fn connect(socket: &Path) -> RawClient {
        let stream = UnixStream::connect(socket).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        RawClient { stream }
    }

    /// Connects and completes the handshake.
    pub fn handshaken(socket: &Path) -> RawClient {
        RawClient::speaking(socket, PROTOCOL_VERSION)
    }

    /// Connects and completes the handshake as a client of `protocol`.
    pub fn speaking(socket: &Path, protocol: gpuctl_protocol::ProtocolVersion) -> RawClient {
        let mut client = RawClient::connect(socket);
        client.send(&ClientMessage::Hello(Hello {
            protocol,
            client: "raw".into(),
        }));
        match client.receive() {
            Some(DaemonMessage::Welcome(_)) => client,
            other => panic!("expected Welcome, got {other:?}"),
        }
    }

    pub fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write");
    }

    pub fn send(&mut self, message: &ClientMessage) {
        let payload = encode_payload(message).expect("encode");
        self.send_frame(&payload);
    }

    pub fn send_frame(&mut self, payload: &[u8]) {
        let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(payload);
        self.send_bytes(&frame);
    }

    pub fn request(&mut self, id: u64, request: Request) {
        self.send(&ClientMessage::Request { id, request });
    }

    /// The next frame, or `None` at end of stream.
    pub fn receive(&mut self) -> Option<DaemonMessage> {
        let mut header = [0u8; 4];
        if let Err(error) = self.stream.read_exact(&mut header) {
            assert!(
                matches!(
                    error.kind(),
                    std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
                ),
                "reading a frame header: {error}"
            );
            return None;
        }
        let mut payload = vec![0u8; u32::from_be_bytes(header) as usize];
        self.stream.read_exact(&mut payload).expect("frame payload");
        Some(decode_payload(&payload).expect("decode daemon frame"))
    }

    /// Expects `Closing` with `code`, then end of stream; returns the message.
    pub fn expect_closing(&mut self, code: gpuctl_protocol::ErrorCode) -> String {
        match self.receive() {
            Some(DaemonMessage::Closing(error)) => {
                assert_eq!(error.code, code, "{}", error.message);
                assert!(
                    self.receive().is_none(),
                    "connection stayed open after Closing"
                );
                error.message
            }
            other => panic!("expected Closing({code}), got {other:?}"),
        }
    }
}

/// The name /etc/group gives `gid`.
pub fn group_name(gid: u32) -> Option<String> {
    let groups = std::fs::read_to_string("/etc/group").ok()?;
    groups.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.get(2)?.parse::<u32>().ok()? == gid).then(|| fields[0].to_owned())
    })
}

/// Runs gpuctld to completion (for runs expected to exit: --check-config,
/// refusals), with no configuration or socket inherited from our environment.
pub fn gpuctld_once(configure: impl FnOnce(&mut Command) -> &mut Command) -> Output {
    let mut command = Command::new(bin("gpuctld"));
    for variable in [
        "GPUCTL_CONFIG",
        "GPUCTL_SOCKET",
        "NOTIFY_SOCKET",
        "LISTEN_FDS",
        "LISTEN_PID",
    ] {
        command.env_remove(variable);
    }
    configure(&mut command).output().expect("run gpuctld")
}
