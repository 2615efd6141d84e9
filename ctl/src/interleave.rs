//! Image outputs arrive planar (`[1,3,H,W]` RGB8: all of red, then green,
//! then blue), streamed in 1 MiB chunks; encoders want interleaved RGB.
//! Placing each chunk's bytes as it arrives keeps one copy of the image
//! instead of two, and does the work while the rest is still on its way.

use std::sync::{Arc, Mutex};

use gpuctl_protocol::{DType, OutputSink, TensorFrame, WireTensor};

/// An RGB image being built from the frames of one planar tensor.
#[derive(Default)]
pub struct Interleaver {
    image: Option<Image>,
    outputs: usize,
    problem: Option<String>,
}

struct Image {
    width: u32,
    height: u32,
    pixels: Vec<u8>,
    /// Bytes of the planar tensor placed so far.
    placed: usize,
}

impl Interleaver {
    /// A sink for [`gpuctl_protocol::Client::start_with_sink`] feeding `shared`.
    pub fn sink(shared: &Arc<Mutex<Interleaver>>) -> OutputSink {
        let shared = shared.clone();
        Box::new(move |frame| {
            shared
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .take(frame)
        })
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
            self.image = None;
            self.problem = Some(problem);
        }
    }

    fn place(&mut self, frame: TensorFrame) -> Result<(), String> {
        match frame {
            TensorFrame::Begin { dtype, shape } => {
                self.outputs += 1;
                if self.outputs > 1 {
                    return Err("the model returned more than one output, not one image".into());
                }
                let [1, 3, height, width] = shape[..] else {
                    return Err(format!("the model returned shape {shape:?}, not [1,3,H,W]"));
                };
                if dtype != DType::U8 {
                    return Err(format!("the model returned {dtype:?} pixels, not RGB8"));
                }
                let (Ok(w), Ok(h)) = (u32::try_from(width), u32::try_from(height)) else {
                    return Err(format!("an image of {width}x{height} is too large"));
                };
                let bytes = 3 * width as usize * height as usize;
                let mut pixels = Vec::new();
                pixels
                    .try_reserve_exact(bytes)
                    .map_err(|_| format!("cannot allocate {bytes} bytes for a {w}x{h} image"))?;
                pixels.resize(bytes, 0);
                self.image = Some(Image {
                    width: w,
                    height: h,
                    pixels,
                    placed: 0,
                });
            }
            TensorFrame::Chunk(data) => {
                let image = self.image.as_mut().ok_or("pixels before the image began")?;
                let plane = image.width as usize * image.height as usize;
                let mut rest = &data[..];
                while !rest.is_empty() {
                    let (channel, start) = (image.placed / plane, image.placed % plane);
                    if channel >= 3 {
                        return Err("more pixels than the image holds".into());
                    }
                    let run = rest.len().min(plane - start);
                    let target = image.pixels[start * 3 + channel..].iter_mut().step_by(3);
                    for (to, from) in target.zip(&rest[..run]) {
                        *to = *from;
                    }
                    image.placed += run;
                    rest = &rest[run..];
                }
            }
            TensorFrame::End => {}
        }
        Ok(())
    }

    /// The finished image, or why there is none.
    pub fn finish(self) -> Result<image::RgbImage, String> {
        if let Some(problem) = self.problem {
            return Err(problem);
        }
        let image = self.image.ok_or("the model returned no image")?;
        if image.placed != image.pixels.len() {
            return Err(format!(
                "the image ended after {} of its {} bytes",
                image.placed,
                image.pixels.len()
            ));
        }
        image::RgbImage::from_raw(image.width, image.height, image.pixels)
            .ok_or_else(|| "the pixel count does not match the size".into())
    }
}

#[cfg(test)]
mod tests {
    use gpuctl_protocol::CHUNK_BYTES;

    use super::*;

    fn planar(width: u64, height: u64) -> WireTensor {
        let plane = (width * height) as usize;
        let data = (0..3 * plane)
            .map(|i| ((i % plane) * 7 + (i / plane) * 100) as u8)
            .collect();
        WireTensor::new(DType::U8, vec![1, 3, height, width], data).unwrap()
    }

    #[test]
    fn chunks_that_straddle_planes_land_where_they_belong() {
        // 700x500: a plane is 350000 bytes, so 1 MiB chunks cross planes.
        let tensor = planar(700, 500);
        assert!(tensor.data.len() > CHUNK_BYTES);
        let mut interleaver = Interleaver::default();
        interleaver.take_tensor(tensor.clone());
        let image = interleaver.finish().unwrap();
        assert_eq!(image.dimensions(), (700, 500));
        let plane = 700 * 500;
        for (i, pixel) in image.pixels().enumerate().step_by(997) {
            for c in 0..3 {
                assert_eq!(
                    pixel[c],
                    tensor.data[c * plane + i],
                    "pixel {i} channel {c}"
                );
            }
        }
    }

    #[test]
    fn what_is_not_one_rgb8_image_is_named() {
        let cases = [
            (
                WireTensor::new(DType::U8, vec![1, 1, 2, 2], vec![0; 4]).unwrap(),
                "not [1,3,H,W]",
            ),
            (
                WireTensor::new(DType::F32, vec![1, 3, 1, 1], vec![0; 12]).unwrap(),
                "F32 pixels",
            ),
        ];
        for (tensor, problem) in cases {
            let mut interleaver = Interleaver::default();
            interleaver.take_tensor(tensor);
            let error = interleaver.finish().unwrap_err();
            assert!(error.contains(problem), "{error}");
        }
        let mut two = Interleaver::default();
        two.take_tensor(planar(2, 2));
        two.take_tensor(planar(2, 2));
        assert!(two.finish().unwrap_err().contains("more than one output"));
        let mut short = Interleaver::default();
        short.take(TensorFrame::Begin {
            dtype: DType::U8,
            shape: vec![1, 3, 2, 2],
        });
        short.take(TensorFrame::Chunk(vec![1; 5]));
        assert!(short
            .finish()
            .unwrap_err()
            .contains("after 5 of its 12 bytes"));
        assert!(Interleaver::default()
            .finish()
            .unwrap_err()
            .contains("no image"));
    }
}
