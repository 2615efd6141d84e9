use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use gpuctld::config::{ConfigSource, Loaded};
use gpuctld::{listener, logging, server, signals};

/// gpuctld: shares an NVIDIA GPU between models and other programs.
#[derive(Parser)]
#[command(version, about)]
struct Flags {
    /// Configuration file [default: $GPUCTL_CONFIG, else /etc/gpuctl/gpuctld.toml
    /// if it exists, else the embedded default]
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Socket to listen on [default: the config's daemon.socket, else
    /// $GPUCTL_SOCKET, else /run/gpuctl/gpuctld.sock for root and
    /// $XDG_RUNTIME_DIR/gpuctl/gpuctld.sock otherwise]
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Validate the configuration, print the verdict and exit (0 valid, 1 not)
    #[arg(long)]
    check_config: bool,
}

fn main() -> ExitCode {
    let flags = Flags::parse();
    let source = ConfigSource::choose(flags.config.clone());
    let loaded = match source.load() {
        Ok(loaded) => loaded,
        Err(error) => {
            eprintln!("gpuctld: {error}");
            return ExitCode::FAILURE;
        }
    };
    if flags.check_config {
        println!(
            "{}: ok ({} models)",
            source.describe(),
            loaded.config.models.len()
        );
        return ExitCode::SUCCESS;
    }
    logging::init(&loaded.config.daemon.log_level.0);
    match start(flags, source, loaded) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("gpuctld: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn start(flags: Flags, source: ConfigSource, loaded: Loaded) -> anyhow::Result<()> {
    let config = &loaded.config;
    // Socket activation reads and clears LISTEN_* variables: do it before
    // any thread exists.
    let inherited = listener::from_systemd()?;
    // Before the socket exists: a client that can connect may signal us.
    let signals = signals::listen().context("cannot install signal handlers")?;
    let listening = match inherited {
        Some(inherited) => inherited,
        None => {
            let uid = nix::unistd::geteuid().as_raw();
            let path = flags
                .socket
                .or_else(|| {
                    Some(PathBuf::from(&config.daemon.socket)).filter(|p| !p.as_os_str().is_empty())
                })
                .unwrap_or_else(|| gpuctl_protocol::daemon_default_socket(uid));
            listener::bind(&path, &config.daemon)?
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.daemon.threads as usize)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let served = runtime.block_on(async move {
        let (listener, path, socket_file) = listening
            .into_tokio()
            .context("cannot register the socket")?;
        server::run(server::Setup {
            listener,
            socket: path.display().to_string(),
            socket_file,
            source,
            loaded,
            reloads: signals.reload,
            shutdown: signals.shutdown,
        })
        .await;
        Ok(())
    });
    // Work past the grace period (a reload stuck reading the file, say) must
    // not hold the exit: dropping the runtime would wait for it forever.
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    served
}
