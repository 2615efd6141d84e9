//! Image outputs come as rows of RGB8 pixels (`[1,H,W,3]`, protocol 1.2),
//! streamed in 1 MiB chunks, a tiled image's while its later tiles still
//! run. A PNG is encoded and written as they arrive: gpuctl holds a chunk
//! of the image, not the image, and the file is done moments after the last
//! row. JPEG and WebP are encoded from the whole image at the end, as is a
//! planar image (`[1,3,H,W]`) from a gpuctld older than 1.2.
//!
//! The file is written beside its destination and renamed into place once
//! complete, so a failed or cancelled request leaves no partial file.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use gpuctl_protocol::{DType, OutputSink, TensorFrame, WireTensor};

/// One image output on its way to a file.
pub struct ImageWriter {
    /// Where the image is written until it is complete.
    partial: PathBuf,
    /// Encode PNG as rows arrive; else keep the image for the end.
    png: bool,
    /// The daemon sends rows of pixels (1.2); else planes.
    rows: bool,
    state: State,
    problem: Option<String>,
}

enum State {
    Waiting,
    /// A PNG being written: `left` bytes of pixels still to come.
    Png {
        stream: Box<png::StreamWriter<'static, BufWriter<File>>>,
        width: u32,
        height: u32,
        left: usize,
    },
    /// The whole image, for an encoder that wants it at once.
    Whole {
        width: u32,
        height: u32,
        pixels: Vec<u8>,
    },
    /// The PNG has been finished; the partial file is complete.
    Written {
        width: u32,
        height: u32,
    },
}

impl ImageWriter {
    /// A writer for the image that will go to `destination` (`None`: a
    /// default PNG name in the current directory, decided later); `rows`:
    /// the daemon speaks protocol 1.2.
    pub fn new(destination: Option<&Path>, rows: bool) -> ImageWriter {
        let png = destination.is_none_or(|path| {
            path.extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("png"))
        });
        let dir = destination
            .and_then(Path::parent)
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = destination
            .and_then(Path::file_name)
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "output.png".to_owned());
        ImageWriter {
            partial: dir.join(format!(".{name}.{}.partial", std::process::id())),
            png,
            rows,
            state: State::Waiting,
            problem: None,
        }
    }

    /// A sink for [`gpuctl_protocol::Client::start_with_sink`] feeding `shared`.
    pub fn sink(shared: &Arc<Mutex<ImageWriter>>) -> OutputSink {
        let shared = shared.clone();
        Box::new(move |frame| lock(&shared).take(frame))
    }

    /// Feeds a tensor that came whole, inside its response.
    pub fn take_tensor(&mut self, tensor: WireTensor) {
        for frame in gpuctl_protocol::stream::frames(tensor) {
            self.take(frame);
        }
    }

    pub fn take(&mut self, frame: TensorFrame) {
        if self.problem.is_some() {
            return;
        }
        if let Err(problem) = self.place(frame) {
            self.abandon();
            self.problem = Some(problem);
        }
    }

    fn place(&mut self, frame: TensorFrame) -> Result<(), String> {
        match frame {
            TensorFrame::Begin { dtype, shape } => self.begin(dtype, &shape),
            TensorFrame::Chunk(data) => match &mut self.state {
                State::Png { stream, left, .. } => {
                    if data.len() > *left {
                        return Err("more pixels than the image holds".into());
                    }
                    *left -= data.len();
                    stream
                        .write_all(&data)
                        .map_err(|e| format!("cannot write {}: {e}", self.partial.display()))
                }
                State::Whole {
                    width,
                    height,
                    pixels,
                } => {
                    if pixels.len() + data.len() > rgb_bytes(*width, *height) {
                        return Err("more pixels than the image holds".into());
                    }
                    pixels.extend_from_slice(&data);
                    Ok(())
                }
                State::Waiting | State::Written { .. } => {
                    Err("pixels before the image began".into())
                }
            },
            TensorFrame::End => match std::mem::replace(&mut self.state, State::Waiting) {
                // Complete: the PNG can be finished now.
                State::Png {
                    stream,
                    width,
                    height,
                    left: 0,
                } => {
                    stream
                        .finish()
                        .map_err(|e| format!("cannot write {}: {e}", self.partial.display()))?;
                    self.state = State::Written { width, height };
                    Ok(())
                }
                // Short or whole: `finish` judges.
                other => {
                    self.state = other;
                    Ok(())
                }
            },
        }
    }

    fn begin(&mut self, dtype: DType, shape: &[u64]) -> Result<(), String> {
        if !matches!(self.state, State::Waiting) {
            return Err("the model returned more than one output, not one image".into());
        }
        let (height, width) = match (self.rows, shape) {
            (true, &[1, height, width, 3]) => (height, width),
            (false, &[1, 3, height, width]) => (height, width),
            (true, _) => return Err(format!("the model returned shape {shape:?}, not [1,H,W,3]")),
            (false, _) => return Err(format!("the model returned shape {shape:?}, not [1,3,H,W]")),
        };
        if dtype != DType::U8 {
            return Err(format!("the model returned {dtype:?} pixels, not RGB8"));
        }
        let (Ok(w), Ok(h)) = (u32::try_from(width), u32::try_from(height)) else {
            return Err(format!("an image of {width}x{height} is too large"));
        };
        let bytes = rgb_bytes(w, h);
        if self.png && self.rows {
            let file = File::create(&self.partial)
                .map_err(|e| format!("cannot create {}: {e}", self.partial.display()))?;
            let mut encoder = png::Encoder::new(BufWriter::new(file), w, h);
            encoder.set_color(png::ColorType::Rgb);
            encoder.set_depth(png::BitDepth::Eight);
            // The image crate's defaults, as for the other formats: zlib's
            // level 6 would take 20 s over an 8K image, fdeflate 1 s.
            encoder.set_compression(png::Compression::Fast);
            encoder.set_filter(png::Filter::Adaptive);
            let stream = encoder
                .write_header()
                .and_then(|writer| writer.into_stream_writer())
                .map_err(|e| format!("cannot write {}: {e}", self.partial.display()))?;
            self.state = State::Png {
                stream: Box::new(stream),
                width: w,
                height: h,
                left: bytes,
            };
        } else {
            let mut pixels = Vec::new();
            pixels
                .try_reserve_exact(bytes)
                .map_err(|_| format!("cannot allocate {bytes} bytes for a {w}x{h} image"))?;
            self.state = State::Whole {
                width: w,
                height: h,
                pixels,
            };
        }
        Ok(())
    }

    /// Puts the finished image at `path` (its extension names the format);
    /// returns its size, or why there is none.
    pub fn finish(&mut self, path: &Path) -> Result<(u32, u32), String> {
        if let Some(problem) = self.problem.take() {
            return Err(problem);
        }
        let size = match std::mem::replace(&mut self.state, State::Waiting) {
            State::Waiting => return Err("the model returned no image".into()),
            State::Png { left, .. } => {
                self.abandon();
                return Err(format!("the image ended {left} bytes short"));
            }
            State::Written { width, height } => (width, height),
            State::Whole {
                width,
                height,
                pixels,
            } => {
                let bytes = rgb_bytes(width, height);
                if pixels.len() != bytes {
                    return Err(format!(
                        "the image ended after {} of its {bytes} bytes",
                        pixels.len(),
                    ));
                }
                let pixels = if self.rows {
                    pixels
                } else {
                    interleave(&pixels)
                };
                let image = image::RgbImage::from_raw(width, height, pixels)
                    .ok_or("the pixel count does not match the size")?;
                let format = image::ImageFormat::from_path(path)
                    .map_err(|e| format!("{e} (use .png, .jpg or .webp)"))?;
                if let Err(error) = image.save_with_format(&self.partial, format) {
                    self.abandon();
                    return Err(format!("{error} (use .png, .jpg or .webp)"));
                }
                (width, height)
            }
        };
        std::fs::rename(&self.partial, path).map_err(|e| {
            self.abandon();
            format!("cannot move {} there: {e}", self.partial.display())
        })?;
        Ok(size)
    }

    /// Removes what was written: the request failed or was cancelled.
    pub fn abandon(&mut self) {
        self.state = State::Waiting;
        let _ = std::fs::remove_file(&self.partial);
    }
}

impl Drop for ImageWriter {
    fn drop(&mut self) {
        if !matches!(self.state, State::Waiting) {
            self.abandon();
        }
    }
}

/// The writer behind a sink: a panic elsewhere does not stop its cleanup.
pub fn lock(shared: &Mutex<ImageWriter>) -> std::sync::MutexGuard<'_, ImageWriter> {
    shared
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The bytes of a `width` x `height` RGB8 image.
fn rgb_bytes(width: u32, height: u32) -> usize {
    3 * width as usize * height as usize
}

/// `[3,H,W]` planes → RGB pixels.
fn interleave(planes: &[u8]) -> Vec<u8> {
    let plane = planes.len() / 3;
    let mut pixels = vec![0u8; planes.len()];
    for (i, pixel) in pixels.chunks_exact_mut(3).enumerate() {
        for (c, value) in pixel.iter_mut().enumerate() {
            *value = planes[c * plane + i];
        }
    }
    pixels
}

#[cfg(test)]
mod tests {
    use gpuctl_protocol::CHUNK_BYTES;

    use super::*;

    /// 700x500 rows of pixels, each byte a function of its position.
    fn rows(width: u64, height: u64) -> WireTensor {
        let data = (0..3 * width * height)
            .map(|i| ((i / 3) * 7 + (i % 3) * 100) as u8)
            .collect();
        WireTensor::new(DType::U8, vec![1, height, width, 3], data).unwrap()
    }

    fn partials(dir: &Path) -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().ends_with(".partial"))
            .collect()
    }

    #[test]
    fn a_png_is_written_as_rows_arrive_and_moved_into_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.png");
        let tensor = rows(700, 500);
        assert!(tensor.data.len() > CHUNK_BYTES);
        let mut writer = ImageWriter::new(Some(&path), true);
        let mut frames = gpuctl_protocol::stream::frames(tensor.clone());
        writer.take(frames.next().unwrap());
        writer.take(frames.next().unwrap());
        assert_eq!(partials(dir.path()).len(), 1, "written before the end");
        assert!(!path.exists());
        frames.for_each(|frame| writer.take(frame));
        assert_eq!(writer.finish(&path), Ok((700, 500)));
        assert!(partials(dir.path()).is_empty());
        let image = image::open(&path).unwrap().to_rgb8();
        assert_eq!(image.dimensions(), (700, 500));
        assert_eq!(image.as_raw(), &tensor.data);
    }

    #[test]
    fn planes_from_an_older_daemon_and_other_formats_come_out_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let tensor = rows(300, 200);
        let plane = 300 * 200;
        let mut planar = vec![0u8; tensor.data.len()];
        for (i, pixel) in tensor.data.chunks_exact(3).enumerate() {
            for c in 0..3 {
                planar[c * plane + i] = pixel[c];
            }
        }
        let planar = WireTensor::new(DType::U8, vec![1, 3, 200, 300], planar).unwrap();
        let path = dir.path().join("old.png");
        let mut writer = ImageWriter::new(Some(&path), false);
        writer.take_tensor(planar);
        assert_eq!(writer.finish(&path), Ok((300, 200)));
        assert_eq!(image::open(&path).unwrap().to_rgb8().as_raw(), &tensor.data);

        let path = dir.path().join("out.webp");
        let mut writer = ImageWriter::new(Some(&path), true);
        writer.take_tensor(tensor.clone());
        assert_eq!(writer.finish(&path), Ok((300, 200)));
        // Lossless WebP: the same pixels.
        assert_eq!(image::open(&path).unwrap().to_rgb8().as_raw(), &tensor.data);
        assert!(partials(dir.path()).is_empty());
    }

    #[test]
    fn what_is_not_one_rgb8_image_is_named_and_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.png");
        let cases = [
            (
                WireTensor::new(DType::U8, vec![1, 2, 2, 1], vec![0; 4]).unwrap(),
                "not [1,H,W,3]",
            ),
            (
                WireTensor::new(DType::F32, vec![1, 1, 1, 3], vec![0; 12]).unwrap(),
                "F32 pixels",
            ),
        ];
        for (tensor, problem) in cases {
            let mut writer = ImageWriter::new(Some(&path), true);
            writer.take_tensor(tensor);
            let error = writer.finish(&path).unwrap_err();
            assert!(error.contains(problem), "{error}");
        }
        let mut two = ImageWriter::new(Some(&path), true);
        two.take_tensor(rows(2, 2));
        two.take_tensor(rows(2, 2));
        assert!(two
            .finish(&path)
            .unwrap_err()
            .contains("more than one output"));
        // Cut off in the middle: the partial file goes.
        let mut short = ImageWriter::new(Some(&path), true);
        let mut frames = gpuctl_protocol::stream::frames(rows(700, 500));
        short.take(frames.next().unwrap());
        short.take(frames.next().unwrap());
        assert_eq!(partials(dir.path()).len(), 1);
        assert!(short.finish(&path).unwrap_err().contains("bytes short"));
        assert!(partials(dir.path()).is_empty());
        // Dropped in the middle (a failed request): the partial file goes.
        let mut dropped = ImageWriter::new(Some(&path), true);
        let mut frames = gpuctl_protocol::stream::frames(rows(700, 500));
        dropped.take(frames.next().unwrap());
        drop(dropped);
        assert!(partials(dir.path()).is_empty());
        assert!(!path.exists());
        assert!(ImageWriter::new(Some(&path), true)
            .finish(&path)
            .unwrap_err()
            .contains("no image"));
    }
}
