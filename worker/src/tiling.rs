//! Large images in tiles: the image is cut into overlapping tiles, tiles
//! run through the model in batches, and the results are blended back with
//! a linear feather, so the output has exactly the untiled size and no seam.
//!
//! The feather gives a tile's outer quarter of each overlap no weight and
//! ramps across the middle half, so every output pixel comes from tiles in
//! which it is at least `overlap / 4` input pixels away from a cut: for a
//! model whose receptive field is within that margin, the tiled result is
//! the untiled one.

use tch::{Kind, Tensor};

/// How to cut: tile edge and overlap in input pixels, tiles per forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tiling {
    pub tile: i64,
    pub overlap: i64,
    pub batch: i64,
}

/// Where tiles start along one axis of `length` pixels, and their length
/// (the axis itself when shorter than a tile). As few tiles as `tile` and
/// `overlap` allow, each shrunk to the same size so that they share the
/// axis evenly: a long axis just past a multiple of the tile costs one
/// smaller tile's worth of extra work, not a whole redundant tile.
pub fn starts(length: i64, tile: i64, overlap: i64) -> (Vec<i64>, i64) {
    if length <= tile {
        return (vec![0], length);
    }
    let widest = (tile - overlap).max(1);
    let count = (length - overlap + widest - 1) / widest;
    // ceil((length + (count - 1) * overlap) / count) <= tile, by the choice of count.
    let size = (length + (count - 1) * overlap + count - 1) / count;
    let stride = (size - overlap).max(1);
    let starts = (0..count)
        .map(|i| (i * stride).min(length - size))
        .collect();
    (starts, size)
}

/// The feather weights along one axis of one tile, in output pixels:
/// `length` long, cut edges (`before`, `after`) ramping over `overlap`.
pub fn feather(length: i64, overlap: i64, before: bool, after: bool) -> Vec<f32> {
    let margin = overlap as f32 / 4.0;
    let ramp = (overlap as f32 / 2.0).max(1.0);
    let weight = |distance: i64| ((distance as f32 + 0.5 - margin) / ramp).clamp(0.0, 1.0);
    (0..length)
        .map(|i| {
            let mut w = 1.0f32;
            if before && overlap > 0 {
                w = w.min(weight(i));
            }
            if after && overlap > 0 {
                w = w.min(weight(length - 1 - i));
            }
            w
        })
        .collect()
}

/// What went wrong while tiling.
#[derive(Debug)]
pub enum TileError {
    /// The forward failed on the tiles starting with this one (row, column).
    Forward {
        tile: (usize, usize),
        error: tch::TchError,
    },
    /// The model does not scale a tile by a whole factor.
    Shape(String),
    /// Anything else libtorch refused (allocation, …).
    Torch(tch::TchError),
    /// Stopped between batches: `done` of `total` tiles were finished.
    Cancelled { done: usize, total: usize },
    /// Finished rows could not be handed on (the daemon hung up, or the
    /// output is not an image).
    Output(String),
}

impl From<tch::TchError> for TileError {
    fn from(error: tch::TchError) -> Self {
        TileError::Torch(error)
    }
}

/// Whether libtorch failed for want of memory (CUDA or host).
pub fn out_of_memory(error: &tch::TchError) -> bool {
    let text = crate::tensors::raised(error).to_lowercase();
    text.contains("out of memory")
        || text.contains("can't allocate memory")
        || text.contains("not enough memory")
}

/// The smallest tile back-off goes to.
const MIN_TILE: i64 = 16;

/// The blended output so far: weighted sum and weights, for a window of
/// output rows from `top` down. Rows above the window were handed on and
/// are never needed again, so the window slides down as the tiles do and
/// the worker holds a few tile rows of the output, not all of it.
struct Blend {
    sum: Tensor,
    weights: Tensor,
    scale: i64,
    /// The output row the window starts at.
    top: i64,
    /// The output's height.
    height: i64,
}

impl Blend {
    fn new(
        like: &Tensor,
        channels: i64,
        height: i64,
        width: i64,
        rows: i64,
        scale: i64,
    ) -> Result<Blend, TileError> {
        let n = like.size()[0];
        let rows = rows.min(height);
        let options = (Kind::Float, like.device());
        Ok(Blend {
            sum: Tensor::f_zeros([n, channels, rows, width], options)?,
            weights: Tensor::f_zeros([1, 1, rows, width], options)?,
            scale,
            top: 0,
            height,
        })
    }

    fn end(&self) -> i64 {
        self.top + self.sum.size()[2]
    }

    /// Makes room down to output row `bottom`, keeping rows from `keep`
    /// (those not handed on yet): the window slides down, or grows if a
    /// batch spans more tile rows than it holds.
    fn reach(&mut self, keep: i64, bottom: i64) -> Result<(), TileError> {
        if bottom <= self.end() {
            return Ok(());
        }
        let keep = keep.max(self.top);
        let rows = self.sum.size()[2]
            .max(bottom - keep)
            .min(self.height - keep);
        let kept = self.end() - keep;
        let slide = |old: &Tensor| -> Result<Tensor, TileError> {
            let mut size = old.size();
            size[2] = rows;
            let new = Tensor::f_zeros(&size[..], (Kind::Float, old.device()))?;
            if kept > 0 {
                new.f_narrow(2, 0, kept)?
                    .f_copy_(&old.f_narrow(2, keep - self.top, kept)?)?;
            }
            Ok(new)
        };
        // One at a time: the old window goes before the next is made.
        self.sum = slide(&self.sum)?;
        self.weights = slide(&self.weights)?;
        self.top = keep;
        Ok(())
    }

    /// Adds a weighted tile whose output starts at (`row`, `column`); rows
    /// above the window were handed on already and take nothing more.
    fn add(
        &mut self,
        part: &Tensor,
        weight: &Tensor,
        row: i64,
        column: i64,
    ) -> Result<(), TileError> {
        let (rows, columns) = (part.size()[2], part.size()[3]);
        let skip = (self.top - row).clamp(0, rows);
        if skip == rows {
            return Ok(());
        }
        let at = |t: &Tensor| -> Result<Tensor, tch::TchError> {
            t.f_narrow(2, row + skip - self.top, rows - skip)?
                .f_narrow(3, column, columns)
        };
        let _ = at(&self.sum)?.f_add_(&part.f_narrow(2, skip, rows - skip)?)?;
        let _ = at(&self.weights)?.f_add_(&weight.f_narrow(2, skip, rows - skip)?)?;
        Ok(())
    }

    /// Whether every output pixel of this region has weight already.
    fn covers(&self, row: i64, rows: i64, column: i64, columns: i64) -> Result<bool, TileError> {
        let start = row.max(self.top);
        if row + rows <= self.top {
            return Ok(true);
        }
        if row + rows > self.end() {
            return Ok(false);
        }
        let least = self
            .weights
            .f_narrow(2, start - self.top, row + rows - start)?
            .f_narrow(3, column, columns)?
            .f_min()?
            .double_value(&[]);
        Ok(least > 0.0)
    }

    /// Hands output rows `from..to` to `rows`, in bands of at most
    /// [`BAND_BYTES`] of output; returns the first row not yet handed on.
    fn emit(
        &self,
        from: i64,
        to: i64,
        rows: &mut dyn FnMut(Band) -> Result<(), TileError>,
    ) -> Result<i64, TileError> {
        let size = self.sum.size();
        let row_bytes = (size[0] * size[1] * size[3]).max(1);
        let step = (BAND_BYTES / row_bytes).max(1);
        let mut top = from;
        while top < to {
            let count = step.min(to - top);
            let band = self.rows(top, count)?;
            rows(Band {
                band,
                top,
                height: self.height,
            })?;
            top += count;
        }
        Ok(top.max(from))
    }

    /// Output rows `row..row + count`, blended.
    fn rows(&self, row: i64, count: i64) -> Result<Tensor, TileError> {
        let local = row - self.top;
        Ok(self
            .sum
            .f_narrow(2, local, count)?
            .f_div(&self.weights.f_narrow(2, local, count)?)?)
    }
}

/// Rows of the blended output, handed on as soon as no tile still to run
/// touches them: `band` is `[N,C,rows,sW]` float, starting at output row
/// `top` of `height`. Bands come top to bottom and cover the output once.
pub struct Band {
    pub band: Tensor,
    pub top: i64,
    pub height: i64,
}

/// Output bytes (at one byte per channel) a band holds at most: its float
/// temporaries stay a few MiB however wide the image.
const BAND_BYTES: i64 = 2 << 20;

/// Runs `forward` over `x` (`[N,C,H,W]` float) in tiles, blends the
/// results and hands finished rows to `rows_out` while later tiles still run,
/// so they can be sent on during the job; `progress(done, total)` is called
/// after every batch and says whether to go on. Out of memory, it halves
/// the batch, then the tile (keeping the tiles already done), and says so
/// in `notes`; another failure is retried `retries` times before it names
/// its tile.
pub fn run(
    x: &Tensor,
    tiling: Tiling,
    retries: u32,
    forward: &dyn Fn(&Tensor) -> Result<Tensor, tch::TchError>,
    progress: &mut dyn FnMut(usize, usize) -> bool,
    rows_out: &mut dyn FnMut(Band) -> Result<(), TileError>,
    notes: &mut Vec<String>,
) -> Result<(), TileError> {
    let size = x.size();
    let (n, height, width) = (size[0], size[2], size[3]);
    let mut plan = tiling;
    plan.batch = plan.batch.max(1);
    let mut blend: Option<Blend> = None;
    // Output rows handed to `rows` so far.
    let mut emitted = 0;
    'plans: loop {
        let (rows, tile_h) = starts(height, plan.tile, plan.overlap);
        let (columns, tile_w) = starts(width, plan.tile, plan.overlap);
        let all: Vec<(usize, usize)> = (0..rows.len())
            .flat_map(|r| (0..columns.len()).map(move |c| (r, c)))
            .collect();
        let total = all.len();
        // After a smaller tile was chosen, what earlier tiles already
        // cover (every output pixel weighted) is not done again.
        let mut pending = Vec::new();
        for &(r, c) in &all {
            let covered = match &blend {
                Some(b) => b.covers(
                    rows[r] * b.scale,
                    tile_h * b.scale,
                    columns[c] * b.scale,
                    tile_w * b.scale,
                )?,
                None => false,
            };
            if !covered {
                pending.push((r, c));
            }
        }
        let mut done = total - pending.len();
        let mut next = 0;
        let mut failures = 0;
        while next < pending.len() {
            let batch = &pending[next..(next + plan.batch as usize).min(pending.len())];
            let first = batch[0];
            let inputs: Vec<Tensor> = batch
                .iter()
                .map(|&(r, c)| {
                    x.f_narrow(2, rows[r], tile_h)?
                        .f_narrow(3, columns[c], tile_w)
                })
                .collect::<Result<_, _>>()?;
            let y = match Tensor::f_cat(&inputs, 0).and_then(|input| forward(&input)) {
                Ok(y) => y,
                Err(error) if out_of_memory(&error) => {
                    if plan.batch > 1 {
                        let halved = plan.batch / 2;
                        notes.push(format!(
                            "out of memory at tile row {}, column {}: batch {} -> {halved}",
                            first.0, first.1, plan.batch
                        ));
                        plan.batch = halved;
                        continue;
                    }
                    let halved = plan.tile / 2;
                    if halved < MIN_TILE {
                        return Err(TileError::Forward { tile: first, error });
                    }
                    notes.push(format!(
                        "out of memory at tile row {}, column {} with batch 1: tile {} -> {halved}, keeping the {done} tiles done",
                        first.0, first.1, plan.tile
                    ));
                    plan.tile = halved;
                    // The margin must stay within the smaller tile.
                    plan.overlap = plan.overlap.min(halved / 4);
                    continue 'plans;
                }
                Err(error) => {
                    failures += 1;
                    if failures > retries {
                        return Err(TileError::Forward { tile: first, error });
                    }
                    notes.push(format!(
                        "tile row {}, column {} failed ({}); retry {failures} of {retries}",
                        first.0,
                        first.1,
                        crate::tensors::raised(&error)
                    ));
                    continue;
                }
            };
            failures = 0;
            let out = y.size();
            if out.len() != 4 || out[0] != n * batch.len() as i64 {
                return Err(TileError::Shape(format!(
                    "forward returned {out:?} for {} tiles of {:?}",
                    batch.len(),
                    [n, size[1], tile_h, tile_w]
                )));
            }
            let scale = out[2] / tile_h;
            if scale < 1 || out[2] != tile_h * scale || out[3] != tile_w * scale {
                return Err(TileError::Shape(format!(
                    "tiling needs a model whose output is a whole multiple of its input; a {tile_h}x{tile_w} tile became {}x{}",
                    out[2], out[3]
                )));
            }
            let b = match &mut blend {
                Some(b) => b,
                // Two tile rows to start with: the one running, and the
                // overlap the one above left unfinished.
                None => blend.insert(Blend::new(
                    x,
                    out[1],
                    height * scale,
                    width * scale,
                    2 * tile_h * scale,
                    scale,
                )?),
            };
            if b.scale != scale {
                return Err(TileError::Shape(format!(
                    "the model scaled tiles by {} and then by {scale}",
                    b.scale
                )));
            }
            let bottom = batch
                .iter()
                .map(|&(r, _)| rows[r] + tile_h)
                .max()
                .unwrap_or(0);
            b.reach(emitted, bottom * scale)?;
            for (j, &(r, c)) in batch.iter().enumerate() {
                let rows_w = feather(
                    tile_h * scale,
                    plan.overlap * scale,
                    r > 0,
                    r + 1 < rows.len(),
                );
                let columns_w = feather(
                    tile_w * scale,
                    plan.overlap * scale,
                    c > 0,
                    c + 1 < columns.len(),
                );
                let weight = Tensor::from_slice(&rows_w)
                    .f_view([1, 1, tile_h * scale, 1])?
                    .f_mul(&Tensor::from_slice(&columns_w).f_view([1, 1, 1, tile_w * scale])?)?
                    .f_to_device(x.device())?;
                let part = y
                    .f_narrow(0, j as i64 * n, n)?
                    .f_to_kind(Kind::Float)?
                    .f_mul(&weight)?;
                b.add(&part, &weight, rows[r] * scale, columns[c] * scale)?;
            }
            next += batch.len();
            done += batch.len();
            // Tiles run row by row: rows above the next tile's are final.
            if let Some(&(r, _)) = pending.get(next) {
                emitted = b.emit(emitted, rows[r] * b.scale, rows_out)?;
            }
            if !progress(done, total) && done < total {
                return Err(TileError::Cancelled { done, total });
            }
        }
        break;
    }
    let b = blend.ok_or_else(|| TileError::Shape("the image has no pixels".to_owned()))?;
    b.emit(emitted, b.height, rows_out)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use tch::Device;

    use super::*;

    #[test]
    fn tiles_cover_the_axis_and_the_last_one_meets_the_edge() {
        assert_eq!(starts(100, 128, 16), (vec![0], 100), "smaller than a tile");
        assert_eq!(starts(128, 128, 16), (vec![0], 128));
        assert_eq!(starts(129, 128, 16), (vec![0, 56], 73), "two even halves");
        assert_eq!(starts(300, 128, 32), (vec![0, 90, 178], 122));
        assert_eq!(
            starts(2048, 512, 32).1,
            436,
            "5 tiles, not 5 and a redundant one"
        );
        for (length, tile, overlap) in [(1000, 64, 16), (4096, 512, 32), (777, 100, 8)] {
            let (s, t) = starts(length, tile, overlap);
            assert!(t <= tile);
            assert!(s
                .windows(2)
                .all(|w| w[1] > w[0] && w[0] + t - w[1] >= overlap));
            assert_eq!(s[0], 0);
            assert_eq!(s.last().map(|l| l + t), Some(length));
        }
    }

    #[test]
    fn feathers_of_neighbours_sum_to_one_across_their_overlap() {
        // Two tiles of 64 overlapping by exactly 16.
        let left = feather(64, 16, false, true);
        let right = feather(64, 16, true, false);
        for i in 0..16 {
            let sum = left[48 + i] + right[i];
            assert!((sum - 1.0).abs() < 1e-6, "at {i}: {sum}");
        }
        assert_eq!(&left[..48], &[1.0; 48][..]);
        assert_eq!(left[63], 0.0, "the cut edge itself has no weight");
        assert_eq!(right[0], 0.0);
        assert_eq!(
            feather(8, 0, true, true),
            vec![1.0; 8],
            "no overlap, no feather"
        );
    }

    #[test]
    fn tiling_a_pointwise_model_gives_the_untiled_result_at_any_size() {
        let forward = |t: &Tensor| -> Result<Tensor, tch::TchError> {
            t.f_upsample_nearest2d([t.size()[2] * 2, t.size()[3] * 2], None, None)
        };
        // (300, 20): one column, so a batch of 3 spans 3 tile rows.
        for (h, w) in [(7, 9), (64, 64), (100, 37), (150, 230), (300, 20)] {
            let x = Tensor::rand([1, 3, h, w], (Kind::Float, Device::Cpu));
            let whole = forward(&x).unwrap();
            let calls = std::cell::RefCell::new(Vec::new());
            let mut bands = Vec::new();
            run(
                &x,
                Tiling {
                    tile: 32,
                    overlap: 8,
                    batch: 3,
                },
                0,
                &forward,
                &mut |done, total| {
                    calls.borrow_mut().push((done, total));
                    true
                },
                &mut |band| {
                    bands.push((band.top, band.height, calls.borrow().len(), band.band));
                    Ok(())
                },
                &mut Vec::new(),
            )
            .unwrap();
            let mut next = 0;
            for (top, height, _, band) in &bands {
                assert_eq!((*top, *height), (next, h * 2), "{h}x{w}: bands in order");
                next += band.size()[2];
            }
            assert_eq!(next, h * 2, "{h}x{w}: bands cover the output");
            let tiled = Tensor::cat(&bands.iter().map(|b| &b.3).collect::<Vec<_>>(), 2);
            assert_eq!(tiled.size(), whole.size());
            let largest = (tiled - whole).abs().max().double_value(&[]);
            assert!(largest < 1e-5, "{h}x{w}: {largest}");
            let calls = calls.into_inner();
            let total = calls.last().unwrap().1;
            assert_eq!(calls.last(), Some(&(total, total)));
            if h > 64 {
                // Taller than two tile rows: the first rows were handed on
                // before the last batch ran.
                assert!(bands[0].2 < calls.len(), "{h}x{w}: {:?}", bands[0].2);
            }
        }
    }

    #[test]
    fn wide_outputs_come_in_bands_of_bounded_size() {
        let forward = |t: &Tensor| -> Result<Tensor, tch::TchError> { Ok(t.shallow_clone()) };
        // 3 x 900 floats per row: BAND_BYTES is about 776 rows' worth.
        let x = Tensor::rand([1, 3, 2000, 900], (Kind::Float, Device::Cpu));
        let mut sizes = Vec::new();
        run(
            &x,
            Tiling {
                tile: 1024,
                overlap: 16,
                batch: 1,
            },
            0,
            &forward,
            &mut |_, _| true,
            &mut |band| {
                sizes.push(band.band.size()[2]);
                Ok(())
            },
            &mut Vec::new(),
        )
        .unwrap();
        assert_eq!(sizes.iter().sum::<i64>(), 2000);
        assert!(
            sizes.iter().all(|&rows| rows * 3 * 900 <= BAND_BYTES),
            "{sizes:?}"
        );
    }
}
