//! One loaded TorchScript module and the model contracts of DESIGN.md.

use std::cell::Cell;
use std::time::Instant;

use gpuctl_protocol::worker::{GenerateJob, Job, LoadModel, Loaded, SwitchMode, Tiling};
use gpuctl_protocol::{
    DType, Error, ErrorCode, ImageLayout, ModelKind, TensorFrame, WireTensor, CHUNK_BYTES,
    IMAGE_SHAPES,
};
use tch::{CModule, Device, IValue, Kind, Tensor};

use crate::lora::Overlays;
use crate::tensors::{first_line, from_wire, to_wire};
use crate::tiling::{self, TileError};

/// A model, loaded and ready.
pub struct Host {
    spec: LoadModel,
    module: CModule,
    device: Device,
    /// The forward runs in float16 (CUDA, `precision = "fp16"`).
    half: bool,
    /// Whether `image` forwards take pixels channels-last (NHWC in memory),
    /// which oneDNN and cuDNN convolve faster; `None` until the first
    /// forward has shown whether the model accepts them (one that calls
    /// `view` on its input may not).
    channels_last: Cell<Option<bool>>,
    /// The LoRAs merged into it, and what they changed.
    overlays: Overlays,
    /// What it holds, as `Loaded` said.
    loaded: Loaded,
}

/// `x` ([N,C,H,W]) with channels-last memory (NHWC), copied only if it is
/// not laid out so already.
fn channels_last(x: &Tensor) -> Result<Tensor, tch::TchError> {
    x.f_permute([0, 2, 3, 1])?
        .f_contiguous()?
        .f_permute([0, 3, 1, 2])
}

/// The module's parameters by name; the tensors share the module's storage.
fn weights(
    module: &CModule,
    model: &str,
) -> Result<std::collections::BTreeMap<String, Tensor>, Error> {
    module
        .named_parameters()
        .map(|named| named.into_iter().collect())
        .map_err(|e| {
            Error::new(
                ErrorCode::Internal,
                format!("model {model}: cannot list parameters: {}", first_line(&e)),
            )
        })
}

fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".to_owned(),
        Device::Cuda(n) => format!("cuda:{n}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

fn parse_device(text: &str) -> Result<Device, String> {
    match text {
        "auto" => Ok(Device::cuda_if_available()),
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        other => other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(Device::Cuda)
            .ok_or_else(|| format!("unknown device {other:?}")),
    }
}

impl Host {
    /// Loads `spec.path` on its device, in eval mode.
    pub fn load(spec: LoadModel) -> Result<(Host, Loaded), Error> {
        let started = Instant::now();
        let fail =
            |code, problem: String| Error::new(code, format!("model {}: {problem}", spec.name));
        // Before the device is chosen: "auto" asks libtorch whether it sees
        // a GPU, which it can only answer with its CUDA library loaded.
        if spec.device != "cpu" {
            match crate::cuda::load() {
                Ok(_) => {}
                Err(reason) if spec.device == "auto" => {
                    eprintln!("gpuctl-worker: running on the CPU: {reason}");
                }
                Err(reason) => {
                    return Err(fail(
                        ErrorCode::LoadFailed,
                        format!("libtorch's CUDA support did not load: {reason}"),
                    ))
                }
            }
        }
        let device = parse_device(&spec.device).map_err(|p| fail(ErrorCode::InvalidRequest, p))?;
        if let Device::Cuda(n) = device {
            let available = tch::Cuda::device_count();
            if i64::from(n as u32) >= available {
                return Err(fail(
                    ErrorCode::InvalidRequest,
                    format!("device cuda:{n} does not exist (this machine has {available} CUDA devices)"),
                ));
            }
        }
        let Some(path) = spec.path.clone() else {
            return Err(fail(
                ErrorCode::InvalidConfig,
                "gpuctl-worker runs TorchScript files and this model names none (set its path, or a command for a program of your own)".to_owned(),
            ));
        };
        match std::fs::metadata(&path) {
            Ok(meta) if meta.is_file() => {}
            Ok(_) => return Err(fail(ErrorCode::NotFound, format!("{path} is not a file"))),
            Err(error) => {
                return Err(fail(
                    ErrorCode::NotFound,
                    format!("cannot read {path}: {error}"),
                ))
            }
        }
        if spec.threads > 0 {
            tch::set_num_threads(spec.threads as i32);
        }
        let mut module = CModule::load_on_device(&path, device).map_err(|e| {
            fail(
                ErrorCode::InvalidRequest,
                format!(
                    "{path} is not a loadable TorchScript file: {}",
                    first_line(&e)
                ),
            )
        })?;
        module.set_eval();
        let half = spec.fp16 && device.is_cuda();
        if half {
            // CModule::to panics where libtorch fails; a panic here is a
            // model that cannot run in half precision, not a worker bug.
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                module.to(device, Kind::Half, false)
            }))
            .map_err(|_| {
                fail(
                    ErrorCode::InvalidRequest,
                    "cannot convert it to float16 (precision = \"fp16\")".to_owned(),
                )
            })?;
        }
        // In the precision it runs in: a switch rebuilds the weights from
        // these same originals, so both give the same model.
        let mut overlays = Overlays::default();
        if !spec.loras.is_empty() {
            overlays
                .apply(&spec.loras, &weights(&module, &spec.name)?)
                .map_err(|problem| fail(ErrorCode::LoadFailed, problem))?;
        }
        let parameter_bytes = weights(&module, &spec.name)?
            .values()
            .map(|t| (t.numel() * t.kind().elt_size_in_bytes()) as u64)
            .sum();
        let loaded = Loaded {
            device: device_name(device),
            load_ms: started.elapsed().as_millis() as u64,
            parameter_bytes,
            // Parameters are what a CPU model holds; on CUDA the daemon
            // measures the process's real use through NVML instead.
            device_bytes: parameter_bytes,
            precision: if half { "fp16" } else { "fp32" }.to_owned(),
        };
        Ok((
            Host {
                spec,
                module,
                device,
                half,
                channels_last: Cell::new(None),
                overlays,
                loaded: loaded.clone(),
            },
            loaded,
        ))
    }

    /// Becomes `mode`: its LoRAs in place of the current ones, the base
    /// not read again. On failure the model stays as it was.
    pub fn switch(&mut self, mode: SwitchMode) -> Result<Loaded, Error> {
        let started = Instant::now();
        let weights = weights(&self.module, &mode.name)?;
        let merged = self
            .overlays
            .apply(&mode.loras, &weights)
            .map_err(|problem| {
                Error::new(
                    ErrorCode::LoadFailed,
                    format!("model {}: {problem}", mode.name),
                )
            })?;
        eprintln!(
            "gpuctl-worker: model {} became {} in place ({merged} LoRA weight changes)",
            self.spec.name, mode.name
        );
        self.spec.name = mode.name;
        self.spec.loras = mode.loras;
        Ok(Loaded {
            load_ms: started.elapsed().as_millis() as u64,
            ..self.loaded.clone()
        })
    }

    fn error(&self, code: ErrorCode, problem: impl std::fmt::Display) -> Error {
        Error::new(code, format!("model {}: {problem}", self.spec.name))
    }

    /// Runs one job; the job must match the model's kind. `progress(done,
    /// total)` hears of tiles as they finish. A tiled RGB8 image goes to
    /// `output` row by row while later tiles run, and is a placeholder in
    /// the outputs; other outputs are returned whole.
    pub fn run(
        &self,
        job: Job,
        progress: &mut dyn FnMut(usize, usize) -> bool,
        output: &mut dyn FnMut(TensorFrame) -> Result<(), String>,
        notes: &mut Vec<String>,
    ) -> Result<Vec<WireTensor>, Error> {
        let _no_grad = tch::no_grad_guard();
        let outputs = match (self.spec.kind, job) {
            (
                ModelKind::Image,
                Job::Image {
                    input,
                    tiling,
                    layout,
                },
            ) => match self.run_image(&input, layout, tiling, progress, output, notes)? {
                ImageOutput::Whole(y) => vec![y],
                ImageOutput::Sent(placeholder) => return Ok(vec![placeholder]),
            },
            (ModelKind::Generate, Job::Generate(job)) => vec![self.run_generate(&job)?],
            (ModelKind::Tensor, Job::Tensor { inputs }) => self.run_tensor(&inputs)?,
            (kind, job) => {
                let got = match job {
                    Job::Image { .. } => "image",
                    Job::Generate(_) => "generate",
                    Job::Tensor { .. } => "tensor",
                };
                return Err(self.error(
                    ErrorCode::InvalidRequest,
                    format!(
                        "is of kind {}, but the request is for a {got} model",
                        kind.name()
                    ),
                ));
            }
        };
        let as_pixels = self.spec.rgb8 && self.spec.kind != ModelKind::Tensor;
        outputs
            .into_iter()
            .map(|t| {
                let t = if as_pixels {
                    to_pixel_rows(t).map_err(|e| self.error(ErrorCode::Internal, first_line(&e)))?
                } else {
                    t
                };
                to_wire(&t).map_err(|p| self.error(ErrorCode::Internal, p))
            })
            .collect()
    }

    fn input(&self, wire: &WireTensor, what: &str) -> Result<Tensor, Error> {
        from_wire(wire, self.device)
            .map_err(|p| self.error(ErrorCode::InvalidRequest, format!("{what}: {p}")))
    }

    /// The forward of an image model on `x` (float32), in the model's
    /// precision; the result is float32 whatever the model returned.
    fn forward_image(&self, x: &Tensor) -> Result<Tensor, tch::TchError> {
        let x = if self.half {
            x.f_to_kind(Kind::Half)?
        } else {
            x.shallow_clone()
        };
        let known = self.channels_last.get();
        if known != Some(false) {
            match self.module.forward_ts(&[channels_last(&x)?]) {
                Ok(y) => {
                    self.channels_last.set(Some(true));
                    return y.f_to_kind(Kind::Float);
                }
                Err(error) if known == Some(true) => return Err(error),
                // Planes decide: a model that fails on them fails anyway.
                Err(_) => {}
            }
        }
        let y = self.module.forward_ts(&[x.f_contiguous()?])?;
        if known.is_none() {
            eprintln!(
                "gpuctl-worker: model {} refused channels-last pixels; it gets planes",
                self.spec.name
            );
            self.channels_last.set(Some(false));
        }
        y.f_to_kind(Kind::Float)
    }

    /// A forward's error: out of memory as such (gpuctld runs a batch of
    /// requests again in halves, and admission learns from it), anything
    /// else as the request's problem.
    fn forward_failed(&self, contract: &str, error: &tch::TchError) -> Error {
        let code = if crate::tiling::out_of_memory(error) {
            ErrorCode::InsufficientVram
        } else {
            ErrorCode::InvalidRequest
        };
        self.error(
            code,
            format!(
                "forward failed ({contract}): {}",
                crate::tensors::raised(error)
            ),
        )
    }

    /// `(x: [N,3,H,W] float 0..1) -> [N,3,sH,sW]`; u8 input is scaled to 0..1.
    /// An image larger than a tile is run in tiles, and one RGB8 image so
    /// made is sent row by row as its rows are finished.
    fn run_image(
        &self,
        input: &WireTensor,
        layout: ImageLayout,
        tiling: Option<Tiling>,
        progress: &mut dyn FnMut(usize, usize) -> bool,
        output: &mut dyn FnMut(TensorFrame) -> Result<(), String>,
        notes: &mut Vec<String>,
    ) -> Result<ImageOutput, Error> {
        let Some((batch, height, width)) = layout.dims(&input.shape) else {
            return Err(self.error(
                ErrorCode::InvalidRequest,
                format!(
                    "an image input must be {IMAGE_SHAPES}, got {:?} as {layout:?}",
                    input.shape
                ),
            ));
        };
        let x = self.input(input, "image input")?;
        // Models take [N,3,H,W]: rows of pixels are a view of it, kept
        // channels-last in memory (what convolutions run fastest on; the
        // forward falls back to planes for a model that refuses them).
        let x = match layout {
            ImageLayout::Planes => x,
            ImageLayout::Rows => x.permute([0, 3, 1, 2]),
        };
        let x = match input.dtype {
            DType::U8 => x.f_to_kind(Kind::Float).map(|x| x / 255.0),
            DType::F32 => Ok(x),
            DType::F16 | DType::BF16 | DType::F64 => x.f_to_kind(Kind::Float),
            other => {
                return Err(self.error(
                    ErrorCode::InvalidRequest,
                    format!("image input must be u8 or float, got {other:?}"),
                ))
            }
        }
        .and_then(|x| channels_last(&x))
        .map_err(|e| self.error(ErrorCode::Internal, first_line(&e)))?;
        let contract = "image: x[N,3,H,W] -> [N,3,sH,sW]";
        let larger_than_a_tile =
            tiling.filter(|t| height > u64::from(t.tile) || width > u64::from(t.tile));
        let y = match larger_than_a_tile {
            None => ImageOutput::Whole(
                self.forward_image(&x)
                    .map_err(|e| self.forward_failed(contract, &e))?,
            ),
            Some(t) => {
                let tiling = tiling::Tiling {
                    tile: i64::from(t.tile),
                    overlap: i64::from(t.overlap),
                    batch: i64::from(t.batch.max(1)),
                };
                let forward = |tiles: &Tensor| self.forward_image(tiles);
                let mut rows = if self.spec.rgb8 && batch == 1 {
                    Rows::Stream(RowStream::new(output))
                } else {
                    Rows::Collect(Vec::new())
                };
                let mut take = |band: tiling::Band| rows.take(band);
                tiling::run(&x, tiling, t.retries, &forward, progress, &mut take, notes)
                    .and_then(|()| rows.finish())
                    .map_err(|e| match e {
                    TileError::Forward {
                        tile: (row, column),
                        error,
                    } => self.error(
                        ErrorCode::InvalidRequest,
                        format!(
                            "forward failed ({contract}) on the batch starting at tile row {row}, column {column}: {}",
                            crate::tensors::raised(&error)
                        ),
                    ),
                    TileError::Shape(problem) => self.error(ErrorCode::InvalidRequest, problem),
                    TileError::Torch(error) => self.error(ErrorCode::Internal, first_line(&error)),
                    TileError::Cancelled { done, total } => self.error(
                        ErrorCode::Cancelled,
                        format!("the request was cancelled after {done} of {total} tiles"),
                    ),
                    TileError::Output(problem) => self.error(ErrorCode::Internal, problem),
                })?
            }
        };
        let y = match y {
            ImageOutput::Whole(y) => y,
            sent => return Ok(sent),
        };
        let out = y.size();
        if out.len() != 4 || out[1] != 3 || out[0] != batch as i64 {
            return Err(self.error(
                ErrorCode::InvalidRequest,
                format!("forward returned {out:?}; an image model must return [N,3,sH,sW] for input [{batch},3,{height},{width}]"),
            ));
        }
        y.f_to_kind(Kind::Float)
            .map(ImageOutput::Whole)
            .map_err(|e| self.error(ErrorCode::Internal, first_line(&e)))
    }

    /// `(noise, prompt, negative, steps, guidance) -> [1,3,H,W]`.
    fn run_generate(&self, job: &GenerateJob) -> Result<Tensor, Error> {
        if job.noise.shape.len() != 4 || job.noise.shape[0] != 1 || job.noise.dtype != DType::F32 {
            return Err(self.error(
                ErrorCode::InvalidRequest,
                format!(
                    "noise must be float32 [1,C,h,w], got {:?} {:?}",
                    job.noise.dtype, job.noise.shape
                ),
            ));
        }
        let mut noise = self.input(&job.noise, "noise")?;
        if self.half {
            noise = noise
                .f_to_kind(Kind::Half)
                .map_err(|e| self.error(ErrorCode::Internal, first_line(&e)))?;
        }
        let inputs = [
            IValue::Tensor(noise),
            IValue::String(job.prompt.clone()),
            IValue::String(job.negative.clone()),
            IValue::Int(i64::from(job.steps)),
            IValue::Double(f64::from(job.guidance)),
        ];
        let contract = "generate: (noise, prompt: str, negative: str, steps: int, guidance: float) -> [1,3,H,W]";
        match self
            .module
            .forward_is(&inputs)
            .map_err(|e| self.forward_failed(contract, &e))?
        {
            IValue::Tensor(image) if image.dim() == 4 && image.size()[1] == 3 => image
                .f_to_kind(Kind::Float)
                .map_err(|e| self.error(ErrorCode::Internal, first_line(&e))),
            other => Err(self.error(
                ErrorCode::InvalidRequest,
                format!(
                    "forward returned {}; a generate model must return one [1,3,H,W] tensor",
                    describe(&other)
                ),
            )),
        }
    }

    /// `(*inputs: Tensor) -> Tensor or tuple of tensors`.
    fn run_tensor(&self, inputs: &[WireTensor]) -> Result<Vec<Tensor>, Error> {
        let inputs: Vec<IValue> = inputs
            .iter()
            .enumerate()
            .map(|(i, wire)| self.input(wire, &format!("input {i}")).map(IValue::Tensor))
            .collect::<Result<_, _>>()?;
        let output = self
            .module
            .forward_is(&inputs)
            .map_err(|e| self.forward_failed("tensor: (*tensors) -> tensors", &e))?;
        flatten(output).map_err(|what| {
            self.error(
                ErrorCode::InvalidRequest,
                format!("forward returned {what}; a tensor model must return tensors"),
            )
        })
    }
}

/// An image model's result: a tensor still to send, or a placeholder for
/// the image already sent row by row.
enum ImageOutput {
    Whole(Tensor),
    Sent(WireTensor),
}

/// Where a tiled image's finished rows go.
enum Rows<'a> {
    /// Sent on as they come (one RGB8 image).
    Stream(RowStream<'a>),
    /// Kept and joined at the end (a batch of images, or float outputs).
    Collect(Vec<Tensor>),
}

impl Rows<'_> {
    fn take(&mut self, band: tiling::Band) -> Result<(), TileError> {
        match self {
            Rows::Stream(stream) => stream.take(band),
            Rows::Collect(bands) => {
                bands.push(band.band);
                Ok(())
            }
        }
    }

    fn finish(&mut self) -> Result<ImageOutput, TileError> {
        match self {
            Rows::Stream(stream) => stream.finish().map(ImageOutput::Sent),
            Rows::Collect(bands) => Ok(ImageOutput::Whole(Tensor::f_cat(bands, 2)?)),
        }
    }
}

/// Sends one image, `[1,H,W,3]` RGB8, a band of rows at a time.
struct RowStream<'a> {
    output: &'a mut dyn FnMut(TensorFrame) -> Result<(), String>,
    shape: Option<Vec<u64>>,
    /// The first row not sent yet.
    next: i64,
}

impl<'a> RowStream<'a> {
    fn new(output: &'a mut dyn FnMut(TensorFrame) -> Result<(), String>) -> Self {
        RowStream {
            output,
            shape: None,
            next: 0,
        }
    }

    fn take(&mut self, band: tiling::Band) -> Result<(), TileError> {
        if band.top != self.next {
            return Err(TileError::Output(format!(
                "rows from {} came when row {} was next",
                band.top, self.next
            )));
        }
        let size = band.band.size();
        self.next += size[2];
        if size[1] != 3 {
            return Err(TileError::Shape(format!(
                "forward returned {} channels; an image model must return [N,3,sH,sW]",
                size[1]
            )));
        }
        if self.shape.is_none() {
            let shape = vec![1, band.height as u64, size[3] as u64, 3];
            let begin = TensorFrame::Begin {
                dtype: DType::U8,
                shape: shape.clone(),
            };
            (self.output)(begin).map_err(TileError::Output)?;
            self.shape = Some(shape);
        }
        let pixels = to_wire(&to_pixel_rows(band.band)?).map_err(TileError::Output)?;
        for chunk in pixels.data.chunks(CHUNK_BYTES) {
            (self.output)(TensorFrame::Chunk(chunk.to_vec())).map_err(TileError::Output)?;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<WireTensor, TileError> {
        let shape = self
            .shape
            .take()
            .ok_or_else(|| TileError::Shape("the image has no pixels".to_owned()))?;
        (self.output)(TensorFrame::End).map_err(TileError::Output)?;
        Ok(WireTensor::placeholder(DType::U8, shape))
    }
}

/// float `[N,3,H,W]` 0..1 → RGB8 `[N,H,W,3]`: channels last, so that the
/// bytes are rows of pixels, as image files hold them, and a receiver can
/// use each row as it arrives.
fn to_pixel_rows(t: Tensor) -> Result<Tensor, tch::TchError> {
    to_rgb8(t)?.f_permute([0, 2, 3, 1])?.f_contiguous()
}

/// float 0..1 → u8 0..255: clamped, rounded, NaN as 0 (as the daemon's
/// `pixels::to_rgb8` does for workers that send floats). In place, but for
/// the bytes: an 8K output is 768 MiB of floats, and each temporary of a
/// chain of operations would be as large.
fn to_rgb8(mut t: Tensor) -> Result<Tensor, tch::TchError> {
    // A float tensor that owns its memory (an expanded view would not).
    t = t.f_to_kind(Kind::Float)?.f_contiguous()?;
    let _ = t.f_nan_to_num_(0.0, 1.0, 0.0)?;
    let _ = t.f_clamp_(0.0, 1.0)?;
    let _ = t.f_mul_scalar_(255.0)?;
    // Half away from zero, like Rust's f32::round (torch rounds half to even).
    let _ = t.f_add_scalar_(0.5)?;
    let _ = t.f_floor_()?;
    t.f_to_kind(Kind::Uint8)
}

/// A tensor, or a (nested) tuple or list of tensors, as a flat list.
fn flatten(value: IValue) -> Result<Vec<Tensor>, String> {
    match value {
        IValue::Tensor(t) => Ok(vec![t]),
        IValue::TensorList(ts) => Ok(ts),
        IValue::Tuple(items) | IValue::GenericList(items) => {
            let mut out = Vec::new();
            for item in items {
                out.extend(flatten(item)?);
            }
            Ok(out)
        }
        other => Err(describe(&other)),
    }
}

fn describe(value: &IValue) -> String {
    match value {
        IValue::Tensor(t) => format!("a tensor of shape {:?}", t.size()),
        IValue::None => "None".to_owned(),
        IValue::Double(_) => "a float".to_owned(),
        IValue::Int(_) => "an int".to_owned(),
        IValue::Bool(_) => "a bool".to_owned(),
        IValue::String(_) => "a string".to_owned(),
        IValue::Tuple(items) => format!("a tuple of {} values", items.len()),
        _ => "a value that is not a tensor".to_owned(),
    }
}
