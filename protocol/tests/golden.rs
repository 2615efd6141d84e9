#![allow(clippy::unwrap_used)]

//! Pins the byte encoding of every message: a change here breaks every
//! client written from protocol/README.md, so it must be deliberate.

use gpuctl_protocol::*;

mod pinned;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn frame<T: serde::Serialize>(message: &T) -> String {
    let payload = encode_payload(message).unwrap();
    keep_as_seed::<T>(&payload);
    record(message, &payload);
    let mut framed = (payload.len() as u32).to_be_bytes().to_vec();
    framed.extend_from_slice(&payload);
    hex(&framed)
}

fn roundtrip<T>(message: &T)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let payload = encode_payload(message).unwrap();
    keep_as_seed::<T>(&payload);
    record(message, &payload);
    let back: T = decode_payload(&payload).unwrap();
    assert_eq!(&back, message);
}

/// With `GPUCTL_SEED_DIR` set, every pinned payload is also written there,
/// as `TYPE/HASH` and, framed, as `frames/HASH`: the fuzzers' seed corpus
/// (scripts/fuzz), so they start from every message this file pins.
fn keep_as_seed<T>(payload: &[u8]) {
    let Some(dir) = std::env::var_os("GPUCTL_SEED_DIR") else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    let kind = std::any::type_name::<T>().rsplit("::").next().unwrap();
    // FNV-1a: a stable name for the same bytes.
    let hash = payload.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    });
    let mut framed = (payload.len() as u32).to_be_bytes().to_vec();
    framed.extend_from_slice(payload);
    for (sub, bytes) in [(kind, payload), ("frames", &framed[..])] {
        let sub = dir.join(sub);
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(sub.join(format!("{hash:016x}")), bytes).unwrap();
    }
}

thread_local! {
    static RECORDED: std::cell::RefCell<Vec<serde_json::Value>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Notes a pinned message for the shared test vectors: its type, its
/// serde form as JSON (externally tagged enums, structs as objects, byte
/// strings as arrays) and its payload.
fn record<T: serde::Serialize>(message: &T, payload: &[u8]) {
    let vector = serde_json::json!({
        "type": std::any::type_name::<T>().rsplit("::").next().unwrap(),
        "message": serde_json::to_value(message).unwrap(),
        "payload": hex(payload),
    });
    RECORDED.with(|recorded| {
        let mut recorded = recorded.borrow_mut();
        if !recorded.contains(&vector) {
            recorded.push(vector);
        }
    });
}

/// The vectors a test pinned must equal `tests/vectors/TEST.json`, which
/// clients in other languages test against (python/tests): a change in
/// the encoding shows there too. `GPUCTL_BLESS=1 cargo test -p
/// gpuctl-protocol --test golden` rewrites the files after a deliberate
/// change.
fn shared_vectors(test: &str) {
    let recorded = RECORDED.with(|recorded| std::mem::take(&mut *recorded.borrow_mut()));
    let text = serde_json::to_string_pretty(&recorded).unwrap() + "\n";
    pinned::check_or_bless(&format!("tests/vectors/{test}.json"), &text, "golden");
}

fn request(id: u64, request: Request) -> ClientMessage {
    ClientMessage::Request { id, request }
}

fn response(id: u64, response: Response) -> DaemonMessage {
    DaemonMessage::Response { id, response }
}

#[test]
fn hello_and_welcome() {
    let hello = ClientMessage::Hello(Hello {
        protocol: PROTOCOL_VERSION,
        client: "ab".into(),
    });
    // len=16 | variant 0 (Hello) | major 1 | minor 6 | string len 2 | "ab"
    assert_eq!(
        frame(&hello),
        "00000012".to_owned() + "00000000" + "0100" + "0600" + "0200000000000000" + "6162"
    );
    let welcome = DaemonMessage::Welcome(Welcome {
        protocol: PROTOCOL_VERSION,
        daemon_version: "0.1.0".into(),
        capabilities: vec!["ping".into()],
    });
    assert_eq!(
        frame(&welcome),
        "00000029".to_owned()
            + "00000000" // Welcome
            + "01000600" // 1.6
            + "0500000000000000"
            + "302e312e30" // "0.1.0"
            + "0100000000000000" // one capability
            + "0400000000000000"
            + "70696e67" // "ping"
    );
    roundtrip(&hello);
    roundtrip(&welcome);
    shared_vectors("hello_and_welcome");
}

#[test]
fn requests() {
    let cases = [
        (
            request(7, Request::Ping(PingRequest {})),
            "00000010 01000000 0700000000000000 00000000",
        ),
        (
            request(7, Request::Status(StatusRequest {})),
            "00000010 01000000 0700000000000000 01000000",
        ),
        (
            request(7, Request::Models(ModelsRequest {})),
            "00000010 01000000 0700000000000000 02000000",
        ),
        (
            request(7, Request::Reload(ReloadRequest {})),
            "00000010 01000000 0700000000000000 03000000",
        ),
    ];
    for (message, expected) in cases {
        assert_eq!(frame(&message), expected.replace(' ', ""), "{message:?}");
        roundtrip(&message);
    }
    shared_vectors("requests");
}

#[test]
fn tensor_streams() {
    let cases = [
        (
            ClientMessage::TensorBegin {
                id: 7,
                dtype: DType::U8,
                shape: vec![2],
            },
            // variant 2 | id 7 | dtype 0 (U8) | one dimension: 2
            "00000020 02000000 0700000000000000 00000000 0100000000000000 0200000000000000",
        ),
        (
            ClientMessage::TensorChunk {
                id: 7,
                data: vec![0xab, 0xcd],
            },
            // variant 3 | id 7 | two bytes
            "00000016 03000000 0700000000000000 0200000000000000 abcd",
        ),
        (
            ClientMessage::TensorEnd { id: 7 },
            "0000000c 04000000 0700000000000000",
        ),
    ];
    for (message, expected) in cases {
        assert_eq!(frame(&message), expected.replace(' ', ""), "{message:?}");
        roundtrip(&message);
    }
    // The daemon's are the same after its five earlier variants.
    let begin = DaemonMessage::TensorBegin {
        id: 7,
        dtype: DType::F32,
        shape: vec![],
    };
    assert_eq!(
        frame(&begin),
        "00000018 05000000 0700000000000000 02000000 0000000000000000".replace(' ', "")
    );
    let chunk = DaemonMessage::TensorChunk {
        id: 7,
        data: vec![1],
    };
    assert_eq!(
        frame(&chunk),
        "00000015 06000000 0700000000000000 0100000000000000 01".replace(' ', "")
    );
    let end = DaemonMessage::TensorEnd { id: 7 };
    assert_eq!(frame(&end), "0000000c070000000700000000000000");
    for message in [begin, chunk, end] {
        roundtrip(&message);
    }
    shared_vectors("tensor_streams");
}

#[test]
fn responses_errors_events() {
    let ping = response(7, Response::Ping(PingResponse {}));
    assert_eq!(
        frame(&ping),
        "00000010 01000000 0700000000000000 00000000".replace(' ', "")
    );

    let reload = response(
        9,
        Response::Reload(ReloadResponse {
            generation: 2,
            changed: true,
            models: 3,
        }),
    );
    assert_eq!(
        frame(&reload),
        "0000001d 01000000 0900000000000000 03000000 0200000000000000 01 03000000".replace(' ', "")
    );

    let error = DaemonMessage::Error {
        id: 9,
        error: Error::new(ErrorCode::Unauthorized, "no"),
    };
    assert_eq!(
        frame(&error),
        "0000001a 02000000 0900000000000000 03000000 0200000000000000 6e6f".replace(' ', "")
    );

    let event = DaemonMessage::Event {
        id: 9,
        event: Event::Progress(ProgressEvent {
            done: 1,
            total: 4,
            message: String::new(),
            elapsed_ms: 2,
            eta_ms: Some(6),
        }),
    };
    assert_eq!(
        frame(&event),
        "00000039 03000000 0900000000000000 00000000 0100000000000000 0400000000000000 0000000000000000 0200000000000000 01 0600000000000000"
            .replace(' ', "")
    );

    let closing = DaemonMessage::Closing(Error::new(ErrorCode::Incompatible, ""));
    assert_eq!(
        frame(&closing),
        "00000010 04000000 09000000 0000000000000000".replace(' ', "")
    );

    let queued = DaemonMessage::Event {
        id: 9,
        event: Event::Queued(QueuedEvent {
            model: "m".into(),
            position: 2,
            waiting_for: String::new(),
        }),
    };
    assert_eq!(
        frame(&queued),
        "00000025 03000000 0900000000000000 01000000 0100000000000000 6d 02000000 0000000000000000"
            .replace(' ', "")
    );
    for message in [ping, reload, error, event, closing, queued] {
        roundtrip(&message);
    }
    shared_vectors("responses_errors_events");
}

#[test]
fn status_and_models_roundtrip() {
    let status = response(
        1,
        Response::Status(StatusResponse {
            daemon_version: "0.1.0".into(),
            pid: 42,
            uptime_ms: 1000,
            socket: "/run/gpuctl/gpuctld.sock".into(),
            config: ConfigStatus {
                path: Some("/etc/gpuctl/gpuctld.toml".into()),
                generation: 3,
                applied_at_unix_ms: 5,
                last_reload: Some(ReloadOutcome {
                    at_unix_ms: 6,
                    trigger: ReloadTrigger::Signal,
                    error: Some("bad".into()),
                }),
            },
            connections: 2,
            models: vec![ModelStatus {
                name: "m".into(),
                state: ModelState::Failed { retry_in_ms: 5 },
                device: None,
                pid: None,
                device_bytes: 0,
                queued: 1,
                in_flight: 0,
                idle_ms: None,
                unload_in_ms: None,
                keep_alive: KeepAlive::Millis(1),
                loads: 2,
                last_load_ms: Some(3),
                last_error: Some("e".into()),
                vram_need: 7,
                vram_need_source: "measured".into(),
                last_unload: Some(UnloadReason::Pressure {
                    holder: Some(Holder {
                        pid: 9,
                        name: "ollama".into(),
                        bytes: 10,
                    }),
                }),
            }],
        }),
    );
    roundtrip(&status);
    let models = response(
        2,
        Response::Models(ModelsResponse {
            models: vec![ModelInfo {
                name: "x".into(),
                kind: ModelKind::Generate,
                path: "/m/x.pt".into(),
                device: "auto".into(),
                keep_alive: KeepAlive::Forever,
                preload: true,
                pin: false,
                group: Some("g".into()),
                scale: None,
                tile: Some(512),
                overlap: Some(32),
                concurrency: 1,
                defaults: GenerateDefaults {
                    size: Some((896, 1152)),
                    steps: Some(40),
                    guidance: Some(8.0),
                },
            }],
        }),
    );
    roundtrip(&models);
    shared_vectors("status_and_models_roundtrip");
}

#[test]
fn arbitration_messages() {
    // len | Request | id 7 | variant 8 (Reserve) | bytes | Some(0) | timeout | None
    assert_eq!(
        frame(&request(
            7,
            Request::Reserve(ReserveRequest {
                bytes: 1 << 30,
                device: Some(0),
                timeout_ms: 1000,
                ttl_ms: None,
            })
        )),
        "00000026".to_owned()
            + "01000000"
            + "0700000000000000"
            + "08000000"
            + "0000004000000000"
            + "01"
            + "00000000"
            + "e803000000000000"
            + "00"
    );
    assert_eq!(
        frame(&request(7, Request::Watch(WatchRequest {}))),
        "00000010".to_owned() + "01000000" + "0700000000000000" + "0a000000"
    );
    let notice = DaemonMessage::Event {
        id: 3,
        event: Event::Notice(Notice {
            at_unix_ms: 1,
            what: NoticeKind::Unloaded {
                model: "up".into(),
                pid: 5,
                reason: UnloadReason::Crash {
                    description: "signal 9".into(),
                },
                reclaimed: 1 << 20,
                took_ms: 140,
            },
        }),
    };
    roundtrip(&notice);
    // UnloadReason::Stuck (1.3) is its ninth variant: it follows Crash.
    let stuck = UnloadReason::Stuck {
        description: "j".into(),
    };
    assert_eq!(
        hex(&encode_payload(&stuck).unwrap()),
        "08000000 0100000000000000 6a".replace(' ', "")
    );
    roundtrip(&stuck);
    let vram = response(
        4,
        Response::Vram(VramResponse {
            backend: "sim".into(),
            reason: "r".into(),
            devices: vec![GpuDevice {
                index: 0,
                name: "Sim".into(),
                total: 10,
                used: 4,
                free: 6,
                processes: vec![GpuProcess {
                    pid: 1,
                    name: "ollama".into(),
                    bytes: 2,
                    model: None,
                    command: "ollama serve".into(),
                }],
                reserved: 2,
                headroom: 1,
            }],
            min_free: 3,
            reservations: vec![ReservationInfo {
                id: 1,
                device: Some(0),
                bytes: 2,
                unused: 2,
                pid: Some(77),
                granted: true,
                age_ms: 5,
            }],
            samples: 9,
        }),
    );
    roundtrip(&vram);
    roundtrip(&response(
        5,
        Response::Reserve(ReserveResponse {
            reservation: 1,
            device: 0,
            bytes: 2,
        }),
    ));
    shared_vectors("arbitration_messages");
}

#[test]
fn generate_then() {
    // len | Request | id 3 | variant 12 (GenerateThen) | the Generate request ...
    let chain = request(
        3,
        Request::GenerateThen(GenerateThenRequest {
            request: GenerateRequest {
                prompt: "fox".into(),
                seed: Some(7),
                ..GenerateRequest::new("gen")
            },
            then: vec!["up".into()],
        }),
    );
    assert!(frame(&chain)[16..].starts_with("0300000000000000" /* id */));
    assert!(frame(&chain)[32..].starts_with("0c000000" /* variant 12 */));
    roundtrip(&chain);
    let step = |model: &str| StepReport {
        model: model.into(),
        device: "cpu".into(),
        queue_ms: 1,
        load_ms: Some(2),
        run_ms: 3,
        notes: vec!["n".into()],
    };
    roundtrip(&response(
        3,
        Response::GenerateThen(GenerateThenResponse {
            response: GenerateResponse {
                model: "up".into(),
                device: "cpu".into(),
                seed: Some(7),
                outputs: vec![WireTensor::new(DType::U8, vec![1, 1, 1, 3], vec![1, 2, 3]).unwrap()],
                queue_ms: 0,
                load_ms: None,
                run_ms: 3,
                notes: vec![],
            },
            steps: vec![step("gen"), step("up")],
        }),
    ));
    shared_vectors("generate_then");
}

/// Error codes travel as their position; appending is the only safe change.
#[test]
fn error_codes_are_stable() {
    let codes = [
        ErrorCode::Internal,
        ErrorCode::InvalidRequest,
        ErrorCode::NotFound,
        ErrorCode::Unauthorized,
        ErrorCode::Busy,
        ErrorCode::QueueFull,
        ErrorCode::InsufficientVram,
        ErrorCode::Timeout,
        ErrorCode::Cancelled,
        ErrorCode::Incompatible,
        ErrorCode::InvalidConfig,
        ErrorCode::ShuttingDown,
        ErrorCode::FrameTooLarge,
        ErrorCode::MalformedFrame,
        ErrorCode::TooLarge,
        ErrorCode::LoadFailed,
        ErrorCode::RetryLater,
    ];
    for (index, code) in codes.iter().enumerate() {
        let payload = encode_payload(code).unwrap();
        assert_eq!(payload, (index as u32).to_le_bytes(), "{code}");
        record(code, &payload);
    }
    shared_vectors("error_codes_are_stable");
}

#[test]
fn tensors_travel_as_raw_bytes() {
    let tensor = WireTensor::new(DType::U8, vec![1, 2], vec![0xaa, 0xbb]).unwrap();
    // dtype U8 (0) | shape: len 2, 1, 2 | data: len 2, aa bb
    assert_eq!(
        hex(&encode_payload(&tensor).unwrap()),
        "00000000 0200000000000000 0100000000000000 0200000000000000 0200000000000000 aabb"
            .replace(' ', "")
    );
    roundtrip(&tensor);
    shared_vectors("tensors_travel_as_raw_bytes");
}

#[test]
fn worker_messages() {
    use gpuctl_protocol::worker::*;
    let load = DaemonToWorker::Load(LoadModel {
        name: "m".into(),
        path: Some("/m.pt".into()),
        kind: ModelKind::Image,
        device: "cpu".into(),
        threads: 2,
        rgb8: true,
        fp16: false,
        options: "{}".into(),
        loras: vec![],
    });
    assert_eq!(
        hex(&encode_payload(&load).unwrap()),
        "00000000 0100000000000000 6d 01 0500000000000000 2f6d2e7074 00000000 0300000000000000 637075 02000000 01 00 0200000000000000 7b7d 0000000000000000"
            .replace(' ', "")
    );
    let run = DaemonToWorker::Run {
        id: 3,
        job: Job::Tensor {
            inputs: vec![WireTensor::new(DType::F32, vec![1], vec![0, 0, 128, 63]).unwrap()],
        },
    };
    // Run | id 4 | Image | input: U8 [1,1,1,3] 3 bytes | no tiling | Rows
    let rows = DaemonToWorker::Run {
        id: 4,
        job: Job::Image {
            input: WireTensor::new(DType::U8, vec![1, 1, 1, 3], vec![1, 2, 3]).unwrap(),
            tiling: None,
            layout: ImageLayout::Rows,
        },
    };
    assert_eq!(
        hex(&encode_payload(&rows).unwrap()),
        "01000000 0400000000000000 00000000 00000000 0400000000000000 0100000000000000 0100000000000000 0100000000000000 0300000000000000 0300000000000000 010203 00 01000000"
            .replace(' ', "")
    );
    roundtrip(&rows);
    let failed = WorkerToDaemon::Failed {
        id: None,
        error: Error::new(ErrorCode::NotFound, "x"),
    };
    assert_eq!(
        hex(&encode_payload(&failed).unwrap()),
        "02000000 00 02000000 0100000000000000 78".replace(' ', "")
    );
    let loaded = WorkerToDaemon::Loaded(Loaded {
        device: "cpu".into(),
        load_ms: 1,
        parameter_bytes: 2,
        device_bytes: 3,
        precision: "fp32".into(),
    });
    roundtrip(&load);
    roundtrip(&DaemonToWorker::Run {
        id: 2,
        job: Job::Generate(GenerateJob {
            noise: WireTensor::placeholder(DType::F32, vec![1, 4, 6, 8]),
            prompt: "a cat".into(),
            negative: String::new(),
            steps: 20,
            guidance: 7.5,
            seed: 42,
            width: 64,
            height: 48,
        }),
    });
    roundtrip(&run);
    roundtrip(&failed);
    roundtrip(&loaded);
    for message in [
        DaemonToWorker::Unload,
        DaemonToWorker::Cancel { id: 3 },
        DaemonToWorker::Tensor(TensorFrame::Begin {
            dtype: DType::U8,
            shape: vec![1, 2],
        }),
        DaemonToWorker::Tensor(TensorFrame::Chunk(vec![1, 2])),
        DaemonToWorker::Tensor(TensorFrame::End),
    ] {
        roundtrip(&message);
    }
    let hello = WorkerToDaemon::Hello(WorkerHello {
        protocol: WORKER_PROTOCOL,
        program: "w".into(),
    });
    // Variant 5 | major 1 | minor 1 | "w": any daemon can read a worker's version.
    assert_eq!(
        hex(&encode_payload(&hello).unwrap()),
        "05000000 0100 0100 0100000000000000 77".replace(' ', "")
    );
    // 1.1: Capabilities (variant 6) | switch_loras true.
    let capabilities = WorkerToDaemon::Capabilities(WorkerCapabilities { switch_loras: true });
    assert_eq!(
        hex(&encode_payload(&capabilities).unwrap()),
        "06000000 01".replace(' ', "")
    );
    // 1.1: Switch (variant 5) | name "b" | one LoRA: path "l", strength 0.5.
    let switch = DaemonToWorker::Switch(SwitchMode {
        name: "b".into(),
        loras: vec![Lora {
            path: "l".into(),
            strength: 0.5,
        }],
    });
    assert_eq!(
        hex(&encode_payload(&switch).unwrap()),
        "05000000 0100000000000000 62 0100000000000000 0100000000000000 6c 0000003f"
            .replace(' ', "")
    );
    roundtrip(&switch);
    roundtrip(&capabilities);
    roundtrip(&WorkerToDaemon::Switched(Loaded {
        device: "cpu".into(),
        load_ms: 1,
        parameter_bytes: 2,
        device_bytes: 3,
        precision: "fp32".into(),
    }));
    for message in [
        hello,
        WorkerToDaemon::Done {
            id: 3,
            outputs: vec![WireTensor::placeholder(DType::U8, vec![1, 2, 2, 3])],
            run_ms: 4,
            notes: vec!["n".into()],
        },
        WorkerToDaemon::Progress {
            id: 3,
            done: 1,
            total: 2,
        },
        WorkerToDaemon::Tensor {
            id: 3,
            frame: TensorFrame::Begin {
                dtype: DType::U8,
                shape: vec![2],
            },
        },
        WorkerToDaemon::Tensor {
            id: 3,
            frame: TensorFrame::Chunk(vec![1, 2]),
        },
        WorkerToDaemon::Tensor {
            id: 3,
            frame: TensorFrame::End,
        },
    ] {
        roundtrip(&message);
    }
    shared_vectors("worker_messages");
}
