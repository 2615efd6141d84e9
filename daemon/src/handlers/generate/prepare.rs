//! What a `Generate` request becomes for a worker: its kind's fields
//! checked, defaults applied, sizes bounded before anything is allocated.

use gpuctl_protocol::worker::{GenerateJob, Job, Tiling};
use gpuctl_protocol::{
    Error, ErrorCode, GenerateRequest, ImageLayout, ProtocolVersion, WireTensor, IMAGE_SHAPES,
};

use crate::config::{check_tiling, Kind, ModelConfig};
use crate::noise;

/// Defaults when neither the request nor the model's `defaults` say.
const DEFAULT_SIZE: (u32, u32) = (512, 512);
const DEFAULT_STEPS: u32 = 20;
const DEFAULT_GUIDANCE: f32 = 7.5;

/// Limits on what a request may make the daemon allocate or compute.
pub(super) struct Bounds {
    /// `policy.max_steps`.
    pub(super) max_steps: u32,
    /// `daemon.max_output`.
    pub(super) max_output: u64,
    /// `daemon.max_upload`: also bounds the noise the daemon makes.
    pub(super) max_input: u64,
}

/// The noise a `generate` request needs, made off the async runtime.
pub(super) struct NoiseSpec {
    pub(super) seed: u64,
    pub(super) channels: u32,
    pub(super) height: u32,
    pub(super) width: u32,
}

impl NoiseSpec {
    pub(super) fn bytes(&self) -> u64 {
        noise::bytes(self.channels, self.height, self.width)
    }

    pub(super) fn make(self) -> Result<WireTensor, String> {
        noise::gaussian(self.seed, self.channels, self.height, self.width)
    }
}

/// An image model's output size is known before it runs: refuse one that
/// would be too large at once, rather than after minutes of work.
pub(super) fn check_output_size(
    job: &Job,
    model: &ModelConfig,
    name: &str,
    limit: u64,
) -> Result<(), Error> {
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
        // 0: the device's choice, made when the job reaches its worker.
        batch: model.batch.unwrap_or(0),
        retries: model.tile_retries,
    }))
}

/// Checks the request against the model's kind and builds the worker's
/// job, moving the request's tensors into it. Every size the client
/// chose is checked against its bound before anything is allocated; a
/// `generate` job's noise is left to make (see [`NoiseSpec`]).
pub(super) fn prepare(
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
                seed: noise.seed,
                width,
                height,
            };
            Ok((Job::Generate(job), Some(noise)))
        }
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
