use gpuctl_protocol::worker::{GenerateJob, Job, Tiling};
use gpuctl_protocol::{
    Error, ErrorCode, GenerateRequest, GenerateResponse, ImageLayout, ProtocolVersion, WireTensor,
    IMAGE_SHAPES,
};

use crate::config::{check_tiling, Kind, ModelConfig};
use crate::context::Context;
use crate::noise;
use crate::outbox::EventSink;
use crate::registry::{not_found, PreparedJob};

/// Defaults when neither the request nor the model's `defaults` say.
const DEFAULT_SIZE: (u32, u32) = (512, 512);
const DEFAULT_STEPS: u32 = 20;
const DEFAULT_GUIDANCE: f32 = 7.5;

pub async fn handle(
    mut request: GenerateRequest,
    ctx: &Context,
    events: EventSink,
) -> Result<GenerateResponse, Error> {
    let config = ctx.registry.config();
    let model = config
        .models
        .get(&request.model)
        .ok_or_else(|| not_found(&request.model, &config))?;
    let bounds = Bounds {
        max_steps: config.policy.max_steps,
        max_output: config.daemon.max_output.0,
        max_input: config.daemon.max_upload.0,
    };
    let (mut job, noise) = prepare(&mut request, model, &bounds, events.peer())?;
    check_output_size(&job, model, &request.model, bounds.max_output)?;
    // The noise is an input the daemon holds for the request, like an
    // upload: it counts against daemon.max_upload_total while it runs.
    let mut _noise_permit = None;
    let seed = match noise {
        Some(noise) => {
            _noise_permit =
                Some(ctx.budget.take(noise.bytes() as usize).ok_or_else(|| {
                    busy_with_uploads(&request.model, noise.bytes(), &ctx.budget)
                })?);
            let seed = noise.seed;
            let made = tokio::task::spawn_blocking(move || noise.make())
                .await
                .map_err(|e| Error::new(ErrorCode::Internal, format!("making noise failed: {e}")))?
                .map_err(|problem| {
                    Error::new(
                        ErrorCode::TooLarge,
                        format!("model {}: {problem}", request.model),
                    )
                })?;
            if let Job::Generate(job) = &mut job {
                job.noise = made;
            }
            Some(seed)
        }
        None => None,
    };
    let limit = request
        .timeout_ms
        .map(std::time::Duration::from_millis)
        .unwrap_or(config.policy.request_timeout.0);
    let name = request.model.clone();
    // Workers send pictures as rows of RGB8 pixels; clients before protocol
    // 1.2 take them planar.
    let planar = model.kind != crate::config::Kind::Tensor && !events.takes_pixel_rows();
    let job = PreparedJob {
        model: request.model,
        job,
        seed,
        keep_alive: request.keep_alive,
        events: Some(events),
    };
    let response = if limit.is_zero() {
        ctx.registry.run(job).await?
    } else {
        // Dropping the call on timeout tells the registry its client is gone:
        // a queued request leaves the queue, a running job is stopped (and its
        // worker killed if it does not stop within policy.cancel_grace).
        tokio::time::timeout(limit, ctx.registry.run(job))
            .await
            .unwrap_or_else(|_| {
                Err(Error::new(
                    ErrorCode::Timeout,
                    format!(
                        "model {name}: the request did not finish within {} (policy.request_timeout, or the request's own timeout); it was stopped",
                        gpuctl_protocol::units::format_duration_ms(limit.as_millis() as u64)
                    ),
                ))
            })?
    };
    if planar {
        to_planar(response).await
    } else {
        Ok(response)
    }
}

/// Up to `daemon.max_output` of pixels made planar: CPU work, off the runtime.
async fn to_planar(mut response: GenerateResponse) -> Result<GenerateResponse, Error> {
    let outputs = std::mem::take(&mut response.outputs);
    let model = response.model.clone();
    response.outputs = tokio::task::spawn_blocking(move || {
        outputs.into_iter().map(crate::pixels::to_planar).collect()
    })
    .await
    .map_err(|error| {
        Error::new(
            ErrorCode::Internal,
            format!("model {model}: making its output planar failed: {error}"),
        )
    })?;
    Ok(response)
}

/// What the daemon-wide upload budget being spent means to a client.
pub fn busy_with_uploads(model: &str, bytes: u64, budget: &crate::budget::Budget) -> Error {
    let fmt = gpuctl_protocol::units::format_bytes;
    Error::new(
        ErrorCode::Busy,
        format!(
            "model {model}: gpuctld holds {} of inputs for its clients, and {} more would pass daemon.max_upload_total ({}); try again later",
            fmt(budget.held() as u64),
            fmt(bytes),
            fmt(budget.limit() as u64)
        ),
    )
}

/// Limits on what a request may make the daemon allocate or compute.
struct Bounds {
    /// `policy.max_steps`.
    max_steps: u32,
    /// `daemon.max_output`.
    max_output: u64,
    /// `daemon.max_upload`: also bounds the noise the daemon makes.
    max_input: u64,
}

/// The noise a `generate` request needs, made off the async runtime.
struct NoiseSpec {
    seed: u64,
    channels: u32,
    height: u32,
    width: u32,
}

impl NoiseSpec {
    fn bytes(&self) -> u64 {
        noise::bytes(self.channels, self.height, self.width)
    }

    fn make(self) -> Result<WireTensor, String> {
        noise::gaussian(self.seed, self.channels, self.height, self.width)
    }
}

/// An image model's output size is known before it runs: refuse one that
/// would be too large at once, rather than after minutes of work.
fn check_output_size(job: &Job, model: &ModelConfig, name: &str, limit: u64) -> Result<(), Error> {
    let (Job::Image { input, layout, .. }, Some(scale)) = (job, model.scale) else {
        return Ok(());
    };
    let Some((n, h, w)) = layout.dims(&input.shape) else {
        return Ok(());
    };
    let bytes = [n, 3, h, w, u64::from(scale), u64::from(scale)]
        .iter()
        .try_fold(1u64, |a, b| a.checked_mul(*b))
        .unwrap_or(u64::MAX);
    if bytes <= limit {
        return Ok(());
    }
    let (s, fmt) = (u64::from(scale), gpuctl_protocol::units::format_bytes);
    Err(Error::new(
        ErrorCode::TooLarge,
        format!(
            "model {name}: a {w}x{h} input makes a {}x{} output ({} as RGB8), over daemon.max_output ({})",
            w.saturating_mul(s),
            h.saturating_mul(s),
            fmt(bytes),
            fmt(limit)
        ),
    ))
}

/// The tiling of an image request: the request's tile and overlap, else
/// the model's; tile 0 means none.
fn tiling(request: &GenerateRequest, model: &ModelConfig) -> Result<Option<Tiling>, String> {
    let tile = request.tile.or(model.tile).unwrap_or(0);
    if tile == 0 {
        return match request.overlap {
            Some(_) => Err("an overlap needs a tile, and this request has none".into()),
            None => Ok(None),
        };
    }
    // The model's overlap suits its receptive field; without one, an
    // eighth of the tile is enough for the feather to hide most seams.
    let overlap = match (request.overlap, request.tile) {
        (Some(overlap), _) => overlap,
        (None, None) => model.overlap.unwrap_or(0),
        (None, Some(_)) => model.overlap.unwrap_or(tile / 8),
    };
    check_tiling(tile, overlap).map_err(|(_, problem)| problem)?;
    Ok(Some(Tiling {
        tile,
        overlap,
        batch: model.batch,
        retries: model.tile_retries,
    }))
}

/// Checks the request against the model's kind and builds the worker's
/// job, moving the request's tensors into it. Every size the client
/// chose is checked against its bound before anything is allocated; a
/// `generate` job's noise is left to make (see [`NoiseSpec`]).
fn prepare(
    request: &mut GenerateRequest,
    model: &ModelConfig,
    bounds: &Bounds,
    peer: ProtocolVersion,
) -> Result<(Job, Option<NoiseSpec>), Error> {
    let name = &request.model;
    let invalid = |problem: String| {
        Error::new(
            ErrorCode::InvalidRequest,
            format!("model {name}: {problem}"),
        )
    };
    let text_given = !request.prompt.is_empty() || !request.negative.is_empty();
    let tiling_given = request.tile.is_some() || request.overlap.is_some();
    let generate_given = text_given
        || request.seed.is_some()
        || request.steps.is_some()
        || request.guidance.is_some()
        || request.size.is_some();
    match model.kind {
        Kind::Image => {
            if !request.inputs.is_empty() || generate_given {
                return Err(invalid(
                    "is an image model: it takes one input image and nothing else".into(),
                ));
            }
            let tiling = tiling(request, model).map_err(invalid)?;
            let input = request
                .input
                .take()
                .ok_or_else(|| invalid("is an image model: send an input image".into()))?;
            input.check().map_err(invalid)?;
            let layout = ImageLayout::of(&input.shape, peer).ok_or_else(|| {
                invalid(format!(
                    "an image input must be {IMAGE_SHAPES}, got {:?}",
                    input.shape
                ))
            })?;
            Ok((
                Job::Image {
                    input,
                    tiling,
                    layout,
                },
                None,
            ))
        }
        Kind::Tensor => {
            if request.input.is_some() || generate_given || tiling_given {
                return Err(invalid(
                    "is a tensor model: it takes input tensors only".into(),
                ));
            }
            for tensor in &request.inputs {
                tensor.check().map_err(invalid)?;
            }
            let inputs = std::mem::take(&mut request.inputs);
            Ok((Job::Tensor { inputs }, None))
        }
        Kind::Generate => {
            if request.input.is_some() || !request.inputs.is_empty() || tiling_given {
                return Err(invalid(
                    "is a generate model: it takes a prompt, not input images, tensors or tiles"
                        .into(),
                ));
            }
            let defaults = &model.defaults;
            let (width, height) = request
                .size
                .or(defaults.size.map(|s| (s.width, s.height)))
                .unwrap_or(DEFAULT_SIZE);
            let scale = model.latent_scale;
            if width == 0 || height == 0 || width % scale != 0 || height % scale != 0 {
                return Err(invalid(format!(
                    "size {width}x{height} must be positive multiples of {scale} (latent_scale)"
                )));
            }
            let steps = request.steps.or(defaults.steps).unwrap_or(DEFAULT_STEPS);
            if steps == 0 {
                return Err(invalid("steps must be at least 1".into()));
            }
            if steps > bounds.max_steps {
                return Err(invalid(format!(
                    "steps {steps} is more than policy.max_steps ({})",
                    bounds.max_steps
                )));
            }
            let fmt = gpuctl_protocol::units::format_bytes;
            // [1,3,H,W] as RGB8, which is what a generate model's worker sends.
            let output = 3u64
                .saturating_mul(u64::from(width))
                .saturating_mul(u64::from(height));
            if output > bounds.max_output {
                return Err(Error::new(
                    ErrorCode::TooLarge,
                    format!(
                        "model {name}: a {width}x{height} image ({} as RGB8) is over daemon.max_output ({})",
                        fmt(output),
                        fmt(bounds.max_output)
                    ),
                ));
            }
            let guidance = request
                .guidance
                .or(defaults.guidance)
                .unwrap_or(DEFAULT_GUIDANCE);
            if !guidance.is_finite() || guidance < 0.0 {
                return Err(invalid(format!(
                    "guidance {guidance} must be a finite number ≥ 0"
                )));
            }
            let noise = NoiseSpec {
                seed: request.seed.unwrap_or_else(noise::random_seed),
                channels: model.noise_channels,
                height: height / scale,
                width: width / scale,
            };
            if noise.bytes() > bounds.max_input {
                return Err(Error::new(
                    ErrorCode::TooLarge,
                    format!(
                        "model {name}: the noise for a {width}x{height} image ({} floats of {}x{}x{}, {}) is over daemon.max_upload ({})",
                        noise.bytes() / 4,
                        noise.channels,
                        noise.height,
                        noise.width,
                        fmt(noise.bytes()),
                        fmt(bounds.max_input)
                    ),
                ));
            }
            let job = GenerateJob {
                // Made off the runtime's threads once the request is admitted.
                noise: WireTensor::placeholder(
                    gpuctl_protocol::DType::F32,
                    vec![
                        1,
                        noise.channels.into(),
                        noise.height.into(),
                        noise.width.into(),
                    ],
                ),
                prompt: std::mem::take(&mut request.prompt),
                negative: std::mem::take(&mut request.negative),
                steps,
                guidance,
            };
            Ok((Job::Generate(job), Some(noise)))
        }
    }
}

#[cfg(test)]
mod tests {
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
}
