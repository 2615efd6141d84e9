//! `Vram` and the GPU backend chosen without an NVIDIA driver.

use super::*;

#[test]
fn vram_shows_devices_our_models_and_other_programs() {
    let dir = tempfile::tempdir().unwrap();
    let foreign = dir.path().join("foreign.json");
    let gpu = format!(
        "[gpu]\nbackend = \"sim\"\n[gpu.sim]\nforeign_usage_file = \"{}\"\n[[gpu.sim.devices]]\nname = \"Sim 24G\"\ntotal = \"24GiB\"\n",
        foreign.display()
    );
    let daemon = Daemon::start(&(config("", "") + &gpu));
    // No file yet: nobody else uses the device.
    let vram = daemon.gpuctl_json(&["vram"]);
    assert_eq!(vram["backend"], "sim");
    assert_eq!(vram["devices"][0]["name"], "Sim 24G");
    assert_eq!(vram["devices"][0]["total"], 24u64 << 30);
    assert_eq!(vram["devices"][0]["used"], 0);

    std::fs::write(
        &foreign,
        r#"[{ "pid": 4121, "name": "ollama", "device": 0, "bytes": 19541180416 }]"#,
    )
    .unwrap();
    assert!(daemon.gpuctl(&["load", "up"]).status.success());
    let vram = daemon.gpuctl_json(&["vram"]);
    let device = &vram["devices"][0];
    let processes = device["processes"].as_array().unwrap();
    let ollama = processes.iter().find(|p| p["pid"] == 4121).unwrap();
    assert_eq!(ollama["name"], "ollama");
    assert!(ollama["model"].is_null());
    let ours = processes
        .iter()
        .find(|p| p["model"] == "up")
        .expect("our worker is listed by model");
    assert_eq!(ours["pid"], model_status(&daemon, "up")["pid"]);
    assert_eq!(ours["bytes"], model_status(&daemon, "up")["device_bytes"]);
    let used = device["used"].as_u64().unwrap();
    assert_eq!(used, 19541180416 + ours["bytes"].as_u64().unwrap());
    assert_eq!(device["free"].as_u64().unwrap(), (24u64 << 30) - used);
    let human = stdout(&daemon.gpuctl(&["vram"]));
    assert!(
        human.contains("GPU 0  Sim 24G  total 24.0 GiB  used 18.2 GiB"),
        "{human}"
    );
    assert!(
        human
            .lines()
            .any(|l| l.starts_with("4121 ") && l.contains(" ollama ")),
        "{human}"
    );

    // A broken file is an error naming it, and disturbs nothing else.
    std::fs::write(&foreign, "[{ \"pid\": 1 }").unwrap();
    let broken = daemon.gpuctl(&["vram"]);
    assert_eq!(broken.status.code(), Some(1));
    assert!(
        stderr(&broken).contains(&foreign.display().to_string()),
        "{}",
        stderr(&broken)
    );
    daemon.assert_serving();
}

#[test]
fn auto_runs_without_a_gpu_where_there_is_no_nvidia_driver() {
    let daemon = Daemon::start(&config("", ""));
    let vram = daemon.gpuctl_json(&["vram"]);
    let has_driver = std::path::Path::new("/proc/driver/nvidia").exists();
    if has_driver {
        eprintln!(
            "SKIPPED the no-driver half: this machine has the NVIDIA driver (backend {})",
            vram["backend"]
        );
        return;
    }
    assert_eq!(vram["backend"], "none");
    assert!(
        vram["reason"]
            .as_str()
            .unwrap()
            .starts_with("auto: no NVIDIA GPU"),
        "{vram}"
    );
    assert_eq!(vram["devices"], serde_json::json!([]));
    assert!(
        daemon.log_text().contains("gpu probe backend=\"none\""),
        "{}",
        daemon.log_text()
    );
    assert!(stdout(&daemon.gpuctl(&["vram"])).starts_with("no GPU (auto: no NVIDIA GPU"));
}
