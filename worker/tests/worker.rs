//! gpuctl-worker driven over a socketpair, as gpuctld drives it, with the
//! models that models/make_models.py builds (scripts/test runs it first).
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gpuctl_protocol::worker::*;
use gpuctl_protocol::{
    decode_payload, encode_payload, DType, Error, ErrorCode, ImageLayout, ModelKind, TensorFrame,
    WireTensor,
};

fn models() -> PathBuf {
    let dir = std::env::var_os("GPUCTL_TEST_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/models"));
    assert!(
        dir.join("manifest.json").exists(),
        "no test models in {}: run scripts/test, or models/make_models.py {0}",
        dir.display()
    );
    dir
}

/// A CPU model, sending floats, in float32.
fn spec(name: &str, path: &str, kind: ModelKind) -> LoadModel {
    LoadModel {
        name: name.into(),
        path: Some(path.into()),
        kind,
        device: "cpu".into(),
        threads: 1,
        rgb8: false,
        fp16: false,
        options: "{}".into(),
        loras: Vec::new(),
    }
}

fn model(name: &str) -> String {
    models().join(name).display().to_string()
}

/// Makes `fd` the child's fd 3, clearing close-on-exec.
fn inherit_as_fd3(command: &mut Command, fd: RawFd) {
    // SAFETY: dup2 and fcntl are async-signal-safe.
    unsafe {
        command.pre_exec(move || gpuctl_protocol::worker::install_worker_fd(fd));
    }
}

struct Worker {
    child: Child,
    socket: UnixStream,
}

impl Worker {
    fn spawn() -> Worker {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_gpuctl-worker"));
        command
            .args(["--fd", "3", "--parent", &std::process::id().to_string()])
            .stderr(Stdio::piped());
        inherit_as_fd3(&mut command, theirs.as_raw_fd());
        let child = command.spawn().unwrap();
        drop(theirs);
        ours.set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut worker = Worker {
            child,
            socket: ours,
        };
        worker.expect_hello();
        worker
    }

    /// A worker's first frame says the worker protocol it speaks.
    fn expect_hello(&mut self) {
        match self.receive() {
            WorkerToDaemon::Hello(hello) => {
                assert_eq!(hello.protocol, WORKER_PROTOCOL);
                assert!(
                    hello.program.starts_with("gpuctl-worker "),
                    "{}",
                    hello.program
                );
            }
            other => panic!("the first frame must be Hello, got {other:?}"),
        }
    }

    fn send(&mut self, message: &DaemonToWorker) {
        let payload = encode_payload(message).unwrap();
        self.socket
            .write_all(&(payload.len() as u32).to_be_bytes())
            .unwrap();
        self.socket.write_all(&payload).unwrap();
    }

    fn receive(&mut self) -> WorkerToDaemon {
        let mut header = [0u8; 4];
        self.socket.read_exact(&mut header).unwrap();
        let mut payload = vec![0u8; u32::from_be_bytes(header) as usize];
        self.socket.read_exact(&mut payload).unwrap();
        decode_payload(&payload).unwrap()
    }

    fn load(&mut self, name: &str, path: &str, kind: ModelKind) -> WorkerToDaemon {
        self.send(&DaemonToWorker::Load(spec(name, path, kind)));
        self.receive()
    }

    fn loaded(name: &str, file: &str, kind: ModelKind) -> (Worker, Loaded) {
        let mut worker = Worker::spawn();
        match worker.load(name, &model(file), kind) {
            WorkerToDaemon::Loaded(loaded) => (worker, loaded),
            other => panic!("loading {file} failed: {other:?}"),
        }
    }

    fn run(&mut self, id: u64, job: Job) -> Result<Vec<WireTensor>, Error> {
        self.run_noting(id, job).map(|(outputs, _)| outputs)
    }

    /// Runs a job as the daemon does (tensors over 1 MiB stream ahead of
    /// their `Run`, and so do outputs ahead of their `Done`); the outputs,
    /// with what the worker said it had to do.
    fn run_noting(
        &mut self,
        id: u64,
        mut job: Job,
    ) -> Result<(Vec<WireTensor>, Vec<String>), Error> {
        for tensor in gpuctl_protocol::stream::take_streamed(job.tensors_mut()) {
            for frame in gpuctl_protocol::stream::frames(tensor) {
                self.send(&DaemonToWorker::Tensor(frame));
            }
        }
        self.send(&DaemonToWorker::Run { id, job });
        let mut streamed = gpuctl_protocol::TensorReceiver::default();
        let answer = loop {
            match self.receive() {
                WorkerToDaemon::Progress {
                    id: of,
                    done,
                    total,
                } => {
                    assert_eq!(of, id);
                    assert!(0 < done && done <= total, "{done}/{total}");
                }
                WorkerToDaemon::Tensor { id: of, frame } => {
                    assert_eq!(of, id);
                    streamed.frame(&frame, usize::MAX)
                }
                other => break other,
            }
        };
        match answer {
            WorkerToDaemon::Done {
                id: done,
                mut outputs,
                notes,
                ..
            } => {
                assert_eq!(done, id);
                streamed.fill(&mut outputs).unwrap();
                Ok((outputs, notes))
            }
            WorkerToDaemon::Failed { id: failed, error } => {
                assert_eq!(failed, Some(id));
                Err(error)
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "worker did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn f32_tensor(shape: &[u64], values: impl Fn(usize) -> f32) -> WireTensor {
    let n: u64 = shape.iter().product();
    let data = (0..n as usize)
        .flat_map(|i| values(i).to_le_bytes())
        .collect();
    WireTensor::new(DType::F32, shape.to_vec(), data).unwrap()
}

fn floats(tensor: &WireTensor) -> Vec<f32> {
    assert_eq!(tensor.dtype, DType::F32);
    tensor
        .data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// The largest difference between two float tensors' values.
fn largest_difference(a: &WireTensor, b: &WireTensor) -> f32 {
    floats(a)
        .iter()
        .zip(floats(b))
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn as_u8_pixels(values: &[f32]) -> Vec<u8> {
    values.iter().map(|v| (v * 255.0).round() as u8).collect()
}

#[test]
fn waifu2x_upscales_by_two() {
    let (mut worker, loaded) = Worker::loaded("waifu2x", "waifu2x-upconv7-x2.pt", ModelKind::Image);
    assert_eq!(loaded.device, "cpu");
    // 3·16·9+16 + 16·32·9+32 + ... + 256·3·16: about 4 MB of float32.
    assert!(
        (3_900_000..4_100_000).contains(&loaded.parameter_bytes),
        "{}",
        loaded.parameter_bytes
    );

    let image = f32_tensor(&[1, 3, 20, 28], |i| (i % 97) as f32 / 97.0);
    let out = worker
        .run(
            1,
            Job::Image {
                layout: ImageLayout::Planes,
                input: image.clone(),
                tiling: None,
            },
        )
        .unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].shape, vec![1, 3, 40, 56]);
    assert!(floats(&out[0]).iter().all(|v| v.is_finite()));

    // u8 pixels are scaled to 0..1 first: the same picture gives the same result.
    let pixels: Vec<u8> = floats(&image)
        .iter()
        .map(|v| (v * 255.0).round() as u8)
        .collect();
    let as_u8 = WireTensor::new(DType::U8, vec![1, 3, 20, 28], pixels).unwrap();
    let out_u8 = worker
        .run(
            2,
            Job::Image {
                layout: ImageLayout::Planes,
                input: as_u8,
                tiling: None,
            },
        )
        .unwrap();
    let largest = largest_difference(&out[0], &out_u8[0]);
    assert!(largest < 0.02, "u8 and float inputs differ by {largest}");

    // The same pixels as rows ([N,H,W,3], protocol 1.4), whole and in
    // tiles, give what the planes give.
    let planes = as_u8_pixels(&floats(&image));
    let mut rows = vec![0u8; planes.len()];
    let plane = 20 * 28;
    for i in 0..plane {
        for c in 0..3 {
            rows[i * 3 + c] = planes[c * plane + i];
        }
    }
    let rows = WireTensor::new(DType::U8, vec![1, 20, 28, 3], rows).unwrap();
    let tiles = Some(Tiling {
        tile: 16,
        overlap: 4,
        batch: 2,
        retries: 0,
    });
    for (id, tiling) in [(3, None), (4, tiles)] {
        let run = |input: WireTensor, layout| Job::Image {
            input,
            tiling,
            layout,
        };
        let from_planes = worker
            .run(
                id,
                run(
                    WireTensor::new(DType::U8, vec![1, 3, 20, 28], planes.clone()).unwrap(),
                    ImageLayout::Planes,
                ),
            )
            .unwrap();
        let from_rows = worker
            .run(id + 10, run(rows.clone(), ImageLayout::Rows))
            .unwrap();
        assert_eq!(from_rows[0].shape, vec![1, 3, 40, 56]);
        let largest = largest_difference(&from_planes[0], &from_rows[0]);
        assert!(
            largest < 1e-5,
            "rows and planes differ by {largest} (tiling {tiling:?})"
        );
    }

    worker.send(&DaemonToWorker::Unload);
    assert!(worker.wait_exit().success());
}

#[test]
fn rows_of_pixels_reach_the_model_as_contiguous_planes() {
    // tiny-view calls `view`, which strided memory refuses: rows must be
    // made into real planes, not handed over as a permuted view.
    let (mut worker, _) = Worker::loaded("view", "tiny-view.pt", ModelKind::Image);
    let (h, w) = (5u64, 7u64);
    let rows: Vec<u8> = (0..h * w * 3).map(|i| (i * 7 % 251) as u8).collect();
    for (id, dtype, data) in [
        (1, DType::U8, rows.clone()),
        (
            2,
            DType::F32,
            rows.iter()
                .flat_map(|v| (f32::from(*v) / 255.0).to_le_bytes())
                .collect(),
        ),
    ] {
        let input = WireTensor::new(dtype, vec![1, h, w, 3], data).unwrap();
        let out = worker
            .run(
                id,
                Job::Image {
                    input,
                    tiling: None,
                    layout: ImageLayout::Rows,
                },
            )
            .unwrap();
        assert_eq!(out[0].shape, vec![1, 3, h, w]);
        let values = floats(&out[0]);
        let plane = (h * w) as usize;
        for i in 0..plane {
            for c in 0..3 {
                let expected = f32::from(rows[i * 3 + c]) / 255.0;
                assert!(
                    (values[c * plane + i] - expected).abs() < 1e-6,
                    "{dtype:?}: pixel {i}, channel {c}"
                );
            }
        }
    }
    worker.send(&DaemonToWorker::Unload);
    assert!(worker.wait_exit().success());
}

#[test]
fn generate_is_deterministic_in_its_inputs() {
    let (mut worker, _) = Worker::loaded("tiny-gen", "tiny-generate.pt", ModelKind::Generate);
    let job = |prompt: &str, seed: usize| {
        Job::Generate(GenerateJob {
            noise: f32_tensor(&[1, 4, 8, 6], |i| {
                ((i * 7919 + seed) % 1000) as f32 / 500.0 - 1.0
            }),
            prompt: prompt.into(),
            negative: "blurry".into(),
            steps: 3,
            guidance: 7.5,
            seed: seed as u64,
            width: 48,
            height: 64,
        })
    };
    let first = worker.run(1, job("a cat", 1)).unwrap();
    assert_eq!(first[0].shape, vec![1, 3, 64, 48]);
    assert_eq!(
        worker.run(2, job("a cat", 1)).unwrap(),
        first,
        "same inputs, same image"
    );
    assert_ne!(
        worker.run(3, job("a dog", 1)).unwrap(),
        first,
        "the prompt matters"
    );
    assert_ne!(
        worker.run(4, job("a cat", 2)).unwrap(),
        first,
        "the noise matters"
    );
}

#[test]
fn tensor_models_take_and_give_several_tensors() {
    let (mut worker, _) = Worker::loaded("tiny-tensor", "tiny-tensor.pt", ModelKind::Tensor);
    let a = f32_tensor(&[2, 2], |i| i as f32);
    let b = f32_tensor(&[2, 2], |_| 1.0);
    let out = worker.run(1, Job::Tensor { inputs: vec![a, b] }).unwrap();
    assert_eq!(out.len(), 2);
    assert_eq!(floats(&out[0]), vec![1.0, 3.0, 5.0, 7.0]);
    assert_eq!(out[1].shape, Vec::<u64>::new());
    assert_eq!(floats(&out[1]), vec![6.0]);
}

#[test]
fn load_failures_name_the_model_and_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.pt").display().to_string();
    let corrupt = dir.path().join("corrupt.pt");
    std::fs::write(&corrupt, b"PK\x03\x04 this is not a TorchScript archive").unwrap();
    let cases = [
        (
            missing.clone(),
            ErrorCode::NotFound,
            format!("model broken: cannot read {missing}"),
        ),
        (
            corrupt.display().to_string(),
            ErrorCode::InvalidRequest,
            "is not a loadable TorchScript file".to_owned(),
        ),
    ];
    for (path, code, text) in cases {
        let mut worker = Worker::spawn();
        match worker.load("broken", &path, ModelKind::Image) {
            WorkerToDaemon::Failed { id: None, error } => {
                assert_eq!(error.code, code, "{}", error.message);
                assert!(error.message.contains(&text), "{}", error.message);
            }
            other => panic!("expected a load failure, got {other:?}"),
        }
        assert!(
            !worker.wait_exit().success(),
            "a worker that failed to load exits with an error"
        );
    }
}

#[test]
fn bad_jobs_fail_alone_and_the_model_keeps_serving() {
    let (mut worker, _) = Worker::loaded("waifu2x", "waifu2x-upconv7-x2.pt", ModelKind::Image);
    let two_channels = f32_tensor(&[1, 2, 8, 8], |_| 0.5);
    let error = worker
        .run(
            1,
            Job::Image {
                layout: ImageLayout::Planes,
                input: two_channels,
                tiling: None,
            },
        )
        .unwrap_err();
    assert_eq!(error.code, ErrorCode::InvalidRequest);
    assert!(
        error
            .message
            .contains("model waifu2x: an image input must be [N,3,H,W] (planes) or [N,H,W,3] (rows of pixels, protocol 1.4), got [1, 2, 8, 8] as Planes"),
        "{}",
        error.message
    );

    let short = WireTensor {
        dtype: DType::F32,
        shape: vec![1, 3, 8, 8],
        data: vec![0; 10],
    };
    let error = worker
        .run(
            2,
            Job::Image {
                layout: ImageLayout::Planes,
                input: short,
                tiling: None,
            },
        )
        .unwrap_err();
    assert!(
        error.message.contains("needs 768 bytes, got 10"),
        "{}",
        error.message
    );

    let error = worker.run(3, Job::Tensor { inputs: vec![] }).unwrap_err();
    assert!(
        error
            .message
            .contains("is of kind image, but the request is for a tensor model"),
        "{}",
        error.message
    );

    let ok = worker
        .run(
            4,
            Job::Image {
                layout: ImageLayout::Planes,
                input: f32_tensor(&[1, 3, 8, 8], |_| 0.5),
                tiling: None,
            },
        )
        .unwrap();
    assert_eq!(ok[0].shape, vec![1, 3, 16, 16]);
}

#[test]
fn a_forward_that_does_not_fit_the_kind_is_named() {
    // A tensor model loaded as a generate model: its forward takes two tensors.
    let (mut worker, _) = Worker::loaded("misfit", "tiny-tensor.pt", ModelKind::Generate);
    let job = Job::Generate(GenerateJob {
        noise: f32_tensor(&[1, 4, 2, 2], |_| 0.0),
        prompt: "x".into(),
        negative: String::new(),
        steps: 1,
        guidance: 1.0,
        seed: 0,
        width: 16,
        height: 16,
    });
    let error = worker.run(1, job).unwrap_err();
    assert!(
        error
            .message
            .starts_with("model misfit: forward failed (generate: (noise, prompt: str"),
        "{}",
        error.message
    );
}

#[test]
fn a_failed_forward_names_its_cause_not_the_interpreter() {
    let (mut worker, _) = Worker::loaded("ten", "tiny-tensor.pt", ModelKind::Tensor);
    let job = Job::Tensor {
        inputs: vec![f32_tensor(&[2], |_| 1.0), f32_tensor(&[3], |_| 1.0)],
    };
    let error = worker.run(1, job).unwrap_err();
    assert!(
        error
            .message
            .contains("RuntimeError: The size of tensor a (2) must match the size of tensor b (3)"),
        "{}",
        error.message
    );
    assert!(
        !error.message.contains("The following operation failed"),
        "{}",
        error.message
    );
}

#[test]
fn the_worker_exits_on_eof_and_with_its_parent() {
    let (mut worker, _) = Worker::loaded("t", "tiny-tensor.pt", ModelKind::Tensor);
    worker.socket.shutdown(std::net::Shutdown::Both).unwrap();
    assert!(worker.wait_exit().success());

    // A shell stands in for the daemon; the worker must die when it does.
    let (ours, theirs) = UnixStream::pair().unwrap();
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg("\"$0\" --fd 3 --parent $$ & echo $!; wait")
        .arg(env!("CARGO_BIN_EXE_gpuctl-worker"))
        .stdout(Stdio::piped());
    inherit_as_fd3(&mut command, theirs.as_raw_fd());
    let mut shell = command.spawn().unwrap();
    drop(theirs);
    let mut line = String::new();
    let mut stdout = shell.stdout.take().unwrap();
    let mut byte = [0u8; 1];
    while stdout.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
        line.push(byte[0] as char);
    }
    let worker_pid: i32 = line.trim().parse().unwrap();
    // Once it has loaded a model it is surely past prctl: only then is its
    // death proof of PR_SET_PDEATHSIG rather than of the start-up check.
    ours.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut orphan = Worker {
        child: Command::new("true").spawn().unwrap(),
        socket: ours,
    };
    orphan.expect_hello();
    assert!(matches!(
        orphan.load("t", &model("tiny-tensor.pt"), ModelKind::Tensor),
        WorkerToDaemon::Loaded(_)
    ));
    shell.kill().unwrap();
    shell.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status =
            std::fs::read_to_string(format!("/proc/{worker_pid}/status")).unwrap_or_default();
        let gone = status.is_empty()
            || status
                .lines()
                .any(|l| l.starts_with("State:") && l.contains('Z'));
        if gone {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "worker {worker_pid} outlived its parent"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn psnr(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let mse = a
        .iter()
        .zip(b)
        .map(|(x, y)| {
            let d = f64::from(x.clamp(0.0, 1.0) - y.clamp(0.0, 1.0));
            d * d
        })
        .sum::<f64>()
        / a.len() as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (1.0 / mse).log10()
    }
}

/// Runs `input` untiled and tiled; returns both outputs' floats and the tiled shape.
fn untiled_and_tiled(
    worker: &mut Worker,
    input: &WireTensor,
    tiling: Tiling,
) -> (Vec<f32>, Vec<f32>, Vec<u64>) {
    let whole = worker
        .run(
            1,
            Job::Image {
                layout: ImageLayout::Planes,
                input: input.clone(),
                tiling: None,
            },
        )
        .unwrap();
    let tiled = worker
        .run(
            2,
            Job::Image {
                layout: ImageLayout::Planes,
                input: input.clone(),
                tiling: Some(tiling),
            },
        )
        .unwrap();
    assert_eq!(
        tiled[0].shape, whole[0].shape,
        "tiling keeps the output size"
    );
    (floats(&whole[0]), floats(&tiled[0]), tiled[0].shape.clone())
}

#[test]
fn tiles_of_a_model_whose_receptive_field_fits_the_overlap_give_the_untiled_result() {
    let (mut worker, _) = Worker::loaded("x4", "tiny-x4.pt", ModelKind::Image);
    // Not a multiple of the tile, and one axis shorter than a tile.
    for (h, w) in [(150, 230), (40, 300)] {
        let input = f32_tensor(&[1, 3, h, w], |i| ((i * 7919) % 255) as f32 / 255.0);
        let tiling = Tiling {
            tile: 64,
            overlap: 16,
            batch: 3,
            retries: 0,
        };
        let (whole, tiled, shape) = untiled_and_tiled(&mut worker, &input, tiling);
        assert_eq!(shape, vec![1, 3, h * 4, w * 4]);
        let db = psnr(&whole, &tiled);
        assert!(db >= 50.0, "{h}x{w}: tiled vs untiled {db:.1} dB");
    }
}

#[test]
fn waifu2x_tiled_matches_untiled_on_a_photo() {
    let (mut worker, _) = Worker::loaded("waifu2x", "waifu2x-upconv7-x2.pt", ModelKind::Image);
    let pixels = std::fs::read(models().join("astronaut-crop-192x256.rgb")).unwrap();
    let input = WireTensor::new(DType::U8, vec![1, 3, 192, 256], pixels).unwrap();
    let tiling = Tiling {
        tile: 96,
        overlap: 32,
        batch: 2,
        retries: 0,
    };
    let (whole, tiled, shape) = untiled_and_tiled(&mut worker, &input, tiling);
    assert_eq!(shape, vec![1, 3, 384, 512]);
    let db = psnr(&whole, &tiled);
    assert!(db >= 40.0, "tiled vs untiled {db:.1} dB");
    eprintln!("waifu2x on the photo crop, tile 96, overlap 32: tiled vs untiled {db:.1} dB");
}

fn tiled_job(input: WireTensor, tile: u32, overlap: u32, batch: u32, retries: u32) -> Job {
    Job::Image {
        layout: ImageLayout::Planes,
        input,
        tiling: Some(Tiling {
            tile,
            overlap,
            batch,
            retries,
        }),
    }
}

#[test]
fn out_of_memory_halves_the_batch_then_the_tile_and_finishes() {
    let (mut worker, _) = Worker::loaded("faulty", "tiny-faulty.pt", ModelKind::Image);
    let input = f32_tensor(&[1, 3, 150, 200], |i| (i % 7) as f32 / 10.0);
    let (outputs, notes) = worker
        .run_noting(1, tiled_job(input.clone(), 128, 16, 4, 0))
        .unwrap();
    assert_eq!(outputs[0].shape, vec![1, 3, 300, 400]);
    // Nearest x2 is pointwise: whatever the tiles, the result is exact.
    let values = floats(&outputs[0]);
    let source = floats(&input);
    for (y, x) in [(0, 0), (299, 399), (151, 17), (3, 250)] {
        for c in 0..3 {
            let out = values[c * 300 * 400 + y * 400 + x];
            let want = source[c * 150 * 200 + (y / 2) * 200 + x / 2];
            assert_eq!(out, want, "at {c},{y},{x}");
        }
    }
    assert_eq!(notes.len(), 3, "{notes:?}");
    assert!(notes[0].contains("batch 4 -> 2"), "{notes:?}");
    assert!(notes[1].contains("batch 2 -> 1"), "{notes:?}");
    assert!(notes[2].contains("tile 128 -> 64"), "{notes:?}");
}

#[test]
fn a_failing_tile_is_retried_and_then_named() {
    let (mut worker, _) = Worker::loaded("faulty", "tiny-faulty.pt", ModelKind::Image);
    // Transient: every third forward fails once; one retry is enough.
    let flaky = f32_tensor(&[1, 3, 60, 60], |_| 0.25);
    let (outputs, notes) = worker
        .run_noting(1, tiled_job(flaky.clone(), 32, 8, 1, 1))
        .unwrap();
    assert_eq!(outputs[0].shape, vec![1, 3, 120, 120]);
    assert!(
        notes.iter().any(|n| n.contains("retry 1 of 1")),
        "{notes:?}"
    );

    // Lasting: a pixel of exactly 1.0 in the bottom-right tile (tiles start
    // at 0, 24 and 28 on each axis).
    let bad = f32_tensor(
        &[1, 3, 60, 60],
        |i| if i == 59 * 60 + 59 { 1.0 } else { 0.5 },
    );
    let error = worker
        .run_noting(2, tiled_job(bad, 32, 8, 1, 2))
        .unwrap_err();
    assert_eq!(error.code, ErrorCode::InvalidRequest);
    assert!(
        error.message.contains("tile row 2, column 2") && error.message.contains("bad pixel"),
        "{}",
        error.message
    );
    // The worker is fine afterwards.
    let fine = f32_tensor(&[1, 3, 60, 60], |_| 0.5);
    assert!(worker.run_noting(3, tiled_job(fine, 32, 8, 1, 0)).is_ok());
}

/// Two workers with tiny-x4: one that answers in floats, one in RGB8.
fn x4_floats_and_pixels() -> (Worker, Worker) {
    let (floats, _) = Worker::loaded("x4", "tiny-x4.pt", ModelKind::Image);
    let mut pixels = Worker::spawn();
    pixels.send(&DaemonToWorker::Load(LoadModel {
        rgb8: true,
        ..spec("x4", &model("tiny-x4.pt"), ModelKind::Image)
    }));
    assert!(matches!(pixels.receive(), WorkerToDaemon::Loaded(_)));
    (floats, pixels)
}

#[test]
fn rgb8_outputs_are_the_floats_clamped_and_rounded() {
    let (mut floats_worker, mut pixels_worker) = x4_floats_and_pixels();
    // Values past both ends of 0..1, to see the clamping.
    let input = f32_tensor(&[1, 3, 6, 5], |i| (i as f32 - 20.0) / 30.0);
    let job = || Job::Image {
        layout: ImageLayout::Planes,
        input: input.clone(),
        tiling: None,
    };
    let want = as_pixel_rows(&floats_worker.run(1, job()).unwrap()[0]);
    let got = pixels_worker.run(1, job()).unwrap();
    assert_eq!(got[0].dtype, DType::U8);
    assert_eq!(got[0].shape, vec![1, 24, 20, 3], "rows of RGB pixels");
    assert_eq!(got[0].data, want);
    assert!(want.contains(&0) && want.contains(&255));
}

/// Planar float `[1,3,H,W]` → RGB8 rows `[1,H,W,3]`, clamped and rounded.
fn as_pixel_rows(planar: &WireTensor) -> Vec<u8> {
    let values = floats(planar);
    let plane = (planar.shape[2] * planar.shape[3]) as usize;
    (0..3 * plane)
        .map(|i| values[(i % 3) * plane + i / 3])
        .map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
        .collect()
}

#[test]
fn a_tiled_rgb8_image_streams_its_rows_while_later_tiles_run() {
    let (mut floats_worker, mut pixels_worker) = x4_floats_and_pixels();
    // 200x300 in tiles of 64 (overlap 16, batch 2): 5 x 4 tiles, 20 rows
    // of 600 x 3 bytes each per input row: several bands and chunks.
    let input = f32_tensor(&[1, 3, 200, 300], |i| ((i * 7919) % 255) as f32 / 255.0);
    let job = || tiled_job(input.clone(), 64, 16, 2, 0);
    let want = as_pixel_rows(&floats_worker.run(1, job()).unwrap()[0]);
    pixels_worker.send(&DaemonToWorker::Run { id: 7, job: job() });
    let mut seen = Vec::new();
    let mut streamed = gpuctl_protocol::TensorReceiver::default();
    let outputs = loop {
        match pixels_worker.receive() {
            WorkerToDaemon::Progress { done, total, .. } => seen.push(format!("{done}/{total}")),
            WorkerToDaemon::Tensor {
                id,
                frame: TensorFrame::Begin { dtype, shape },
            } => {
                assert_eq!(
                    (id, dtype, &shape[..]),
                    (7, DType::U8, &[1, 800, 1200, 3][..])
                );
                seen.push("begin".into());
                streamed.begin(dtype, shape, usize::MAX);
            }
            WorkerToDaemon::Tensor {
                id: 7,
                frame: TensorFrame::Chunk(data),
            } => {
                seen.push("chunk".into());
                streamed.chunk(&data);
            }
            WorkerToDaemon::Tensor {
                id: 7,
                frame: TensorFrame::End,
            } => {
                seen.push("end".into());
                streamed.end();
            }
            WorkerToDaemon::Done { id: 7, outputs, .. } => break outputs,
            other => panic!("unexpected {other:?}"),
        }
    };
    let first_chunk = seen.iter().position(|s| s == "chunk").unwrap();
    let last_progress = seen.iter().rposition(|s| s.contains('/')).unwrap();
    assert!(
        first_chunk < last_progress && seen[..first_chunk].iter().any(|s| s.contains('/')),
        "rows came while tiles still ran: {seen:?}"
    );
    assert_eq!(seen.last().map(String::as_str), Some("end"));
    assert!(outputs[0].is_placeholder(), "sent ahead, not inside Done");
    let mut outputs = outputs;
    streamed.fill(&mut outputs).unwrap();
    assert_eq!(outputs[0].shape, vec![1, 800, 1200, 3]);
    // The same blend as the float output, rounded the same way: within one
    // level where float error lands on a rounding edge.
    let largest = outputs[0]
        .data
        .iter()
        .zip(&want)
        .map(|(a, b)| a.abs_diff(*b))
        .max();
    assert!(largest <= Some(1), "{largest:?}");
}

#[test]
fn fp16_is_for_cuda_and_the_cpu_keeps_float32() {
    let (mut plain, loaded) = Worker::loaded("x4", "tiny-x4.pt", ModelKind::Image);
    assert_eq!(loaded.precision, "fp32");
    let mut asked = Worker::spawn();
    asked.send(&DaemonToWorker::Load(LoadModel {
        fp16: true,
        ..spec("x4", &model("tiny-x4.pt"), ModelKind::Image)
    }));
    let WorkerToDaemon::Loaded(loaded) = asked.receive() else {
        panic!("tiny-x4 did not load with fp16 asked for")
    };
    assert_eq!(
        (loaded.device.as_str(), loaded.precision.as_str()),
        ("cpu", "fp32")
    );
    let job = || Job::Image {
        layout: ImageLayout::Planes,
        input: f32_tensor(&[1, 3, 6, 5], |i| i as f32 / 90.0),
        tiling: None,
    };
    let (a, b) = (plain.run(1, job()).unwrap(), asked.run(1, job()).unwrap());
    assert_eq!(a, b);
    assert_eq!(a[0].dtype, DType::F32);
}
