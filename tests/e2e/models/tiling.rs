//! Large images in tiles: same result as untiled, progress, cancellation, timeouts, out-of-memory back-off.

use super::*;

#[test]
fn an_image_larger_than_its_tile_is_processed_in_tiles_with_the_same_result() {
    let tiled_config = config("", "").replace(
        "scale = 2\n",
        "scale = 2\ntile = 80\noverlap = 32\nbatch = 2\n",
    );
    let plain = Daemon::start(&config("", ""));
    let tiled = Daemon::start(&tiled_config);
    let image = WireTensor::new(
        DType::U8,
        vec![1, 3, 90, 130],
        (0..3 * 90 * 130).map(|i| ((i * 31) % 251) as u8).collect(),
    )
    .unwrap();
    let upscale = |daemon: &Daemon| {
        let image = image.clone();
        runtime().block_on(async {
            let client = Client::connect(&daemon.socket).await.unwrap();
            let answer = generate(
                &client,
                GenerateRequest {
                    input: Some(image),
                    ..request("up")
                },
            )
            .await
            .unwrap();
            answer.outputs.into_iter().next().unwrap()
        })
    };
    let (whole, pieces) = (upscale(&plain), upscale(&tiled));
    assert_eq!(pieces.shape, vec![1, 180, 260, 3]);
    assert_eq!(pieces.shape, whole.shape);
    let largest = whole
        .data
        .iter()
        .zip(&pieces.data)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    assert!(largest <= 1, "tiled and untiled pixels differ by {largest}");
}

#[test]
fn tiled_requests_report_progress_per_batch() {
    let tiled_config = config("", "").replace(
        "scale = 2\n",
        "scale = 2\ntile = 80\noverlap = 32\nbatch = 2\n",
    );
    let daemon = Daemon::start(&tiled_config);
    let image = WireTensor::new(DType::U8, vec![1, 3, 90, 130], vec![77; 3 * 90 * 130]).unwrap();
    let events = runtime().block_on(async {
        let client = Client::connect(&daemon.socket).await.unwrap();
        let mut call = client
            .start(Request::Generate(GenerateRequest {
                input: Some(image),
                ..request("up")
            }))
            .await
            .unwrap();
        let mut events = Vec::new();
        while let Some(event) = call.event().await {
            if let gpuctl_protocol::Event::Progress(progress) = event {
                events.push(progress);
            }
        }
        assert!(matches!(call.response().await, Ok(Response::Generate(_))));
        events
    });
    // 90x130 in tiles of 80: 2 rows x 3 columns, 2 per forward.
    let seen: Vec<(u64, u64)> = events.iter().map(|e| (e.done, e.total)).collect();
    assert_eq!(seen, [(2, 6), (4, 6), (6, 6)]);
    assert_eq!(events[0].message, "tile 2/6");
    assert!(events
        .windows(2)
        .all(|w| w[0].elapsed_ms <= w[1].elapsed_ms));
    assert_eq!(events[2].eta_ms, Some(0));
}

/// `up` in 64 tiles of 48 (overlap 16), one per forward: a few seconds of work.
fn many_tiles() -> (String, GenerateRequest) {
    let config = config("", "").replace(
        "scale = 2\n",
        "scale = 2\ntile = 48\noverlap = 16\nbatch = 1\n",
    );
    let image = WireTensor::new(DType::U8, vec![1, 3, 256, 256], vec![90; 3 * 256 * 256]).unwrap();
    let request = GenerateRequest {
        input: Some(image),
        ..request("up")
    };
    (config, request)
}

#[test]
fn a_cancelled_or_abandoned_job_stops_at_a_batch_boundary_and_the_model_stays() {
    let (config, job) = many_tiles();
    let daemon = Daemon::start(&config);
    runtime().block_on(async {
        let client = Client::connect(&daemon.socket).await.unwrap();
        // Cancel { id } after the first batch.
        let mut call = client.start(Request::Generate(job.clone())).await.unwrap();
        loop {
            match call.event().await {
                Some(gpuctl_protocol::Event::Progress(_)) => break,
                Some(_) => {}
                None => panic!("no progress"),
            }
        }
        let pid = model_status(&daemon, "up")["pid"].as_u64().unwrap();
        let cancel = Request::Cancel(gpuctl_protocol::CancelRequest { id: call.id() });
        match client.call(cancel).await.unwrap() {
            Response::Cancel(answer) => assert!(answer.cancelled),
            other => panic!("{other:?}"),
        }
        let error = daemon_error(call.response().await);
        assert_eq!(error.code, ErrorCode::Cancelled, "{}", error.message);
        wait_until("the job to stop", Duration::from_secs(30), || {
            daemon
                .log_text()
                .contains("job of a client that left has stopped")
        });
        assert!(
            daemon
                .log_text()
                .contains("the request was cancelled after"),
            "{}",
            daemon.log_text()
        );
        assert_eq!(model_status(&daemon, "up")["in_flight"], 0);
        assert_eq!(
            model_status(&daemon, "up")["pid"],
            pid,
            "the model stays loaded"
        );

        // A client that disconnects mid-job.
        let leaving = Client::connect(&daemon.socket).await.unwrap();
        let mut call = leaving.start(Request::Generate(job.clone())).await.unwrap();
        while !matches!(
            call.event().await,
            Some(gpuctl_protocol::Event::Progress(_))
        ) {}
        drop(call);
        drop(leaving);
        wait_until("the abandoned job to stop", Duration::from_secs(30), || {
            daemon
                .log_text()
                .matches("job of a client that left has stopped")
                .count()
                == 2
        });
        // The model serves the next request, in the same worker.
        let small = GenerateRequest {
            input: Some(WireTensor::new(DType::U8, vec![1, 3, 8, 8], vec![1; 192]).unwrap()),
            ..request("up")
        };
        generate(&client, small).await.unwrap();
        assert_eq!(model_status(&daemon, "up")["pid"], pid);
        assert_eq!(model_status(&daemon, "up")["loads"], 1);
    });
}

#[test]
fn a_request_past_its_timeout_is_stopped_cleanly() {
    let (config, job) = many_tiles();
    let config = config.replace("[policy]\n", "[policy]\nrequest_timeout = \"30m\"\n");
    let daemon = Daemon::start(&config);
    runtime().block_on(async {
        let client = Client::connect(&daemon.socket).await.unwrap();
        // Warm up, so that the limit falls inside the tiles, not the load.
        let small = GenerateRequest {
            input: Some(WireTensor::new(DType::U8, vec![1, 3, 8, 8], vec![1; 192]).unwrap()),
            ..request("up")
        };
        generate(&client, small.clone()).await.unwrap();
        let started = std::time::Instant::now();
        let error = daemon_error(
            generate(
                &client,
                GenerateRequest {
                    timeout_ms: Some(300),
                    ..job
                },
            )
            .await,
        );
        assert_eq!(error.code, ErrorCode::Timeout, "{}", error.message);
        assert!(
            error.message.contains("did not finish within 300ms"),
            "{}",
            error.message
        );
        assert!(started.elapsed() < Duration::from_secs(10));
        wait_until("the job to stop", Duration::from_secs(30), || {
            daemon
                .log_text()
                .contains("the request was cancelled after")
        });
        // Nothing else was disturbed.
        generate(&client, small).await.unwrap();
        assert_eq!(model_status(&daemon, "up")["loads"], 1);
    });
}

#[test]
fn out_of_memory_back_off_is_reported_in_the_response() {
    let faulty = format!(
        "{}\n[models.faulty]\npath = \"tiny-faulty.pt\"\nkind = \"image\"\nscale = 2\ntile = 128\noverlap = 16\nbatch = 4\n",
        config("", "")
    );
    let daemon = Daemon::start(&faulty);
    let answer = runtime().block_on(async {
        let client = Client::connect(&daemon.socket).await.unwrap();
        let image =
            WireTensor::new(DType::U8, vec![1, 3, 150, 200], vec![9; 3 * 150 * 200]).unwrap();
        generate(
            &client,
            GenerateRequest {
                input: Some(image),
                ..request("faulty")
            },
        )
        .await
        .unwrap()
    });
    assert_eq!(answer.outputs[0].shape, vec![1, 300, 400, 3]);
    assert!(answer.outputs[0].data.iter().all(|v| *v == 9));
    assert_eq!(answer.notes.len(), 3, "{:?}", answer.notes);
    assert!(
        answer.notes[2].contains("tile 128 -> 64"),
        "{:?}",
        answer.notes
    );
}
