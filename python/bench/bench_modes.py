#!/usr/bin/env python3
"""Switching between modes of one base in a group, measured in one run
(issue 16): realesrgan-x4plus.pt (RRDBNet, 16.7 M parameters) as three
modes in one group: `plain`, and `warm` and `cool`, each with a LoRA of rank
4 on every convolution (350 weights: the worst case for a switch, which
rebuilds every touched weight). LoRA files are made here, in a temporary
folder.

Interleaved rounds; medians:
- load: a full load (the model unloaded: a new worker reads the file) vs a
  switch (another mode resident: its worker re-merges in place), as
  `gpuctl load` reports them;
- first image (64×64): the request that finds its model unloaded vs the one
  that finds another mode resident;
- the worker's resident memory with a LoRA mode vs the plain mode (the
  originals a switch restores are kept in host memory).

Run by scripts/bench-modes, which builds what it needs.
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile
import time
from typing import Dict, List

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import numpy as np  # noqa: E402

import gpuctl  # noqa: E402
from bench_client import start_daemon  # noqa: E402

MODEL = "realesrgan-x4plus.pt"


def make_loras(models: pathlib.Path, where: pathlib.Path) -> Dict[str, pathlib.Path]:
    import torch
    from safetensors.torch import save_file

    module = torch.jit.load(str(models / MODEL))
    convs = [(name[: -len(".weight")], p.shape) for name, p in module.named_parameters() if name.endswith(".weight") and p.dim() == 4]
    files = {}
    for seed, mode in enumerate(("warm", "cool")):
        generator = torch.Generator().manual_seed(seed)
        tensors = {}
        for module_name, shape in convs:
            tensors[f"base_model.model.{module_name}.lora_A.weight"] = torch.randn(4, shape[1], shape[2], shape[3], generator=generator) * 0.01
            tensors[f"base_model.model.{module_name}.lora_B.weight"] = torch.randn(shape[0], 4, 1, 1, generator=generator) * 0.01
        files[mode] = where / f"{mode}.safetensors"
        save_file(tensors, str(files[mode]))
    print(f"LoRAs: rank 4 on {len(convs)} convolutions each")
    return files


def config(models: pathlib.Path, loras: Dict[str, pathlib.Path], threads: int) -> str:
    text = f'model_root = "{models}"\n[gpu]\nbackend = "none"\n[policy]\nkeep_alive = "forever"\n'
    for mode, lora in (("plain", None), ("warm", loras["warm"]), ("cool", loras["cool"])):
        text += f'[models.{mode}]\npath = "{MODEL}"\nkind = "image"\nscale = 4\ngroup = "modes"\nthreads = {threads}\n'
        text += f'loras = [{{ path = "{lora}", strength = 0.8 }}]\n' if lora else ""
    return text


def rss_mib(pid: int) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin-dir", type=pathlib.Path, required=True)
    parser.add_argument("--models", type=pathlib.Path, required=True)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    models = args.models.resolve()
    if not (models / MODEL).exists():
        raise SystemExit(f"{models / MODEL} is missing: run models/make_models.py without --offline")
    image = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    full: List[float] = []
    switched: List[float] = []
    cold_first: List[float] = []
    switch_first: List[float] = []
    rss: Dict[str, List[float]] = {"plain": [], "warm": []}
    with tempfile.TemporaryDirectory(prefix="gpuctl-bench-modes-") as tmp:
        where = pathlib.Path(tmp)
        loras = make_loras(models, where)
        daemon = start_daemon(args.bin_dir, config(models, loras, args.threads), where)
        try:
            with gpuctl.Client(str(where / "gpuctld.sock")) as client:
                def pid_of(mode: str) -> int:
                    return next(m.pid for m in client.status().models if m.name == mode and m.pid is not None)

                for _ in range(args.rounds):
                    client.unload()
                    full.append(float(client.load("warm").load_ms or 0))
                    rss["warm"].append(rss_mib(pid_of("warm")))
                    switched.append(float(client.load("cool").load_ms or 0))
                    switched.append(float(client.load("plain").load_ms or 0))
                    client.unload()
                    full.append(float(client.load("plain").load_ms or 0))
                    rss["plain"].append(rss_mib(pid_of("plain")))
                    switched.append(float(client.load("warm").load_ms or 0))
                    # First images: cold, then across a switch.
                    client.unload()
                    started = time.perf_counter()
                    client.generate("cool", image)
                    cold_first.append((time.perf_counter() - started) * 1000)
                    started = time.perf_counter()
                    client.generate("warm", image)
                    switch_first.append((time.perf_counter() - started) * 1000)
        finally:
            daemon.terminate()
            daemon.wait()
    med = statistics.median
    print(f"{MODEL}, {args.threads} threads, {args.rounds} interleaved rounds (medians):")
    print(f"  load:            full {med(full):7.0f} ms   switch {med(switched):7.0f} ms   ratio {med(full) / max(med(switched), 1):5.1f}x")
    print(f"  first 64x64 ×4:  cold {med(cold_first):7.0f} ms   switch {med(switch_first):7.0f} ms   ratio {med(cold_first) / max(med(switch_first), 1):5.1f}x")
    print(f"  worker RSS:      plain {med(rss['plain']):6.0f} MiB   with a LoRA {med(rss['warm']):6.0f} MiB (originals of the touched weights kept)")


if __name__ == "__main__":
    main()
