"""The blocking client against a real gpuctld: every request, the three
kinds of model, images in every form, correct pixels."""
from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import numpy as np
import pytest
import torch
from conftest import MODELS, Daemon, wait_until
from PIL import Image

import gpuctl


@pytest.fixture(scope="module")
def client(daemon: Daemon):  # type: ignore[no-untyped-def]
    with gpuctl.Client(daemon.path) as c:
        yield c


def reference(model: str, image: np.ndarray) -> np.ndarray:
    """The model run here, in PyTorch, as gpuctld's worker should run it."""
    module = torch.jit.load(str(MODELS / model))
    x = torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0).float() / 255.0
    with torch.no_grad():
        y = module(x)
    return (y.clamp(0, 1) * 255.0).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()


def photo(height: int = 40, width: int = 56) -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_ping_status_models_vram(client: gpuctl.Client, daemon: Daemon) -> None:
    assert 0 < client.ping() < 5
    assert client.welcome.protocol.major == 1 and "generate" in client.welcome.capabilities
    status = client.status()
    assert status.pid == daemon.process.pid
    assert {m.name for m in status.models} >= {"up", "x4", "gen", "ten"}
    models = {m.name: m for m in client.models()}
    assert models["up"].kind == gpuctl.ModelKind.Image and models["up"].scale == 2
    assert models["gen"].defaults.size == (64, 48)
    vram = client.vram()
    assert vram.backend == "sim" and vram.devices[0].total == 1 << 30


def test_numpy_in_numpy_out_with_the_right_pixels(client: gpuctl.Client) -> None:
    image = photo()
    result = client.generate("up", image)
    assert isinstance(result.image, np.ndarray) and result.image.shape == (80, 112, 3)
    assert result.model == "up" and result.device == "cpu" and result.run_ms >= 0
    difference = np.abs(result.image.astype(int) - reference("waifu2x-upconv7-x2.pt", image).astype(int)).max()
    assert difference <= 1
    batch = np.stack([image, image[::-1].copy()])
    out = client.generate("up", batch).image
    assert out.shape == (2, 80, 112, 3)
    # A batch may round differently in the last bit.
    assert np.abs(out[0].astype(int) - result.image.astype(int)).max() <= 1


def test_pil_and_path_in_pil_out(client: gpuctl.Client, tmp_path) -> None:  # type: ignore[no-untyped-def]
    image = photo(33, 21)
    expected = client.generate("up", image).image
    pil = client.generate("up", Image.fromarray(image)).image
    assert isinstance(pil, Image.Image) and pil.size == (42, 66)
    assert np.array_equal(np.asarray(pil), expected)
    path = tmp_path / "in.png"
    Image.fromarray(image).save(path)
    result = client.generate("up", str(path))
    assert np.array_equal(np.asarray(result.image), expected)
    result.save(tmp_path / "out.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out.png")), expected)
    assert result.png().startswith(b"\x89PNG")
    encoded = client.generate("up", path.read_bytes())
    assert isinstance(encoded.image, Image.Image)
    assert np.array_equal(np.asarray(encoded.image), expected)
    with pytest.raises(ValueError, match="not an image file"):
        client.generate("up", b"not a picture")
    with pytest.raises(TypeError, match="numpy array"):
        client.generate("up", 42)


def test_a_strided_array_goes_as_its_pixels(client: gpuctl.Client) -> None:
    image = photo(30, 60)
    strided = image[:, ::2]
    assert not strided.flags["C_CONTIGUOUS"]
    assert np.array_equal(client.generate("view", strided).image, strided)


def test_a_model_that_refuses_channels_last_pixels_gets_planes_and_the_same_answer(client: gpuctl.Client, daemon: Daemon) -> None:
    image = photo(24, 20)
    for _ in range(2):  # the second forward goes straight to planes
        assert np.array_equal(client.generate("view", image).image, image)
    log = daemon.log_text()
    assert log.count("model view refused channels-last pixels; it gets planes") == 1, log[-2000:]
    client.generate("up", image)
    assert "model up refused" not in daemon.log_text(), "a convolutional model takes them"


def test_gpuctl_tensor_without_numpy_types(client: gpuctl.Client) -> None:
    image = photo(8, 8)
    tensor = gpuctl.Tensor(gpuctl.DType.U8, (8, 8, 3), image.tobytes())
    out = client.generate("view", tensor).image
    assert isinstance(out, gpuctl.Tensor) and out.shape == (8, 8, 3)
    assert bytes(out.data) == image.tobytes()


def test_generate_reproduces_from_a_seed(client: gpuctl.Client) -> None:
    first = client.generate("gen", prompt="a red fox", seed=42)
    again = client.generate("gen", prompt="a red fox", seed=42, steps=2)
    other = client.generate("gen", prompt="a red fox", seed=43)
    assert first.seed == 42 and first.image.shape == (48, 64, 3)
    assert np.array_equal(first.image, again.image)
    assert not np.array_equal(first.image, other.image)
    sized = client.generate("gen", prompt="x", negative="blur", size="32x16", guidance=3.5)
    assert sized.image.shape == (16, 32, 3) and sized.seed is not None


def test_tensor_models_take_and_give_arrays(client: gpuctl.Client) -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.full((2, 3), 0.5, dtype=np.float32)
    result = client.generate("ten", inputs=[a, b])
    assert result.image is None
    doubled, total = result.outputs
    assert np.array_equal(doubled, a * 2 + b)
    assert float(total) == float((a * b).sum())


def test_load_unload_and_watch(client: gpuctl.Client, daemon: Daemon) -> None:
    notices = []
    client.unload("ten")
    with gpuctl.Client(daemon.path) as watcher:
        stream = watcher.watch()
        ready = threading.Event()

        def collect() -> None:
            ready.set()
            for notice in stream:
                notices.append(notice)
                if isinstance(notice.what, gpuctl.NoticeKind.Unloaded) and notice.what.model == "ten":
                    return

        thread = threading.Thread(target=collect)
        thread.start()
        ready.wait()
        time.sleep(0.2)  # the watch request reaches the daemon first
        loaded = client.load("ten", keep_alive="forever")
        assert loaded.model == "ten" and loaded.load_ms is not None
        assert client.load("ten").load_ms is None  # already loaded
        state = {m.name: m for m in client.status().models}["ten"]
        assert state.state == gpuctl.ModelState.Ready() and state.state.name == "Ready"
        assert state.keep_alive == gpuctl.KeepAlive.Forever()
        assert client.unload("ten") == ["ten"]
        thread.join(10)
        stream.close()
    assert not thread.is_alive()
    kinds = [n.what.name for n in notices]
    assert "Loaded" in kinds and "Unloaded" in kinds
    unloaded = [n.what for n in notices if n.what.name == "Unloaded"][-1]
    assert unloaded.reason == gpuctl.UnloadReason.Explicit()


def test_reload_and_reserve(client: gpuctl.Client, daemon: Daemon) -> None:
    generation = client.status().config.generation
    reloaded = client.reload()
    assert reloaded.generation == generation + 1 and not reloaded.changed
    with client.reserve("256MiB", ttl="1m") as reservation:
        assert reservation.bytes == 256 << 20
        held = client.vram().reservations
        assert [r.id for r in held] == [reservation.id] and held[0].granted
    assert client.vram().reservations == []


def test_many_threads_share_one_connection(client: gpuctl.Client) -> None:
    results = {}

    def work(i: int) -> None:
        a = np.full((4,), float(i), dtype=np.float32)
        results[i] = client.generate("ten", inputs=[a, a]).outputs[0]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == list(range(8))
    for i, out in results.items():
        assert np.array_equal(out, np.full((4,), 3.0 * i, dtype=np.float32))


def test_ctrl_c_cancels_the_job_and_the_model_stays_loaded(client: gpuctl.Client, daemon: Daemon) -> None:
    image = photo(1024, 1024)
    fired = []

    def interrupt(event: gpuctl.ProgressEvent) -> None:
        if not fired:
            fired.append(event)
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        client.generate("x4", image, tile=128, overlap=8, on_progress=interrupt)
    assert fired and fired[0].done < fired[0].total

    def idle() -> bool:
        model = {m.name: m for m in client.status().models}["x4"]
        return model.in_flight == 0 and model.queued == 0

    wait_until("the cancelled job to stop", idle)
    x4 = {m.name: m for m in client.status().models}["x4"]
    assert x4.state == gpuctl.ModelState.Ready(), x4
    assert "cancel" in daemon.log_text().lower()
    # The connection goes on serving.
    assert client.generate("x4", photo(8, 8)).image.shape == (32, 32, 3)


def test_generate_then_upscale_in_one_request(client: gpuctl.Client) -> None:
    chained = client.generate("gen", prompt="fox", seed=9, then=["up"])
    by_hand = client.generate("up", client.generate("gen", prompt="fox", seed=9).image)
    assert [step.model for step in chained.steps] == ["gen", "up"]
    assert (chained.model, chained.seed) == ("up", 9)
    assert np.array_equal(chained.image, by_hand.image)
    with pytest.raises(gpuctl.InvalidRequest, match=r"step 2 of 2 \(ten\): only image models"):
        client.generate("gen", prompt="fox", then=["ten"])
    with pytest.raises(TypeError, match="then= takes a list"):
        client.generate("gen", prompt="fox", then="up")  # type: ignore[arg-type]


def test_generate_then_from_asyncio(daemon: Daemon) -> None:
    async def chained() -> gpuctl.GenerateResult:
        async with gpuctl.AsyncClient(daemon.path) as client:
            return await client.generate("gen", prompt="fox", seed=9, then=["up"])

    result = asyncio.run(chained())
    assert result.image.shape == (96, 128, 3) and len(result.steps) == 2
