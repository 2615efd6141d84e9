use gpuctl_protocol::worker::{GenerateJob, Job, Tiling};
use gpuctl_protocol::{Error, ErrorCode, GenerateRequest, GenerateResponse};

use crate::config::{check_tiling, Kind, ModelConfig};
use crate::context::{Context, EventSink};
use crate::noise;
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
    let (job, seed) = prepare(&mut request, model)?;
    check_output_size(&job, model, &request.model, config.daemon.max_output.0)?;
    let limit = request
        .timeout_ms
        .map(std::time::Duration::from_millis)
        .unwrap_or(config.policy.request_timeout.0);
    let name = request.model.clone();
    let job = PreparedJob {
        model: request.model,
        job,
        seed,
        keep_alive: request.keep_alive,
        events: Some(events),
    };
    if limit.is_zero() {
        return ctx.registry.run(job).await;
    }
    // Dropping the call on timeout tells the registry its client is gone:
    // a queued request is dropped, a running job stops at its next batch.
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
        })
}

/// An image model's output size is known before it runs: refuse one that
/// would be too large at once, rather than after minutes of work.
fn check_output_size(job: &Job, model: &ModelConfig, name: &str, limit: u64) -> Result<(), Error> {
    let (Job::Image { input, .. }, Some(scale)) = (job, model.scale) else {
        return Ok(());
    };
    let [n, c, h, w] = input.shape[..] else {
        return Ok(());
    };
    let bytes = [n, c, h, w, u64::from(scale), u64::from(scale)]
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
/// job, moving the request's tensors into it.
fn prepare(
    request: &mut GenerateRequest,
    model: &ModelConfig,
) -> Result<(Job, Option<u64>), Error> {
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
            Ok((Job::Image { input, tiling }, None))
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
            let guidance = request
                .guidance
                .or(defaults.guidance)
                .unwrap_or(DEFAULT_GUIDANCE);
            if !guidance.is_finite() || guidance < 0.0 {
                return Err(invalid(format!(
                    "guidance {guidance} must be a finite number ≥ 0"
                )));
            }
            let seed = request.seed.unwrap_or_else(noise::random_seed);
            let noise = noise::gaussian(seed, model.noise_channels, height / scale, width / scale);
            let job = GenerateJob {
                noise,
                prompt: request.prompt.clone(),
                negative: request.negative.clone(),
                steps,
                guidance,
            };
            Ok((Job::Generate(job), Some(seed)))
        }
    }
}

#[cfg(test)]
mod tests {
    use gpuctl_protocol::{DType, WireTensor};

    use super::*;
    use crate::config::Config;

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
        };
        // 2048² × 4 → 8192² RGB8 is 192 MiB.
        assert!(check_output_size(&job(2048), up, "up", 192 << 20).is_ok());
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
    fn an_image_model_with_a_tile_sends_its_tiling() {
        let config = Config::parse(
            "[models.up]\npath = \"u.pt\"\nkind = \"image\"\ntile = 256\noverlap = 16\nbatch = 3\n\
             [models.plain]\npath = \"p.pt\"\nkind = \"image\"\n",
            "t.toml",
        )
        .unwrap();
        match prepare(&mut image_request(), &config.models["up"])
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
        match prepare(&mut image_request(), &config.models["plain"])
            .unwrap()
            .0
        {
            Job::Image { tiling, .. } => assert_eq!(tiling, None),
            other => panic!("{other:?}"),
        }
    }
}
