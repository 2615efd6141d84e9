//! gpuctld under load, in one run: 1,000 connections × 100 pings, then 64
//! clients × 50 small `tensor` requests (tiny-rows, one row of 16 values)
//! whose answers are checked against the model's definition, in ROUNDS
//! rounds interleaving three servers: gpuctld, a minimal relay doing the
//! same hops (see load/relay.rs), and gpuctld with `max_batch = 8` on the
//! model. Prints, for each, the replies lost (no answer within 60 s),
//! mismatched (the wrong answer) and errored (must all be 0), the
//! throughput, p50 and p99 latency, the server's own CPU per request; then
//! the medians with gpuctld's rate as a share of the relay's and batching's
//! gain, and gpuctld's peak RSS; exits 1 if any reply was lost, wrong or an
//! error.
//!
//! `cargo bench -p gpuctl-e2e --bench load [-- CONNECTIONS PINGS CLIENTS REQUESTS ROUNDS]`
//! (needs `cargo build`, a release build preferred — `cargo build --release`
//! — and the models from models/make_models.py). CONNECTIONS 0 skips the
//! pings. Extra `[models.ten]` settings for gpuctld come from the
//! environment variable `GPUCTL_BENCH_MODEL` (e.g. `max_batch = 8`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gpuctl_protocol::{Client, DType, GenerateRequest, PingRequest, Request, Response, WireTensor};

#[path = "load/relay.rs"]
mod relay;

const REPLY_LIMIT: Duration = Duration::from_secs(60);

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[derive(Default)]
struct Tally {
    latencies: Vec<Duration>,
    lost: u64,
    mismatched: u64,
    errored: u64,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        self.latencies.extend(other.latencies);
        self.lost += other.lost;
        self.mismatched += other.mismatched;
        self.errored += other.errored;
    }

    /// Prints the figures, gives the rate and p99 (ms); true when every
    /// reply was right.
    fn print_rate(
        &mut self,
        what: &str,
        asked: u64,
        took: Duration,
        figures: &mut (f64, f64),
    ) -> bool {
        self.latencies.sort();
        let at = |q: f64| {
            self.latencies
                .get(
                    ((self.latencies.len() as f64 * q) as usize)
                        .min(self.latencies.len().saturating_sub(1)),
                )
                .map_or(0.0, |d| d.as_secs_f64() * 1e3)
        };
        let rate = self.latencies.len() as f64 / took.as_secs_f64();
        *figures = (rate, at(0.99));
        println!(
            "{what}: {asked} requests: lost {}, mismatched {}, errored {}; {:.0} replies/s; p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({:.1} s in all)",
            self.lost,
            self.mismatched,
            self.errored,
            rate,
            at(0.50),
            at(0.99),
            self.latencies.last().map_or(0.0, |d| d.as_secs_f64() * 1e3),
            took.as_secs_f64()
        );
        self.lost + self.mismatched + self.errored == 0
    }
}

/// One row of values.
fn f32s(values: &[f32]) -> WireTensor {
    WireTensor::new(
        DType::F32,
        vec![1, values.len() as u64],
        values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    )
    .unwrap()
}

fn values(tensor: &WireTensor) -> Vec<f32> {
    tensor
        .data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// One connection's pings, in turn.
async fn pings(socket: Arc<PathBuf>, count: usize) -> Tally {
    let mut tally = Tally::default();
    let client = match tokio::time::timeout(REPLY_LIMIT, Client::connect(socket.as_path())).await {
        Ok(Ok(client)) => client,
        Ok(Err(error)) => {
            eprintln!("connect: {error}");
            tally.errored += count as u64;
            return tally;
        }
        Err(_) => {
            tally.lost += count as u64;
            return tally;
        }
    };
    for _ in 0..count {
        let started = Instant::now();
        match tokio::time::timeout(REPLY_LIMIT, client.call(Request::Ping(PingRequest {}))).await {
            Ok(Ok(Response::Ping(_))) => tally.latencies.push(started.elapsed()),
            Ok(Ok(_)) => tally.mismatched += 1,
            Ok(Err(error)) => {
                eprintln!("ping: {error}");
                tally.errored += 1;
            }
            Err(_) => tally.lost += 1,
        }
    }
    tally
}

/// One client's tensor requests to `model`, in turn: one row, `(a * 2 +
/// b, sum(a * b))`.
async fn requests(
    socket: Arc<PathBuf>,
    model: &'static str,
    client_index: usize,
    count: usize,
) -> Tally {
    let mut tally = Tally::default();
    let Ok(Ok(client)) = tokio::time::timeout(REPLY_LIMIT, Client::connect(socket.as_path())).await
    else {
        tally.errored += count as u64;
        return tally;
    };
    for i in 0..count {
        let a: Vec<f32> = (0..16)
            .map(|k| (client_index * 1000 + i * 16 + k) as f32)
            .collect();
        let b: Vec<f32> = (0..16).map(|k| k as f32 * 0.5).collect();
        let request = GenerateRequest {
            inputs: vec![f32s(&a), f32s(&b)],
            ..GenerateRequest::new(model)
        };
        let started = Instant::now();
        match tokio::time::timeout(REPLY_LIMIT, client.call(Request::Generate(request))).await {
            Ok(Ok(Response::Generate(answer))) => {
                let want: Vec<f32> = a.iter().zip(&b).map(|(a, b)| a * 2.0 + b).collect();
                let sum: f32 = a.iter().zip(&b).map(|(a, b)| a * b).sum();
                let right = answer.outputs.len() == 2
                    && answer.outputs[0].shape == [1, 16]
                    && answer.outputs[1].shape == [1]
                    && values(&answer.outputs[0]) == want
                    && values(&answer.outputs[1])
                        .first()
                        .is_some_and(|s| (s - sum).abs() <= sum.abs() * 1e-5);
                if right {
                    tally.latencies.push(started.elapsed());
                } else {
                    tally.mismatched += 1;
                }
            }
            Ok(Ok(_)) => tally.mismatched += 1,
            Ok(Err(error)) => {
                eprintln!("generate: {error}");
                tally.errored += 1;
            }
            Err(_) => tally.lost += 1,
        }
    }
    tally
}

/// CPU seconds process `pid` has used (user + system).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command's closing parenthesis; utime and stime
    // are the 14th and 15th of the whole line.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // SAFETY: sysconf reads a constant.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(11) + ticks(12)) / per_second
}

/// Context switches of every thread of `pid` so far, and its read and
/// write calls: the wake-ups and hops a request costs.
fn switches_and_io_calls(pid: u32) -> (u64, u64) {
    let field = |text: &str, name: &str| -> u64 {
        text.lines()
            .filter_map(|l| l.strip_prefix(name))
            .filter_map(|v| v.trim().parse::<u64>().ok())
            .sum()
    };
    let switches = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|task| {
            let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
            field(&status, "voluntary_ctxt_switches:")
                + field(&status, "nonvoluntary_ctxt_switches:")
        })
        .sum();
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
    (switches, field(&io, "syscr:") + field(&io, "syscw:"))
}

fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

/// `clients` clients × `per_client` tensor requests to `model` at
/// `socket`; prints the figures and returns the rate and p99, or `None` if
/// a reply was wrong.
async fn generate_round(
    socket: &Arc<PathBuf>,
    model: &'static str,
    what: &str,
    clients: usize,
    per_client: usize,
) -> Option<(f64, f64)> {
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|i| tokio::spawn(requests(socket.clone(), model, i, per_client)))
        .collect();
    let mut tally = Tally::default();
    for task in tasks {
        tally.add(task.await.unwrap());
    }
    let mut figures = (0.0, 0.0);
    tally
        .print_rate(
            &format!("{what}: generate (tiny-rows), {clients} clients x {per_client}"),
            (clients * per_client) as u64,
            started.elapsed(),
            &mut figures,
        )
        .then_some(figures)
}

async fn wait_for(socket: &Path, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Client::connect(socket).await.is_err() {
        assert!(Instant::now() < deadline, "{what} did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(at) = args.iter().position(|a| a == "relay-serve") {
        relay::serve(&args[at + 1..]);
        return;
    }
    let numbers: Vec<usize> = args.iter().filter_map(|a| a.parse().ok()).collect();
    let arg = |i: usize, default: usize| numbers.get(i).copied().unwrap_or(default);
    let (connections, per_connection) = (arg(0, 1000), arg(1, 100));
    let (clients, per_client) = (arg(2, 64), arg(3, 50));
    let rounds = arg(4, 3).max(1);
    let (gpuctld, profile) = ["release", "debug"]
        .iter()
        .map(|p| (root().join("target").join(p).join("gpuctld"), *p))
        .find(|(p, _)| p.exists())
        .expect("no gpuctld: run `cargo build --release` (or `cargo build`) first");
    let worker = gpuctld.with_file_name("gpuctl-worker");
    let models = root().join("target/models");
    assert!(
        models.join("tiny-rows.pt").exists(),
        "no test models: run models/make_models.py target/models (scripts/test does)"
    );
    // Every connection is a descriptor here and one in gpuctld.
    // SAFETY: getrlimit/setrlimit write only the struct given.
    unsafe {
        let mut limit = std::mem::zeroed::<libc::rlimit>();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let slots = connections + clients + 16;
    let extra = std::env::var("GPUCTL_BENCH_MODEL").unwrap_or_default();
    let start = |name: &str, daemon_keys: &str| {
        let config = dir.path().join(format!("{name}.toml"));
        let socket = dir.path().join(format!("{name}.sock"));
        std::fs::write(
            &config,
            format!(
                "model_root = \"{}\"\n[daemon]\nmax_connections = {slots}\nmax_connections_per_uid = {slots}\nlog_level = \"warn\"\n{daemon_keys}[policy]\nmax_loaded = 4\nqueue_max = {}\n[gpu]\nbackend = \"none\"\n[models.rows8]\npath = \"tiny-rows.pt\"\nkind = \"tensor\"\nthreads = 1\nmax_batch = 8\n[models.rows]\npath = \"tiny-rows.pt\"\nkind = \"tensor\"\nthreads = 1\n{extra}\n",
                models.display(),
                clients * 2
            ),
        )
        .unwrap();
        let daemon = Command::new(&gpuctld)
            .arg("--config")
            .arg(&config)
            .arg("--socket")
            .arg(&socket)
            .env_remove("RUST_LOG")
            .env("STATE_DIRECTORY", dir.path().join(format!("{name}-state")))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start gpuctld");
        (daemon, Arc::new(socket))
    };
    let (mut daemon, socket) = start("gpuctld", "");
    // The same daemon with two event-loop threads: what the default of one
    // gains or loses, measured in the same run.
    let (mut daemon2, socket2) = start("gpuctld-threads2", "threads = 2\n");
    let relay_socket = dir.path().join("relay.sock");
    let mut relay = Command::new(std::env::current_exe().unwrap())
        .arg("relay-serve")
        .arg(&relay_socket)
        .arg(&worker)
        .arg(models.join("tiny-rows.pt"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the relay");
    let pid = daemon.id();
    let pid2 = daemon2.id();
    let relay_pid = relay.id();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "load: gpuctld ({profile} build), {cores} cores, bench and daemon on the same machine; [models.rows] extra: {extra:?}"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let relay_socket = Arc::new(relay_socket);
    let ok = runtime.block_on(async {
        wait_for(&socket, "gpuctld").await;
        wait_for(&socket2, "gpuctld (threads = 2)").await;
        wait_for(&relay_socket, "the relay").await;
        let mut pinged = true;
        if connections > 0 {
            let mut rates: Vec<Vec<(f64, f64)>> = vec![Vec::new(); 2];
            for round in 1..=rounds {
                for ((what, socket), rates) in [("gpuctld", &socket), ("gpuctld, threads = 2", &socket2)]
                    .into_iter()
                    .zip(&mut rates)
                {
                    let started = Instant::now();
                    let tasks: Vec<_> = (0..connections)
                        .map(|_| tokio::spawn(pings(socket.clone(), per_connection)))
                        .collect();
                    let mut tally = Tally::default();
                    for task in tasks {
                        tally.add(task.await.unwrap());
                    }
                    let mut figure = (0.0, 0.0);
                    pinged &= tally.print_rate(
                        &format!("round {round}, {what}: ping, {connections} connections x {per_connection}"),
                        (connections * per_connection) as u64,
                        started.elapsed(),
                        &mut figure,
                    );
                    rates.push(figure);
                }
            }
            let medians: Vec<f64> = rates
                .iter()
                .map(|r| median(&mut r.iter().map(|f| f.0).collect::<Vec<_>>()))
                .collect();
            println!(
                "ping: gpuctld {:.0} replies/s, with threads = 2 {:.0} (median of {rounds}): one thread {:.2}x two",
                medians[0],
                medians[1],
                medians[0] / medians[1].max(f64::MIN_POSITIVE)
            );
        }

        // The models' loads are not what is measured, nor TorchScript's
        // first (profiling) runs.
        for (socket, models) in [(&socket, &["rows", "rows8"][..]), (&socket2, &["rows"])] {
            let warm = Client::connect(socket.as_path()).await.unwrap();
            for model in models {
                warm.call(Request::Load(gpuctl_protocol::LoadRequest {
                    model: (*model).into(),
                    keep_alive: None,
                }))
                .await
                .unwrap();
            }
        }
        for (socket, model) in [
            (&socket, "rows"),
            (&socket, "rows8"),
            (&socket2, "rows"),
            (&relay_socket, "rows"),
        ] {
            let _ = requests(socket.clone(), model, 0, 5).await;
        }
        let arms = [
            ("gpuctld", &socket, "rows", pid),
            ("relay", &relay_socket, "rows", relay_pid),
            ("gpuctld, max_batch 8", &socket, "rows8", pid),
            ("gpuctld, threads = 2", &socket2, "rows", pid2),
        ];
        let mut figures: Vec<Vec<(f64, f64)>> = vec![Vec::new(); arms.len()];
        let mut generated = true;
        for round in 1..=rounds {
            for ((what, socket, model, server), figures) in arms.iter().zip(&mut figures) {
                let cpu = cpu_seconds(*server);
                let (switches, io_calls) = switches_and_io_calls(*server);
                let what = format!("round {round}, {what}");
                match generate_round(socket, model, &what, clients, per_client).await {
                    Some(figure) => figures.push(figure),
                    None => generated = false,
                }
                let used = cpu_seconds(*server) - cpu;
                let (switched, io_called) = switches_and_io_calls(*server);
                let count = (clients * per_client) as f64;
                println!(
                    "  its server's own CPU: {:.0} µs per request; {:.1} context switches and {:.1} reads and writes per request",
                    used * 1e6 / count,
                    switched.saturating_sub(switches) as f64 / count,
                    io_called.saturating_sub(io_calls) as f64 / count,
                );
            }
        }
        let medians: Vec<(f64, f64)> = figures
            .iter()
            .map(|f| {
                let (mut rates, mut p99s): (Vec<f64>, Vec<f64>) = f.iter().copied().unzip();
                (median(&mut rates), median(&mut p99s))
            })
            .collect();
        for ((what, ..), (rate, p99)) in arms.iter().zip(&medians) {
            println!("median of {rounds}: {what}: {rate:.0} replies/s, p99 {p99:.2} ms");
        }
        let ratio = |a: f64, b: f64| a / b.max(f64::MIN_POSITIVE);
        println!(
            "generate: gpuctld {:.2} of the relay's rate; max_batch 8 {:.2}x gpuctld unbatched",
            ratio(medians[0].0, medians[1].0),
            ratio(medians[2].0, medians[0].0)
        );
        println!(
            "generate: gpuctld (one event-loop thread) {:.2}x gpuctld with threads = 2",
            ratio(medians[0].0, medians[3].0)
        );
        pinged && generated
    });
    println!("gpuctld peak RSS: {:.1} MiB", peak_rss_mib(pid));
    for daemon in [&mut daemon, &mut daemon2] {
        let _ = daemon.kill();
        let _ = daemon.wait();
    }
    let _ = relay.kill();
    let _ = relay.wait();
    if !ok {
        eprintln!("load: replies were lost, wrong or errors");
        std::process::exit(1);
    }
}
