#!/usr/bin/env python3
"""Python models under gpuctld, measured in one run (issue 15):

1. Cold start: the DDPM example (python/examples/ddpm_worker.py, a diffusers
   DDPMPipeline with a small random UNet) from unloaded to its first image
   through gpuctld, vs the same pipeline built and run in a fresh `python`
   process (import torch and diffusers, build, run). Interleaved rounds,
   medians, ratio.
2. Warm per-request overhead: tiny-tensor.pt (two [2] float tensors) through
   gpuctl-worker (tch) vs through a Python worker-SDK process running the same
   TorchScript file (bench/torchscript_worker.py); sequential requests on one
   connection, interleaved blocks; p50 and p99 and their difference.

Run by scripts/bench-workers, which builds what it needs.
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from typing import List

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE.parent / "src"))

import numpy as np  # noqa: E402

import gpuctl  # noqa: E402
from bench_client import start_daemon  # noqa: E402

STEPS, SIZE = 4, 32
FRESH = f"""
import sys, torch
sys.path[:0] = [{str(ROOT / 'python' / 'examples')!r}, {str(ROOT / 'python' / 'src')!r}]
from ddpm_worker import random_pipeline
pipe = random_pipeline(0)
pipe.set_progress_bar_config(disable=True)
pipe(batch_size=1, generator=torch.Generator().manual_seed(1), num_inference_steps={STEPS}, output_type="np")
import time
print(time.time(), flush=True)
"""


def config(models: pathlib.Path) -> str:
    python, src = sys.executable, ROOT / "python" / "src"
    return f"""model_root = "{models}"
[gpu]
backend = "none"
[policy]
keep_alive = "forever"
[models.ddpm]
kind = "generate"
command = ["{python}", "{ROOT / 'python/examples/ddpm_worker.py'}"]
env = {{ PYTHONPATH = "{src}" }}
defaults = {{ size = "{SIZE}x{SIZE}", steps = {STEPS} }}
[models.tch]
path = "tiny-tensor.pt"
kind = "tensor"
threads = 1
[models.sdk]
path = "tiny-tensor.pt"
kind = "tensor"
threads = 1
command = ["{python}", "{HERE / 'torchscript_worker.py'}"]
env = {{ PYTHONPATH = "{src}" }}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin-dir", type=pathlib.Path, default=ROOT / "target" / "release")
    parser.add_argument("--models", type=pathlib.Path, default=ROOT / "target" / "models")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gpuctl-bench-") as tmp:
        where = pathlib.Path(tmp)
        daemon = start_daemon(args.bin_dir, config(args.models.resolve()), where)
        try:
            with gpuctl.Client(where / "gpuctld.sock") as client:
                cold(client, args.rounds)
                warm(client, args.rounds, args.requests)
        finally:
            daemon.terminate()
            daemon.wait()


def cold(client: gpuctl.Client, rounds: int) -> None:
    through: List[float] = []
    fresh: List[float] = []
    for _ in range(rounds):
        client.unload("ddpm")
        started = time.perf_counter()
        client.generate("ddpm", prompt="bench", seed=1)
        through.append(time.perf_counter() - started)
        # Until the image exists, not until the process has torn torch down.
        started_wall = time.time()
        done = subprocess.run([sys.executable, "-c", FRESH], check=True, stderr=subprocess.DEVNULL, capture_output=False, stdout=subprocess.PIPE, text=True)
        fresh.append(float(done.stdout.split()[-1]) - started_wall)
    a, b = statistics.median(through), statistics.median(fresh)
    print(f"cold start, DDPM {SIZE}x{SIZE} {STEPS} steps, unloaded to first image ({rounds} rounds, medians):")
    print(f"  through gpuctld (command worker)  {a * 1000:8.0f} ms")
    print(f"  fresh python process              {b * 1000:8.0f} ms")
    print(f"  ratio gpuctld / fresh             {a / b:8.2f}")


def warm(client: gpuctl.Client, rounds: int, requests: int) -> None:
    inputs = [np.arange(2, dtype=np.float32), np.ones(2, dtype=np.float32)]
    for model in ("tch", "sdk"):
        client.load(model)
        for _ in range(20):
            client.generate(model, inputs=inputs)
    times = {"tch": [], "sdk": []}  # type: dict[str, List[float]]
    for _ in range(rounds):
        for model in ("tch", "sdk"):
            for _ in range(requests):
                started = time.perf_counter()
                client.generate(model, inputs=inputs)
                times[model].append(time.perf_counter() - started)
    def pct(values: List[float], p: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1e6
    print(f"warm requests, tiny-tensor.pt, one at a time ({rounds}x{requests} each, interleaved):")
    for model, label in (("tch", "gpuctl-worker (tch)"), ("sdk", "Python worker SDK")):
        print(f"  {label:24} p50 {pct(times[model], 0.5):7.0f} µs   p99 {pct(times[model], 0.99):7.0f} µs")
    extra = pct(times["sdk"], 0.5) - pct(times["tch"], 0.5)
    print(f"  the Python worker adds {extra:.0f} µs per request at p50 ({pct(times['sdk'], 0.5) / pct(times['tch'], 0.5):.2f}x)")


if __name__ == "__main__":
    main()
