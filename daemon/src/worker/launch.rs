//! How a worker process is started: gpuctl-worker for TorchScript files,
//! or the program a model's `command` names. Either way it gets its socket
//! as fd 3, runs in a process group of its own (so that killing the group
//! ends whatever it started), and dies with gpuctld.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use gpuctl_protocol::worker::WORKER_FD;
use tokio::process::Command;

/// The variable holding the descriptor of a worker's socket.
pub const FD_VARIABLE: &str = "GPUCTL_WORKER_FD";
/// The variable holding gpuctld's pid.
pub const PARENT_VARIABLE: &str = "GPUCTL_PARENT_PID";
/// The variable holding the model's name.
pub const MODEL_VARIABLE: &str = "GPUCTL_MODEL";

/// What to start for one model.
#[derive(Debug, Clone, PartialEq)]
pub struct Launch {
    /// The program: gpuctl-worker, or the command's first word.
    pub program: PathBuf,
    /// Its arguments after the program.
    pub args: Vec<String>,
    /// Variables set on top of gpuctld's environment.
    pub env: BTreeMap<String, String>,
    /// Its working directory; `None`: gpuctld's.
    pub cwd: Option<PathBuf>,
    /// Start to `Loaded`, at most.
    pub load_timeout: Duration,
}

impl Launch {
    /// gpuctl-worker, told where its socket is by arguments.
    pub fn builtin(program: PathBuf, load_timeout: Duration) -> Launch {
        Launch {
            program,
            args: vec![
                "--fd".to_owned(),
                WORKER_FD.to_string(),
                "--parent".to_owned(),
                std::process::id().to_string(),
            ],
            env: BTreeMap::new(),
            cwd: None,
            load_timeout,
        }
    }

    /// A model's `command`: argv as written (a word with a `/` that is not
    /// absolute is taken relative to `cwd`; a bare name is looked up on
    /// PATH), told where its socket is by environment variables only.
    pub fn command(
        argv: &[String],
        env: &BTreeMap<String, String>,
        cwd: PathBuf,
        load_timeout: Duration,
    ) -> Launch {
        let (program, args) = match argv.split_first() {
            Some((program, args)) => (program.clone(), args.to_vec()),
            None => (String::new(), Vec::new()),
        };
        let program = PathBuf::from(program);
        let program = if program.is_relative() && program.components().count() > 1 {
            cwd.join(program)
        } else {
            program
        };
        Launch {
            program,
            args,
            env: env.clone(),
            cwd: Some(cwd),
            load_timeout,
        }
    }

    /// The command that starts it with `fd` as its socket.
    pub(super) fn prepare(&self, model: &str, fd: std::os::fd::RawFd) -> Command {
        let mut command = Command::new(&self.program);
        let parent = std::process::id();
        command
            .args(&self.args)
            // What systemd handed gpuctld is not the worker's.
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDNAMES")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .envs(&self.env)
            .env(FD_VARIABLE, WORKER_FD.to_string())
            .env(PARENT_VARIABLE, parent.to_string())
            .env(MODEL_VARIABLE, model)
            .env(
                gpuctl_protocol::worker::WORKER_PROTOCOL_ENV,
                gpuctl_protocol::worker::WORKER_PROTOCOL.to_string(),
            )
            .stdin(std::process::Stdio::null())
            // Its own group: killing the group ends what it started too, and
            // a Ctrl-C at gpuctld's terminal is gpuctld's to handle.
            .process_group(0)
            .kill_on_drop(true);
        if let Some(cwd) = &self.cwd {
            command.current_dir(cwd);
        }
        // SAFETY: dup2, fcntl, prctl and getppid are async-signal-safe and
        // take plain integers; nothing else runs between fork and exec.
        unsafe {
            command.pre_exec(move || {
                gpuctl_protocol::worker::install_worker_fd(fd)?;
                die_with(parent)
            });
        }
        command
    }
}

/// Arms SIGKILL for when the spawning thread's process goes, and refuses to
/// start when it already has (between fork and prctl). Survives exec, so a
/// program that never heard of gpuctld still dies with it; what it starts
/// in turn is the worker protocol's business (the socket closes).
fn die_with(parent: u32) -> std::io::Result<()> {
    // SAFETY: see `Launch::prepare`.
    unsafe {
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::getppid() as u32 != parent {
            return Err(std::io::Error::other(
                "gpuctld exited while starting the worker",
            ));
        }
    }
    Ok(())
}

/// Kills a worker's whole process group: the worker and everything it
/// started that did not leave the group. Harmless once the group is empty;
/// a pid of 0 (none known) kills nothing.
pub fn kill_group(pid: u32) {
    let Ok(group) = libc::pid_t::try_from(pid) else {
        return;
    };
    if group <= 1 {
        return;
    }
    // SAFETY: killpg takes plain integers. The group id is the worker's pid,
    // which the kernel does not hand out again while the group has members.
    unsafe {
        libc::killpg(group, libc::SIGKILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_runs_as_written_in_its_directory() {
        let argv = ["python", "-m", "app.worker"].map(String::from);
        let launch = Launch::command(
            &argv,
            &BTreeMap::from([("HF_HOME".into(), "/var/lib/gpuctl/hf".into())]),
            PathBuf::from("/srv/models"),
            Duration::from_secs(600),
        );
        assert_eq!(
            launch.program,
            PathBuf::from("python"),
            "bare names use PATH"
        );
        assert_eq!(launch.args, ["-m", "app.worker"]);
        assert_eq!(
            launch.cwd.as_deref(),
            Some(std::path::Path::new("/srv/models"))
        );
        let relative = Launch::command(
            &["./venv/bin/python".into()],
            &BTreeMap::new(),
            PathBuf::from("/srv/models"),
            Duration::from_secs(1),
        );
        assert_eq!(
            relative.program,
            PathBuf::from("/srv/models/./venv/bin/python")
        );
        let builtin = Launch::builtin(
            PathBuf::from("/usr/bin/gpuctl-worker"),
            Duration::from_secs(1),
        );
        assert_eq!(builtin.args[..2], ["--fd", "3"]);
        assert_eq!(builtin.args[2], "--parent");
    }

    #[test]
    fn killing_no_group_kills_nothing() {
        // pid 0 would be our own group, 1 init's: neither may be signalled.
        kill_group(0);
        kill_group(1);
    }
}
