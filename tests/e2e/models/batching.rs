//! Keeping a worker fed and dynamic batching: short jobs sent ahead (and
//! run by the next worker when one dies before starting them, or stopped
//! without killing it), requests of one shape run as one forward with each
//! client getting exactly its own rows, a failing batch failing each, an
//! out-of-memory batch run again in halves.

use std::time::Instant;

use gpuctl_protocol::GenerateResponse;

use super::*;

/// `tiny-spin`'s request: `x + 1` after `spins` rounds of busy work.
fn spin(x: f32, spins: i64) -> GenerateRequest {
    GenerateRequest {
        inputs: vec![
            f32_tensor(&[1, 4], |i| x + i as f32),
            WireTensor::new(DType::I64, vec![], spins.to_le_bytes().to_vec()).unwrap(),
        ],
        ..request("spin")
    }
}

fn f32s(tensor: &WireTensor) -> Vec<f32> {
    tensor
        .data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn spun_right(answer: &GenerateResponse, x: f32) -> bool {
    f32s(&answer.outputs[0]) == (0..4).map(|i| x + i as f32 + 1.0).collect::<Vec<_>>()
}

fn spin_daemon(policy: &str) -> Daemon {
    Daemon::start(&config(
        policy,
        "\n[models.spin]\npath = \"tiny-spin.pt\"\nkind = \"tensor\"\nthreads = 1\n",
    ))
}

/// Warms `spin` up with short jobs, so that its jobs count as short
/// (TorchScript's first runs are slower: it profiles them).
async fn warm(client: &Client) {
    for _ in 0..3 {
        let answer = generate(client, spin(0.0, 0)).await.unwrap();
        assert!(spun_right(&answer, 0.0));
    }
}

#[test]
fn short_jobs_wait_on_the_worker_and_those_it_never_started_run_on_the_next_one() {
    let daemon = spin_daemon("");
    runtime().block_on(async {
        let client = Client::connect(&daemon.socket).await.unwrap();
        warm(&client).await;
        let long = client
            .start(Request::Generate(spin(100.0, 20_000_000)))
            .await
            .unwrap();
        wait_until("the long job to run", Duration::from_secs(10), || {
            model_status(&daemon, "spin")["in_flight"] == 1
        });
        let mut short = Vec::new();
        for x in 1..=8 {
            short.push((
                x as f32,
                client
                    .start(Request::Generate(spin(x as f32, 0)))
                    .await
                    .unwrap(),
            ));
        }
        // Handed to the worker behind the long one, not left in the queue.
        wait_until(
            "the short jobs to reach the worker",
            Duration::from_secs(10),
            || {
                let status = model_status(&daemon, "spin");
                status["in_flight"] == 9 && status["queued"] == 0
            },
        );
        let pid = model_status(&daemon, "spin")["pid"].as_i64().unwrap() as i32;
        // SAFETY: kill has no memory-safety preconditions.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
        let error = daemon_error(long.response().await);
        assert!(
            error
                .message
                .contains(&format!("its worker (pid {pid}) died")),
            "{}",
            error.message
        );
        // The others had not started: the next worker runs them.
        for (x, call) in short {
            let Response::Generate(answer) = call.response().await.unwrap() else {
                panic!("not a generate answer");
            };
            assert!(spun_right(&answer, x), "{x}: {:?}", answer.outputs);
        }
        assert_eq!(model_status(&daemon, "spin")["loads"], 2);
    });
    daemon.assert_serving();
}

#[test]
fn a_job_stopped_while_it_waits_behind_another_does_not_kill_the_worker() {
    let daemon = spin_daemon("cancel_grace = \"1s\"");
    runtime().block_on(async {
        let client = Client::connect(&daemon.socket).await.unwrap();
        warm(&client).await;
        let pid = model_status(&daemon, "spin")["pid"].clone();
        // About three seconds of work, longer than the grace.
        let long = client
            .start(Request::Generate(spin(100.0, 2_500_000)))
            .await
            .unwrap();
        wait_until("the long job to run", Duration::from_secs(10), || {
            model_status(&daemon, "spin")["in_flight"] == 1
        });
        let started = Instant::now();
        let gone = generate(
            &client,
            GenerateRequest {
                timeout_ms: Some(200),
                ..spin(1.0, 0)
            },
        )
        .await;
        assert_eq!(daemon_error(gone).code, ErrorCode::Timeout);
        let Response::Generate(answer) = long.response().await.unwrap() else {
            panic!("not a generate answer");
        };
        assert!(spun_right(&answer, 100.0));
        assert!(
            started.elapsed() > Duration::from_millis(1500),
            "the long job outlasted the grace ({:?}), so the test means something",
            started.elapsed()
        );
        let status = model_status(&daemon, "spin");
        assert_eq!(status["pid"], pid, "the same worker: {status}");
        assert_eq!(status["loads"], 1, "{status}");
        assert!(status["last_error"].is_null(), "{status}");
    });
    daemon.assert_serving();
}

/// A `[1,3,h,w]` u8 image, different for each `seed`.
fn picture(seed: u8, h: u64, w: u64) -> WireTensor {
    let bytes = (0..3 * h * w)
        .map(|i| ((i * 7 + u64::from(seed) * 31) % 251) as u8)
        .collect();
    WireTensor::new(DType::U8, vec![1, 3, h, w], bytes).unwrap()
}

fn image_request(model: &str, input: WireTensor) -> GenerateRequest {
    GenerateRequest {
        input: Some(input),
        ..request(model)
    }
}

/// Starts every request at once and waits for all the answers.
async fn all_at_once(
    client: &Client,
    requests: Vec<GenerateRequest>,
) -> Vec<Result<Response, ClientError>> {
    let mut calls = Vec::new();
    for request in requests {
        calls.push(client.start(Request::Generate(request)).await.unwrap());
    }
    let mut answers = Vec::new();
    for call in calls {
        answers.push(call.response().await);
    }
    answers
}

fn answered(result: Result<Response, ClientError>) -> GenerateResponse {
    match result {
        Ok(Response::Generate(answer)) => answer,
        other => panic!("expected an answer, got {other:?}"),
    }
}

fn batched(answer: &GenerateResponse) -> bool {
    answer
        .notes
        .iter()
        .any(|n| n.starts_with("ran in a batch of"))
}

#[test]
fn batched_images_are_bit_identical_to_images_run_alone() {
    let extra = "\n[models.up8]\npath = \"waifu2x-upconv7-x2.pt\"\nkind = \"image\"\nscale = 2\nmax_batch = 8\nbatch_window = \"300ms\"\n";
    let daemon = Daemon::start(&config("", extra));
    runtime().block_on(async {
        let client = Client::connect(&daemon.socket).await.unwrap();
        let pictures: Vec<WireTensor> = (0..6).map(|seed| picture(seed, 24, 32)).collect();
        let together = all_at_once(
            &client,
            pictures
                .iter()
                .map(|p| image_request("up8", p.clone()))
                .collect(),
        )
        .await;
        let together: Vec<GenerateResponse> = together.into_iter().map(answered).collect();
        assert!(
            together.iter().filter(|a| batched(a)).count() >= 2,
            "at least some ran together: {:?}",
            together.iter().map(|a| &a.notes).collect::<Vec<_>>()
        );
        for (picture, batched) in pictures.iter().zip(&together) {
            let alone = generate(&client, image_request("up", picture.clone()))
                .await
                .unwrap();
            assert!(alone.notes.is_empty(), "{:?}", alone.notes);
            assert_eq!(batched.outputs.len(), 1);
            assert_eq!(batched.outputs[0].shape, alone.outputs[0].shape);
            assert!(
                batched.outputs[0].data == alone.outputs[0].data,
                "a batched image differs from the same image run alone"
            );
        }
    });
    daemon.assert_serving();
}

#[test]
fn batched_tensor_requests_each_get_their_own_rows() {
    let extra = "\n[models.rows]\npath = \"tiny-rows.pt\"\nkind = \"tensor\"\nthreads = 1\nmax_batch = 8\nbatch_window = \"300ms\"\n";
    let daemon = Daemon::start(&config("", extra));
    runtime().block_on(async {
        let client = Client::connect(&daemon.socket).await.unwrap();
        // Requests of 1, 2 and 3 rows of 5 values.
        let shapes: Vec<u64> = vec![1, 2, 3, 1, 2, 1];
        let inputs: Vec<(WireTensor, WireTensor)> = shapes
            .iter()
            .enumerate()
            .map(|(k, &rows)| {
                (
                    f32_tensor(&[rows, 5], |i| (k * 100 + i) as f32),
                    f32_tensor(&[rows, 5], |i| (i % 5) as f32 * 0.5),
                )
            })
            .collect();
        let answers = all_at_once(
            &client,
            inputs
                .iter()
                .map(|(a, b)| GenerateRequest {
                    inputs: vec![a.clone(), b.clone()],
                    ..request("rows")
                })
                .collect(),
        )
        .await;
        let mut together = 0;
        for ((a, b), answer) in inputs.iter().zip(answers) {
            let answer = answered(answer);
            together += usize::from(batched(&answer));
            let (a, b) = (f32s(a), f32s(b));
            let want: Vec<f32> = a.iter().zip(&b).map(|(a, b)| a * 2.0 + b).collect();
            let sums: Vec<f32> = a
                .chunks(5)
                .zip(b.chunks(5))
                .map(|(a, b)| a.iter().zip(b).map(|(a, b)| a * b).sum())
                .collect();
            assert_eq!(answer.outputs[0].shape, [a.len() as u64 / 5, 5]);
            assert_eq!(f32s(&answer.outputs[0]), want);
            assert_eq!(answer.outputs[1].shape, [a.len() as u64 / 5]);
            assert_eq!(f32s(&answer.outputs[1]), sums);
        }
        assert!(together >= 2, "some requests ran together");
    });
    daemon.assert_serving();
}

/// tiny-faulty: nearest ×2, "out of memory" for more than 2 images at
/// once, a lasting error for an image holding a white pixel.
fn faulty_daemon(max_batch: u32) -> Daemon {
    let extra = format!(
        "\n[models.faulty]\npath = \"tiny-faulty.pt\"\nkind = \"image\"\nscale = 2\nthreads = 1\nmax_batch = {max_batch}\nbatch_window = \"300ms\"\n"
    );
    Daemon::start(&config("", &extra))
}

/// Nearest ×2 of a `[1,3,h,w]` u8 image, as rows of RGB pixels.
fn nearest_x2_rows(image: &WireTensor) -> Vec<u8> {
    let (h, w) = (image.shape[2] as usize, image.shape[3] as usize);
    let mut out = Vec::with_capacity(4 * h * w * 3);
    for y in 0..2 * h {
        for x in 0..2 * w {
            for c in 0..3 {
                out.push(image.data[c * h * w + (y / 2) * w + x / 2]);
            }
        }
    }
    out
}

#[test]
fn a_batch_out_of_memory_runs_again_in_halves() {
    let daemon = faulty_daemon(8);
    runtime().block_on(async {
        let client = Client::connect(&daemon.socket).await.unwrap();
        // Loaded first, so that all eight wait in one window.
        generate(&client, image_request("faulty", picture(0, 8, 8)))
            .await
            .unwrap();
        let pictures: Vec<WireTensor> = (1..=8).map(|seed| picture(seed, 8, 8)).collect();
        let answers = all_at_once(
            &client,
            pictures
                .iter()
                .map(|p| image_request("faulty", p.clone()))
                .collect(),
        )
        .await;
        let mut halved = 0;
        for (picture, answer) in pictures.iter().zip(answers) {
            let answer = answered(answer);
            halved += usize::from(
                answer
                    .notes
                    .iter()
                    .any(|n| n.starts_with("out of memory in a batch of")),
            );
            assert_eq!(answer.outputs[0].shape, [1, 16, 16, 3]);
            assert_eq!(answer.outputs[0].data, nearest_x2_rows(picture));
        }
        assert!(
            halved >= 3,
            "a batch of more than 2 ran out of memory and was halved"
        );
    });
    daemon.assert_serving();
}

#[test]
fn a_failing_batch_fails_each_of_its_requests_with_the_error() {
    let daemon = faulty_daemon(2);
    runtime().block_on(async {
        let client = Client::connect(&daemon.socket).await.unwrap();
        generate(&client, image_request("faulty", picture(0, 8, 8)))
            .await
            .unwrap();
        let mut white = picture(1, 8, 8);
        white.data[5] = 255;
        let answers = all_at_once(
            &client,
            vec![
                image_request("faulty", picture(2, 8, 8)),
                image_request("faulty", white),
            ],
        )
        .await;
        for answer in answers {
            let error = daemon_error(answer);
            assert!(error.message.contains("model faulty"), "{}", error.message);
            assert!(error.message.contains("bad pixel"), "{}", error.message);
        }
        // Alone, the good one is fine.
        let alone = generate(&client, image_request("faulty", picture(2, 8, 8)))
            .await
            .unwrap();
        assert_eq!(alone.outputs[0].data, nearest_x2_rows(&picture(2, 8, 8)));
    });
    daemon.assert_serving();
}

#[test]
fn outputs_that_are_not_per_row_cannot_be_batched_and_say_so() {
    // tiny-tensor sums everything into one number: not a batch dimension.
    let extra = "max_batch = 4\nbatch_window = \"300ms\"\n";
    let daemon = Daemon::start(&config("", extra));
    runtime().block_on(async {
        let client = Client::connect(&daemon.socket).await.unwrap();
        generate(&client, tensor_request()).await.unwrap();
        let answers = all_at_once(&client, vec![tensor_request(), tensor_request()]).await;
        for answer in answers {
            let error = daemon_error(answer);
            assert!(
                error
                    .message
                    .contains("model ten: its output 1 has shape []"),
                "{}",
                error.message
            );
            assert!(error.message.contains("max_batch = 1"), "{}", error.message);
        }
    });
    daemon.assert_serving();
}

/// How many spins take about `wanted` on this machine, measured.
async fn spins_lasting(client: &Client, wanted: Duration) -> i64 {
    const PROBE: i64 = 20_000;
    let started = Instant::now();
    generate(client, spin(0.0, PROBE)).await.unwrap();
    let took = started.elapsed().as_secs_f64();
    ((PROBE as f64 * wanted.as_secs_f64() / took) as i64).max(1)
}

/// Sends `count` spin requests of `spins` each at once; how many times
/// each heard its place in the queue, in order, all answered right.
async fn places_heard(client: &Client, count: usize, spins: i64) -> Vec<usize> {
    let mut calls = Vec::new();
    for x in 1..=count {
        calls.push((
            x as f32,
            client
                .start(Request::Generate(spin(x as f32, spins)))
                .await
                .unwrap(),
        ));
    }
    let mut heard = Vec::new();
    for (x, mut call) in calls {
        let mut places = 0;
        while let Some(event) = call.event().await {
            places += usize::from(matches!(event, gpuctl_protocol::Event::Queued(_)));
        }
        let Response::Generate(answer) = call.response().await.unwrap() else {
            panic!("not a generate answer");
        };
        assert!(spun_right(&answer, x));
        heard.push(places);
    }
    heard
}

#[test]
fn clients_waiting_for_short_jobs_hear_their_place_once_and_only_when_the_wait_shows() {
    let daemon = spin_daemon("queue_max = 500");
    runtime().block_on(async {
        let client = Client::connect(&daemon.socket).await.unwrap();
        warm(&client).await;
        // Behind a job of 0.3 s, more than the worker holds (65): the
        // rest queue, but jobs of well under a millisecond each are done
        // before a client could show its place (policy::QUEUE_NEWS_MS).
        let long = spins_lasting(&client, Duration::from_millis(300)).await;
        let spins = spins_lasting(&client, Duration::from_millis(3)).await;
        // The model's recent jobs short again after the measuring.
        for _ in 0..4 {
            generate(&client, spin(0.0, 0)).await.unwrap();
        }
        let mut first = client
            .start(Request::Generate(spin(-1.0, long)))
            .await
            .unwrap();
        let heard = places_heard(&client, 300, 0).await;
        assert!(heard.iter().all(|&n| n == 0), "nobody told: {heard:?}");
        while first.event().await.is_some() {}
        first.response().await.unwrap();
        // Jobs of about 3 ms (short: at most 10): the 167th waiting and
        // those behind wait 0.5 s or more and are told, once.
        let heard = places_heard(&client, 400, spins).await;
        assert!(heard.contains(&1), "those far back were told: {heard:?}");
        assert!(heard.iter().all(|&n| n <= 1), "once each: {heard:?}");
        assert_eq!(heard[0], 0, "the first ran at once");
    });
    daemon.assert_serving();
}
