//! Under systemd, stderr is the journal and JOURNAL_STREAM says so: then
//! gpuctld logs to journald's native socket, with structured fields.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::Duration;

use crate::fixture::*;

const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

#[test]
fn logs_go_to_journald_when_stderr_is_the_journal() {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED logs_go_to_journald_when_stderr_is_the_journal: needs root to stand in for journald");
        return;
    }
    if Path::new(JOURNAL_SOCKET).exists() {
        eprintln!(
            "SKIPPED logs_go_to_journald_when_stderr_is_the_journal: a real journald runs here"
        );
        return;
    }
    let created: Vec<&'static Path> = ["/run/systemd", "/run/systemd/journal"]
        .iter()
        .map(Path::new)
        .filter(|d| !d.exists())
        .collect();
    for dir in &created {
        std::fs::create_dir(dir).unwrap();
    }
    let _cleanup = Cleanup(created);
    let journal = UnixDatagram::bind(JOURNAL_SOCKET).unwrap();
    journal
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();

    let mut spec = DaemonSpec::new("");
    spec.journal_stream = true;
    let daemon = Daemon::start_with(spec);
    let mut entries: Vec<Vec<(String, String)>> = Vec::new();
    let mut buffer = vec![0u8; 65536];
    let is_ready = |entry: &Vec<(String, String)>| {
        entry
            .iter()
            .any(|(k, v)| k == "MESSAGE" && v == "gpuctld ready")
    };
    while !entries.iter().any(is_ready) {
        match journal.recv(&mut buffer) {
            Ok(n) => entries.push(parse_native(&buffer[..n])),
            Err(error) => {
                panic!("no 'gpuctld ready' entry reached the journal socket ({error}); got {entries:?}");
            }
        }
    }
    let ready = entries.iter().find(|e| is_ready(e)).unwrap();
    let field = |key: &str| ready.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
    assert_eq!(
        field("SYSLOG_IDENTIFIER").as_deref(),
        Some("gpuctld"),
        "{ready:?}"
    );
    assert_eq!(
        field("F_SOCKET"),
        Some(daemon.socket.display().to_string()),
        "{ready:?}"
    );
    assert_eq!(field("F_PID"), Some(daemon.pid().to_string()), "{ready:?}");
    // tracing-journald maps INFO to priority 5 (notice).
    assert_eq!(field("PRIORITY").as_deref(), Some("5"), "{ready:?}");
    assert!(
        !daemon.log_text().contains("gpuctld ready"),
        "also logged to stderr: {}",
        daemon.log_text()
    );
}

/// Removes the stand-in journal socket and the directories made for it,
/// even when the test fails.
struct Cleanup(Vec<&'static Path>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(JOURNAL_SOCKET);
        for dir in self.0.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// journald's native format: `KEY=VALUE\n`, or `KEY\n` + u64 LE length +
/// value + `\n` for values that may hold newlines.
fn parse_native(mut data: &[u8]) -> Vec<(String, String)> {
    let mut fields = Vec::new();
    while let Some(end) = data.iter().position(|b| *b == b'\n') {
        let line = &data[..end];
        if let Some(eq) = line.iter().position(|b| *b == b'=') {
            let key = String::from_utf8_lossy(&line[..eq]).into_owned();
            fields.push((key, String::from_utf8_lossy(&line[eq + 1..]).into_owned()));
            data = &data[end + 1..];
        } else {
            let key = String::from_utf8_lossy(line).into_owned();
            let rest = &data[end + 1..];
            let Some(len) = rest
                .get(..8)
                .map(|b| u64::from_le_bytes(b.try_into().unwrap()) as usize)
            else {
                break;
            };
            let Some(value) = rest.get(8..8 + len) else {
                break;
            };
            fields.push((key, String::from_utf8_lossy(value).into_owned()));
            data = rest.get(8 + len + 1..).unwrap_or_default();
        }
    }
    fields
}
