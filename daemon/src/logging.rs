//! Logs: to journald when stderr is the journal, else readable stderr.

use std::io::IsTerminal;
use std::os::unix::fs::MetadataExt;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. A non-empty `RUST_LOG` wins over
/// `default_filter` (the config's `log_level`); an invalid one is reported
/// and the config's level used.
pub fn init(default_filter: &str) {
    let from_env = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty());
    let filter = match from_env.map(|v| (EnvFilter::try_new(&v), v)) {
        Some((Ok(filter), _)) => filter,
        Some((Err(error), value)) => {
            eprintln!("gpuctld: ignoring RUST_LOG={value:?} ({error}); using log_level {default_filter:?}");
            EnvFilter::try_new(default_filter).unwrap_or_else(|_| EnvFilter::new("info"))
        }
        None => EnvFilter::try_new(default_filter).unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let registry = tracing_subscriber::registry().with(filter);
    if stderr_is_journal() {
        match tracing_journald::layer() {
            Ok(journald) => {
                registry
                    .with(journald.with_syslog_identifier("gpuctld".into()))
                    .init();
                return;
            }
            Err(error) => eprintln!("gpuctld: cannot reach journald ({error}); logging to stderr"),
        }
    }
    let ansi = std::io::stderr().is_terminal();
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(ansi);
    registry.with(stderr).init();
}

/// systemd sets JOURNAL_STREAM to the `device:inode` of the stream it
/// connected; stderr is the journal only if it is still that stream.
fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    dev.parse() == Ok(meta.dev()) && ino.parse() == Ok(meta.ino())
}
