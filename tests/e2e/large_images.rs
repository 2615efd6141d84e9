//! Large images end to end: a 2048² PNG through `gpuctl generate` and a ×4
//! model into an 8192² PNG, tensors streamed both ways, with the peak
//! memory of the client, the daemon and the worker measured against the
//! bounds the README documents.

use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};

use gpuctl_protocol::{
    Client, ClientMessage, DType, DaemonMessage, ErrorCode, Event, GenerateRequest, Request,
    Response, WireTensor,
};

use crate::fixture::*;
use crate::models::{daemon_error, generate, model_status, models_dir, runtime};

const MIB: u64 = 1 << 20;

/// A pattern with texture and sharp edges: any misplaced tile shows.
fn input_pixel(x: u32, y: u32) -> [u8; 3] {
    [
        (x / 8) as u8,
        (y / 8) as u8,
        ((x * 7 + y * 13) ^ (x * y / 64)) as u8,
    ]
}

/// What tiny-x4 makes of channel `c` at output pixel (x, y): bilinear ×4
/// (align_corners = false), then a 3×3 box blur with zero padding, then RGB8
/// rounding — computed here, independently of libtorch.
fn expected_pixel(input: &image::RgbImage, size: u32, x: u32, y: u32, c: usize) -> u8 {
    let out = i64::from(size) * 4;
    let sample = |axis: i64| -> (usize, usize, f64) {
        let source = ((axis as f64 + 0.5) / 4.0 - 0.5).max(0.0);
        let low = source.floor() as usize;
        let high = (low + 1).min(size as usize - 1);
        (low, high, source - low as f64)
    };
    let up = |ox: i64, oy: i64| -> f64 {
        if ox < 0 || oy < 0 || ox >= out || oy >= out {
            return 0.0;
        }
        let (x0, x1, fx) = sample(ox);
        let (y0, y1, fy) = sample(oy);
        let at = |x: usize, y: usize| f64::from(input.get_pixel(x as u32, y as u32)[c]) / 255.0;
        (1.0 - fy) * ((1.0 - fx) * at(x0, y0) + fx * at(x1, y0))
            + fy * ((1.0 - fx) * at(x0, y1) + fx * at(x1, y1))
    };
    let mut sum = 0.0;
    for dy in -1..=1 {
        for dx in -1..=1 {
            sum += up(i64::from(x) + dx, i64::from(y) + dy);
        }
    }
    ((sum / 9.0).clamp(0.0, 1.0) * 255.0).round() as u8
}

/// A line of /proc/PID/status in bytes (`VmHWM`: peak resident, `VmRSS`: now).
fn proc_bytes(pid: u64, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib * 1024
}

/// Runs gpuctl to completion; its exit status and peak resident bytes.
// Reaped by wait4, which std's Child knows nothing of.
#[allow(clippy::zombie_processes)]
fn gpuctl_peak(daemon: &Daemon, dir: &Path, args: &[&str]) -> (i32, u64) {
    let child = Command::new(bin("gpuctl"))
        .current_dir(dir)
        .arg("--socket")
        .arg(&daemon.socket)
        .args(args)
        .stdout(File::create(dir.join("stdout")).unwrap())
        .stderr(File::create(dir.join("stderr")).unwrap())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let (mut status, mut usage) = (0, unsafe { std::mem::zeroed::<libc::rusage>() });
    // SAFETY: wait4 writes the status and usage of our own child.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as i32, "wait4 failed");
    // ru_maxrss is in KiB on Linux.
    (libc::WEXITSTATUS(status), usage.ru_maxrss as u64 * 1024)
}

#[test]
fn an_image_of_2048_squared_becomes_8192_squared_through_gpuctl_in_bounded_memory() {
    const SIZE: u32 = 2048;
    let daemon = Daemon::start(&format!(
        "model_root = \"{}\"\n[gpu]\nbackend = \"none\"\n\
         [models.x4]\npath = \"tiny-x4.pt\"\nkind = \"image\"\nscale = 4\ntile = 512\noverlap = 32\nbatch = 4\n",
        models_dir().display()
    ));
    let dir = tempfile::tempdir().unwrap();
    let input = image::RgbImage::from_fn(SIZE, SIZE, |x, y| image::Rgb(input_pixel(x, y)));
    input.save(dir.path().join("in.png")).unwrap();

    // Baselines: a loaded worker, an idle daemon, a gpuctl that only talks.
    let (code, client_base) = gpuctl_peak(&daemon, dir.path(), &["load", "x4"]);
    assert_eq!(
        code,
        0,
        "{}",
        std::fs::read_to_string(dir.path().join("stderr")).unwrap()
    );
    let worker = daemon.status()["models"][0]["pid"].as_u64().unwrap();
    let daemon_pid = daemon.pid() as u64;
    let (daemon_base, worker_base) = (proc_bytes(daemon_pid, "VmRSS"), proc_bytes(worker, "VmRSS"));

    let (code, client_peak) = gpuctl_peak(
        &daemon,
        dir.path(),
        &["--json", "generate", "x4", "in.png", "-o", "out.png"],
    );
    let chatter = std::fs::read_to_string(dir.path().join("stderr")).unwrap();
    assert_eq!(code, 0, "{chatter}");
    // 2048 in tiles of 512 overlapping by 32: 5 × 5 tiles, 4 per forward.
    let progress: Vec<serde_json::Value> = chatter
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let done: Vec<u64> = progress
        .iter()
        .map(|p| p["progress"]["done"].as_u64().unwrap())
        .collect();
    assert_eq!(done, [4, 8, 12, 16, 20, 24, 25], "{chatter}");
    assert!(progress.iter().all(|p| p["progress"]["total"] == 25));

    let output = image::open(dir.path().join("out.png")).unwrap().to_rgb8();
    assert_eq!(output.dimensions(), (4 * SIZE, 4 * SIZE));
    // Every pixel of every 61st row and column, seams and edges included
    // (tiles meet near multiples of 480 input pixels, ×4 here).
    let mut worst = 0u8;
    let lines = (0..4 * SIZE).step_by(61).chain([4 * SIZE - 1]);
    for y in lines.clone() {
        for x in (0..4 * SIZE).step_by(7) {
            for c in 0..3 {
                let want = expected_pixel(&input, SIZE, x, y, c);
                worst = worst.max(output.get_pixel(x, y)[c].abs_diff(want));
            }
        }
    }
    for x in lines {
        for y in (0..4 * SIZE).step_by(7) {
            let want = expected_pixel(&input, SIZE, x, y, 0);
            worst = worst.max(output.get_pixel(x, y)[0].abs_diff(want));
        }
    }
    assert!(
        worst <= 1,
        "pixels differ from the model's definition by up to {worst}"
    );

    // The documented bounds (README, "Large images"): in bytes as RGB8.
    let (input_bytes, output_bytes) = (3 * u64::from(SIZE).pow(2), 3 * 16 * u64::from(SIZE).pow(2));
    let daemon_peak = proc_bytes(daemon_pid, "VmHWM");
    let worker_peak = proc_bytes(worker, "VmHWM");
    let report = format!(
        "peak above baseline: gpuctl {} MiB (baseline {} MiB), gpuctld {} MiB (baseline {} MiB), worker {} MiB (baseline {} MiB); output {} MiB",
        client_peak.saturating_sub(client_base) / MIB,
        client_base / MIB,
        daemon_peak.saturating_sub(daemon_base) / MIB,
        daemon_base / MIB,
        worker_peak.saturating_sub(worker_base) / MIB,
        worker_base / MIB,
        output_bytes / MIB,
    );
    println!("{report}");
    // gpuctl writes the PNG as rows arrive: it never holds the output.
    assert!(
        client_peak <= client_base + 4 * input_bytes + 64 * MIB,
        "gpuctl: {report}"
    );
    assert!(
        daemon_peak <= daemon_base + output_bytes + 2 * input_bytes + 64 * MIB,
        "gpuctld: {report}"
    );
    // The blend (a float sum, 12 B per output pixel, and a float weight,
    // 4 B) over a window of two tile rows (5 rows of 436 px tiles here,
    // ×4), the model's own working memory for one batch of tiles (for
    // tiny-x4 under 8 times the batch's float output), the input as floats.
    let blend = 16 * (2 * 436 * 4) * u64::from(4 * SIZE);
    let batch = 4 * 3 * 4 * (436u64 * 4).pow(2);
    assert!(
        worker_peak <= worker_base + blend + 8 * batch + 8 * input_bytes + 128 * MIB,
        "worker: {report}"
    );
}

fn x4_daemon(daemon_section: &str) -> Daemon {
    Daemon::start(&format!(
        "model_root = \"{}\"\n[daemon]\n{daemon_section}\n[gpu]\nbackend = \"none\"\n\
         [models.x4]\npath = \"tiny-x4.pt\"\nkind = \"image\"\nscale = 4\n",
        models_dir().display()
    ))
}

fn image(side: u64) -> WireTensor {
    WireTensor::new(
        DType::U8,
        vec![1, 3, side, side],
        vec![100; 3 * (side * side) as usize],
    )
    .unwrap()
}

#[test]
fn an_upload_over_max_upload_or_an_output_over_max_output_is_refused_and_the_connection_goes_on() {
    let daemon = x4_daemon("max_upload = \"4MiB\"\nmax_output = \"2MiB\"");
    runtime().block_on(async {
        let client = Client::connect(&daemon.socket).await.unwrap();
        // 1300² RGB8 is 4.8 MiB: streamed, and refused before it is held.
        let error = daemon_error(
            client
                .call(Request::Generate(GenerateRequest {
                    input: Some(image(1300)),
                    ..GenerateRequest::new("x4")
                }))
                .await,
        );
        assert_eq!(error.code, ErrorCode::TooLarge);
        assert!(
            error.message.contains("[1, 3, 1300, 1300] (4.8 MiB)")
                && error.message.contains("daemon.max_upload (4.0 MiB"),
            "{}",
            error.message
        );
        // 1000² (2.9 MiB) streams in, but its ×4 output would be 45.8 MiB.
        let error = daemon_error(
            client
                .call(Request::Generate(GenerateRequest {
                    input: Some(image(1000)),
                    ..GenerateRequest::new("x4")
                }))
                .await,
        );
        assert_eq!(error.code, ErrorCode::TooLarge);
        assert_eq!(
            error.message,
            "model x4: a 1000x1000 input makes a 4000x4000 output (45.8 MiB as RGB8), over daemon.max_output (2.0 MiB)"
        );
        // The same connection still serves: 200² → 800² is 1.8 MiB.
        let answer = generate(
            &client,
            GenerateRequest {
                input: Some(image(200)),
                ..GenerateRequest::new("x4")
            },
        )
        .await
        .unwrap();
        assert_eq!(answer.outputs[0].shape, vec![1, 800, 800, 3]);
    });
    // Nothing ran for the refused ones: one load, for the last request.
    assert_eq!(model_status(&daemon, "x4")["loads"], 1);
}

#[test]
fn a_broken_stream_fails_its_request_only() {
    let daemon = x4_daemon("");
    let mut raw = RawClient::handshaken(&daemon.socket);
    // A chunk with no begin, then the request that would have used it.
    raw.send(&ClientMessage::TensorChunk {
        id: 1,
        data: vec![1, 2, 3],
    });
    raw.request(
        1,
        Request::Generate(GenerateRequest {
            input: Some(WireTensor::placeholder(DType::U8, vec![1, 3, 1, 1])),
            ..GenerateRequest::new("x4")
        }),
    );
    match raw.receive() {
        Some(DaemonMessage::Error { id: 1, error }) => {
            assert_eq!(error.code, ErrorCode::InvalidRequest);
            assert!(
                error.message.contains("TensorChunk without TensorBegin"),
                "{}",
                error.message
            );
        }
        other => panic!("expected the request's error, got {other:?}"),
    }
    // A placeholder with nothing streamed for it.
    raw.request(
        2,
        Request::Generate(GenerateRequest {
            input: Some(WireTensor::placeholder(DType::U8, vec![1, 3, 4, 4])),
            ..GenerateRequest::new("x4")
        }),
    );
    match raw.receive() {
        Some(DaemonMessage::Error { id: 2, error }) => {
            assert!(
                error.message.contains("none was streamed"),
                "{}",
                error.message
            )
        }
        other => panic!("expected the request's error, got {other:?}"),
    }
    // A stream done right on the same connection: 2×2 pixels in two chunks.
    raw.send(&ClientMessage::TensorBegin {
        id: 3,
        dtype: DType::U8,
        shape: vec![1, 3, 2, 2],
    });
    for data in [vec![255; 6], vec![0; 6]] {
        raw.send(&ClientMessage::TensorChunk { id: 3, data });
    }
    raw.send(&ClientMessage::TensorEnd { id: 3 });
    raw.request(
        3,
        Request::Generate(GenerateRequest {
            input: Some(WireTensor::placeholder(DType::U8, vec![1, 3, 2, 2])),
            ..GenerateRequest::new("x4")
        }),
    );
    loop {
        match raw.receive() {
            Some(DaemonMessage::Event { .. }) => {}
            Some(DaemonMessage::Response {
                id: 3,
                response: Response::Generate(answer),
            }) => {
                // 8×8×3 bytes: small enough to come back inline.
                assert_eq!(answer.outputs[0].shape, vec![1, 8, 8, 3]);
                assert_eq!(answer.outputs[0].data.len(), 192);
                break;
            }
            other => panic!("expected the answer, got {other:?}"),
        }
    }
}

#[test]
fn a_request_may_choose_its_own_tiles() {
    let daemon = x4_daemon("");
    let progress = |tile: Option<u32>, overlap: Option<u32>| {
        runtime().block_on(async {
            let client = Client::connect(&daemon.socket).await.unwrap();
            let mut call = client
                .start(Request::Generate(GenerateRequest {
                    input: Some(image(100)),
                    tile,
                    overlap,
                    ..GenerateRequest::new("x4")
                }))
                .await
                .unwrap();
            let mut totals = Vec::new();
            while let Some(event) = call.event().await {
                if let gpuctl_protocol::Event::Progress(p) = event {
                    totals.push((p.done, p.total));
                }
            }
            let answer = call.response().await;
            (totals, answer)
        })
    };
    // x4 has no tile of its own: one forward, no progress.
    let (totals, answer) = progress(None, None);
    assert!(totals.is_empty() && answer.is_ok(), "{totals:?}");
    // Tiles of 48 overlapping by 16 on 100 px: 3 × 3, one per forward
    // (the CPU's batch when the model sets none).
    let (totals, answer) = progress(Some(48), Some(16));
    assert_eq!(totals, (1..=9).map(|done| (done, 9)).collect::<Vec<_>>());
    assert!(answer.is_ok());
    let (_, answer) = progress(Some(40), Some(20));
    let error = daemon_error(answer);
    assert_eq!(error.code, ErrorCode::InvalidRequest);
    assert!(
        error
            .message
            .contains("overlap 20 is too large for tile 40"),
        "{}",
        error.message
    );
}

#[test]
fn a_worker_output_over_max_output_is_refused_when_the_scale_is_not_known_ahead() {
    // No `scale`: the size shows only when the worker streams its output.
    let daemon = Daemon::start(&format!(
        "model_root = \"{}\"\n[daemon]\nmax_output = \"2MiB\"\n[gpu]\nbackend = \"none\"\n\
         [models.x4]\npath = \"tiny-x4.pt\"\nkind = \"image\"\n",
        models_dir().display()
    ));
    runtime().block_on(async {
        let client = Client::connect(&daemon.socket).await.unwrap();
        let ask = |side| {
            client.call(Request::Generate(GenerateRequest {
                input: Some(image(side)),
                ..GenerateRequest::new("x4")
            }))
        };
        let error = daemon_error(ask(256).await);
        assert_eq!(error.code, ErrorCode::TooLarge);
        assert_eq!(
            error.message,
            "model x4: its output of shape [1, 1024, 1024, 3] (3.0 MiB) exceeds daemon.max_output (2.0 MiB)"
        );
        // The worker and the daemon go on.
        assert!(ask(100).await.is_ok());
    });
    assert_eq!(model_status(&daemon, "x4")["loads"], 1);
}

#[test]
fn streams_for_requests_that_never_come_are_capped() {
    let daemon = x4_daemon("");
    let mut raw = RawClient::handshaken(&daemon.socket);
    for id in 0..=1024 {
        raw.send(&ClientMessage::TensorEnd { id });
    }
    let message = raw.expect_closing(ErrorCode::InvalidRequest);
    assert!(
        message.contains("more than 1024 requests that were never sent"),
        "{message}"
    );
    daemon.assert_serving();
}

#[test]
fn a_client_gone_in_the_middle_of_an_upload_frees_it_and_disturbs_no_one() {
    let daemon = x4_daemon("");
    let pid = daemon.pid() as u64;
    let before = proc_bytes(pid, "VmRSS");
    {
        let mut raw = RawClient::handshaken(&daemon.socket);
        // 256 MiB announced, 128 MiB of it sent, then the client is gone.
        raw.send(&ClientMessage::TensorBegin {
            id: 1,
            dtype: DType::U8,
            shape: vec![1, 3, 8192, 10923],
        });
        for _ in 0..128 {
            raw.send(&ClientMessage::TensorChunk {
                id: 1,
                data: vec![7; 1 << 20],
            });
        }
    }
    daemon.wait_idle();
    let after = proc_bytes(pid, "VmRSS");
    assert!(
        after < before + 32 * MIB,
        "gpuctld kept {} MiB of an abandoned upload",
        (after.saturating_sub(before)) / MIB
    );
    runtime().block_on(async {
        let client = Client::connect(&daemon.socket).await.unwrap();
        let answer = generate(
            &client,
            GenerateRequest {
                input: Some(image(600)),
                ..GenerateRequest::new("x4")
            },
        )
        .await
        .unwrap();
        assert_eq!(answer.outputs[0].shape, vec![1, 2400, 2400, 3]);
    });
}

#[test]
fn a_tiled_image_reaches_the_client_row_by_row_while_its_tiles_run() {
    let daemon = x4_daemon("");
    let mut raw = RawClient::handshaken(&daemon.socket);
    // 200 px in tiles of 64 overlapping by 16: 4 rows of 4 tiles, one row
    // per forward of 4.
    raw.request(
        1,
        Request::Generate(GenerateRequest {
            input: Some(image(200)),
            tile: Some(64),
            overlap: Some(16),
            ..GenerateRequest::new("x4")
        }),
    );
    let (mut seen, mut pixels) = (Vec::new(), Vec::new());
    let answer = loop {
        match raw.receive() {
            Some(DaemonMessage::Event {
                id: 1,
                event: Event::Progress(p),
            }) => seen.push(format!("{}/{}", p.done, p.total)),
            Some(DaemonMessage::Event { .. }) => {}
            Some(DaemonMessage::TensorBegin {
                id: 1,
                dtype,
                shape,
            }) => {
                assert_eq!((dtype, &shape[..]), (DType::U8, &[1, 800, 800, 3][..]));
                seen.push("begin".into());
            }
            Some(DaemonMessage::TensorChunk { id: 1, data }) => {
                seen.push("chunk".into());
                pixels.extend_from_slice(&data);
            }
            Some(DaemonMessage::TensorEnd { id: 1 }) => seen.push("end".into()),
            Some(DaemonMessage::Response {
                id: 1,
                response: Response::Generate(answer),
            }) => break answer,
            other => panic!("unexpected {other:?}"),
        }
    };
    let first_rows = seen.iter().position(|s| s == "chunk").unwrap();
    let last_tiles = seen.iter().position(|s| s == "16/16").unwrap();
    assert!(
        0 < first_rows && first_rows < last_tiles,
        "rows are sent while tiles still run: {seen:?}"
    );
    assert!(
        answer.outputs[0].is_placeholder(),
        "streamed ahead of the answer"
    );
    assert_eq!(pixels.len(), 800 * 800 * 3);
    // A flat grey input stays flat grey away from the zero-padded border.
    let centre = (400 * 800 + 400) * 3;
    assert_eq!(&pixels[centre..centre + 3], &[100, 100, 100]);

    // A 1.1 client gets the same image planar, after the job.
    let mut old = RawClient::speaking(
        &daemon.socket,
        gpuctl_protocol::ProtocolVersion { major: 1, minor: 1 },
    );
    old.request(
        2,
        Request::Generate(GenerateRequest {
            input: Some(image(200)),
            tile: Some(64),
            overlap: Some(16),
            ..GenerateRequest::new("x4")
        }),
    );
    let (mut seen, mut planar) = (Vec::new(), Vec::new());
    loop {
        match old.receive() {
            Some(DaemonMessage::Event {
                event: Event::Progress(p),
                ..
            }) => seen.push(format!("{}/{}", p.done, p.total)),
            Some(DaemonMessage::Event { .. }) => {}
            Some(DaemonMessage::TensorBegin { id: 2, shape, .. }) => {
                assert_eq!(shape, vec![1, 3, 800, 800]);
                seen.push("begin".into());
            }
            Some(DaemonMessage::TensorChunk { id: 2, data }) => planar.extend_from_slice(&data),
            Some(DaemonMessage::TensorEnd { id: 2 }) => {}
            Some(DaemonMessage::Response { id: 2, .. }) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen.last().map(String::as_str), Some("begin"), "{seen:?}");
    let plane = 800 * 800;
    for (i, pixel) in pixels.chunks_exact(3).enumerate().step_by(101) {
        for (c, value) in pixel.iter().enumerate() {
            assert_eq!(planar[c * plane + i], *value, "pixel {i}, channel {c}");
        }
    }
}

#[test]
fn large_tensor_outputs_are_passed_on_to_new_clients_and_assembled_for_old_ones() {
    let daemon = Daemon::start(&crate::models::config("", "[daemon]\nmax_frame = \"2MiB\""));
    // tiny-tensor: (a, b) -> (a * 2 + b, sum(a * b)); 3 MiB in, 3 MiB out.
    let n = 3 << 18;
    let request = || GenerateRequest {
        inputs: vec![
            crate::models::f32_tensor(&[n], |i| i as f32),
            crate::models::f32_tensor(&[n], |_| 0.5),
        ],
        ..GenerateRequest::new("ten")
    };
    let check = |outputs: &[WireTensor]| {
        assert_eq!(outputs.len(), 2);
        assert_eq!(outputs[0].shape, vec![n]);
        let at =
            |i: usize| f32::from_le_bytes(outputs[0].data[4 * i..4 * i + 4].try_into().unwrap());
        assert_eq!(
            (at(0), at(1000), at(n as usize - 1)),
            (0.5, 2000.5, (2 * n - 2) as f32 + 0.5)
        );
        assert_eq!(outputs[1].shape, Vec::<u64>::new());
    };
    // A 1.2 client: the worker's frames, passed on, fill the placeholder.
    let answer = runtime().block_on(async {
        let client = Client::connect(&daemon.socket).await.unwrap();
        generate(&client, request()).await.unwrap()
    });
    check(&answer.outputs);
    // A 1.1 client: gpuctld assembles the output, then streams it.
    let mut old = RawClient::speaking(
        &daemon.socket,
        gpuctl_protocol::ProtocolVersion { major: 1, minor: 1 },
    );
    let mut streamed = Vec::new();
    let mut request = request();
    for tensor in gpuctl_protocol::stream::take_streamed(request.tensors_mut()) {
        for frame in gpuctl_protocol::stream::frames(tensor) {
            old.send(&ClientMessage::tensor_frame(1, frame));
        }
    }
    old.request(1, Request::Generate(request));
    let mut outputs = loop {
        match old.receive() {
            Some(DaemonMessage::TensorChunk { id: 1, data }) => streamed.extend_from_slice(&data),
            Some(DaemonMessage::Response {
                id: 1,
                response: Response::Generate(answer),
            }) => break answer.outputs,
            Some(
                DaemonMessage::Event { .. }
                | DaemonMessage::TensorBegin { .. }
                | DaemonMessage::TensorEnd { .. },
            ) => {}
            other => panic!("unexpected {other:?}"),
        }
    };
    assert!(outputs[0].is_placeholder());
    outputs[0].data = streamed;
    check(&outputs);
}
