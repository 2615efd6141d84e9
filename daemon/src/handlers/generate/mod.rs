//! `Generate`: a request checked against its model's kind and the
//! daemon's limits (`prepare.rs`), its noise made, then run by the registry.

use gpuctl_protocol::worker::Job;
use gpuctl_protocol::{Error, ErrorCode, GenerateRequest, GenerateResponse};

use crate::context::Context;
use crate::outbox::EventSink;
use crate::registry::{not_found, PreparedJob};

pub mod chain;
mod prepare;

use prepare::{check_output_size, prepare, Bounds};

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
