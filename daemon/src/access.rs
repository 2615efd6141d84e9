//! Who may do what, from the peer's kernel-reported credentials.
//!
//! Anyone who can open the socket (its mode and group decide that) may read
//! state and run models; administrative operations change what everyone
//! else gets, so they need root, the daemon's own user, or `admin_group`.

use gpuctl_protocol::units::{format_bytes, format_duration_ms};
use gpuctl_protocol::{Error, ErrorCode, Request, ReserveRequest};

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
        | Request::GenerateThen(_)
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

/// Whether `peer` is an administrator: root, the daemon's own user, or a
/// member of `daemon.admin_group`.
pub fn is_admin(peer: &Peer, config: &Config) -> bool {
    peer.uid == 0
        || peer.uid == daemon_uid()
        || in_group(peer, &config.daemon.admin_group, "daemon.admin_group")
}

/// Whether `peer` runs with `group` (primary or supplementary); `key`
/// names the setting, for the log.
fn in_group(peer: &Peer, group: &str, key: &str) -> bool {
    if group.is_empty() {
        return false;
    }
    let Some(gid) = lookup_group(group) else {
        tracing::warn!(group = %group, key, "the group does not exist; nobody is a member");
        return false;
    };
    peer.gid == gid
        || peer
            .pid
            .is_some_and(|pid| supplementary_groups(pid).contains(&gid))
}

/// The terms on which `peer` may reserve GPU memory: administrators and
/// members of `gpu.reserve_group` as they ask; others up to
/// `gpu.reserve_max`, for at most `gpu.reserve_max_ttl` (a reservation
/// without a ttl gets that one). Returns the ttl to apply.
pub fn reservation_ttl(
    request: &ReserveRequest,
    peer: &Peer,
    config: &Config,
) -> Result<Option<u64>, Error> {
    let gpu = &config.gpu;
    if is_admin(peer, config) || in_group(peer, &gpu.reserve_group, "gpu.reserve_group") {
        return Ok(request.ttl_ms);
    }
    let via_group = match gpu.reserve_group.as_str() {
        "" => String::new(),
        group => format!(", members of group {group:?} (gpu.reserve_group)"),
    };
    if request.bytes > gpu.reserve_max.0 {
        let others = match gpu.reserve_max.0 {
            0 => "others may not reserve (gpu.reserve_max = \"0\")".to_owned(),
            max => format!("others up to {} (gpu.reserve_max)", format_bytes(max)),
        };
        return Err(Error::new(
            ErrorCode::Unauthorized,
            format!(
                "reserving {} is not allowed for uid {}: reservations are for root, the daemon's user (uid {}), administrators{via_group}; {others}",
                format_bytes(request.bytes),
                peer.uid,
                daemon_uid()
            ),
        ));
    }
    let max_ttl = gpu.reserve_max_ttl.0.as_millis() as u64;
    let ttl = request.ttl_ms.map_or(max_ttl, |ttl| ttl.min(max_ttl));
    if request.ttl_ms != Some(ttl) {
        tracing::info!(
            uid = peer.uid,
            ttl = %format_duration_ms(ttl),
            "reservation ttl limited by gpu.reserve_max_ttl"
        );
    }
    Ok(Some(ttl))
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
    fn others_reserve_within_the_operators_limits() {
        let ask = |bytes: u64, ttl_ms: Option<u64>| ReserveRequest {
            bytes,
            device: None,
            timeout_ms: 1000,
            ttl_ms,
        };
        let mut config = Config::default();
        let error = reservation_ttl(&ask(1, None), &stranger(), &config).unwrap_err();
        assert_eq!(error.code, ErrorCode::Unauthorized);
        assert!(
            error
                .message
                .contains("others may not reserve (gpu.reserve_max = \"0\")"),
            "{}",
            error.message
        );
        let root = Peer {
            uid: 0,
            gid: 0,
            pid: None,
        };
        assert_eq!(
            reservation_ttl(&ask(1 << 40, None), &root, &config),
            Ok(None)
        );
        config.gpu.reserve_max = crate::config::Bytes(4 << 30);
        let error = reservation_ttl(&ask(5 << 30, None), &stranger(), &config).unwrap_err();
        assert!(
            error.message.contains("others up to 4.0 GiB"),
            "{}",
            error.message
        );
        assert_eq!(
            reservation_ttl(&ask(1 << 30, None), &stranger(), &config),
            Ok(Some(3_600_000)),
            "no ttl: the longest allowed"
        );
        assert_eq!(
            reservation_ttl(&ask(1 << 30, Some(u64::MAX)), &stranger(), &config),
            Ok(Some(3_600_000))
        );
        assert_eq!(
            reservation_ttl(&ask(1 << 30, Some(5_000)), &stranger(), &config),
            Ok(Some(5_000))
        );
        config.gpu.reserve_group = "root".into();
        let member = Peer {
            uid: 54_321,
            gid: 0,
            pid: None,
        };
        assert_eq!(
            reservation_ttl(&ask(1 << 40, None), &member, &config),
            Ok(None)
        );
    }

    #[test]
    fn groups_line() {
        let status = "Name:\tx\nGid:\t5\t5\t5\t5\nGroups:\t4 24 27 \nNgid:\t0\n";
        assert_eq!(parse_groups_line(status), vec![4, 24, 27]);
        assert_eq!(parse_groups_line("Name:\tx\n"), Vec::<u32>::new());
    }
}
