//! `gpuctl reserve`: keep GPU memory free for another program, run it,
//! release when it exits (or hold until Ctrl-C).

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use gpuctl_protocol::units::format_bytes;
use gpuctl_protocol::{Client, ReleaseRequest, Request, ReserveRequest, ReserveResponse, Response};

use crate::interrupt::Interrupt;
use crate::{unexpected, CliError, Output};

/// `gpuctl reserve`'s arguments.
#[derive(clap::Args)]
pub struct ReserveArgs {
    /// Memory to keep free, e.g. "10GiB" or "512MiB"
    #[arg(value_parser = gpuctl_protocol::units::parse_bytes)]
    pub size: u64,
    /// The GPU [default: the one where it fits best]
    #[arg(long, value_name = "N")]
    pub device: Option<u32>,
    /// Give up if the memory is not free within this long
    #[arg(long, default_value = "1m", value_parser = gpuctl_protocol::units::parse_duration)]
    pub timeout: Duration,
    /// End the reservation after this long even if COMMAND still runs
    #[arg(long, value_parser = gpuctl_protocol::units::parse_duration)]
    pub ttl: Option<Duration>,
    /// Run this once the memory is reserved; its exit status becomes
    /// gpuctl's. Without it, hold the reservation until Ctrl-C.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

pub async fn run(client: &Client, args: ReserveArgs, output: Output) -> Result<(), CliError> {
    let request = ReserveRequest {
        bytes: args.size,
        device: args.device,
        timeout_ms: args.timeout.as_millis() as u64,
        ttl_ms: args.ttl.map(|t| t.as_millis() as u64),
    };
    let granted = match client.call(Request::Reserve(request)).await? {
        Response::Reserve(granted) => granted,
        other => return Err(unexpected(&other).into()),
    };
    // Progress goes to stderr: stdout belongs to COMMAND.
    eprintln!(
        "gpuctl: reserved {} on GPU {} (reservation {})",
        format_bytes(granted.bytes),
        granted.device,
        granted.reservation
    );
    if output == Output::Json && args.command.is_empty() {
        crate::print_json(&granted);
    }
    match args.command.split_first() {
        Some((program, rest)) => run_command(program, rest).await,
        None => hold(client, &granted).await,
    }
}

/// Runs COMMAND while the reservation lives; its status becomes ours.
async fn run_command(program: &str, args: &[String]) -> Result<(), CliError> {
    let mut interrupt = Interrupt::listen();
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .spawn()
        .map_err(|error| {
            eprintln!("gpuctl: cannot run {program}: {error}");
            CliError::Exit(127)
        })?;
    // Ctrl-C reaches COMMAND too (same process group); gpuctl waits for it
    // to end and keeps the memory until then.
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            _ = interrupt.recv() => {}
        }
    };
    let code = match status {
        Ok(status) => match (status.code(), status.signal()) {
            (Some(code), _) => code as u8,
            (None, Some(signal)) => 128 + signal as u8,
            _ => 1,
        },
        Err(error) => {
            eprintln!("gpuctl: cannot wait for {program}: {error}");
            1
        }
    };
    if code == 0 {
        Ok(())
    } else {
        Err(CliError::Exit(code))
    }
}

/// Holds the reservation until Ctrl-C, then releases it.
async fn hold(client: &Client, granted: &ReserveResponse) -> Result<(), CliError> {
    eprintln!("gpuctl: holding it; press Ctrl-C to release");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = client.closed() => {
            return Err(CliError::Failed("gpuctld closed the connection: the reservation is gone".into()));
        }
    }
    match client
        .call(Request::Release(ReleaseRequest {
            reservation: granted.reservation,
        }))
        .await?
    {
        Response::Release(_) => {
            eprintln!("gpuctl: released {}", format_bytes(granted.bytes));
            Ok(())
        }
        other => Err(unexpected(&other).into()),
    }
}
