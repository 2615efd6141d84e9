"""The Real-ESRGAN port (models/realesrgan.py, made by make_models.py)
served by gpuctld: untiled, its pixels are the TorchScript module's run in
this process; in tiles, the seams cost little."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import pytest
from conftest import MODELS, Daemon

import gpuctl

torch = pytest.importorskip("torch")
FILE = MODELS / "realesrgan-animevideov3-x4.pt"

ESRGAN_TOML = f"""
[models.esrgan]
path = "{FILE.name}"
kind = "image"
scale = 4

[models.esrgan-tiled]
path = "{FILE.name}"
kind = "image"
scale = 4
tile = 32
overlap = 8
batch = 2
"""


@pytest.fixture(scope="module")
def esrgan() -> Iterator[Daemon]:
    if not FILE.exists():
        pytest.fail(f"{FILE} is missing: run python models/make_models.py target/models")
    d = Daemon('[policy]\nkeep_alive = "forever"\n', models=ESRGAN_TOML)
    yield d
    d.stop()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def test_served_real_esrgan_equals_the_module_and_tiles_cost_little(esrgan: Daemon) -> None:
    from PIL import Image

    image = np.asarray(Image.open(MODELS / "astronaut-128.png").convert("RGB"))[40:88, 30:94].copy()  # 48x64
    module = torch.jit.load(str(FILE)).eval()
    with torch.inference_mode():
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
        expected = np.floor(module(x).clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    with gpuctl.Client(esrgan.path) as client:
        whole = client.generate("esrgan", image).image
        tiled = client.generate("esrgan-tiled", image).image
    assert whole.shape == tiled.shape == (192, 256, 3)
    assert np.abs(whole.astype(int) - expected.astype(int)).max() <= 1
    assert psnr(tiled, whole) >= 35.0, psnr(tiled, whole)
