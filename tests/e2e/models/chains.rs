//! `GenerateThen`: a generation followed by image models inside gpuctld
//! (`gpuctl generate MODEL --then UPSCALER`).

use std::path::Path;

use gpuctl_protocol::{CancelRequest, GenerateThenRequest, GenerateThenResponse};

use super::*;

fn chain_config(extra: &str) -> String {
    config(
        "",
        &format!(
            "[models.x4]\npath = \"realesrgan-animevideov3-x4.pt\"\nkind = \"image\"\nscale = 4\ntile = 32\noverlap = 8\n\
             [models.missing]\npath = \"no-such-upscaler.pt\"\nkind = \"image\"\nscale = 2\n{extra}"
        ),
    )
}

fn fox(seed: u64) -> GenerateRequest {
    GenerateRequest {
        prompt: "a fox".into(),
        seed: Some(seed),
        ..request("gen")
    }
}

async fn chain(
    client: &Client,
    first: GenerateRequest,
    then: &[&str],
) -> Result<GenerateThenResponse, ClientError> {
    let request = Request::GenerateThen(GenerateThenRequest {
        request: first,
        then: then.iter().map(|m| m.to_string()).collect(),
    });
    match client.call(request).await? {
        Response::GenerateThen(response) => Ok(response),
        other => panic!("unexpected {other:?}"),
    }
}

fn image_request(model: &str, image: WireTensor) -> GenerateRequest {
    GenerateRequest {
        input: Some(image),
        ..request(model)
    }
}

#[test]
fn generate_then_upscale_twice_equals_the_three_requests_run_by_hand() {
    let daemon = Daemon::start(&chain_config(""));
    runtime().block_on(async {
        let client = Client::connect(&daemon.socket).await.unwrap();
        let chained = chain(&client, fox(5), &["up", "x4"]).await.unwrap();
        let steps: Vec<&str> = chained.steps.iter().map(|s| s.model.as_str()).collect();
        assert_eq!(steps, ["gen", "up", "x4"]);
        assert!(
            chained.steps[1].notes[0].starts_with("step 2 (up) was loaded first"),
            "{:?}",
            chained.steps
        );
        assert_eq!(chained.response.model, "x4");
        assert_eq!(chained.response.seed, Some(5), "the generation's seed");
        let generated = generate(&client, fox(5)).await.unwrap();
        let doubled = generate(&client, image_request("up", generated.outputs[0].clone()))
            .await
            .unwrap();
        let by_hand = generate(&client, image_request("x4", doubled.outputs[0].clone()))
            .await
            .unwrap();
        assert_eq!(chained.response.outputs[0].shape, [1, 48 * 8, 64 * 8, 3]);
        assert_eq!(chained.response.outputs, by_hand.outputs, "the same pixels");
    });
    // The CLI: one command, one file, every step reported.
    let out = daemon.config.parent().unwrap().join("fox.png");
    let done = daemon.gpuctl(&[
        "generate",
        "gen",
        "--prompt",
        "a fox",
        "--seed",
        "5",
        "--then",
        "up",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(done.status.success(), "{}", stderr(&done));
    assert!(
        stdout(&done).contains("  step 2: up on cpu"),
        "{}",
        stdout(&done)
    );
    assert_eq!(image::image_dimensions(Path::new(&out)).unwrap(), (128, 96));
}

#[test]
fn a_failing_or_wrong_step_is_named_and_nothing_runs_for_a_wrong_one() {
    let daemon = Daemon::start(&chain_config(""));
    runtime().block_on(async {
        let client = Client::connect(&daemon.socket).await.unwrap();
        let wrong = daemon_error(chain(&client, fox(1), &["up", "ten"]).await);
        assert_eq!(wrong.code, ErrorCode::InvalidRequest);
        assert_eq!(
            wrong.message,
            "step 3 of 3 (ten): only image models can take the previous step's image; ten is a tensor model"
        );
        let unknown = daemon_error(chain(&client, fox(1), &["nope"]).await);
        assert_eq!(unknown.code, ErrorCode::NotFound);
        assert!(unknown.message.starts_with("step 2 of 2 (nope): "), "{}", unknown.message);
        assert_eq!(model_status(&daemon, "gen")["loads"], 0, "refused before anything ran");
        let failed = daemon_error(chain(&client, fox(1), &["missing"]).await);
        assert!(failed.message.starts_with("step 2 of 2 (missing): model missing: cannot read"), "{}", failed.message);
        // A first step that makes no image.
        let tensors = daemon_error(chain(&client, tensor_request(), &["up"]).await);
        assert!(tensors.message.starts_with("step 1 of 2 (ten) made no single RGB image"), "{}", tensors.message);
    });
    daemon.assert_serving();
}

#[test]
fn a_chain_is_cancelled_in_either_step() {
    let dir = open_tempdir();
    let slow_upscaler = format!(
        "[models.slowup]\nkind = \"image\"\ncommand = [\"{python}\", \"{script}\"]\n\
         env = {{ PYTHONPATH = \"{src}\", GPUCTL_TEST_DIR = \"{dir}\" }}\n\
         options = {{ steps = 400, step_s = 0.05 }}\n",
        python = std::env::var("VIRTUAL_ENV").map_or_else(
            |_| format!(
                "{}/.cache/gpuctl/venv/bin/python",
                std::env::var("HOME").unwrap()
            ),
            |venv| format!("{venv}/bin/python")
        ),
        script = models_dir()
            .join("../../python/tests/workers/numpy_worker.py")
            .display(),
        src = models_dir().join("../../python/src").display(),
        dir = dir.path().display(),
    );
    let daemon = Daemon::start(&chain_config(&slow_upscaler));
    assert!(daemon.gpuctl(&["load", "slowup"]).status.success());
    runtime().block_on(async {
        let client = Client::connect(&daemon.socket).await.unwrap();
        // In the first step: a generation of many steps, past the chain's timeout.
        let slow = GenerateRequest {
            timeout_ms: Some(1_000),
            ..slow_request(100_000_000)
        };
        let error = daemon_error(chain(&client, slow, &["up"]).await);
        assert_eq!(error.code, ErrorCode::Timeout);
        assert!(
            error.message.starts_with("step 1 of 2 (gen): "),
            "{}",
            error.message
        );
        // In the second: a Cancel while the slow upscaler runs.
        let call = client
            .start(Request::GenerateThen(GenerateThenRequest {
                request: fox(2),
                then: vec!["slowup".into()],
            }))
            .await
            .unwrap();
        wait_until("the second step to run", Duration::from_secs(30), || {
            model_status(&daemon, "slowup")["in_flight"] == 1
        });
        let cancel = Request::Cancel(CancelRequest { id: call.id() });
        client.call(cancel).await.unwrap();
        let error = daemon_error(call.response().await);
        assert_eq!(error.code, ErrorCode::Cancelled, "{}", error.message);
        assert!(
            error.message.contains("was cancelled by its client"),
            "{}",
            error.message
        );
    });
    wait_until(
        "the upscaler's job to stop",
        Duration::from_secs(10),
        || model_status(&daemon, "slowup")["in_flight"] == 0,
    );
    assert_eq!(
        model_status(&daemon, "slowup")["loads"],
        1,
        "stopped at a step, not killed"
    );
    daemon.assert_serving();
}
