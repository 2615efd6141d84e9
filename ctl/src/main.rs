//! gpuctl: the command line for gpuctld.
//!
//! Results go to stdout, diagnostics to stderr. Exit codes: 0 ok, 1 the
//! daemon returned an error, 2 usage, 3 cannot connect.

mod commands;
mod image_out;
mod interrupt;
mod progress;
mod table;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use gpuctl_protocol::{
    Client, ClientError, ClientOptions, FrameError, KeepAlive, Response, PROTOCOL_VERSION,
};
use serde::Serialize;

/// Control gpuctld, the daemon that shares a GPU between models and other programs.
#[derive(Parser)]
#[command(version, about, propagate_version = true)]
pub struct Cli {
    /// gpuctld's socket [default: $XDG_RUNTIME_DIR/gpuctl/gpuctld.sock if it
    /// exists, else /run/gpuctl/gpuctld.sock]
    #[arg(long, global = true, env = "GPUCTL_SOCKET", value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Print one JSON document (the protocol's own types) on stdout
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show the daemon's state and every model's: loaded or not, memory,
    /// queue, time left before an idle unload, loads, last error
    #[command(visible_alias = "ps")]
    Status,
    /// Run a model: upscale an image, generate from a prompt, or run tensors
    Generate(commands::generate::GenerateArgs),
    /// Load a model now instead of on its first request (administrators only)
    Load {
        /// The configured model's name
        model: String,
        /// Keep it this long once idle: a duration ("10m", "0s") or "forever"
        #[arg(long, value_parser = parse_keep_alive)]
        keep_alive: Option<KeepAlive>,
    },
    /// Unload a model, or all of them, once their work is done (administrators only)
    #[command(group(clap::ArgGroup::new("which").required(true).args(["model", "all"])))]
    Unload {
        /// The model to unload
        model: Option<String>,
        /// Unload every model
        #[arg(long)]
        all: bool,
        /// Cancel work in flight instead of waiting for it
        #[arg(long)]
        force: bool,
    },
    /// GPU memory: each device's total, used, free and headroom, who holds
    /// it (our models by name, other programs by pid and name), reservations
    Vram,
    /// Keep GPU memory free for another program: `gpuctl reserve 10GiB --
    /// ollama run llama3` evicts idle models until 10 GiB is free, runs the
    /// command, and releases when it exits (passing its exit status through)
    Reserve(commands::reserve::ReserveArgs),
    /// Print what the daemon does as it happens (loads, unloads and why,
    /// pressure, reservations, reloads) until Ctrl-C; --json: JSON lines
    Watch,
    /// List the configured models and their settings
    Models,
    /// Make the daemon re-read its config file (administrators only)
    Reload,
    /// Check that the daemon answers, and print the round-trip time
    Ping {
        /// Pings to send, one a second
        #[arg(short, long, default_value_t = 1)]
        count: u32,
    },
    /// Print a shell completion script
    Completions {
        /// bash, zsh, fish, elvish or powershell
        shell: clap_complete::Shell,
    },
}

/// How results are printed.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Aligned tables for people.
    Human,
    /// One JSON document.
    Json,
}

const EXIT_DAEMON_ERROR: u8 = 1;
const EXIT_CANNOT_CONNECT: u8 = 3;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Completions { shell } = cli.command {
        commands::completions::run(shell);
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("gpuctl: cannot start the async runtime: {error}");
            return ExitCode::from(EXIT_DAEMON_ERROR);
        }
    };
    let socket = cli
        .socket
        .clone()
        .unwrap_or_else(gpuctl_protocol::client_default_socket);
    let output = if cli.json {
        Output::Json
    } else {
        Output::Human
    };
    match runtime.block_on(run(cli.command, &socket, output)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(CliError::Client(error)) => ExitCode::from(report(&error, &socket)),
        Err(CliError::Usage(message)) => {
            eprintln!("gpuctl: {message}");
            ExitCode::from(2)
        }
        Err(CliError::Failed(message)) => {
            eprintln!("gpuctl: {message}");
            ExitCode::from(EXIT_DAEMON_ERROR)
        }
        Err(CliError::Exit(code)) => ExitCode::from(code),
    }
}

/// Why a command failed.
pub enum CliError {
    /// Talking to gpuctld failed, or gpuctld refused.
    Client(ClientError),
    /// A local file or argument is unusable (exit 2).
    Usage(String),
    /// Writing a result failed (exit 1).
    Failed(String),
    /// End with this status, already explained (a command's own status).
    Exit(u8),
}

impl From<ClientError> for CliError {
    fn from(error: ClientError) -> Self {
        CliError::Client(error)
    }
}

async fn run(command: Command, socket: &std::path::Path, output: Output) -> Result<(), CliError> {
    let options = ClientOptions {
        name: format!("gpuctl {}", env!("CARGO_PKG_VERSION")),
        ..ClientOptions::default()
    };
    let client = Client::connect_with(socket, options).await?;
    let done = match command {
        Command::Status => commands::status::run(&client, output).await,
        Command::Models => commands::models::run(&client, output).await,
        Command::Vram => commands::vram::run(&client, output).await,
        Command::Reload => commands::reload::run(&client, output).await,
        Command::Ping { count } => commands::ping::run(&client, count, output).await,
        Command::Generate(args) => return commands::generate::run(&client, args, output).await,
        Command::Reserve(args) => return commands::reserve::run(&client, args, output).await,
        Command::Watch => return commands::watch::run(&client, output).await,
        Command::Load { model, keep_alive } => {
            commands::load::run(&client, model, keep_alive, output).await
        }
        Command::Unload {
            model,
            all: _,
            force,
        } => commands::unload::run(&client, model, force, output).await,
        Command::Completions { .. } => Ok(()),
    };
    done.map_err(CliError::from)
}

/// Prints what went wrong and how to fix it; returns the exit code.
fn report(error: &ClientError, socket: &std::path::Path) -> u8 {
    match error {
        ClientError::Connect { .. } => {
            eprintln!("gpuctl: {error}");
            eprintln!(
                "gpuctl: is gpuctld running? Start it with `systemctl start gpuctld` or `gpuctld --socket {}`, or point gpuctl elsewhere with --socket or GPUCTL_SOCKET",
                socket.display()
            );
            EXIT_CANNOT_CONNECT
        }
        ClientError::Frame(FrameError::Malformed(_)) | ClientError::Unexpected(_) => {
            eprintln!("gpuctl: {error}");
            eprintln!(
                "gpuctl: gpuctld's reply was not understood; this gpuctl speaks protocol {PROTOCOL_VERSION}: if gpuctld was upgraded or downgraded, restart it"
            );
            EXIT_DAEMON_ERROR
        }
        _ => {
            eprintln!("gpuctl: {error}");
            EXIT_DAEMON_ERROR
        }
    }
}

fn unexpected(response: &Response) -> ClientError {
    ClientError::Unexpected(format!("{response:?}"))
}

fn print_json<T: Serialize>(value: &T) {
    match serde_json::to_string_pretty(value) {
        Ok(json) => emit(&format!("{json}\n")),
        Err(error) => eprintln!("gpuctl: cannot print JSON: {error}"),
    }
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Writes results to stdout. A reader that went away (`gpuctl status | head`)
/// ends gpuctl quietly, as SIGPIPE would; SIGPIPE itself stays ignored so a
/// daemon hanging up on us is an error we can report, not a silent death.
pub fn emit(text: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(error) = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        if error.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(141);
        }
        eprintln!("gpuctl: cannot write output: {error}");
    }
}

/// `--keep-alive`: a duration such as "10m" or "0s", or "forever".
pub fn parse_keep_alive(text: &str) -> Result<KeepAlive, String> {
    if text == "forever" {
        return Ok(KeepAlive::Forever);
    }
    let duration = gpuctl_protocol::units::parse_duration(text)?;
    Ok(KeepAlive::Millis(duration.as_millis() as u64))
}

/// `--size`: WIDTHxHEIGHT, e.g. "896x1152".
pub fn parse_size(text: &str) -> Result<(u32, u32), String> {
    let problem = || format!("invalid size {text:?}: expected WIDTHxHEIGHT such as 896x1152");
    let (w, h) = text.split_once('x').ok_or_else(problem)?;
    let size = (
        w.parse().map_err(|_| problem())?,
        h.parse().map_err(|_| problem())?,
    );
    if size.0 == 0 || size.1 == 0 {
        return Err(problem());
    }
    Ok(size)
}
