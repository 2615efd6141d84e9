//! Who may do what, from the peer's kernel-reported credentials.
//!
//! Anyone who can open the socket (its mode and group decide that) may read
//! state and run models; administrative operations change what everyone
//! else gets, so they need root, the daemon's own user, or `admin_group`.

use gpuctl_protocol::{Error, ErrorCode, Request};

use crate::config::{lookup_group, Config};

/// The credentials of a connected process (SO_PEERCRED).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// Effective user id.
    pub uid: u32,
    /// Effective group id.
    pub gid: u32,
    /// Process id, when the kernel reports one.
    pub pid: Option<i32>,
}

/// Whether `request` changes the daemon for everyone.
pub fn is_administrative(request: &Request) -> bool {
    match request {
        Request::Ping(_)
        | Request::Status(_)
        | Request::Models(_)
        | Request::Generate(_)
        | Request::Vram(_)
        | Request::Reserve(_)
        | Request::Release(_)
        | Request::Watch(_)
        | Request::Cancel(_) => false,
        Request::Reload(_) | Request::Load(_) | Request::Unload(_) => true,
    }
}

/// Refuses `request` with `Unauthorized` unless `peer` may make it.
pub fn authorize(request: &Request, peer: &Peer, config: &Config) -> Result<(), Error> {
    if !is_administrative(request) || is_admin(peer, config) {
        return Ok(());
    }
    let via_group = match config.daemon.admin_group.as_str() {
        "" => String::new(),
        group => format!(", or members of group {group:?}"),
    };
    Err(Error::new(
        ErrorCode::Unauthorized,
        format!(
            "{} is an administrative operation: allowed for root, the daemon's user (uid {}){via_group}; you are uid {}",
            request.operation(),
            daemon_uid(),
            peer.uid
        ),
    ))
}

fn is_admin(peer: &Peer, config: &Config) -> bool {
    if peer.uid == 0 || peer.uid == daemon_uid() {
        return true;
    }
    let group = &config.daemon.admin_group;
    if group.is_empty() {
        return false;
    }
    let Some(admin_gid) = lookup_group(group) else {
        tracing::warn!(group = %group, "admin_group does not exist; nobody else is an administrator");
        return false;
    };
    peer.gid == admin_gid
        || peer
            .pid
            .is_some_and(|pid| supplementary_groups(pid).contains(&admin_gid))
}

fn daemon_uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// The supplementary groups of a live process, from `/proc/PID/status`.
/// These are the groups the process really runs with, which is what
/// matters, rather than what `/etc/group` says of its user today.
fn supplementary_groups(pid: i32) -> Vec<u32> {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return Vec::new();
    };
    parse_groups_line(&status)
}

fn parse_groups_line(status: &str) -> Vec<u32> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("Groups:"))
        .map(|groups| {
            groups
                .split_whitespace()
                .filter_map(|g| g.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use gpuctl_protocol::{PingRequest, ReloadRequest};

    use super::*;

    fn stranger() -> Peer {
        Peer {
            uid: 54_321,
            gid: 54_321,
            pid: None,
        }
    }

    #[test]
    fn read_only_requests_are_open() {
        let config = Config::default();
        assert!(authorize(&Request::Ping(PingRequest {}), &stranger(), &config).is_ok());
    }

    #[test]
    fn administrative_requests_need_an_admin() {
        let config = Config::default();
        let reload = Request::Reload(ReloadRequest {});
        let error = authorize(&reload, &stranger(), &config).unwrap_err();
        assert_eq!(error.code, ErrorCode::Unauthorized);
        assert!(
            error
                .message
                .starts_with("reload is an administrative operation"),
            "{}",
            error.message
        );
        assert!(error.message.contains("uid 54321"), "{}", error.message);
        let root = Peer {
            uid: 0,
            gid: 0,
            pid: None,
        };
        assert!(authorize(&reload, &root, &config).is_ok());
        let me = Peer {
            uid: daemon_uid(),
            gid: 1,
            pid: None,
        };
        assert!(authorize(&reload, &me, &config).is_ok());
    }

    #[test]
    fn the_admin_group_counts_as_primary_or_supplementary() {
        let mut config = Config::default();
        config.daemon.admin_group = "root".into();
        let reload = Request::Reload(ReloadRequest {});
        let primary = Peer {
            uid: 54_321,
            gid: 0,
            pid: None,
        };
        assert!(authorize(&reload, &primary, &config).is_ok());
        assert!(authorize(&reload, &stranger(), &config).is_err());
    }

    #[test]
    fn groups_line() {
        let status = "Name:\tx\nGid:\t5\t5\t5\t5\nGroups:\t4 24 27 \nNgid:\t0\n";
        assert_eq!(parse_groups_line(status), vec![4, 24, 27]);
        assert_eq!(parse_groups_line("Name:\tx\n"), Vec::<u32>::new());
    }
}
