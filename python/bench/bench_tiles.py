#!/usr/bin/env python3
"""Tiled upscaling through gpuctld against ComfyUI's algorithm (issue 17),
measured in one run on the same TorchScript module, image and thread count.

The reference is ComfyUI's public `tiled_scale` algorithm, reimplemented
here from its description: tiles start every `tile - overlap` pixels (the
last ones clipped at the edge), one tile per forward, each output tile
multiplied by a mask that ramps linearly over the (scaled) overlap, summed
into a full-size output and divided by the summed masks. It runs in this
process, in PyTorch, with `torch.set_num_threads(THREADS)` and
`inference_mode`, PNG in and PNG out like gpuctl's file-to-file run.

Measured (interleaved rounds, medians; wall time file to file):
- gpuctld, tiled (tile, overlap, batch 1 and 4): `gpuctl generate M in.png -o out.png`;
- the reference, tiled the same;
- gpuctld untiled vs a direct untiled forward in PyTorch.

Run by scripts/bench-tiles, which builds what it needs.
"""
from __future__ import annotations

import argparse
import itertools
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from bench_client import start_daemon  # noqa: E402

MODEL = "waifu2x-upconv7-x2.pt"
SCALE = 2


def comfy_tiled_scale(samples: Any, function: Callable[[Any], Any], tile: int, overlap: int, scale: int) -> Any:
    """ComfyUI's tiled_scale for 2-D images: [N,C,H,W] float in, float out."""
    import torch

    n, _, height, width = samples.shape
    output = torch.empty((n, 3, height * scale, width * scale))
    for b in range(n):
        s = samples[b:b + 1]
        if height <= tile and width <= tile:
            output[b:b + 1] = function(s)
            continue
        out = torch.zeros((1, 3, height * scale, width * scale))
        out_div = torch.zeros((1, 3, height * scale, width * scale))
        positions = [range(0, size - overlap, tile - overlap) if size > tile else [0] for size in (height, width)]
        for y, x in itertools.product(*positions):
            y = max(0, min(height - overlap, y))
            x = max(0, min(width - overlap, x))
            h, w = min(tile, height - y), min(tile, width - x)
            ps = function(s[:, :, y:y + h, x:x + w])
            mask = torch.ones_like(ps)
            feather = round(overlap * scale)
            for d in (2, 3):
                if feather >= mask.shape[d]:
                    continue
                for t in range(feather):
                    a = (t + 1) / feather
                    mask.narrow(d, t, 1).mul_(a)
                    mask.narrow(d, mask.shape[d] - 1 - t, 1).mul_(a)
            out[:, :, y * scale:y * scale + ps.shape[2], x * scale:x * scale + ps.shape[3]].add_(ps * mask)
            out_div[:, :, y * scale:y * scale + ps.shape[2], x * scale:x * scale + ps.shape[3]].add_(mask)
        output[b:b + 1] = out / out_div
    return output


def reference(module: Any, source: pathlib.Path, target: pathlib.Path, tile: int, overlap: int) -> float:
    import numpy as np
    import torch
    from PIL import Image

    started = time.perf_counter()
    pixels = np.asarray(Image.open(source).convert("RGB"))
    with torch.inference_mode():
        x = torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float() / 255
        if tile:
            y = comfy_tiled_scale(x, module, tile, overlap, SCALE)
        else:
            y = module(x)
        out = (y.clamp(0, 1) * 255).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()
    Image.fromarray(out).save(target)
    return time.perf_counter() - started


def config(models: pathlib.Path, threads: int, tile: int, overlap: int) -> str:
    text = f'model_root = "{models}"\n[gpu]\nbackend = "none"\n[policy]\nkeep_alive = "forever"\nrequest_timeout = "10m"\n'
    for name, tiling in (("tiled1", f"tile = {tile}\noverlap = {overlap}\nbatch = 1\n"),
                         ("tiled4", f"tile = {tile}\noverlap = {overlap}\nbatch = 4\n"),
                         ("whole", "")):
        text += f'[models.{name}]\npath = "{MODEL}"\nkind = "image"\nscale = {SCALE}\nthreads = {threads}\n{tiling}'
    return text


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin-dir", type=pathlib.Path, required=True)
    parser.add_argument("--models", type=pathlib.Path, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--overlap", type=int, default=32)
    parser.add_argument("--only", default="", help="comma-separated subset of: tiled1,tiled4,comfy,whole,direct")
    args = parser.parse_args()
    import torch
    from PIL import Image

    torch.set_num_threads(args.threads)
    models = args.models.resolve()
    module = torch.jit.load(str(models / MODEL)).eval()
    wanted = set(filter(None, args.only.split(","))) or {"tiled1", "tiled4", "comfy", "whole", "direct"}
    times: Dict[str, List[float]] = {k: [] for k in ("tiled1", "tiled4", "comfy", "whole", "direct")}
    with tempfile.TemporaryDirectory(prefix="gpuctl-bench-tiles-") as tmp:
        where = pathlib.Path(tmp)
        source = where / "in.png"
        Image.open(models / "astronaut.png").convert("RGB").resize((args.size, args.size), Image.LANCZOS).save(source)
        daemon = start_daemon(args.bin_dir, config(models, args.threads, args.tile, args.overlap), where)
        gpuctl = [str(args.bin_dir / "gpuctl"), "--socket", str(where / "gpuctld.sock")]

        def through(model: str) -> float:
            started = time.perf_counter()
            subprocess.run([*gpuctl, "generate", model, str(source), "-o", str(where / f"{model}.png")], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            return time.perf_counter() - started

        try:
            for model in ("tiled1", "tiled4", "whole"):
                if model in wanted:
                    subprocess.run([*gpuctl, "load", model], check=True, stdout=subprocess.DEVNULL)
            # One warm-up each: TorchScript's profiling executor optimises on the first runs.
            small = where / "small.png"
            Image.open(source).resize((64, 64)).save(small)
            for model in ("tiled1", "tiled4", "whole"):
                if model in wanted:
                    subprocess.run([*gpuctl, "generate", model, str(small), "-o", str(where / "w.png")], check=True, stdout=subprocess.DEVNULL)
            with torch.inference_mode():
                module(torch.zeros(1, 3, 64, 64))
                module(torch.zeros(1, 3, 64, 64))
            for _ in range(args.rounds):
                for label in ("tiled1", "tiled4", "comfy", "whole", "direct"):
                    if label not in wanted:
                        continue
                    if label == "comfy":
                        times[label].append(reference(module, source, where / "comfy.png", args.tile, args.overlap))
                    elif label == "direct":
                        times[label].append(reference(module, source, where / "direct.png", 0, 0))
                    else:
                        times[label].append(through(label))
        finally:
            daemon.terminate()
            daemon.wait()
    med = {k: statistics.median(v) for k, v in times.items() if v}
    print(f"{MODEL}, {args.size}² → {args.size * SCALE}², tile {args.tile}, overlap {args.overlap}, "
          f"{args.threads} threads, {args.rounds} interleaved rounds, medians, file to file:")
    for label, text in (("tiled1", "gpuctld tiled, batch 1 (the CPU default)"), ("tiled4", "gpuctld tiled, batch 4 (the CUDA default)"),
                        ("comfy", "ComfyUI's algorithm (PyTorch)"), ("whole", "gpuctld untiled"),
                        ("direct", "direct untiled forward (PyTorch)")):
        if label in med:
            print(f"  {text:34} {med[label]:7.2f} s")
    if "comfy" in med:
        for label in ("tiled1", "tiled4"):
            if label in med:
                print(f"  speed-up over ComfyUI's algorithm, {label}: {med['comfy'] / med[label]:.2f}x (target >= 1.5)")
    if "direct" in med:
        for label in ("tiled1", "tiled4", "whole"):
            if label in med:
                print(f"  {label} / direct untiled forward: {med[label] / med['direct']:.2f} (target <= 1.0)")


if __name__ == "__main__":
    main()
