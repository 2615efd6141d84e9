//! The listening socket: inherited from systemd, or bound by us.

use std::io;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener as StdListener, UnixStream as StdStream};
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;

use crate::config::{lookup_group, DaemonConfig};

/// Why no listening socket could be had.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// Another daemon answers on the path.
    #[error("another gpuctld is already listening on {0}; stop it first, or start this one with --socket PATH")]
    AlreadyRunning(PathBuf),
    /// The path is taken by something that is not a socket.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// systemd passed descriptors we cannot use.
    #[error("socket activation: {0}")]
    Activation(String),
    /// A system call failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The failure.
        source: io::Error,
    },
}

/// A listening socket and, if we created its file, the guard that removes it.
#[derive(Debug)]
pub struct Listening {
    /// The std listener, converted to tokio's inside the runtime.
    pub listener: StdListener,
    /// The socket's path, for `Status` and logs.
    pub path: PathBuf,
    /// Removes the socket file on drop; `None` when systemd owns the file.
    pub file: Option<SocketFile>,
}

impl Listening {
    /// Registers the listener with the running tokio runtime.
    pub fn into_tokio(self) -> io::Result<(UnixListener, PathBuf, Option<SocketFile>)> {
        self.listener.set_nonblocking(true)?;
        Ok((UnixListener::from_std(self.listener)?, self.path, self.file))
    }
}

/// Removes the socket file when dropped, unless another daemon has
/// replaced it since (the inode no longer matches).
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    inode: u64,
}

impl SocketFile {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the file has been removed (not replaced: a socket another
    /// daemon put there is not ours to take over).
    pub fn missing(&self) -> bool {
        matches!(std::fs::symlink_metadata(&self.path), Err(e) if e.kind() == io::ErrorKind::NotFound)
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt;
        match std::fs::symlink_metadata(&self.path) {
            Ok(meta) if meta.ino() == self.inode => {
                if let Err(error) = std::fs::remove_file(&self.path) {
                    tracing::warn!(path = %self.path.display(), %error, "cannot remove socket file");
                }
            }
            _ => {}
        }
    }
}

/// The listener systemd passed (LISTEN_FDS/LISTEN_PID), if any. Must run
/// before any thread is started: it clears those variables.
pub fn from_systemd() -> Result<Option<Listening>, ListenError> {
    let mut fds = sd_notify::listen_fds().map_err(|e| ListenError::Activation(e.to_string()))?;
    let Some(fd) = fds.next() else {
        return Ok(None);
    };
    if fds.next().is_some() {
        return Err(ListenError::Activation(
            "more than one socket was passed; gpuctld.socket should have one ListenStream".into(),
        ));
    }
    let listener = adopt(fd)?;
    let path = listener
        .local_addr()
        .ok()
        .and_then(|addr| addr.as_pathname().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from(format!("<inherited fd {fd}>")));
    Ok(Some(Listening {
        listener,
        path,
        file: None,
    }))
}

fn adopt(fd: RawFd) -> Result<StdListener, ListenError> {
    use nix::sys::socket::{getsockname, getsockopt, sockopt, AddressFamily, SockType, UnixAddr};
    use std::os::fd::BorrowedFd;

    // SAFETY: systemd hands us this descriptor and nothing else owns it.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let kind = getsockopt(&borrowed, sockopt::SockType)
        .map_err(|e| ListenError::Activation(format!("fd {fd} is not a socket: {e}")))?;
    let family = getsockname::<UnixAddr>(fd)
        .ok()
        .map(|_| AddressFamily::Unix);
    if kind != SockType::Stream || family != Some(AddressFamily::Unix) {
        return Err(ListenError::Activation(format!(
            "fd {fd} is not a Unix stream socket; use ListenStream=/path in gpuctld.socket"
        )));
    }
    // SAFETY: checked above to be an open Unix stream socket that we now own.
    Ok(unsafe { StdListener::from_raw_fd(fd) })
}

/// Binds `path`, replacing a stale socket file but never a live daemon's.
pub fn bind(path: &Path, config: &DaemonConfig) -> Result<Listening, ListenError> {
    let io_error = |what, source| ListenError::Io {
        what,
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| ListenError::Io {
            what: "cannot create the socket's directory",
            path: parent.to_path_buf(),
            source: e,
        })?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(ListenError::NotASocket(path.into()))
        }
        Ok(_) => match StdStream::connect(path) {
            Ok(_) => return Err(ListenError::AlreadyRunning(path.into())),
            Err(_) => {
                tracing::info!(path = %path.display(), "replacing a stale socket file nobody listens on");
                std::fs::remove_file(path)
                    .map_err(|e| io_error("cannot remove stale socket", e))?;
            }
        },
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(io_error("cannot inspect", error)),
    }
    let listener = StdListener::bind(path).map_err(|e| io_error("cannot listen on", e))?;
    let inode = {
        use std::os::unix::fs::MetadataExt;
        std::fs::symlink_metadata(path)
            .map_err(|e| io_error("cannot inspect", e))?
            .ino()
    };
    let file = SocketFile {
        path: path.to_path_buf(),
        inode,
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(config.socket_mode.0))
        .map_err(|e| io_error("cannot set the mode of", e))?;
    if !config.socket_group.is_empty() {
        let gid = lookup_group(&config.socket_group).ok_or_else(|| {
            io_error(
                "cannot set the group of",
                io::Error::other(format!("no group {:?}", config.socket_group)),
            )
        })?;
        std::os::unix::fs::chown(path, None, Some(gid))
            .map_err(|e| io_error("cannot set the group of", e))?;
    }
    Ok(Listening {
        listener,
        path: path.to_path_buf(),
        file: Some(file),
    })
}
