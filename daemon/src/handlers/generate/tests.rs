use gpuctl_protocol::{DType, WireTensor, PROTOCOL_VERSION};

use super::*;
use crate::config::Config;

const BOUNDS: Bounds = Bounds {
    max_steps: 1000,
    max_output: 4 << 30,
    max_input: 2 << 30,
};

#[test]
fn every_size_a_client_chooses_is_bounded_before_anything_is_made() {
    let config = Config::parse(
        "[models.gen]\npath = \"g.pt\"\nkind = \"generate\"\n\
         [models.wide]\npath = \"w.pt\"\nkind = \"generate\"\nnoise_channels = 64\nlatent_scale = 1\n",
        "t.toml",
    )
    .unwrap();
    let ask = |size: (u32, u32), steps: u32| GenerateRequest {
        prompt: "x".into(),
        size: Some(size),
        steps: Some(steps),
        ..GenerateRequest::new("gen")
    };
    let refuse = |request: GenerateRequest, model: &str| {
        prepare(
            &mut request.clone(),
            &config.models[model],
            &BOUNDS,
            PROTOCOL_VERSION,
        )
        .err()
        .unwrap()
    };
    let error = refuse(ask((4294967288, 4294967288), 1), "gen");
    assert_eq!(error.code, ErrorCode::TooLarge);
    assert!(
        error.message.contains("a 4294967288x4294967288 image")
            && error.message.contains("over daemon.max_output (4.0 GiB)"),
        "{}",
        error.message
    );
    let error = refuse(ask((64, 64), u32::MAX), "gen");
    assert_eq!(error.code, ErrorCode::InvalidRequest);
    assert!(
        error
            .message
            .contains("steps 4294967295 is more than policy.max_steps (1000)"),
        "{}",
        error.message
    );
    // 64 channels at full size: 256 B of noise per pixel.
    let error = refuse(ask((8192, 8192), 1), "wide");
    assert_eq!(error.code, ErrorCode::TooLarge);
    assert!(
        error.message.contains("over daemon.max_upload (2.0 GiB)"),
        "{}",
        error.message
    );
    let (job, noise) = prepare(
        &mut ask((64, 48), 1000),
        &config.models["gen"],
        &BOUNDS,
        PROTOCOL_VERSION,
    )
    .unwrap();
    let noise = noise.unwrap();
    assert_eq!((noise.channels, noise.height, noise.width), (4, 6, 8));
    match job {
        Job::Generate(job) => {
            assert!(job.noise.is_placeholder(), "made later, off the runtime")
        }
        other => panic!("{other:?}"),
    }
    let made = noise.make().unwrap();
    assert_eq!(made.shape, vec![1, 4, 6, 8]);
}

#[test]
fn a_generate_job_carries_its_seed_and_size_for_workers_that_make_their_own_latents() {
    let config = Config::parse(
        "[models.gen]\npath = \"g.pt\"\nkind = \"generate\"\nlatent_scale = 8\n",
        "t.toml",
    )
    .unwrap();
    let mut request = GenerateRequest {
        prompt: "a cat".into(),
        seed: Some(42),
        size: Some((64, 48)),
        ..GenerateRequest::new("gen")
    };
    let (job, noise) = prepare(
        &mut request,
        &config.models["gen"],
        &BOUNDS,
        PROTOCOL_VERSION,
    )
    .unwrap();
    let Job::Generate(job) = job else {
        panic!("{job:?}")
    };
    assert_eq!((job.seed, job.width, job.height), (42, 64, 48));
    assert_eq!(
        noise.map(|n| n.seed),
        Some(42),
        "the daemon's noise from the same seed"
    );
    let mut unseeded = GenerateRequest {
        size: Some((64, 48)),
        ..GenerateRequest::new("gen")
    };
    let (Job::Generate(job), Some(noise)) = prepare(
        &mut unseeded,
        &config.models["gen"],
        &BOUNDS,
        PROTOCOL_VERSION,
    )
    .unwrap() else {
        panic!("no generate job")
    };
    assert_eq!(
        job.seed, noise.seed,
        "the seed gpuctld picked, told to the worker too"
    );
}

fn image_request() -> GenerateRequest {
    GenerateRequest {
        input: Some(WireTensor::new(DType::U8, vec![1, 3, 2, 2], vec![0; 12]).unwrap()),
        ..GenerateRequest::new("up")
    }
}

#[test]
fn the_request_may_choose_its_tiles() {
    let config = Config::parse(
        "[models.up]\npath = \"u.pt\"\nkind = \"image\"\ntile = 256\noverlap = 16\n\
         [models.plain]\npath = \"p.pt\"\nkind = \"image\"\n",
        "t.toml",
    )
    .unwrap();
    let (up, plain) = (&config.models["up"], &config.models["plain"]);
    let ask = |tile: Option<u32>, overlap: Option<u32>| GenerateRequest {
        tile,
        overlap,
        ..image_request()
    };
    let edges = |t: Option<Tiling>| t.map(|t| (t.tile, t.overlap));
    assert_eq!(
        edges(tiling(&ask(None, None), up).unwrap()),
        Some((256, 16))
    );
    assert_eq!(
        edges(tiling(&ask(Some(512), None), up).unwrap()),
        Some((512, 16))
    );
    assert_eq!(
        edges(tiling(&ask(None, Some(8)), up).unwrap()),
        Some((256, 8))
    );
    assert_eq!(edges(tiling(&ask(Some(0), None), up).unwrap()), None);
    assert_eq!(edges(tiling(&ask(None, None), plain).unwrap()), None);
    assert_eq!(
        edges(tiling(&ask(Some(128), None), plain).unwrap()),
        Some((128, 16))
    );
    let error = tiling(&ask(None, Some(8)), plain).unwrap_err();
    assert!(error.contains("needs a tile"), "{error}");
    let error = tiling(&ask(Some(64), Some(32)), plain).unwrap_err();
    assert!(
        error.contains("overlap 32 is too large for tile 64"),
        "{error}"
    );
    let error = tiling(&ask(Some(8), None), plain).unwrap_err();
    assert!(error.contains("at least 16"), "{error}");
}

#[test]
fn an_output_over_max_output_is_refused_before_it_runs() {
    let config = Config::parse(
        "[models.up]\npath = \"u.pt\"\nkind = \"image\"\nscale = 4\n",
        "t.toml",
    )
    .unwrap();
    let up = &config.models["up"];
    let job = |side: u64| Job::Image {
        input: WireTensor::placeholder(DType::U8, vec![1, 3, side, side]),
        tiling: None,
        layout: ImageLayout::Planes,
    };
    // 2048² × 4 → 8192² RGB8 is 192 MiB.
    assert!(check_output_size(&job(2048), up, "up", 192 << 20).is_ok());
    // The same picture as pixel rows, 3000 wide and 1000 high.
    let rows = Job::Image {
        input: WireTensor::placeholder(DType::U8, vec![1, 1000, 3000, 3]),
        tiling: None,
        layout: ImageLayout::Rows,
    };
    let error = check_output_size(&rows, up, "up", 100 << 20).unwrap_err();
    assert!(
        error
            .message
            .contains("a 3000x1000 input makes a 12000x4000 output"),
        "{}",
        error.message
    );
    let error = check_output_size(&job(2048), up, "up", (192 << 20) - 1).unwrap_err();
    assert_eq!(error.code, ErrorCode::TooLarge);
    assert!(
        error
            .message
            .contains("a 2048x2048 input makes a 8192x8192 output (192.0 MiB as RGB8)"),
        "{}",
        error.message
    );
}

#[test]
fn image_inputs_come_as_planes_or_as_rows_of_pixels() {
    let config =
        Config::parse("[models.up]\npath = \"u.pt\"\nkind = \"image\"\n", "t.toml").unwrap();
    let up = &config.models["up"];
    let ask = |shape: Vec<u64>| GenerateRequest {
        input: Some({
            let bytes = shape.iter().product::<u64>() as usize;
            WireTensor::new(DType::U8, shape, vec![0; bytes]).unwrap()
        }),
        ..image_request()
    };
    let layout = |shape: Vec<u64>, peer| match prepare(&mut ask(shape), up, &BOUNDS, peer) {
        Ok((Job::Image { layout, .. }, _)) => Ok(layout),
        Ok((other, _)) => panic!("{other:?}"),
        Err(error) => Err(error.message),
    };
    let old = gpuctl_protocol::LOAD_FAILED;
    assert_eq!(
        layout(vec![1, 3, 4, 5], PROTOCOL_VERSION),
        Ok(ImageLayout::Planes)
    );
    assert_eq!(
        layout(vec![1, 4, 5, 3], PROTOCOL_VERSION),
        Ok(ImageLayout::Rows)
    );
    assert_eq!(layout(vec![1, 3, 4, 5], old), Ok(ImageLayout::Planes));
    let error = layout(vec![1, 4, 5, 3], old).unwrap_err();
    assert!(
        error.contains("must be [N,3,H,W] (planes) or [N,H,W,3]"),
        "{error}"
    );
    let error = layout(vec![1, 4, 5, 6], PROTOCOL_VERSION).unwrap_err();
    assert!(error.contains("got [1, 4, 5, 6]"), "{error}");
}

#[test]
fn an_image_model_with_a_tile_sends_its_tiling() {
    let config = Config::parse(
        "[models.up]\npath = \"u.pt\"\nkind = \"image\"\ntile = 256\noverlap = 16\nbatch = 3\n\
         [models.plain]\npath = \"p.pt\"\nkind = \"image\"\n",
        "t.toml",
    )
    .unwrap();
    match prepare(
        &mut image_request(),
        &config.models["up"],
        &BOUNDS,
        PROTOCOL_VERSION,
    )
    .unwrap()
    .0
    {
        Job::Image { tiling, .. } => assert_eq!(
            tiling,
            Some(Tiling {
                tile: 256,
                overlap: 16,
                batch: 3,
                retries: 2
            })
        ),
        other => panic!("{other:?}"),
    }
    match prepare(
        &mut image_request(),
        &config.models["plain"],
        &BOUNDS,
        PROTOCOL_VERSION,
    )
    .unwrap()
    .0
    {
        Job::Image { tiling, .. } => assert_eq!(tiling, None),
        other => panic!("{other:?}"),
    }
}
