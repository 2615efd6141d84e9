//! Dynamic batching's arithmetic: which jobs may share a forward, the one
//! job made of several (inputs concatenated along their first dimension),
//! and each job's slice of the outputs. Pure functions.

use gpuctl_protocol::worker::{Job, Tiling};
use gpuctl_protocol::{DType, ImageLayout, WireTensor};

/// What jobs must have in common to run as one forward: everything but
/// their first dimension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchKey {
    Image {
        layout: ImageLayout,
        dtype: DType,
        rest: Vec<u64>,
        tiling: Option<Tiling>,
    },
    Tensor(Vec<(DType, Vec<u64>)>),
}

/// The key a job batches under and its rows (first dimension); `None` for
/// a job that runs alone: `generate`, an image larger than a tile (it is
/// cut into tiles, batched by the worker), a tensor job with a scalar or
/// inputs whose first dimensions differ.
pub fn batch_key(job: &Job) -> Option<(BatchKey, u64)> {
    match job {
        Job::Image {
            input,
            tiling,
            layout,
        } => {
            let (rows, height, width) = layout.dims(&input.shape)?;
            if tiling.is_some_and(|t| height > u64::from(t.tile) || width > u64::from(t.tile)) {
                return None;
            }
            let key = BatchKey::Image {
                layout: *layout,
                dtype: input.dtype,
                rest: input.shape[1..].to_vec(),
                tiling: *tiling,
            };
            Some((key, rows))
        }
        Job::Tensor { inputs } => {
            let rows = *inputs.first()?.shape.first()?;
            let mut key = Vec::with_capacity(inputs.len());
            for input in inputs {
                match input.shape.split_first() {
                    Some((first, rest)) if *first == rows => {
                        key.push((input.dtype, rest.to_vec()));
                    }
                    _ => return None,
                }
            }
            Some((BatchKey::Tensor(key), rows))
        }
        Job::Generate(_) => None,
    }
}

/// One job whose inputs are those of `jobs` (all of one [`BatchKey`])
/// concatenated along the first dimension. Row-major tensors concatenate
/// along it by their bytes.
pub fn merge(jobs: &[&Job]) -> Result<Job, String> {
    let first = jobs.first().ok_or("no jobs to merge")?;
    let concat = |tensors: Vec<&WireTensor>| -> Result<WireTensor, String> {
        let head = tensors.first().ok_or("no tensors to merge")?;
        let rows: u64 = tensors.iter().filter_map(|t| t.shape.first()).sum();
        let mut shape = head.shape.clone();
        if let Some(first) = shape.first_mut() {
            *first = rows;
        }
        let bytes = tensors.iter().map(|t| t.data.len()).sum();
        let mut data = Vec::with_capacity(bytes);
        for tensor in &tensors {
            data.extend_from_slice(&tensor.data);
        }
        WireTensor::new(head.dtype, shape, data)
    };
    match first {
        Job::Image { tiling, layout, .. } => {
            let inputs = jobs
                .iter()
                .map(|job| match job {
                    Job::Image { input, .. } => Ok(input),
                    _ => Err("a batch mixes kinds of job".to_owned()),
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Job::Image {
                input: concat(inputs)?,
                tiling: *tiling,
                layout: *layout,
            })
        }
        Job::Tensor { inputs } => {
            let mut merged = Vec::with_capacity(inputs.len());
            for index in 0..inputs.len() {
                let column = jobs
                    .iter()
                    .map(|job| match job {
                        Job::Tensor { inputs } => {
                            inputs.get(index).ok_or("inputs differ in number")
                        }
                        _ => Err("a batch mixes kinds of job"),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                merged.push(concat(column)?);
            }
            Ok(Job::Tensor { inputs: merged })
        }
        Job::Generate(_) => Err("generate jobs are not batched".to_owned()),
    }
}

/// Each job's outputs from a batched forward's: every output split along
/// its first dimension by `rows` (each job's rows, in the batch's order).
/// An output whose first dimension is not the batch's rows cannot be
/// shared out, and is named.
pub fn split(outputs: Vec<WireTensor>, rows: &[u64]) -> Result<Vec<Vec<WireTensor>>, String> {
    let total: u64 = rows.iter().sum();
    let mut parts: Vec<Vec<WireTensor>> = rows
        .iter()
        .map(|_| Vec::with_capacity(outputs.len()))
        .collect();
    for (index, output) in outputs.into_iter().enumerate() {
        if output.shape.first() != Some(&total) || total == 0 {
            return Err(format!(
                "its output {index} has shape {:?} for a batch of {total} rows: a batched forward must return every output with the batch as its first dimension (set max_batch = 1 for this model)",
                output.shape
            ));
        }
        let row_bytes = output.data.len() / total as usize;
        let mut at = 0;
        for (part, &n) in parts.iter_mut().zip(rows) {
            let bytes = row_bytes * n as usize;
            let mut shape = output.shape.clone();
            shape[0] = n;
            let data = output.data[at..at + bytes].to_vec();
            at += bytes;
            part.push(WireTensor::new(output.dtype, shape, data)?);
        }
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32s(shape: &[u64], values: impl IntoIterator<Item = f32>) -> WireTensor {
        let data = values.into_iter().flat_map(f32::to_le_bytes).collect();
        WireTensor::new(DType::F32, shape.to_vec(), data).unwrap()
    }

    fn tensor_job(rows: u64, start: f32) -> Job {
        Job::Tensor {
            inputs: vec![
                f32s(&[rows, 2], (0..rows * 2).map(|i| start + i as f32)),
                f32s(&[rows], (0..rows).map(|i| -(start + i as f32))),
            ],
        }
    }

    fn image(shape: &[u64], tiling: Option<Tiling>) -> Job {
        let bytes = shape.iter().product::<u64>() as usize;
        Job::Image {
            input: WireTensor::new(DType::U8, shape.to_vec(), vec![7; bytes]).unwrap(),
            tiling,
            layout: ImageLayout::Rows,
        }
    }

    #[test]
    fn jobs_batch_when_all_but_their_first_dimension_agree() {
        let (a, rows) = batch_key(&tensor_job(1, 0.0)).unwrap();
        assert_eq!(rows, 1);
        assert_eq!(Some(a.clone()), batch_key(&tensor_job(3, 5.0)).map(|k| k.0));
        let wider = Job::Tensor {
            inputs: vec![f32s(&[1, 3], [0.0; 3]), f32s(&[1], [0.0])],
        };
        assert_ne!(Some(a), batch_key(&wider).map(|k| k.0));
        let tile = Some(Tiling {
            tile: 64,
            overlap: 8,
            batch: 4,
            retries: 2,
        });
        let small = batch_key(&image(&[2, 32, 48, 3], tile)).unwrap();
        assert_eq!(small.1, 2);
        assert_eq!(
            Some(small.0),
            batch_key(&image(&[1, 32, 48, 3], tile)).map(|k| k.0)
        );
        assert_ne!(
            batch_key(&image(&[1, 32, 48, 3], None)).map(|k| k.0),
            batch_key(&image(&[1, 48, 32, 3], None)).map(|k| k.0)
        );
    }

    #[test]
    fn some_jobs_run_alone() {
        let tile = Some(Tiling {
            tile: 64,
            overlap: 8,
            batch: 4,
            retries: 2,
        });
        assert_eq!(
            batch_key(&image(&[1, 65, 32, 3], tile)),
            None,
            "cut into tiles"
        );
        let scalar = Job::Tensor {
            inputs: vec![WireTensor::new(DType::F32, vec![], vec![0; 4]).unwrap()],
        };
        assert_eq!(batch_key(&scalar), None);
        let ragged = Job::Tensor {
            inputs: vec![f32s(&[2], [0.0; 2]), f32s(&[3], [0.0; 3])],
        };
        assert_eq!(batch_key(&ragged), None);
        assert_eq!(batch_key(&Job::Tensor { inputs: vec![] }), None);
    }

    #[test]
    fn merged_then_split_gives_each_job_its_own_rows() {
        let jobs = [tensor_job(1, 0.0), tensor_job(2, 10.0), tensor_job(1, 20.0)];
        let merged = merge(&jobs.iter().collect::<Vec<_>>()).unwrap();
        let Job::Tensor { inputs } = &merged else {
            panic!("{merged:?}");
        };
        assert_eq!(inputs[0].shape, [4, 2]);
        assert_eq!(inputs[1].shape, [4]);
        // An identity forward: each job gets exactly what it sent.
        let parts = split(inputs.clone(), &[1, 2, 1]).unwrap();
        for (part, job) in parts.iter().zip(&jobs) {
            let Job::Tensor { inputs } = job else {
                unreachable!()
            };
            assert_eq!(part, inputs);
        }
    }

    #[test]
    fn an_output_without_the_batch_as_first_dimension_is_named() {
        let sum = f32s(&[], [1.0]);
        let error = split(vec![f32s(&[3], [0.0; 3]), sum], &[1, 2]).unwrap_err();
        assert!(error.contains("output 1 has shape []"), "{error}");
        assert!(error.contains("max_batch = 1"), "{error}");
        let error = split(vec![f32s(&[4], [0.0; 4])], &[1, 2]).unwrap_err();
        assert!(
            error.contains("output 0 has shape [4] for a batch of 3"),
            "{error}"
        );
    }
}
