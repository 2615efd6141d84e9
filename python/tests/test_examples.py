"""The worker-SDK examples served by a real gpuctld, their results checked
against the same code run in this process: python/examples/torch_worker.py
(an eager module as an `image` model) and python/examples/ddpm_worker.py (a
diffusers pipeline as a `generate` model)."""
from __future__ import annotations

import asyncio
import sys
from typing import Iterator

import numpy as np
import pytest
from conftest import ROOT, Daemon

import gpuctl

torch = pytest.importorskip("torch")
EXAMPLES = ROOT / "python" / "examples"
sys.path.insert(0, str(EXAMPLES))


def model(name: str, kind: str, script: str, more: str = "") -> str:
    return (
        f'\n[models.{name}]\nkind = "{kind}"\n'
        f'command = ["{sys.executable}", "{EXAMPLES / script}"]\n'
        f'env = {{ PYTHONPATH = "{ROOT / "python" / "src"}" }}\n{more}\n'
    )


@pytest.fixture(scope="module")
def examples() -> Iterator[Daemon]:
    models = model("eager", "image", "torch_worker.py", "scale = 2\noptions = { init_seed = 5 }")
    models += model(
        "eager4", "image", "torch_worker.py", 'scale = 2\noptions = { init_seed = 5 }\nmax_batch = 4\nbatch_window = "300ms"'
    )
    models += model("ddpm", "generate", "ddpm_worker.py", 'defaults = { size = "24x16", steps = 3 }')
    d = Daemon('[policy]\nkeep_alive = "forever"\n', models=models)
    yield d
    d.stop()


def test_an_eager_module_serves_images_with_the_pixels_it_computes(examples: Daemon) -> None:
    import torch_worker

    image = np.random.default_rng(3).integers(0, 256, (20, 28, 3), dtype=np.uint8)
    with gpuctl.Client(examples.path) as client:
        result = client.generate("eager", image)
    torch.manual_seed(5)
    net = torch_worker.ShuffleX2().eval()
    with torch.inference_mode():
        x = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 255
        expected = np.floor(net(x).clamp(0, 1).permute(0, 2, 3, 1)[0].numpy() * 255 + 0.5).astype(np.uint8)
    assert result.image.shape == (40, 56, 3)
    assert np.abs(result.image.astype(int) - expected.astype(int)).max() <= 1


def test_a_worker_sdk_model_batches_requests_with_nothing_to_do_for_it(examples: Daemon) -> None:
    images = [np.random.default_rng(seed).integers(0, 256, (12, 16, 3), dtype=np.uint8) for seed in range(4)]

    async def together() -> "list[gpuctl.GenerateResult]":
        async with gpuctl.AsyncClient(examples.path) as client:
            await client.generate("eager4", images[0])  # loaded first: the four wait in one window
            return list(await asyncio.gather(*(client.generate("eager4", image) for image in images)))

    batched = asyncio.run(together())
    assert sum(any(n.startswith("ran in a batch of") for n in r.notes) for r in batched) >= 2
    with gpuctl.Client(examples.path) as client:
        for image, result in zip(images, batched):
            np.testing.assert_array_equal(result.image, client.generate("eager", image).image)


def test_the_ddpm_pipeline_makes_the_image_the_same_seed_makes_in_process(examples: Daemon) -> None:
    import ddpm_worker

    progress = []
    with gpuctl.Client(examples.path) as client:
        result = client.generate("ddpm", prompt="x", seed=11, size=(32, 16), steps=5, on_progress=progress.append)
    pipe = ddpm_worker.random_pipeline(0)
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.register_to_config(sample_size=(16, 32))
    expected = pipe(batch_size=1, generator=torch.Generator().manual_seed(11), num_inference_steps=5, output_type="np").images
    expected = np.floor(np.clip(expected[0], 0, 1) * 255 + 0.5).astype(np.uint8)
    assert result.image.shape == (16, 32, 3)
    np.testing.assert_array_equal(result.image, expected)
    assert [(p.done, p.total) for p in progress][-1] == (5, 5)
