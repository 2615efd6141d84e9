//! Administrative requests from a non-admin uid are refused. Needs root to
//! run the client as another user; skipped with a message otherwise.

use std::process::Command;

use crate::fixture::*;

const NOBODY: u32 = 65534;

fn as_nobody(daemon: &Daemon, args: &[&str]) -> std::process::Output {
    Command::new("setpriv")
        .args([
            "--reuid",
            &NOBODY.to_string(),
            "--regid",
            &NOBODY.to_string(),
            "--clear-groups",
        ])
        .arg(bin("gpuctl"))
        .arg("--socket")
        .arg(&daemon.socket)
        .args(args)
        .output()
        .expect("run setpriv (util-linux)")
}

fn running_as_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn administrative_requests_need_an_admin() {
    if !running_as_root() {
        eprintln!("SKIPPED administrative_requests_need_an_admin: needs root to run gpuctl as uid {NOBODY}");
        return;
    }
    let daemon = Daemon::start("[daemon]\nsocket_mode = \"0666\"\n");

    let status = as_nobody(&daemon, &["status"]);
    assert!(
        status.status.success(),
        "read-only requests are open: {}",
        stderr(&status)
    );

    let reload = as_nobody(&daemon, &["reload"]);
    assert_eq!(reload.status.code(), Some(1));
    let message = stderr(&reload);
    assert!(
        message.contains("reload is an administrative operation"),
        "{message}"
    );
    assert!(message.contains("(unauthorized)"), "{message}");
    assert!(
        message.contains(&format!("you are uid {NOBODY}")),
        "{message}"
    );
    assert_eq!(
        daemon.status()["config"]["generation"],
        1,
        "nothing was reloaded"
    );

    for (args, operation) in [
        (&["load", "m"][..], "load"),
        (&["unload", "--all"][..], "unload"),
    ] {
        let refused = as_nobody(&daemon, args);
        assert_eq!(refused.status.code(), Some(1));
        let message = stderr(&refused);
        assert!(
            message.contains(&format!("{operation} is an administrative operation")),
            "{message}"
        );
    }

    // root is always an administrator.
    assert!(daemon.gpuctl(&["reload"]).status.success());
}

#[test]
fn the_admin_group_grants_administration() {
    if !running_as_root() {
        eprintln!("SKIPPED the_admin_group_grants_administration: needs root to run gpuctl as uid {NOBODY}");
        return;
    }
    let Some(group) = group_name(NOBODY) else {
        eprintln!("SKIPPED the_admin_group_grants_administration: no group with gid {NOBODY} in /etc/group");
        return;
    };
    let daemon = Daemon::start(&format!(
        "[daemon]\nsocket_mode = \"0666\"\nadmin_group = \"{group}\"\n"
    ));
    let reload = as_nobody(&daemon, &["reload"]);
    assert!(reload.status.success(), "{}", stderr(&reload));
    assert_eq!(daemon.status()["config"]["generation"], 2);
}
