use gpuctl_protocol::worker::{GenerateJob, Job, Tiling};
use gpuctl_protocol::{Error, ErrorCode, GenerateRequest, GenerateResponse};

use crate::config::{Kind, ModelConfig};
use crate::context::{Context, EventSink};
use crate::noise;
use crate::registry::{not_found, PreparedJob};

/// Defaults when neither the request nor the model's `defaults` say.
const DEFAULT_SIZE: (u32, u32) = (512, 512);
const DEFAULT_STEPS: u32 = 20;
const DEFAULT_GUIDANCE: f32 = 7.5;

pub async fn handle(
    request: GenerateRequest,
    ctx: &Context,
    events: EventSink,
) -> Result<GenerateResponse, Error> {
    let config = ctx.registry.config();
    let model = config
        .models
        .get(&request.model)
        .ok_or_else(|| not_found(&request.model, &config))?;
    let (job, seed) = prepare(&request, model)?;
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

/// Checks the request against the model's kind and builds the worker's job.
fn prepare(request: &GenerateRequest, model: &ModelConfig) -> Result<(Job, Option<u64>), Error> {
    let name = &request.model;
    let invalid = |problem: String| {
        Error::new(
            ErrorCode::InvalidRequest,
            format!("model {name}: {problem}"),
        )
    };
    let text_given = !request.prompt.is_empty() || !request.negative.is_empty();
    let generate_given = text_given
        || request.seed.is_some()
        || request.steps.is_some()
        || request.guidance.is_some()
        || request.size.is_some();
    match model.kind {
        Kind::Image => {
            let input = request
                .input
                .clone()
                .ok_or_else(|| invalid("is an image model: send an input image".into()))?;
            if !request.inputs.is_empty() || generate_given {
                return Err(invalid(
                    "is an image model: it takes one input image and nothing else".into(),
                ));
            }
            input.check().map_err(invalid)?;
            let tiling = model.tile.map(|tile| Tiling {
                tile,
                overlap: model.overlap.unwrap_or(0),
                batch: model.batch,
                retries: model.tile_retries,
            });
            Ok((Job::Image { input, tiling }, None))
        }
        Kind::Tensor => {
            if request.input.is_some() || generate_given {
                return Err(invalid(
                    "is a tensor model: it takes input tensors only".into(),
                ));
            }
            for tensor in &request.inputs {
                tensor.check().map_err(invalid)?;
            }
            Ok((
                Job::Tensor {
                    inputs: request.inputs.clone(),
                },
                None,
            ))
        }
        Kind::Generate => {
            if request.input.is_some() || !request.inputs.is_empty() {
                return Err(invalid(
                    "is a generate model: it takes a prompt, not input images or tensors".into(),
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
    fn an_image_model_with_a_tile_sends_its_tiling() {
        let config = Config::parse(
            "[models.up]\npath = \"u.pt\"\nkind = \"image\"\ntile = 256\noverlap = 16\nbatch = 3\n\
             [models.plain]\npath = \"p.pt\"\nkind = \"image\"\n",
            "t.toml",
        )
        .unwrap();
        match prepare(&image_request(), &config.models["up"]).unwrap().0 {
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
        match prepare(&image_request(), &config.models["plain"])
            .unwrap()
            .0
        {
            Job::Image { tiling, .. } => assert_eq!(tiling, None),
            other => panic!("{other:?}"),
        }
    }
}
