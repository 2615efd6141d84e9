"""LoRA overlays merged by gpuctl-worker at load, checked against the merge
done here in PyTorch: tiny-x4.pt's `smooth` convolution with the LoRA files
make_models.py writes (PEFT and kohya key conventions)."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import pytest
from conftest import MODELS, Daemon

import gpuctl

torch = pytest.importorskip("torch")
from safetensors.torch import load_file  # noqa: E402  (diffusers brings it)


def model(name: str, loras: str) -> str:
    return f'\n[models.{name}]\npath = "tiny-x4.pt"\nkind = "image"\nscale = 4\nloras = [{loras}]\n'


LORA_TOML = "".join([
    model("base", ""),
    model("peft", '{ path = "tiny-x4-lora-peft.safetensors", strength = 0.8 }'),
    model("kohya", '{ path = "tiny-x4-lora-kohya.safetensors" }'),
    model("both", '{ path = "tiny-x4-lora-peft.safetensors", strength = 0.5 }, { path = "tiny-x4-lora-kohya.safetensors", strength = -1.0 }'),
    model("zero", '{ path = "tiny-x4-lora-peft.safetensors", strength = 0.0 }'),
    model("nomatch", '{ path = "tiny-x4-lora-nomatch.safetensors" }'),
    model("badshape", '{ path = "tiny-x4-lora-badshape.safetensors" }'),
    model("missing", '{ path = "no-such-lora.safetensors" }'),
])


@pytest.fixture(scope="module")
def loras() -> Iterator[Daemon]:
    d = Daemon('[policy]\nkeep_alive = "forever"\n', models=LORA_TOML)
    yield d
    d.stop()


def reference(image: np.ndarray, merges: list) -> np.ndarray:
    """tiny-x4 run here, with W += strength · alpha/r · up·down per file."""
    module = torch.jit.load(str(MODELS / "tiny-x4.pt")).eval()
    weight = module.smooth.weight
    with torch.no_grad():
        for file, strength in merges:
            tensors = load_file(str(MODELS / file))
            down = next(v for k, v in tensors.items() if k.endswith(("lora_A.weight", "lora_down.weight")))
            up = next(v for k, v in tensors.items() if k.endswith(("lora_B.weight", "lora_up.weight")))
            alpha = next((float(v) for k, v in tensors.items() if k.endswith(".alpha")), None)
            scale = 1.0 if alpha is None else alpha / down.shape[0]
            weight += strength * scale * (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
        y = module(x).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    return np.floor(y * 255 + 0.5).astype(np.uint8)


def test_merged_weights_equal_the_merge_done_in_pytorch(loras: Daemon) -> None:
    image = np.random.default_rng(5).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    cases = {
        "peft": [("tiny-x4-lora-peft.safetensors", 0.8)],
        "kohya": [("tiny-x4-lora-kohya.safetensors", 1.0)],
        "both": [("tiny-x4-lora-peft.safetensors", 0.5), ("tiny-x4-lora-kohya.safetensors", -1.0)],
    }
    with gpuctl.Client(loras.path) as client:
        base = client.generate("base", image).image
        assert np.array_equal(client.generate("zero", image).image, base), "strength 0 is the base"
        for name, merges in cases.items():
            got = client.generate(name, image).image
            expected = reference(image, merges)
            assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1, name
            assert not np.array_equal(got, base), f"{name} changed nothing"


def test_a_lora_that_does_not_fit_is_a_clear_load_error(loras: Daemon) -> None:
    image = np.zeros((4, 4, 3), dtype=np.uint8)
    with gpuctl.Client(loras.path) as client:
        with pytest.raises(gpuctl.LoadFailed, match=r"model nomatch: LoRA .*tiny-x4-lora-nomatch.safetensors: nothing matches no weight of the model \(it has e\.g\. smooth\.weight"):
            client.generate("nomatch", image)
        with pytest.raises(gpuctl.LoadFailed, match=r"LoRA .*badshape.safetensors: smooth: up \[3, 2, 1, 1\] and down \[2, 4, 3, 3\] do not make a weight of \[3, 3, 3, 3\]"):
            client.generate("badshape", image)
        with pytest.raises(gpuctl.LoadFailed, match=r"LoRA .*no-such-lora.safetensors: not a readable safetensors file"):
            client.generate("missing", image)
        client.generate("base", image)  # nothing else disturbed


def grouped(name: str, loras: str) -> str:
    return model(name, loras) + 'group = "modes"\n'


MODES_TOML = "".join([
    grouped("m-base", ""),
    grouped("m-peft", '{ path = "tiny-x4-lora-peft.safetensors", strength = 0.8 }'),
    grouped("m-kohya", '{ path = "tiny-x4-lora-kohya.safetensors" }'),
    grouped("m-both", '{ path = "tiny-x4-lora-peft.safetensors", strength = 0.5 }, { path = "tiny-x4-lora-kohya.safetensors", strength = -1.0 }'),
    grouped("m-nomatch", '{ path = "tiny-x4-lora-nomatch.safetensors" }'),
    model("m-other", "") + 'group = "modes"\nprecision = "fp16"\n',
])


def resident(client: gpuctl.Client) -> dict:
    return {m.name: m.pid for m in client.status().models if m.pid is not None}


def test_modes_of_one_base_in_a_group_switch_in_place_and_compute_what_a_fresh_load_does(loras: Daemon) -> None:
    image = np.random.default_rng(9).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    with gpuctl.Client(loras.path) as fresh:
        expected = {mode: fresh.generate(mode, image).image for mode in ("base", "peft", "kohya", "both")}
    d = Daemon('[policy]\nkeep_alive = "forever"\n', models=MODES_TOML)
    try:
        with gpuctl.Client(d.path) as client:
            assert np.array_equal(client.generate("m-peft", image).image, expected["peft"])
            pid = resident(client)["m-peft"]
            # Every mode after the first is the same worker, switched: and
            # each computes exactly what that mode freshly loaded does,
            # back to the base (the originals restored) and on again.
            for mode in ("kohya", "both", "base", "peft", "kohya"):
                got = client.generate(f"m-{mode}", image).image
                assert np.array_equal(got, expected[mode]), mode
                assert resident(client) == {f"m-{mode}": pid}, mode
            status = {m.name: m for m in client.status().models}
            assert isinstance(status["m-peft"].last_unload, gpuctl.messages.UnloadReason.GroupSwitch)
            # Other settings (precision) are another worker: unloaded and loaded.
            client.generate("m-other", image)
            other = resident(client)
            assert list(other) == ["m-other"] and other["m-other"] != pid
            # A mode whose LoRA does not fit fails by name, as its fresh load
            # would; its worker is let go, and the next mode loads afresh.
            client.generate("m-base", image)
            with pytest.raises(gpuctl.LoadFailed, match=r"model m-nomatch: LoRA .*tiny-x4-lora-nomatch.safetensors: nothing matches no weight"):
                client.generate("m-nomatch", image)
            assert np.array_equal(client.generate("m-kohya", image).image, expected["kohya"])
        assert "its worker becomes m-kohya in place" in d.log_text()
    finally:
        d.stop()
