//! Where the daemon's socket lives when nobody says otherwise.

use std::path::PathBuf;

/// The environment variable that names the socket for clients and daemon.
pub const SOCKET_ENV: &str = "GPUCTL_SOCKET";

/// The system daemon's socket, as in `systemd/gpuctld.socket`.
pub const SYSTEM_SOCKET: &str = "/run/gpuctl/gpuctld.sock";

/// The per-user socket: `$XDG_RUNTIME_DIR/gpuctl/gpuctld.sock`, if that
/// variable is set.
pub fn user_socket() -> Option<PathBuf> {
    let runtime = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty())?;
    Some(PathBuf::from(runtime).join("gpuctl").join("gpuctld.sock"))
}

/// The default socket for a daemon run by `uid` with no `--socket` and no
/// configured path: `$GPUCTL_SOCKET`, else the system socket for root and
/// the per-user socket otherwise.
pub fn daemon_default_socket(uid: u32) -> PathBuf {
    if let Some(path) = env_socket() {
        return path;
    }
    match (uid, user_socket()) {
        (0, _) | (_, None) => PathBuf::from(SYSTEM_SOCKET),
        (_, Some(user)) => user,
    }
}

/// The socket a client connects to when not told: `$GPUCTL_SOCKET`, else a
/// per-user daemon's socket if one exists, else the system socket.
pub fn client_default_socket() -> PathBuf {
    if let Some(path) = env_socket() {
        return path;
    }
    match user_socket() {
        Some(user) if user.exists() => user,
        _ => PathBuf::from(SYSTEM_SOCKET),
    }
}

fn env_socket() -> Option<PathBuf> {
    std::env::var_os(SOCKET_ENV)
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
}
