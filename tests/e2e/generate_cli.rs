//! `gpuctl generate`: image files and safetensors in and out, decoded and
//! encoded by gpuctl, run through gpuctld and real workers.

use std::path::Path;
use std::process::Command;

use crate::fixture::*;
use crate::models::{config, models_dir};

fn gpuctl_in(daemon: &Daemon, dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(bin("gpuctl"))
        .current_dir(dir)
        .arg("--socket")
        .arg(&daemon.socket)
        .args(args)
        .output()
        .unwrap()
}

fn small_photo(dir: &Path) -> image::RgbImage {
    let photo = image::open(models_dir().join("astronaut.png"))
        .unwrap()
        .to_rgb8();
    let small = image::imageops::resize(&photo, 48, 40, image::imageops::FilterType::Triangle);
    small.save(dir.join("photo.png")).unwrap();
    small.save(dir.join("photo.jpg")).unwrap();
    small.save(dir.join("photo.webp")).unwrap();
    small
}

#[test]
fn images_in_every_format_are_upscaled_and_written_by_extension() {
    let daemon = Daemon::start(&config("", ""));
    let dir = tempfile::tempdir().unwrap();
    let photo = small_photo(dir.path());

    let output = gpuctl_in(&daemon, dir.path(), &["generate", "up", "photo.png"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let said = stdout(&output);
    assert!(
        said.starts_with("wrote photo-up.png: model up on cpu, waited "),
        "{said}"
    );
    assert!(
        said.contains("(load "),
        "the first request reports the load: {said}"
    );
    let chatter = stderr(&output);
    assert!(
        chatter.contains("waiting for up: position 1 in its queue (the model to load)"),
        "{chatter}"
    );
    let up = image::open(dir.path().join("photo-up.png"))
        .unwrap()
        .to_rgb8();
    assert_eq!(up.dimensions(), (96, 80));
    // The upscale resembles its source: compare with a plain resize.
    let reference =
        image::imageops::resize(&photo, 96, 80, image::imageops::FilterType::CatmullRom);
    let mse: f64 = up
        .as_raw()
        .iter()
        .zip(reference.as_raw())
        .map(|(a, b)| (f64::from(*a) - f64::from(*b)).powi(2))
        .sum::<f64>()
        / up.as_raw().len() as f64;
    assert!(
        mse < 150.0,
        "the upscaled image does not look like its source (mse {mse})"
    );

    for (input, out, magic) in [
        ("photo.jpg", "a.webp", &b"RIFF"[..]),
        ("photo.webp", "b.jpg", &[0xff, 0xd8][..]),
        ("photo.png", "c.png", &b"\x89PNG"[..]),
    ] {
        let output = gpuctl_in(&daemon, dir.path(), &["generate", "up", input, "-o", out]);
        assert!(output.status.success(), "{input}: {}", stderr(&output));
        let bytes = std::fs::read(dir.path().join(out)).unwrap();
        assert!(
            bytes.starts_with(magic),
            "{out} is not in the format its extension names"
        );
        assert_eq!(image::load_from_memory(&bytes).unwrap().width(), 96);
    }
}

#[test]
fn a_seed_reproduces_a_generated_image_file() {
    let daemon = Daemon::start(&config("", ""));
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "generate",
        "gen",
        "--prompt",
        "a lighthouse",
        "--seed",
        "3",
        "--size",
        "64x32",
        "--steps",
        "4",
    ];
    let first = gpuctl_in(&daemon, dir.path(), &args);
    assert!(first.status.success(), "{}", stderr(&first));
    assert!(
        stdout(&first).starts_with("wrote gen-3.png: model gen on cpu, seed 3"),
        "{}",
        stdout(&first)
    );
    let image_one = std::fs::read(dir.path().join("gen-3.png")).unwrap();
    assert_eq!(image::load_from_memory(&image_one).unwrap().width(), 64);
    std::fs::remove_file(dir.path().join("gen-3.png")).unwrap();
    assert!(gpuctl_in(&daemon, dir.path(), &args).status.success());
    assert_eq!(
        std::fs::read(dir.path().join("gen-3.png")).unwrap(),
        image_one,
        "same seed, same image"
    );

    let json = gpuctl_in(
        &daemon,
        dir.path(),
        &[
            "--json", "generate", "gen", "--prompt", "x", "--size", "16x16",
        ],
    );
    let report: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let seed = report["seed"].as_u64().expect("a random seed is reported");
    assert_eq!(report["output"], format!("gen-{seed}.png"));
    assert_eq!(report["shapes"], serde_json::json!([[1, 16, 16, 3]]));
    assert!(report["run_ms"].as_u64().is_some());
}

#[test]
fn tensor_models_take_and_give_safetensors() {
    use safetensors::tensor::TensorView;
    use safetensors::Dtype;
    let daemon = Daemon::start(&config("", ""));
    let dir = tempfile::tempdir().unwrap();
    let a: Vec<u8> = [1.0f32, 2.0, 3.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let b: Vec<u8> = [10.0f32, 20.0, 30.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let views = vec![
        ("a", TensorView::new(Dtype::F32, vec![3], &a).unwrap()),
        ("b", TensorView::new(Dtype::F32, vec![3], &b).unwrap()),
    ];
    std::fs::write(
        dir.path().join("in.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
    let output = gpuctl_in(&daemon, dir.path(), &["generate", "ten", "in.safetensors"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let bytes = std::fs::read(dir.path().join("ten-output.safetensors")).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let floats = |name: &str| -> Vec<f32> {
        file.tensor(name)
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    assert_eq!(floats("output_0"), vec![12.0, 24.0, 36.0], "a * 2 + b");
    assert_eq!(floats("output_1"), vec![140.0], "(a * b).sum()");
}

#[test]
fn bad_arguments_are_named() {
    let daemon = Daemon::start(&config("", ""));
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&[&str], i32, &str); 4] = [
        (
            &["generate", "up"],
            2,
            "up is an image model: give an input image",
        ),
        (
            &["generate", "up", "missing.png"],
            2,
            "cannot read missing.png",
        ),
        (
            &["generate", "gen", "x.png"],
            2,
            "gen is a generate model: it takes --prompt",
        ),
        (
            &["generate", "nope", "--prompt", "x"],
            1,
            "no model named \"nope\"",
        ),
    ];
    for (args, code, message) in cases {
        let output = gpuctl_in(&daemon, dir.path(), args);
        assert_eq!(
            output.status.code(),
            Some(code),
            "{args:?}: {}",
            stderr(&output)
        );
        assert!(
            stderr(&output).contains(message),
            "{args:?}: {}",
            stderr(&output)
        );
    }
    std::fs::write(dir.path().join("junk.png"), b"not an image").unwrap();
    let output = gpuctl_in(&daemon, dir.path(), &["generate", "up", "junk.png"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("cannot decode junk.png"),
        "{}",
        stderr(&output)
    );
    daemon.assert_serving();
}

#[test]
fn progress_goes_to_stderr_as_json_lines_with_json_and_nowhere_when_piped() {
    let tiled = config("", "").replace(
        "scale = 2\n",
        "scale = 2\ntile = 32\noverlap = 8\nbatch = 1\n",
    );
    let daemon = Daemon::start(&tiled);
    let dir = tempfile::tempdir().unwrap();
    small_photo(dir.path());

    // 48x40 in tiles of 32 (overlap 8): 2 x 2 tiles, one per forward.
    let output = gpuctl_in(
        &daemon,
        dir.path(),
        &["--json", "generate", "up", "photo.png"],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let lines: Vec<serde_json::Value> = stderr(&output)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let done: Vec<u64> = lines
        .iter()
        .map(|l| l["progress"]["done"].as_u64().unwrap())
        .collect();
    assert_eq!(done, [1, 2, 3, 4], "{}", stderr(&output));
    assert!(lines.iter().all(|l| l["progress"]["total"] == 4));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["shapes"][0], serde_json::json!([1, 80, 96, 3]));

    // Not a terminal, not --json: no progress at all.
    let output = gpuctl_in(&daemon, dir.path(), &["generate", "up", "photo.png"]);
    assert!(output.status.success());
    assert!(!stderr(&output).contains("tile"), "{}", stderr(&output));
}

#[test]
fn ctrl_c_cancels_a_running_generate_and_the_model_stays() {
    let tiled = config("", "").replace(
        "scale = 2\n",
        "scale = 2\ntile = 48\noverlap = 16\nbatch = 1\n",
    );
    let daemon = Daemon::start(&tiled);
    let dir = tempfile::tempdir().unwrap();
    // 512x512 in tiles of 48: 256 forwards, several seconds on 2 cores.
    image::RgbImage::from_fn(512, 512, |x, y| image::Rgb([x as u8, y as u8, 7]))
        .save(dir.path().join("big.png"))
        .unwrap();
    let child = Command::new(bin("gpuctl"))
        .current_dir(dir.path())
        .arg("--socket")
        .arg(&daemon.socket)
        .args(["generate", "up", "big.png"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Rows of the output reach gpuctl, and its file, while tiles still run.
    wait_until(
        "the first rows to be written",
        std::time::Duration::from_secs(60),
        || !partial_files(dir.path()).is_empty(),
    );
    assert_eq!(crate::models::model_status(&daemon, "up")["in_flight"], 1);
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(130), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("gpuctl: cancelled"),
        "{}",
        stderr(&output)
    );
    assert!(!dir.path().join("big-up.png").exists());
    assert_eq!(
        partial_files(dir.path()),
        Vec::<String>::new(),
        "no partial file is left"
    );
    wait_until(
        "the job to stop",
        std::time::Duration::from_secs(30),
        || crate::models::model_status(&daemon, "up")["in_flight"] == 0,
    );
    assert!(daemon
        .log_text()
        .contains("the request was cancelled after"));
    assert_eq!(crate::models::model_status(&daemon, "up")["state"], "Ready");
}

/// Files gpuctl writes while an image streams in, before it is complete.
fn partial_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".partial"))
        .collect()
}

#[test]
fn a_job_that_fails_after_its_first_rows_were_written_leaves_no_file() {
    let faulty = format!(
        "{}\n[models.faulty]\npath = \"tiny-faulty.pt\"\nkind = \"image\"\nscale = 2\n\
         tile = 32\noverlap = 8\nbatch = 1\ntile_retries = 0\n",
        config("", "")
    );
    let daemon = Daemon::start(&faulty);
    let dir = tempfile::tempdir().unwrap();
    // tiny-faulty fails for good on a tile holding a white pixel: here
    // only the bottom rows, so the rows above have streamed by then.
    image::RgbImage::from_fn(96, 160, |x, y| {
        image::Rgb(if y > 150 {
            [255; 3]
        } else {
            [x as u8, y as u8, 9]
        })
    })
    .save(dir.path().join("in.png"))
    .unwrap();
    let output = gpuctl_in(
        &daemon,
        dir.path(),
        &["generate", "faulty", "in.png", "-o", "out.png"],
    );
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("bad pixel (simulated lasting failure)"),
        "{}",
        stderr(&output)
    );
    assert!(!dir.path().join("out.png").exists());
    // Its first rows had been written to a partial file (rows stream in
    // order, ahead of the error): that file is gone too.
    assert_eq!(partial_files(dir.path()), Vec::<String>::new());
}
