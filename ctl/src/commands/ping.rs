use std::time::{Duration, Instant};

use gpuctl_protocol::{Client, ClientError, PingRequest, Request};
use serde::Serialize;

use crate::Output;

#[derive(Serialize)]
struct PingReport {
    socket: String,
    daemon_version: String,
    protocol: String,
    round_trips_ms: Vec<f64>,
}

pub async fn run(client: &Client, count: u32, output: Output) -> Result<(), ClientError> {
    let mut round_trips = Vec::new();
    for n in 0..count.max(1) {
        if n > 0 {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let start = Instant::now();
        client.call(Request::Ping(PingRequest {})).await?;
        let ms = start.elapsed().as_secs_f64() * 1000.0;
        round_trips.push(ms);
        if output == Output::Human {
            crate::emit(&format!(
                "pong from gpuctld {} at {}: time={ms:.3} ms\n",
                client.welcome().daemon_version,
                client.socket().display()
            ));
        }
    }
    if output == Output::Json {
        let welcome = client.welcome();
        crate::print_json(&PingReport {
            socket: client.socket().display().to_string(),
            daemon_version: welcome.daemon_version.clone(),
            protocol: welcome.protocol.to_string(),
            round_trips_ms: round_trips,
        });
    }
    Ok(())
}
