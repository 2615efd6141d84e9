"""The package with the standard library only: no numpy, no Pillow, and on
the oldest Python it supports when that is installed."""
from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, Daemon

PROBE = r"""
import struct, sys
sys.modules["numpy"] = None  # an import of numpy now fails, as if absent
sys.modules["PIL"] = None
sys.path.insert(0, sys.argv[1])
import gpuctl
from gpuctl import DType, Tensor

with gpuctl.Client(sys.argv[2]) as client:
    assert client.ping() > 0
    pixels = bytes(range(256)) * 3  # 16 x 16 RGB
    out = client.generate("view", Tensor(DType.U8, (16, 16, 3), pixels))
    assert isinstance(out.image, Tensor) and out.image.shape == (16, 16, 3), out.image
    assert bytes(out.image.data) == pixels
    a = Tensor(DType.F32, (3,), struct.pack("<3f", 1, 2, 3))
    b = Tensor(DType.F32, (3,), struct.pack("<3f", 1, 1, 1))
    doubled, total = client.generate("ten", inputs=[a, b]).outputs
    assert struct.unpack("<3f", bytes(doubled.data)) == (3.0, 5.0, 7.0), doubled
    assert struct.unpack("<f", bytes(total.data)) == (6.0,)
    generated = client.generate("gen", prompt="fox", seed=1)
    assert isinstance(generated.image, Tensor) and generated.image.shape[-1] == 3
    try:
        client.generate("view", "photo.png")
    except RuntimeError as error:
        assert "Pillow" in str(error)
    else:
        raise AssertionError("a path without Pillow should say Pillow is needed")
print("ok", sys.version_info[:2])
"""


def test_without_numpy_or_pillow(daemon: Daemon) -> None:
    run = subprocess.run([sys.executable, "-c", PROBE, str(ROOT / "python" / "src"), daemon.path], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("ok")


def test_on_python_3_9_when_installed(daemon: Daemon) -> None:
    found = [shutil.which("python3.9")] + sorted(str(p) for p in pathlib.Path.home().glob(".pyenv/versions/3.9*/bin/python3.9"))
    python39 = next((p for p in found if p and subprocess.run([p, "-c", "pass"], capture_output=True).returncode == 0), None)
    if python39 is None or subprocess.run([python39, "-c", "pass"], capture_output=True).returncode != 0:
        pytest.skip("no python3.9 on this machine")
    run = subprocess.run([python39, "-c", PROBE, str(ROOT / "python" / "src"), daemon.path], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("ok (3, 9)")
