//! gpuctld under load, in one run: 1,000 connections × 100 pings, then 64
//! clients × 50 small `tensor` requests whose answers are checked against
//! the model's definition, in ROUNDS rounds interleaved with the same
//! requests through a minimal relay doing the same hops (see relay.rs).
//! Prints, for each, the replies lost (no answer within 60 s), mismatched
//! (the wrong answer) and errored (must all be 0), the throughput, p50 and
//! p99 latency, gpuctld's rate as a share of the relay's (medians), and
//! gpuctld's peak RSS; exits 1 if any reply was lost, wrong or an error.
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

    /// Prints the figures; true when every reply was right. `rate` gets
    /// the replies per second.
    fn print(&mut self, what: &str, asked: u64, took: Duration) -> bool {
        self.print_rate(what, asked, took, &mut 0.0)
    }

    fn print_rate(&mut self, what: &str, asked: u64, took: Duration, rate: &mut f64) -> bool {
        self.latencies.sort();
        let at = |q: f64| {
            self.latencies
                .get(
                    ((self.latencies.len() as f64 * q) as usize)
                        .min(self.latencies.len().saturating_sub(1)),
                )
                .map_or(0.0, |d| d.as_secs_f64() * 1e3)
        };
        *rate = self.latencies.len() as f64 / took.as_secs_f64();
        println!(
            "{what}: {asked} requests: lost {}, mismatched {}, errored {}; {:.0} replies/s; p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({:.1} s in all)",
            self.lost,
            self.mismatched,
            self.errored,
            *rate,
            at(0.50),
            at(0.99),
            self.latencies.last().map_or(0.0, |d| d.as_secs_f64() * 1e3),
            took.as_secs_f64()
        );
        self.lost + self.mismatched + self.errored == 0
    }
}

fn f32s(values: &[f32]) -> WireTensor {
    WireTensor::new(
        DType::F32,
        vec![values.len() as u64],
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

/// One client's tensor requests, in turn: `(a * 2 + b, sum(a * b))`.
async fn requests(socket: Arc<PathBuf>, client_index: usize, count: usize) -> Tally {
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
            ..GenerateRequest::new("ten")
        };
        let started = Instant::now();
        match tokio::time::timeout(REPLY_LIMIT, client.call(Request::Generate(request))).await {
            Ok(Ok(Response::Generate(answer))) => {
                let want: Vec<f32> = a.iter().zip(&b).map(|(a, b)| a * 2.0 + b).collect();
                let sum: f32 = a.iter().zip(&b).map(|(a, b)| a * b).sum();
                let right = answer.outputs.len() == 2
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

fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

/// `clients` clients × `per_client` tensor requests at `socket`; prints
/// the figures and returns the rate, or `None` if a reply was wrong.
async fn generate_round(
    socket: &Arc<PathBuf>,
    what: &str,
    clients: usize,
    per_client: usize,
) -> Option<f64> {
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|i| tokio::spawn(requests(socket.clone(), i, per_client)))
        .collect();
    let mut tally = Tally::default();
    for task in tasks {
        tally.add(task.await.unwrap());
    }
    let mut rate = 0.0;
    tally
        .print_rate(
            &format!("{what}: generate (tiny tensor model), {clients} clients x {per_client}"),
            (clients * per_client) as u64,
            started.elapsed(),
            &mut rate,
        )
        .then_some(rate)
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
        models.join("tiny-tensor.pt").exists(),
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
    let socket = dir.path().join("gpuctld.sock");
    let config = dir.path().join("gpuctld.toml");
    let slots = connections + clients + 16;
    let extra = std::env::var("GPUCTL_BENCH_MODEL").unwrap_or_default();
    std::fs::write(
        &config,
        format!(
            "model_root = \"{}\"\n[daemon]\nmax_connections = {slots}\nmax_connections_per_uid = {slots}\nlog_level = \"warn\"\n[policy]\nqueue_max = {}\n[gpu]\nbackend = \"none\"\n[models.ten]\npath = \"tiny-tensor.pt\"\nkind = \"tensor\"\nthreads = 1\n{extra}\n",
            models.display(),
            clients * 2
        ),
    )
    .unwrap();
    let mut daemon = Command::new(&gpuctld)
        .arg("--config")
        .arg(&config)
        .arg("--socket")
        .arg(&socket)
        .env_remove("RUST_LOG")
        .env("STATE_DIRECTORY", dir.path().join("state"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start gpuctld");
    let relay_socket = dir.path().join("relay.sock");
    let mut relay = Command::new(std::env::current_exe().unwrap())
        .arg("relay-serve")
        .arg(&relay_socket)
        .arg(&worker)
        .arg(models.join("tiny-tensor.pt"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the relay");
    let pid = daemon.id();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "load: gpuctld ({profile} build), {cores} cores, bench and daemon on the same machine; [models.ten] extra: {extra:?}"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let socket = Arc::new(socket);
    let relay_socket = Arc::new(relay_socket);
    let ok = runtime.block_on(async {
        wait_for(&socket, "gpuctld").await;
        wait_for(&relay_socket, "the relay").await;
        let mut pinged = true;
        if connections > 0 {
            let started = Instant::now();
            let tasks: Vec<_> = (0..connections)
                .map(|_| tokio::spawn(pings(socket.clone(), per_connection)))
                .collect();
            let mut tally = Tally::default();
            for task in tasks {
                tally.add(task.await.unwrap());
            }
            pinged = tally.print(
                &format!("ping, {connections} connections x {per_connection}"),
                (connections * per_connection) as u64,
                started.elapsed(),
            );
        }

        // The model's load is not what is measured.
        let warm = Client::connect(socket.as_path()).await.unwrap();
        warm.call(Request::Load(gpuctl_protocol::LoadRequest {
            model: "ten".into(),
            keep_alive: None,
        }))
        .await
        .unwrap();
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        let mut generated = true;
        for round in 1..=rounds {
            for (socket, what, rates) in [
                (&socket, "gpuctld", &mut ours),
                (&relay_socket, "relay", &mut theirs),
            ] {
                match generate_round(socket, &format!("round {round}, {what}"), clients, per_client)
                    .await
                {
                    Some(rate) => rates.push(rate),
                    None => generated = false,
                }
            }
        }
        let (ours, theirs) = (median(&mut ours), median(&mut theirs));
        println!(
            "generate: gpuctld {ours:.0} replies/s, relay {theirs:.0} replies/s (medians of {rounds} rounds): {:.2} of the relay's rate",
            ours / theirs.max(f64::MIN_POSITIVE)
        );
        pinged && generated
    });
    println!("gpuctld peak RSS: {:.1} MiB", peak_rss_mib(pid));
    let _ = daemon.kill();
    let _ = daemon.wait();
    let _ = relay.kill();
    let _ = relay.wait();
    if !ok {
        eprintln!("load: replies were lost, wrong or errors");
        std::process::exit(1);
    }
}
