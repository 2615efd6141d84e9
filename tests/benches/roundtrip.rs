//! Warm round trips through the Rust client, for comparison with other
//! clients (python/bench/bench_client.py runs it between its own rounds):
//! one connection, `WARMUP` untimed calls, then `COUNT` timed ones, one at a
//! time. Prints one JSON line: {"what", "count", "p50_us", "p99_us", "mean_us"}.
//!
//! `roundtrip SOCKET ping COUNT` — `Ping`;
//! `roundtrip SOCKET image COUNT MODEL SIZE` — a SIZE×SIZE RGB8 image (rows of
//! pixels) through the image model MODEL, its output checked for its size.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use gpuctl_protocol::{Client, DType, GenerateRequest, PingRequest, Request, Response, WireTensor};

const WARMUP: usize = 50;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    if args.len() < 3 {
        eprintln!("usage: roundtrip SOCKET ping COUNT | roundtrip SOCKET image COUNT MODEL SIZE");
        std::process::exit(2);
    }
    let socket = args[0].clone();
    let count: usize = args[2].parse().expect("COUNT");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let request = match args[1].as_str() {
        "ping" => Request::Ping(PingRequest {}),
        "image" => {
            let model = args.get(3).expect("MODEL").clone();
            let size: u64 = args.get(4).expect("SIZE").parse().expect("SIZE");
            let pixels = vec![128u8; (size * size * 3) as usize];
            let input = WireTensor::new(DType::U8, vec![1, size, size, 3], pixels).expect("tensor");
            let mut generate = GenerateRequest::new(model);
            generate.input = Some(input);
            Request::Generate(generate)
        }
        other => panic!("unknown mode {other}"),
    };
    let times = runtime.block_on(async {
        let client = Client::connect(&socket).await.expect("connect");
        let mut times = Vec::with_capacity(count);
        for i in 0..WARMUP + count {
            let started = Instant::now();
            match client.call(request.clone()).await.expect("call") {
                Response::Ping(_) => {}
                Response::Generate(answer) => assert_eq!(answer.outputs.len(), 1),
                other => panic!("unexpected answer {other:?}"),
            }
            if i >= WARMUP {
                times.push(started.elapsed());
            }
        }
        times
    });
    print_json(&args[1], times);
}

fn print_json(what: &str, mut times: Vec<Duration>) {
    times.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let at = |q: f64| us(times[((times.len() as f64 * q) as usize).min(times.len() - 1)]);
    let mean = times.iter().map(|d| us(*d)).sum::<f64>() / times.len() as f64;
    println!(
        "{{\"what\": \"{what}\", \"count\": {}, \"p50_us\": {:.1}, \"p99_us\": {:.1}, \"mean_us\": {:.1}}}",
        times.len(),
        at(0.5),
        at(0.99),
        mean
    );
}
