//! GPU arbitration end to end on the simulated device: real gpuctld, real
//! workers, and "another program" acted out through the sim's foreign-usage
//! file. Every model is configured with a `vram` figure, which the sim
//! counts its worker with, so the arithmetic below is exact.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gpuctl_protocol::{
    Call, Client, ErrorCode, Event, Notice, NoticeKind, Request, ReserveRequest, Response,
    UnloadReason, WatchRequest,
};
use serde_json::Value;

use crate::fixture::*;
use crate::models::*;

const MIB: u64 = 1 << 20;

/// A 1 GiB simulated GPU and the three test models, each said to need
/// `model_mib`.
struct Sim {
    dir: tempfile::TempDir,
    foreign: PathBuf,
}

impl Sim {
    fn new() -> Sim {
        let dir = open_tempdir();
        let foreign = dir.path().join("foreign.json");
        Sim { dir, foreign }
    }

    fn config(&self, gpu: &str, model_mib: u64) -> String {
        format!(
            r#"model_root = "{root}"
[policy]
keep_alive = "forever"
max_steps = 100000000

[gpu]
backend = "sim"
{gpu}

[gpu.sim]
foreign_usage_file = "{foreign}"

[[gpu.sim.devices]]
name = "Sim 1G"
total = "1GiB"

[models.up]
path = "waifu2x-upconv7-x2.pt"
kind = "image"
scale = 2
vram = "{model_mib}MiB"

[models.gen]
path = "tiny-generate.pt"
kind = "generate"
defaults = {{ size = "64x48", steps = 2, guidance = 5.0 }}
vram = "{model_mib}MiB"

[models.ten]
path = "tiny-tensor.pt"
kind = "tensor"
vram = "{model_mib}MiB"
"#,
            root = models_dir().display(),
            foreign = self.foreign.display()
        )
    }

    fn start(self, config: &str) -> (Daemon, PathBuf) {
        let foreign = self.foreign.clone();
        (Daemon::start_in(self.dir, DaemonSpec::new(config)), foreign)
    }
}

/// Acts out "ollama (pid 4121)" holding `mib` on GPU 0 (written atomically:
/// the daemon may read at any moment).
fn ollama_holds(foreign: &Path, mib: u64) {
    let json = if mib == 0 {
        "[]".to_owned()
    } else {
        format!(
            r#"[{{ "pid": 4121, "name": "ollama", "device": 0, "bytes": {} }}]"#,
            mib * MIB
        )
    };
    let next = foreign.with_extension("next");
    std::fs::write(&next, json).unwrap();
    std::fs::rename(&next, foreign).unwrap();
}

fn load(daemon: &Daemon, model: &str) {
    let output = daemon.gpuctl(&["load", model]);
    assert!(
        output.status.success(),
        "{}\n{}",
        stderr(&output),
        daemon.log_text()
    );
}

fn vram(daemon: &Daemon) -> Value {
    daemon.gpuctl_json(&["vram"])
}

fn loads(daemon: &Daemon, model: &str) -> u64 {
    model_status(daemon, model)["loads"].as_u64().unwrap()
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Reads notices from a watch until `want` matches one, within 30 s.
async fn next_notice(watch: &mut Call, what: &str, want: impl Fn(&Notice) -> bool) -> Notice {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match tokio::time::timeout_at(deadline, watch.event()).await {
            Ok(Some(Event::Notice(notice))) if want(&notice) => return notice,
            Ok(Some(_)) => {}
            Ok(None) => panic!("the watch ended while waiting for {what}"),
            Err(_) => panic!("no notice of {what} within 30 s"),
        }
    }
}

/// The first `Queued` event saying the request waits for GPU memory.
async fn waiting_for_gpu(job: &mut Call) -> String {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), job.event()).await {
            Ok(Some(Event::Queued(queued))) if queued.waiting_for.contains("GPU") => {
                return queued.waiting_for;
            }
            Ok(Some(_)) => {}
            other => panic!("no event saying it waits for GPU memory: {other:?}"),
        }
    }
}

fn unloaded<'a>(notice: &'a Notice, model: &str) -> Option<&'a UnloadReason> {
    match &notice.what {
        NoticeKind::Unloaded {
            model: m, reason, ..
        } if m == model => Some(reason),
        _ => None,
    }
}

fn names_ollama(reason: &UnloadReason) -> bool {
    matches!(reason, UnloadReason::Pressure { holder: Some(h) } if h.pid == 4121 && h.name == "ollama")
}

#[test]
fn admission_evicts_the_least_recently_used_idle_model_to_fit() {
    let sim = Sim::new();
    let config = sim.config("min_free_vram = \"100MiB\"", 200);
    let (daemon, foreign) = sim.start(&config);
    ollama_holds(&foreign, 500);
    // gpuctl watch --json, as a user would run it beside.
    let watch = Command::new(bin("gpuctl"))
        .args([
            "--socket",
            daemon.socket.to_str().unwrap(),
            "--json",
            "watch",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("the watcher to connect", Duration::from_secs(10), || {
        daemon.status()["connections"].as_u64() == Some(2)
    });

    // 524 MiB free: ten fits (200 + 100 left free), then up; 124 MiB left.
    load(&daemon, "ten");
    load(&daemon, "up");
    // gen needs 300: ten, the least recently used idle model, makes room;
    // up stays.
    load(&daemon, "gen");
    assert_eq!(model_status(&daemon, "gen")["state"], "Ready");
    assert_eq!(model_status(&daemon, "up")["state"], "Ready");
    assert_eq!(model_status(&daemon, "ten")["state"], "Unloaded");
    assert_eq!(model_status(&daemon, "ten")["last_unload"], "Lru");

    let shown = vram(&daemon);
    let device = &shown["devices"][0];
    assert_eq!(device["free"].as_u64(), Some(124 * MIB), "{shown}");
    assert_eq!(device["headroom"].as_u64(), Some(24 * MIB), "{shown}");
    let holders: Vec<(Value, Value)> = device["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].clone(), p["model"].clone()))
        .collect();
    assert!(holders.contains(&("ollama".into(), Value::Null)), "{shown}");
    assert!(
        holders.contains(&("gpuctl-worker".into(), "up".into())),
        "{shown}"
    );
    assert!(
        holders.contains(&("gpuctl-worker".into(), "gen".into())),
        "{shown}"
    );
    let table = stdout(&daemon.gpuctl(&["vram"]));
    assert!(table.contains("headroom 24.0 MiB"), "{table}");
    assert!(table.contains("ollama"), "{table}");

    // The watcher saw the loads and the unload with its reason.
    wait_until("the unload to be verified", Duration::from_secs(10), || {
        daemon.log_text().contains("unloaded: reclaimed 200.0 MiB")
    });
    unsafe { libc::kill(watch.id() as i32, libc::SIGINT) };
    let output = watch.wait_with_output().unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let notices: Vec<Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ten_unloaded = notices
        .iter()
        .find(|n| n["what"]["Unloaded"]["model"] == "ten")
        .unwrap_or_else(|| panic!("{notices:?}"));
    assert_eq!(ten_unloaded["what"]["Unloaded"]["reason"], "Lru");
    assert_eq!(
        ten_unloaded["what"]["Unloaded"]["reclaimed"].as_u64(),
        Some(200 * MIB)
    );
    assert_eq!(
        notices
            .iter()
            .filter(|n| n["what"]["Loaded"].is_object())
            .count(),
        3,
        "{notices:?}"
    );
}

#[test]
fn a_load_waits_for_memory_and_proceeds_when_it_is_released() {
    let sim = Sim::new();
    let config = sim.config("min_free_vram = \"100MiB\"\nload_wait = \"1m\"", 200);
    let (daemon, foreign) = sim.start(&config);
    ollama_holds(&foreign, 800);
    runtime().block_on(async {
        let client = Client::connect(&daemon.socket).await.unwrap();
        let mut job = client
            .start(Request::Generate(tensor_request()))
            .await
            .unwrap();
        // 224 MiB free < 200 + 100: it waits, and its client is told why.
        let waiting_for = waiting_for_gpu(&mut job).await;
        assert_eq!(
            waiting_for,
            "waiting for 200.0 MiB on GPU 0: ollama (pid 4121) holds 800.0 MiB"
        );
        assert_eq!(model_status(&daemon, "ten")["state"], "WaitingForVram");
        assert_eq!(loads(&daemon, "ten"), 0);

        // ollama lets go: the load proceeds at the next sample.
        ollama_holds(&foreign, 0);
        assert!(matches!(job.response().await, Ok(Response::Generate(_))));
        assert_eq!(loads(&daemon, "ten"), 1);
    });
}

#[test]
fn a_load_that_never_fits_fails_with_insufficient_vram() {
    let sim = Sim::new();
    let config = sim.config("min_free_vram = \"100MiB\"\nload_wait = \"1s\"", 200);
    let (daemon, foreign) = sim.start(&config);
    ollama_holds(&foreign, 900);
    runtime().block_on(async {
        let client = Client::connect(&daemon.socket).await.unwrap();
        let started = Instant::now();
        let error = daemon_error(generate(&client, tensor_request()).await);
        assert_eq!(error.code, ErrorCode::InsufficientVram);
        assert!(started.elapsed() >= Duration::from_secs(1));
        assert_eq!(
            error.message,
            "model ten needs 200.0 MiB (configured) plus 100.0 MiB left free (gpu.min_free_vram), \
             but only 124.0 MiB is free after waiting 1s (gpu.load_wait): waiting for 200.0 MiB \
             on GPU 0: ollama (pid 4121) holds 900.0 MiB"
        );
    });
    let output = daemon.gpuctl(&["load", "ten"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("(insufficient_vram)")
            && stderr(&output).contains("ollama (pid 4121) holds 900.0 MiB"),
        "{}",
        stderr(&output)
    );
    // Nothing was disturbed: the daemon serves, and no load was tried.
    daemon.assert_serving();
    assert_eq!(loads(&daemon, "ten"), 0);
    assert_eq!(model_status(&daemon, "ten")["state"], "Unloaded");
}

#[test]
fn pressure_unloads_idle_models_then_busy_ones_after_their_work_without_thrashing() {
    let sim = Sim::new();
    let poll = Duration::from_millis(250);
    let config = sim.config(
        "poll_interval = \"250ms\"\nmin_free_vram = \"300MiB\"\nload_wait = \"1s\"",
        100,
    );
    let (daemon, foreign) = sim.start(&config);
    runtime().block_on(async {
        let client = Client::connect(&daemon.socket).await.unwrap();
        let mut watch = client.start(Request::Watch(WatchRequest {})).await.unwrap();
        load(&daemon, "ten");
        load(&daemon, "up");
        let job = start_slow_job(&client, &daemon, 400_000).await;
        // 724 MiB free. ollama takes 700: 24 MiB free, 276 short of the
        // headroom: both idle models go at once, busy gen after its job.
        let grew_at = unix_ms();
        ollama_holds(&foreign, 700);
        let pressure = next_notice(&mut watch, "pressure", |n| {
            matches!(n.what, NoticeKind::Pressure { .. })
        })
        .await;
        assert!(
            pressure.at_unix_ms - grew_at <= 2 * poll.as_millis() as u64 + 250,
            "pressure seen {} ms after the foreign program grew",
            pressure.at_unix_ms - grew_at
        );
        match &pressure.what {
            NoticeKind::Pressure {
                device: 0,
                free,
                holder: Some(holder),
                ..
            } => {
                assert_eq!(*free, 24 * MIB);
                assert_eq!((holder.pid, holder.name.as_str()), (4121, "ollama"));
            }
            other => panic!("{other:?}"),
        }
        // Workers exit in any order.
        let mut idle_gone = Vec::new();
        while idle_gone.len() < 2 {
            let notice = next_notice(&mut watch, "ten and up unloaded", |n| {
                unloaded(n, "ten").is_some() || unloaded(n, "up").is_some()
            })
            .await;
            let NoticeKind::Unloaded { model, reason, .. } = notice.what else {
                unreachable!()
            };
            assert!(names_ollama(&reason), "{reason:?}");
            idle_gone.push(model);
        }
        idle_gone.sort();
        assert_eq!(idle_gone, ["ten", "up"]);
        assert_eq!(
            model_status(&daemon, "gen")["state"],
            "Ready",
            "the busy model is not killed"
        );
        assert!(matches!(job.response().await, Ok(Response::Generate(_))));
        let notice = next_notice(&mut watch, "gen", |n| unloaded(n, "gen").is_some()).await;
        assert!(
            names_ollama(unloaded(&notice, "gen").unwrap()),
            "{notice:?}"
        );

        // 324 MiB free now: no pressure, and a model that would bring it
        // back (100 + 300) is not loaded and evicted in a loop.
        for _ in 0..3 {
            let error = daemon_error(generate(&client, tensor_request()).await);
            assert_eq!(error.code, ErrorCode::InsufficientVram, "{}", error.message);
        }
        assert_eq!(loads(&daemon, "ten"), 1, "{}", daemon.log_text());
    });
}

#[test]
fn a_reservation_frees_memory_keeps_loads_out_and_ends_with_its_connection() {
    let sim = Sim::new();
    let config = sim.config(
        "poll_interval = \"100ms\"\nmin_free_vram = \"100MiB\"\nload_wait = \"1m\"",
        200,
    );
    let (daemon, _foreign) = sim.start(&config);
    load(&daemon, "ten");
    load(&daemon, "gen");
    runtime().block_on(async {
        // 624 MiB free; 800 wanted: ten, the least recently used, goes.
        let holder = Client::connect(&daemon.socket).await.unwrap();
        let granted = match holder
            .call(Request::Reserve(ReserveRequest {
                bytes: 800 * MIB,
                device: None,
                timeout_ms: 30_000,
                ttl_ms: None,
            }))
            .await
            .unwrap()
        {
            Response::Reserve(granted) => granted,
            other => panic!("{other:?}"),
        };
        assert_eq!(granted.device, 0);
        assert_eq!(model_status(&daemon, "ten")["last_unload"], "Reservation");
        assert_eq!(model_status(&daemon, "gen")["state"], "Ready");
        let shown = vram(&daemon);
        assert_eq!(shown["devices"][0]["reserved"].as_u64(), Some(800 * MIB));
        assert_eq!(shown["devices"][0]["headroom"].as_u64(), Some(0));
        assert_eq!(shown["reservations"][0]["granted"], true, "{shown}");

        // The reserved memory is kept out of loads: up waits, even with
        // gen evicted (824 free - 800 reserved - 100 left free + 200 < 200)...
        let client = Client::connect(&daemon.socket).await.unwrap();
        let mut job = client
            .start(Request::Generate(gpuctl_protocol::GenerateRequest {
                input: Some(
                    gpuctl_protocol::WireTensor::new(
                        gpuctl_protocol::DType::U8,
                        vec![1, 3, 8, 8],
                        vec![128; 192],
                    )
                    .unwrap(),
                ),
                ..request("up")
            }))
            .await
            .unwrap();
        let waiting_for = waiting_for_gpu(&mut job).await;
        assert!(
            waiting_for.contains("reservations keep 800.0 MiB"),
            "{waiting_for}"
        );
        // ...until the reserving client disconnects.
        drop(holder);
        let answer = job.response().await;
        assert!(matches!(answer, Ok(Response::Generate(_))), "{answer:?}");
        assert_eq!(vram(&daemon)["reservations"], serde_json::json!([]));
    });

    // gpuctl reserve -- COMMAND: runs it once granted, passes its status
    // through, releases when it exits.
    let output = daemon.gpuctl(&[
        "reserve",
        "300MiB",
        "--",
        "sh",
        "-c",
        "echo running; exit 3",
    ]);
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    assert_eq!(stdout(&output), "running\n");
    assert!(
        stderr(&output).contains("reserved 300.0 MiB on GPU 0"),
        "{}",
        stderr(&output)
    );
    assert_eq!(vram(&daemon)["reservations"], serde_json::json!([]));

    // Without a command it holds until Ctrl-C.
    let held = Command::new(bin("gpuctl"))
        .args([
            "--socket",
            daemon.socket.to_str().unwrap(),
            "reserve",
            "100MiB",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(
        "the reservation to be granted",
        Duration::from_secs(30),
        || vram(&daemon)["reservations"][0]["granted"] == true,
    );
    unsafe { libc::kill(held.id() as i32, libc::SIGINT) };
    let output = held.wait_with_output().unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("released 100.0 MiB"),
        "{}",
        stderr(&output)
    );
    assert_eq!(vram(&daemon)["reservations"], serde_json::json!([]));
    assert!(daemon.log_text().contains("why=\"connection closed\""));
    assert!(daemon.log_text().contains("why=\"released\""));
}

#[test]
fn a_reservation_that_cannot_be_met_times_out_with_a_clear_error() {
    let sim = Sim::new();
    let config = sim.config("poll_interval = \"100ms\"", 200);
    let (daemon, foreign) = sim.start(&config);
    ollama_holds(&foreign, 900);
    let output = daemon.gpuctl(&["reserve", "500MiB", "--timeout", "500ms", "--", "true"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains(
            "cannot keep 500.0 MiB free on GPU 0 within 500ms: 124.0 MiB is free; ollama (pid 4121) holds 900.0 MiB"
        ),
        "{}",
        stderr(&output)
    );
    let output = daemon.gpuctl(&["reserve", "1MiB", "--device", "3", "--", "true"]);
    assert!(
        stderr(&output).contains("there is no GPU 3"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn the_measured_need_replaces_the_estimate_and_survives_a_restart() {
    let state = open_tempdir();
    let sim = Sim::new();
    // No `vram` for the models: file size × 1.2, then what was measured.
    let config = sim
        .config("", 1)
        .lines()
        .filter(|l| !l.starts_with("vram"))
        .collect::<Vec<_>>()
        .join("\n");
    let spec = || DaemonSpec::new(&config).env("STATE_DIRECTORY", state.path().to_str().unwrap());
    let file_bytes = std::fs::metadata(models_dir().join("tiny-generate.pt"))
        .unwrap()
        .len();
    let mut daemon = Daemon::start_in(sim.dir, spec());
    let before = model_status(&daemon, "gen");
    assert_eq!(before["vram_need_source"], "file size × 1.2");
    assert_eq!(before["vram_need"].as_u64(), Some(file_bytes * 120 / 100));
    load(&daemon, "gen");
    let reported = model_status(&daemon, "gen")["device_bytes"]
        .as_u64()
        .unwrap();
    wait_until("the measurement", Duration::from_secs(10), || {
        model_status(&daemon, "gen")["vram_need_source"] == "measured"
    });
    assert_eq!(
        model_status(&daemon, "gen")["vram_need"].as_u64(),
        Some(reported)
    );
    wait_until("the state file", Duration::from_secs(10), || {
        state.path().join("measured.json").exists()
    });
    daemon.stop();

    let daemon = Daemon::start_with(spec());
    let after = model_status(&daemon, "gen");
    assert_eq!(after["vram_need_source"], "measured");
    assert_eq!(after["vram_need"].as_u64(), Some(reported));
}

#[test]
fn an_idle_daemon_does_not_sample_the_gpu() {
    let sim = Sim::new();
    let config = sim.config("poll_interval = \"20ms\"", 100);
    let (daemon, _foreign) = sim.start(&config);
    let samples = |daemon: &Daemon| vram(daemon)["samples"].as_u64().unwrap();
    let first = samples(&daemon);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        samples(&daemon),
        first + 1,
        "with nothing on the GPU, only `vram` itself samples"
    );
    load(&daemon, "ten");
    let loaded = samples(&daemon);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        samples(&daemon) > loaded + 5,
        "a resident model is watched every poll_interval"
    );
    assert!(daemon.gpuctl(&["unload", "ten"]).status.success());
    std::thread::sleep(Duration::from_millis(200));
    let idle = samples(&daemon);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(samples(&daemon), idle + 1, "idle again: polling stopped");
}

#[test]
fn a_worker_that_ignores_unload_is_killed_after_the_grace_period() {
    let daemon = Daemon::start(&config("", ""));
    load(&daemon, "ten");
    let pid = model_status(&daemon, "ten")["pid"].as_u64().unwrap();
    // A stopped process cannot answer Unload.
    unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
    let started = Instant::now();
    let output = daemon.gpuctl(&["unload", "ten"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert!(!pid_alive(pid));
    assert!(
        daemon
            .log_text()
            .contains("worker did not exit after Unload; killing it"),
        "{}",
        daemon.log_text()
    );
    assert!(daemon.log_text().contains("unloaded: reclaimed"));
}

#[test]
fn reservations_belong_to_their_connection_and_end_with_their_ttl() {
    let sim = Sim::new();
    let config = sim.config("poll_interval = \"100ms\"", 200);
    let (daemon, foreign) = sim.start(&config);
    let reserve = |bytes: u64, ttl_ms: Option<u64>| {
        Request::Reserve(ReserveRequest {
            bytes,
            device: Some(0),
            timeout_ms: 30_000,
            ttl_ms,
        })
    };
    runtime().block_on(async {
        let owner = Client::connect(&daemon.socket).await.unwrap();
        let other = Client::connect(&daemon.socket).await.unwrap();
        let granted = match owner.call(reserve(100 * MIB, None)).await.unwrap() {
            Response::Reserve(granted) => granted,
            other => panic!("{other:?}"),
        };
        let release = Request::Release(gpuctl_protocol::ReleaseRequest {
            reservation: granted.reservation,
        });
        let error = daemon_error(other.call(release.clone()).await);
        assert_eq!(error.code, ErrorCode::Unauthorized, "{}", error.message);
        assert!(matches!(
            owner.call(release.clone()).await,
            Ok(Response::Release(r)) if r.bytes == 100 * MIB
        ));
        assert_eq!(
            daemon_error(owner.call(release).await).code,
            ErrorCode::NotFound
        );

        // A ttl ends it while the connection stays open.
        assert!(matches!(
            owner.call(reserve(100 * MIB, Some(300))).await,
            Ok(Response::Reserve(_))
        ));
        wait_until("the ttl to end it", Duration::from_secs(10), || {
            vram(&daemon)["reservations"] == serde_json::json!([])
        });
        assert!(daemon.log_text().contains("why=\"ttl expired\""));

        // Released while it still waits: its asker is told.
        ollama_holds(&foreign, 1000);
        let waiting = owner.start(reserve(500 * MIB, None)).await.unwrap();
        wait_until("the reservation to wait", Duration::from_secs(10), || {
            vram(&daemon)["reservations"][0]["granted"] == false
        });
        let id = vram(&daemon)["reservations"][0]["id"].as_u64().unwrap();
        assert!(matches!(
            owner
                .call(Request::Release(gpuctl_protocol::ReleaseRequest {
                    reservation: id
                }))
                .await,
            Ok(Response::Release(_))
        ));
        let error = daemon_error(waiting.response().await);
        assert_eq!(error.code, ErrorCode::Cancelled, "{}", error.message);
    });
    daemon.assert_serving();
}
