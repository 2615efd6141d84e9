//! Each kind's contract through real workers, and one load shared by concurrent first requests.

use super::*;

#[test]
fn lazy_load_shared_by_concurrent_first_requests() {
    let daemon = Daemon::start(&config("", ""));
    for name in ["gen", "ten", "up"] {
        assert_eq!(
            model_status(&daemon, name)["state"],
            "Unloaded",
            "nothing is loaded at start-up"
        );
    }
    runtime().block_on(async {
        let client = Client::connect(&daemon.socket).await.unwrap();
        // All four are on the wire before the first load can have finished.
        let mut calls = Vec::new();
        for _ in 0..4 {
            calls.push(
                client
                    .start(Request::Generate(tensor_request()))
                    .await
                    .unwrap(),
            );
        }
        for call in calls {
            let Ok(Response::Generate(response)) = call.response().await else {
                panic!("a request failed")
            };
            assert_eq!(response.device, "cpu");
            assert_eq!(response.outputs.len(), 2);
            let expected: Vec<u8> = [1.0f32, 3.0].iter().flat_map(|v| v.to_le_bytes()).collect();
            assert_eq!(response.outputs[0].data, expected);
            assert!(
                response.load_ms.is_some(),
                "each of them waited for the one load"
            );
        }
    });
    let ten = model_status(&daemon, "ten");
    assert_eq!(
        ten["loads"], 1,
        "four concurrent first requests, one load: {ten}"
    );
    assert_eq!(ten["state"], "Ready");
    assert!(pid_alive(ten["pid"].as_u64().unwrap()));
}

#[test]
fn image_generate_and_tensor_contracts() {
    let daemon = Daemon::start(&config("", ""));
    runtime().block_on(async {
        let client = Client::connect(&daemon.socket).await.unwrap();
        let pixels = WireTensor::new(
            DType::U8,
            vec![1, 3, 12, 10],
            (0..360).map(|i| (i % 256) as u8).collect(),
        )
        .unwrap();
        let up = generate(
            &client,
            GenerateRequest {
                input: Some(pixels.clone()),
                ..request("up")
            },
        )
        .await
        .unwrap();
        assert_eq!(
            up.outputs[0].shape,
            vec![1, 24, 20, 3],
            "rows of RGB8 pixels"
        );
        assert!(
            up.load_ms.is_some(),
            "the first request waited for the load"
        );
        // Clients before protocol 1.2 get the same pixels planar.
        let mut old = RawClient::speaking(
            &daemon.socket,
            gpuctl_protocol::ProtocolVersion { major: 1, minor: 1 },
        );
        old.request(
            1,
            Request::Generate(GenerateRequest {
                input: Some(pixels.clone()),
                ..request("up")
            }),
        );
        let planar = loop {
            match old.receive() {
                Some(gpuctl_protocol::DaemonMessage::Response {
                    response: Response::Generate(answer),
                    ..
                }) => break answer.outputs[0].clone(),
                Some(gpuctl_protocol::DaemonMessage::Event { .. }) => {}
                other => panic!("unexpected {other:?}"),
            }
        };
        assert_eq!(planar.shape, vec![1, 3, 24, 20]);
        let plane = 24 * 20;
        for (i, pixel) in up.outputs[0].data.chunks_exact(3).enumerate() {
            for (c, value) in pixel.iter().enumerate() {
                assert_eq!(planar.data[c * plane + i], *value, "pixel {i}, channel {c}");
            }
        }
        // Since 1.4 the input may come as rows of pixels too, as image
        // files and numpy hold it: the same picture, the same output.
        let [_, _, h, w] = pixels.shape[..] else {
            panic!("{:?}", pixels.shape)
        };
        let plane_in = (h * w) as usize;
        let mut row_data = vec![0u8; pixels.data.len()];
        for i in 0..plane_in {
            for c in 0..3 {
                row_data[i * 3 + c] = pixels.data[c * plane_in + i];
            }
        }
        let rows = WireTensor::new(DType::U8, vec![1, h, w, 3], row_data).unwrap();
        let from_rows = generate(
            &client,
            GenerateRequest {
                input: Some(rows.clone()),
                ..request("up")
            },
        )
        .await
        .unwrap();
        assert_eq!(
            from_rows.outputs, up.outputs,
            "rows in, the same pixels out"
        );
        // A client of 1.3 sends planes only: rows from it are named wrong.
        let mut older = RawClient::speaking(
            &daemon.socket,
            gpuctl_protocol::ProtocolVersion { major: 1, minor: 3 },
        );
        older.request(
            1,
            Request::Generate(GenerateRequest {
                input: Some(rows),
                ..request("up")
            }),
        );
        match older.receive() {
            Some(gpuctl_protocol::DaemonMessage::Error { error, .. }) => assert!(
                error
                    .message
                    .contains("must be [N,3,H,W] (planes) or [N,H,W,3]"),
                "{}",
                error.message
            ),
            other => panic!("unexpected {other:?}"),
        }
        let again = generate(
            &client,
            GenerateRequest {
                input: Some(f32_tensor(&[1, 3, 4, 4], |_| 0.5)),
                ..request("up")
            },
        )
        .await
        .unwrap();
        assert_eq!(again.load_ms, None, "the second found it loaded");

        let seeded = GenerateRequest {
            prompt: "a red fox".into(),
            seed: Some(7),
            ..request("gen")
        };
        let first = generate(&client, seeded.clone()).await.unwrap();
        assert_eq!(first.seed, Some(7));
        assert_eq!(
            first.outputs[0].shape,
            vec![1, 48, 64, 3],
            "size from the model's defaults"
        );
        assert_eq!(
            generate(&client, seeded.clone()).await.unwrap().outputs,
            first.outputs,
            "a seed reproduces an image"
        );
        let other = generate(
            &client,
            GenerateRequest {
                seed: Some(8),
                ..seeded.clone()
            },
        )
        .await
        .unwrap();
        assert_ne!(other.outputs, first.outputs);
        let unseeded = generate(
            &client,
            GenerateRequest {
                prompt: "x".into(),
                size: Some((16, 8)),
                ..request("gen")
            },
        )
        .await
        .unwrap();
        assert!(
            unseeded.seed.is_some(),
            "a random seed is chosen and reported"
        );
        assert_eq!(unseeded.outputs[0].shape, vec![1, 8, 16, 3]);

        let error = daemon_error(
            generate(
                &client,
                GenerateRequest {
                    size: Some((10, 10)),
                    ..request("gen")
                },
            )
            .await,
        );
        assert_eq!(error.code, ErrorCode::InvalidRequest);
        assert!(
            error
                .message
                .contains("size 10x10 must be positive multiples of 8"),
            "{}",
            error.message
        );
        let error = daemon_error(generate(&client, request("up")).await);
        assert!(
            error
                .message
                .contains("model up: is an image model: send an input image"),
            "{}",
            error.message
        );
        let wrong = WireTensor::new(DType::F32, vec![1, 1, 4, 4], vec![0; 64]).unwrap();
        let error = daemon_error(
            generate(
                &client,
                GenerateRequest {
                    input: Some(wrong),
                    ..request("up")
                },
            )
            .await,
        );
        assert!(
            error.message.contains("image input must be [N,3,H,W]"),
            "{}",
            error.message
        );
        let error = daemon_error(generate(&client, request("nope")).await);
        assert_eq!(error.code, ErrorCode::NotFound);
        assert!(
            error
                .message
                .contains("no model named \"nope\" (configured: gen, ten, up)"),
            "{}",
            error.message
        );
    });
    daemon.assert_serving();
}
