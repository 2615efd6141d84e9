//! LoRA overlays merged into a TorchScript module's weights:
//! `W += strength · scale · up·down` for each weight a file names, at load
//! and again at each switch to another mode of the same model.
//!
//! Two key conventions are read, as the files say:
//! - PEFT: `base_model.model.<module>.lora_A.weight` (down, `[r, in, …]`)
//!   and `….lora_B.weight` (up, `[out, r, …]`); scale 1 (PEFT keeps alpha
//!   in `adapter_config.json`, not in the weights).
//! - kohya: `lora_<prefix>_<module with . as _>.lora_down.weight`,
//!   `….lora_up.weight` and an optional `….alpha` (scale `alpha / r`).
//!
//! `<module>` is a path of the TorchScript module (`body.0.conv`), whose
//! `<module>.weight` is the weight changed. A file whose pairs match no
//! weight, or a pair whose shapes do not make the weight's, is refused
//! with the key; nothing is merged before every pair of every file checks
//! out.
//!
//! A switch puts other LoRAs in place of the current ones without reading
//! the base again: the weights as they were before any LoRA touched them
//! are kept (in host memory, in the weight's own precision) and each
//! touched weight is rebuilt from its original, so a mode reached by
//! switching computes exactly what the same mode freshly loaded does.

use std::collections::BTreeMap;

use gpuctl_protocol::worker::Lora;
use tch::{Device, Kind, Tensor};

/// The LoRAs merged into a module, undoable.
#[derive(Default)]
pub struct Overlays {
    /// Every weight a LoRA has changed in this process, as it was before.
    originals: BTreeMap<String, Tensor>,
}

impl Overlays {
    /// Makes `weights` (name → parameter, as the module lists them) the
    /// base plus `loras`, in order, whatever was merged before. Every file
    /// is read and checked before a weight changes: a file that does not
    /// fit leaves them as they were. Returns how many (LoRA, weight) pairs were merged.
    pub fn apply(
        &mut self,
        loras: &[Lora],
        weights: &BTreeMap<String, Tensor>,
    ) -> Result<usize, String> {
        let mut steps = Vec::new();
        for lora in loras {
            steps.extend(plan(&lora.path, lora.strength, weights)?);
        }
        let _no_grad = tch::no_grad_guard();
        for (target, _) in &steps {
            if let (false, Some(weight)) =
                (self.originals.contains_key(target), weights.get(target))
            {
                let original = weight
                    .f_to_device(Device::Cpu)
                    .and_then(|w| w.f_detach_copy())
                    .map_err(|e| {
                        format!("{target}: cannot keep its original: {}", first_line(&e))
                    })?;
                self.originals.insert(target.clone(), original);
            }
        }
        for (target, original) in &self.originals {
            if let Some(weight) = weights.get(target) {
                let own: Vec<&Tensor> = steps
                    .iter()
                    .filter(|(name, _)| name == target)
                    .map(|(_, step)| step)
                    .collect();
                rebuild(weight, original, &own)
                    .map_err(|e| format!("{target}: {}", first_line(&e)))?;
            }
        }
        Ok(steps.len())
    }
}

/// `weight = original + steps…`, summed in float32 on the weight's device
/// and stored in the weight's precision.
fn rebuild(weight: &Tensor, original: &Tensor, steps: &[&Tensor]) -> Result<(), tch::TchError> {
    let device = weight.device();
    let mut sum = original.f_to_kind(Kind::Float)?.f_to_device(device)?;
    for step in steps {
        sum = sum.f_add(&step.f_to_device(device)?)?;
    }
    weight.shallow_clone().f_copy_(&sum)
}

/// What the LoRA at `path` adds to each weight it names: `strength · scale ·
/// up·down` as float32, in the weight's shape.
fn plan(
    path: &str,
    strength: f32,
    weights: &BTreeMap<String, Tensor>,
) -> Result<Vec<(String, Tensor)>, String> {
    plan_file(path, strength, weights).map_err(|problem| format!("LoRA {path}: {problem}"))
}

/// One pair of a file, before it is matched to a weight.
#[derive(Default)]
struct Pair {
    down: Option<Tensor>,
    up: Option<Tensor>,
    alpha: Option<f64>,
}

fn plan_file(
    path: &str,
    strength: f32,
    weights: &BTreeMap<String, Tensor>,
) -> Result<Vec<(String, Tensor)>, String> {
    let tensors = Tensor::read_safetensors(path)
        .map_err(|e| format!("not a readable safetensors file: {}", first_line(&e)))?;
    let mut pairs: BTreeMap<String, Pair> = BTreeMap::new();
    let mut unknown = Vec::new();
    for (key, tensor) in tensors {
        match split_key(&key) {
            Some((module, Part::Down)) => pairs.entry(module).or_default().down = Some(tensor),
            Some((module, Part::Up)) => pairs.entry(module).or_default().up = Some(tensor),
            Some((module, Part::Alpha)) => {
                pairs.entry(module).or_default().alpha = tensor.f_double_value(&[]).ok();
            }
            None => unknown.push(key),
        }
    }
    if pairs.is_empty() {
        return Err(format!(
            "no LoRA weights in it (PEFT's lora_A/lora_B or kohya's lora_down/lora_up); its keys: {}",
            sample(unknown.iter())
        ));
    }
    let mut steps = Vec::new();
    for (module, pair) in &pairs {
        let (Some(down), Some(up)) = (&pair.down, &pair.up) else {
            return Err(format!("{module} has only one of its two matrices"));
        };
        let found = find_weight(module, weights)
            .and_then(|target| weights.get(&target).map(|weight| (target, weight)));
        let Some((target, weight)) = found else {
            return Err(format!(
                "{module} matches no weight of the model (it has e.g. {})",
                sample(weights.keys().filter(|name| name.ends_with(".weight")))
            ));
        };
        let delta =
            product(up, down, &weight.size()).map_err(|problem| format!("{module}: {problem}"))?;
        let rank = down.size().first().copied().unwrap_or(1).max(1) as f64;
        let scale = pair.alpha.map_or(1.0, |alpha| alpha / rank);
        let step = delta
            .f_mul_scalar(f64::from(strength) * scale)
            .map_err(|e| format!("{target}: {}", first_line(&e)))?;
        steps.push((target, step));
    }
    Ok(steps)
}

enum Part {
    Down,
    Up,
    Alpha,
}

/// A key's module and part, under either convention.
fn split_key(key: &str) -> Option<(String, Part)> {
    let peft = key.strip_prefix("base_model.model.").unwrap_or(key);
    for (suffix, part) in [(".lora_A.weight", Part::Down), (".lora_B.weight", Part::Up)] {
        if let Some(module) = peft.strip_suffix(suffix) {
            return Some((module.to_owned(), part));
        }
    }
    for (suffix, part) in [
        (".lora_down.weight", Part::Down),
        (".lora_up.weight", Part::Up),
        (".alpha", Part::Alpha),
    ] {
        if let Some(module) = key.strip_suffix(suffix) {
            return Some((module.to_owned(), part));
        }
    }
    None
}

/// The weight a module names: `<module>.weight` as is (PEFT), or the one
/// whose path with `.` as `_` is the kohya name after its `lora_<prefix>_`.
fn find_weight(module: &str, weights: &BTreeMap<String, Tensor>) -> Option<String> {
    let direct = format!("{module}.weight");
    if weights.contains_key(&direct) {
        return Some(direct);
    }
    let flat = module.strip_prefix("lora_")?;
    weights.keys().find_map(|name| {
        let path = name.strip_suffix(".weight")?.replace('.', "_");
        // kohya's prefix (unet, te, te1, …) comes before the path.
        let matches = flat == path || flat.strip_suffix(&path).is_some_and(|p| p.ends_with('_'));
        matches.then(|| name.clone())
    })
}

/// `up·down` in the weight's shape: `[out, r]·[r, in]` for a linear
/// weight, `[out, r, 1, 1]·[r, in, kh, kw]` for a convolution's.
fn product(up: &Tensor, down: &Tensor, shape: &[i64]) -> Result<Tensor, String> {
    let (up_size, down_size) = (up.size(), down.size());
    let rank = down_size.first().copied().unwrap_or(0);
    let fits = up_size.len() >= 2
        && up_size[1] == rank
        && shape.first() == up_size.first()
        && shape.len() == down_size.len()
        && shape[1..] == down_size[1..];
    if !fits {
        return Err(format!(
            "up {up_size:?} and down {down_size:?} do not make a weight of {shape:?}"
        ));
    }
    let up = up
        .f_reshape([up_size[0], rank])
        .and_then(|u| u.f_to_kind(Kind::Float));
    let down = down
        .f_reshape([rank, -1])
        .and_then(|d| d.f_to_kind(Kind::Float));
    up.and_then(|u| down.and_then(|d| u.f_matmul(&d)))
        .and_then(|p| p.f_reshape(shape))
        .map_err(|e| first_line(&e))
}

fn sample<'a>(names: impl Iterator<Item = &'a String>) -> String {
    let names: Vec<&str> = names.take(4).map(String::as_str).collect();
    if names.is_empty() {
        "none".to_owned()
    } else {
        names.join(", ")
    }
}

fn first_line(error: &impl std::fmt::Display) -> String {
    error
        .to_string()
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_both_conventions_find_their_weight() {
        let weights: BTreeMap<String, Tensor> = ["body.0.conv.weight", "head.weight"]
            .into_iter()
            .map(|n| {
                (
                    n.to_owned(),
                    Tensor::zeros([1], (Kind::Float, tch::Device::Cpu)),
                )
            })
            .collect();
        assert!(
            matches!(split_key("base_model.model.body.0.conv.lora_A.weight"), Some((m, Part::Down)) if m == "body.0.conv")
        );
        assert!(
            matches!(split_key("lora_unet_body_0_conv.alpha"), Some((m, Part::Alpha)) if m == "lora_unet_body_0_conv")
        );
        assert_eq!(
            find_weight("body.0.conv", &weights).as_deref(),
            Some("body.0.conv.weight")
        );
        assert_eq!(
            find_weight("lora_unet_body_0_conv", &weights).as_deref(),
            Some("body.0.conv.weight")
        );
        assert_eq!(
            find_weight("lora_te_head", &weights).as_deref(),
            Some("head.weight")
        );
        assert_eq!(find_weight("lora_unet_tail", &weights), None);
        assert!(split_key("something.else").is_none());
    }
}
