//! `GenerateThen`: a request, then each named `image` model on the previous
//! step's image, inside gpuctld. Each step is an ordinary request to the
//! registry (loaded, queued, arbitrated and unloaded under the usual rules);
//! the images between steps stay here, never going back through the client.

use std::time::{Duration, Instant};

use gpuctl_protocol::{
    Error, ErrorCode, GenerateRequest, GenerateResponse, GenerateThenRequest, GenerateThenResponse,
    StepReport, WireTensor,
};

use crate::config::Kind;
use crate::context::Context;
use crate::outbox::EventSink;
use crate::registry::not_found;

/// Steps after the first, at most: a chain is a pipeline, not a program.
pub const MAX_THEN: usize = 8;

pub async fn handle(
    chain: GenerateThenRequest,
    ctx: &Context,
    events: EventSink,
) -> Result<GenerateThenResponse, Error> {
    let GenerateThenRequest { request, then } = chain;
    check_steps(&then, ctx)?;
    let total = then.len() + 1;
    let config = ctx.registry.config();
    let limit = request
        .timeout_ms
        .map_or(config.policy.request_timeout.0, Duration::from_millis);
    let started = Instant::now();
    let keep_alive = request.keep_alive;
    let first = request.model.clone();
    // Only the last step's outputs go to the client as they are made.
    let sink = |last: bool| {
        if last {
            events.clone()
        } else {
            events.keeping_outputs()
        }
    };
    let mut response = super::handle(request, ctx, sink(then.is_empty()))
        .await
        .map_err(|error| in_step(error, 1, total, &first))?;
    let seed = response.seed;
    let mut steps = vec![report(&response, None)];
    for (index, model) in then.iter().enumerate() {
        let step = index + 2;
        let image = image_of(&mut response, step - 1, total)?;
        let timeout_ms = remaining(limit, started.elapsed()).map(|left| left.as_millis() as u64);
        let next = GenerateRequest {
            input: Some(image),
            keep_alive,
            timeout_ms,
            ..GenerateRequest::new(model)
        };
        response = super::handle(next, ctx, sink(step == total))
            .await
            .map_err(|error| in_step(error, step, total, model))?;
        let waited = response.load_ms.map(|load_ms| {
            format!(
                "step {step} ({model}) was loaded first ({load_ms} ms); the image of step {} waited in gpuctld",
                step - 1
            )
        });
        steps.push(report(&response, waited));
    }
    response.seed = seed;
    Ok(GenerateThenResponse { response, steps })
}

/// Every later step names a configured `image` model, before anything runs.
fn check_steps(then: &[String], ctx: &Context) -> Result<(), Error> {
    if then.len() > MAX_THEN {
        return Err(Error::new(
            ErrorCode::InvalidRequest,
            format!(
                "a chain may name at most {MAX_THEN} models after the first, not {}",
                then.len()
            ),
        ));
    }
    let config = ctx.registry.config();
    for (index, name) in then.iter().enumerate() {
        let model = config
            .models
            .get(name)
            .ok_or_else(|| in_step(not_found(name, &config), index + 2, then.len() + 1, name))?;
        if model.kind != Kind::Image {
            return Err(Error::new(
                ErrorCode::InvalidRequest,
                format!(
                    "step {} of {} ({name}): only image models can take the previous step's image; {name} is a {} model",
                    index + 2,
                    then.len() + 1,
                    gpuctl_protocol::ModelKind::from(model.kind).name()
                ),
            ));
        }
    }
    Ok(())
}

/// The previous step's image, as the next step's input: one RGB8 image in
/// rows of pixels, which is what image and generate models answer.
fn image_of(
    response: &mut GenerateResponse,
    step: usize,
    total: usize,
) -> Result<WireTensor, Error> {
    let model = response.model.clone();
    let image = std::mem::take(&mut response.outputs)
        .into_iter()
        .next()
        .filter(|t| {
            t.shape.len() == 4 && t.shape[0] == 1 && t.shape[3] == 3 && !t.is_placeholder()
        });
    image.ok_or_else(|| {
        Error::new(
            ErrorCode::InvalidRequest,
            format!("step {step} of {total} ({model}) made no single RGB image for the next step to take"),
        )
    })
}

/// What is left of the chain's time; `None`: no limit.
fn remaining(limit: Duration, spent: Duration) -> Option<Duration> {
    if limit.is_zero() {
        return None;
    }
    // A step that starts with nothing left times out at once, naming itself.
    Some(limit.saturating_sub(spent).max(Duration::from_millis(1)))
}

fn report(response: &GenerateResponse, note: Option<String>) -> StepReport {
    StepReport {
        model: response.model.clone(),
        device: response.device.clone(),
        queue_ms: response.queue_ms,
        load_ms: response.load_ms,
        run_ms: response.run_ms,
        notes: note
            .into_iter()
            .chain(response.notes.iter().cloned())
            .collect(),
    }
}

/// A step's error, naming the step.
fn in_step(error: Error, step: usize, total: usize, model: &str) -> Error {
    Error {
        message: format!("step {step} of {total} ({model}): {}", error.message),
        ..error
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_shares_its_time_and_names_its_steps() {
        let second = Duration::from_secs(1);
        assert_eq!(remaining(Duration::ZERO, second), None, "no limit");
        assert_eq!(remaining(10 * second, 4 * second), Some(6 * second));
        assert_eq!(
            remaining(second, 2 * second),
            Some(Duration::from_millis(1))
        );
        let error = in_step(
            Error::new(ErrorCode::LoadFailed, "model up: gone"),
            2,
            3,
            "up",
        );
        assert_eq!(
            (error.code, error.message.as_str()),
            (ErrorCode::LoadFailed, "step 2 of 3 (up): model up: gone")
        );
    }
}
