//! Large images end to end: a 2048² PNG through `gpuctl generate` and a ×4
//! model into an 8192² PNG, tensors streamed both ways, with the peak
//! memory of the client, the daemon and the worker measured against the
//! bounds the README documents.

use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::fixture::*;
use crate::models::models_dir;

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
    assert!(
        client_peak <= client_base + 2 * output_bytes + 4 * input_bytes + 128 * MIB,
        "gpuctl: {report}"
    );
    assert!(
        daemon_peak <= daemon_base + output_bytes + 2 * input_bytes + 64 * MIB,
        "gpuctld: {report}"
    );
    // The blend (a float sum, 12 B per output pixel, and a float weight,
    // 4 B), the model's own working memory for one batch of tiles (for
    // tiny-x4 under 8 times the batch's float output), the input as floats.
    let blend = 16 * u64::from(4 * SIZE).pow(2);
    let batch = 4 * 3 * 4 * (436u64 * 4).pow(2);
    assert!(
        worker_peak <= worker_base + blend + 8 * batch + 8 * input_bytes + 128 * MIB,
        "worker: {report}"
    );
}
