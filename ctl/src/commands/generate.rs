//! `gpuctl generate`: files in, files out. Images are decoded and encoded
//! here, never in the daemon; tensor models take and give safetensors.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use gpuctl_protocol::{
    Client, DType, Event, GenerateRequest, GenerateResponse, KeepAlive, ModelKind, ModelsRequest,
    Request, Response, WireTensor,
};
use safetensors::{Dtype, SafeTensors};
use serde::Serialize;

use crate::image_out::{self, ImageWriter};
use crate::interrupt::Interrupt;
use crate::{unexpected, CliError, Output};

/// `gpuctl generate`'s arguments.
#[derive(clap::Args)]
pub struct GenerateArgs {
    /// The configured model's name
    pub model: String,
    /// Image models: a PNG, JPEG or WebP file; tensor models: a safetensors file
    pub input: Option<PathBuf>,
    /// Where to write the result; its extension picks the image format
    /// [default: INPUT-MODEL.png, MODEL-SEED.png, or MODEL-output.safetensors]
    #[arg(short, long, value_name = "OUT")]
    pub output: Option<PathBuf>,
    /// Generate models: what to make
    #[arg(long, default_value = "")]
    pub prompt: String,
    /// Generate models: what to avoid
    #[arg(long, default_value = "")]
    pub negative: String,
    /// Generate models: the noise seed [default: random, and printed]
    #[arg(long)]
    pub seed: Option<u64>,
    /// Generate models: sampling steps [default: the model's defaults]
    #[arg(long)]
    pub steps: Option<u32>,
    /// Generate models: guidance scale [default: the model's defaults]
    #[arg(long)]
    pub guidance: Option<f32>,
    /// Generate models: output size, WIDTHxHEIGHT
    #[arg(long, value_parser = crate::parse_size, value_name = "WxH")]
    pub size: Option<(u32, u32)>,
    /// Keep the model this long once idle: a duration ("10m", "0s") or "forever"
    #[arg(long, value_parser = crate::parse_keep_alive)]
    pub keep_alive: Option<KeepAlive>,
    /// Give up after this long, waiting included [default: the daemon's
    /// policy.request_timeout]
    #[arg(long, value_parser = gpuctl_protocol::units::parse_duration)]
    pub timeout: Option<std::time::Duration>,
    /// Image models: tile edge in input pixels, 0 for one forward over the
    /// whole image [default: the model's `tile`]
    #[arg(long, value_name = "PIXELS")]
    pub tile: Option<u32>,
    /// Image models: overlap between tiles [default: the model's, else an
    /// eighth of --tile]
    #[arg(long, value_name = "PIXELS")]
    pub overlap: Option<u32>,
    /// Then run this image model on the result, inside gpuctld (e.g. an
    /// upscaler after a generation); repeat for more steps
    #[arg(long, value_name = "MODEL")]
    pub then: Vec<String>,
}

#[derive(Serialize)]
struct Report {
    model: String,
    device: String,
    seed: Option<u64>,
    output: String,
    shapes: Vec<Vec<u64>>,
    queue_ms: u64,
    load_ms: Option<u64>,
    run_ms: u64,
    notes: Vec<String>,
    /// With --then: every step, the first included.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    steps: Vec<gpuctl_protocol::StepReport>,
}

pub async fn run(client: &Client, args: GenerateArgs, output: Output) -> Result<(), CliError> {
    let kind = model_kind(client, &args.model).await?;
    let mut request = GenerateRequest {
        model: args.model.clone(),
        input: None,
        inputs: vec![],
        prompt: args.prompt.clone(),
        negative: args.negative.clone(),
        seed: args.seed,
        steps: args.steps,
        guidance: args.guidance,
        size: args.size,
        keep_alive: args.keep_alive,
        timeout_ms: args.timeout.map(|t| t.as_millis() as u64),
        tile: args.tile,
        overlap: args.overlap,
    };
    match (kind, &args.input) {
        (Some(ModelKind::Image), Some(path)) => {
            let rows = client.welcome().protocol.sends_pixel_rows();
            request.input = Some(read_image(path, rows)?);
        }
        (Some(ModelKind::Image), None) => {
            return Err(CliError::Usage(format!(
                "{} is an image model: give an input image",
                args.model
            )))
        }
        (Some(ModelKind::Tensor), Some(path)) => request.inputs = read_safetensors(path)?,
        (Some(ModelKind::Generate), Some(_)) => {
            return Err(CliError::Usage(format!(
                "{} is a generate model: it takes --prompt, not an input file",
                args.model
            )))
        }
        _ => {}
    }
    // Image outputs are written to their file as their rows stream in.
    let rows = client.welcome().protocol.takes_pixel_rows();
    let streamed = Arc::new(Mutex::new(ImageWriter::new(args.output.as_deref(), rows)));
    let chained = !args.then.is_empty();
    let request = if chained {
        let daemon = client.welcome().protocol;
        if !daemon.knows_file_change() {
            return Err(CliError::Usage(format!(
                "--then needs a gpuctld of protocol 1.6 or later; this one speaks {daemon}"
            )));
        }
        Request::GenerateThen(gpuctl_protocol::GenerateThenRequest {
            request,
            then: args.then.clone(),
        })
    } else {
        Request::Generate(request)
    };
    // A chain ends with an image model, whatever the first step is.
    let kind = if chained {
        Some(ModelKind::Image)
    } else {
        kind
    };
    let mut call = match kind {
        Some(ModelKind::Tensor) => client.start(request).await?,
        _ => {
            let sink = ImageWriter::sink(&streamed);
            client.start_with_sink(request, sink).await?
        }
    };
    let mut progress = crate::progress::Progress::new(output);
    let mut interrupt = Interrupt::listen();
    loop {
        let event = tokio::select! {
            event = call.event() => event,
            _ = interrupt.recv() => {
                // The daemon stops the job at its next batch and keeps the
                // model loaded for the next request.
                progress.finish();
                image_out::lock(&streamed).abandon();
                let cancel = Request::Cancel(gpuctl_protocol::CancelRequest { id: call.id() });
                let _ = client.call(cancel).await;
                eprintln!("gpuctl: cancelled");
                return Err(CliError::Exit(130));
            }
        };
        let Some(event) = event else { break };
        if let Event::Progress(event) = &event {
            progress.show(event);
        }
        if let (Event::Queued(queued), Output::Human) = (event, output) {
            if queued.waiting_for.starts_with("waiting for ") {
                // GPU memory: the daemon's sentence says it all.
                eprintln!("gpuctl: {}: {}", queued.model, queued.waiting_for);
            } else {
                eprintln!(
                    "gpuctl: waiting for {}: position {} in its queue ({})",
                    queued.model, queued.position, queued.waiting_for
                );
            }
        }
    }
    progress.finish();
    let (mut answer, steps) = match call.response().await? {
        Response::Generate(answer) => (answer, Vec::new()),
        Response::GenerateThen(chain) => (chain.response, chain.steps),
        other => return Err(unexpected(&other).into()),
    };
    let path = args
        .output
        .clone()
        .unwrap_or_else(|| default_output(&args, kind, &answer));
    match kind {
        Some(ModelKind::Tensor) => write_safetensors(&path, &answer.outputs)?,
        _ => write_image(&path, &mut answer.outputs, &streamed)?,
    }
    let report = Report {
        model: answer.model.clone(),
        device: answer.device.clone(),
        seed: answer.seed,
        output: path.display().to_string(),
        shapes: answer.outputs.iter().map(|t| t.shape.clone()).collect(),
        queue_ms: answer.queue_ms,
        load_ms: answer.load_ms,
        run_ms: answer.run_ms,
        notes: answer.notes.clone(),
        steps,
    };
    match output {
        Output::Json => crate::print_json(&report),
        Output::Human => {
            let notes = match report.steps.as_slice() {
                [] => report.notes.clone(),
                steps => steps.iter().flat_map(|s| s.notes.clone()).collect(),
            };
            for note in &notes {
                eprintln!("gpuctl: note: {note}");
            }
            crate::emit(&describe(&report))
        }
    }
    Ok(())
}

fn describe(report: &Report) -> String {
    let mut line = format!(
        "wrote {}: model {} on {}",
        report.output, report.model, report.device
    );
    if let Some(seed) = report.seed {
        line.push_str(&format!(", seed {seed}"));
    }
    line.push_str(&format!(", waited {} ms", report.queue_ms));
    if let Some(load) = report.load_ms {
        line.push_str(&format!(" (load {load} ms)"));
    }
    line.push_str(&format!(", ran {} ms\n", report.run_ms));
    for (index, step) in report.steps.iter().enumerate() {
        line.push_str(&format!(
            "  step {}: {} on {}, waited {} ms{}, ran {} ms\n",
            index + 1,
            step.model,
            step.device,
            step.queue_ms,
            step.load_ms
                .map_or(String::new(), |ms| format!(" (load {ms} ms)")),
            step.run_ms
        ));
    }
    line
}

async fn model_kind(client: &Client, model: &str) -> Result<Option<ModelKind>, CliError> {
    match client.call(Request::Models(ModelsRequest {})).await? {
        // An unknown model is left to gpuctld, whose error lists the known ones.
        Response::Models(models) => Ok(models
            .models
            .iter()
            .find(|m| m.name == model)
            .map(|m| m.kind)),
        other => Err(unexpected(&other).into()),
    }
}

fn default_output(
    args: &GenerateArgs,
    kind: Option<ModelKind>,
    answer: &GenerateResponse,
) -> PathBuf {
    let stem = args
        .input
        .as_ref()
        .and_then(|p| p.file_stem())
        .map(|s| s.to_string_lossy().into_owned());
    PathBuf::from(match (kind, stem, answer.seed) {
        (Some(ModelKind::Tensor), _, _) => format!("{}-output.safetensors", args.model),
        (_, Some(stem), _) => format!("{stem}-{}.png", args.model),
        (_, None, Some(seed)) => format!("{}-{seed}.png", args.model),
        (_, None, None) => format!("{}-output.png", args.model),
    })
}

/// PNG, JPEG or WebP → RGB8, as rows of pixels `[1,H,W,3]` for a daemon
/// that takes them (1.4; no copy), else as planes `[1,3,H,W]`.
fn read_image(path: &Path, rows: bool) -> Result<WireTensor, CliError> {
    let image = image::ImageReader::open(path)
        .and_then(|r| r.with_guessed_format())
        .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", path.display())))?
        .decode()
        .map_err(|e| CliError::Usage(format!("cannot decode {}: {e}", path.display())))?
        // No copy when the file was RGB8 already, as most photos are.
        .into_rgb8();
    let (width, height) = image.dimensions();
    if rows {
        let shape = vec![1, u64::from(height), u64::from(width), 3];
        return WireTensor::new(DType::U8, shape, image.into_raw()).map_err(CliError::Usage);
    }
    let plane = (width * height) as usize;
    let mut data = vec![0u8; plane * 3];
    for (i, pixel) in image.pixels().enumerate() {
        for c in 0..3 {
            data[c * plane + i] = pixel[c];
        }
    }
    WireTensor::new(
        DType::U8,
        vec![1, 3, u64::from(height), u64::from(width)],
        data,
    )
    .map_err(CliError::Usage)
}

/// The image outputs, whichever way they came (streamed into `streamed`,
/// or inline in the response), → a file whose format the extension names.
fn write_image(
    path: &Path,
    outputs: &mut [WireTensor],
    streamed: &Mutex<ImageWriter>,
) -> Result<(), CliError> {
    let mut writer = image_out::lock(streamed);
    for tensor in outputs.iter_mut().filter(|t| !t.is_placeholder()) {
        let data = tensor.take_data();
        writer.take_tensor(WireTensor {
            dtype: tensor.dtype,
            shape: tensor.shape.clone(),
            data,
        });
    }
    writer
        .finish(path)
        .map(|_| ())
        .map_err(|problem| CliError::Failed(format!("cannot write {}: {problem}", path.display())))
}

fn dtype_of(dtype: Dtype) -> Option<DType> {
    Some(match dtype {
        Dtype::U8 => DType::U8,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::F32 => DType::F32,
        Dtype::F64 => DType::F64,
        Dtype::I32 => DType::I32,
        Dtype::I64 => DType::I64,
        _ => return None,
    })
}

fn safetensors_dtype(dtype: DType) -> Dtype {
    match dtype {
        DType::U8 => Dtype::U8,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
        DType::F32 => Dtype::F32,
        DType::F64 => Dtype::F64,
        DType::I32 => Dtype::I32,
        DType::I64 => Dtype::I64,
    }
}

/// A safetensors file → the forward's arguments, in the order of their names.
fn read_safetensors(path: &Path) -> Result<Vec<WireTensor>, CliError> {
    let bytes = std::fs::read(path)
        .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", path.display())))?;
    let file = SafeTensors::deserialize(&bytes).map_err(|e| {
        CliError::Usage(format!("{} is not a safetensors file: {e}", path.display()))
    })?;
    let mut tensors = file.tensors();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    tensors
        .into_iter()
        .map(|(name, view)| {
            let dtype = dtype_of(view.dtype()).ok_or_else(|| {
                CliError::Usage(format!(
                    "{}: tensor {name} has unsupported dtype {:?}",
                    path.display(),
                    view.dtype()
                ))
            })?;
            let shape = view.shape().iter().map(|d| *d as u64).collect();
            WireTensor::new(dtype, shape, view.data().to_vec()).map_err(CliError::Usage)
        })
        .collect()
}

/// Outputs → a safetensors file with tensors `output_0`, `output_1`, …
fn write_safetensors(path: &Path, outputs: &[WireTensor]) -> Result<(), CliError> {
    let bad =
        |problem: String| CliError::Failed(format!("cannot write {}: {problem}", path.display()));
    let views = outputs
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let shape = t.shape.iter().map(|d| *d as usize).collect();
            safetensors::tensor::TensorView::new(safetensors_dtype(t.dtype), shape, &t.data)
                .map(|view| (format!("output_{i}"), view))
                .map_err(|e| bad(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let bytes = safetensors::serialize(views, None).map_err(|e| bad(e.to_string()))?;
    std::fs::write(path, bytes).map_err(|e| bad(e.to_string()))
}
