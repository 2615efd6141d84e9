"""A real gpuctld for the tests: the debug build (`cargo build`), the demo
models (`models/make_models.py target/models`), a socket in a temporary
directory, a simulated 1 GiB GPU."""
from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Iterator

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "python" / "src"))

TARGET = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
GPUCTLD = pathlib.Path(os.environ.get("GPUCTLD", TARGET / "debug" / "gpuctld"))
MODELS = pathlib.Path(os.environ.get("GPUCTL_TEST_MODELS", TARGET / "models"))

MODELS_TOML = """
[models.up]
path = "waifu2x-upconv7-x2.pt"
kind = "image"
scale = 2
vram = "100MiB"

[models.x4]
path = "tiny-x4.pt"
kind = "image"
scale = 4
tile = 512
overlap = 32
batch = 4
vram = "100MiB"

[models.view]
path = "tiny-view.pt"
kind = "image"
vram = "100MiB"

[models.gen]
path = "tiny-generate.pt"
kind = "generate"
defaults = { size = "64x48", steps = 2, guidance = 5.0 }
vram = "100MiB"

[models.ten]
path = "tiny-tensor.pt"
kind = "tensor"
vram = "100MiB"

[models.broken]
path = "no-such-model.pt"
kind = "image"
vram = "100MiB"
"""


class Daemon:
    def __init__(self, extra: str = "", gpu: str = "", models: str = MODELS_TOML) -> None:
        """`extra`: more sections ([daemon], [policy]); `gpu`: more lines of [gpu]."""
        for need, how in ((GPUCTLD, "cargo build"), (MODELS / "tiny-x4.pt", "python models/make_models.py target/models")):
            if not need.exists():
                pytest.fail(f"{need} is missing: run `{how}` first (scripts/test does both)")
        self.dir = tempfile.TemporaryDirectory(prefix="gpuctl-pytest-")
        base = pathlib.Path(self.dir.name)
        self.socket = base / "gpuctld.sock"
        self.config = base / "gpuctld.toml"
        self.log = base / "gpuctld.log"
        self.foreign = base / "foreign.json"
        self.text = (
            f'model_root = "{MODELS}"\n{extra}\n'
            f'[gpu]\nbackend = "sim"\npoll_interval = "100ms"\nmin_free_vram = "64MiB"\n{gpu}\n'
            f'[gpu.sim]\nforeign_usage_file = "{self.foreign}"\n'
            '[[gpu.sim.devices]]\nname = "Sim 1G"\ntotal = "1GiB"\n' + models
        )
        self.config.write_text(self.text)
        env = {k: v for k, v in os.environ.items() if k not in ("GPUCTL_SOCKET", "NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID")}
        env["STATE_DIRECTORY"] = str(base / "state")
        env.setdefault("RUST_LOG", "debug")
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [str(GPUCTLD), "--config", str(self.config), "--socket", str(self.socket)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, env=env,
            )
        deadline = time.monotonic() + 15
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"gpuctld exited at start:\n{self.log.read_text()}")
            try:
                with socket.socket(socket.AF_UNIX) as probe:
                    probe.connect(str(self.socket))
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"gpuctld did not listen within 15 s:\n{self.log.read_text()}")
                time.sleep(0.02)

    @property
    def path(self) -> str:
        return str(self.socket)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.dir.cleanup()


@pytest.fixture(scope="session")
def daemon() -> Iterator[Daemon]:
    d = Daemon('[policy]\nkeep_alive = "forever"\n')
    yield d
    d.stop()


def wait_until(what: str, condition, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
