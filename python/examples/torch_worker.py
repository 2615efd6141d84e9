"""An eager (not scripted) PyTorch module served by gpuctld as an `image`
model: a ×2 upscaler made of a convolution and a pixel shuffle.

    [models.eager-x2]
    kind = "image"
    scale = 2
    command = ["/path/to/venv/bin/python", "/path/to/torch_worker.py"]
    options = { init_seed = 0 }             # or path = "weights.pt" (a state_dict)
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from gpuctl import worker


class ShuffleX2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The input upscaled by nearest neighbour, plus what the network adds.
        return (nn.functional.interpolate(x, scale_factor=2.0, mode="nearest") + 0.1 * self.shuffle(self.conv(x))).clamp(0, 1)


class EagerUpscaler(worker.Model):
    def load(self, spec: worker.Spec) -> None:
        torch.manual_seed(int(spec.options.get("init_seed", 0)))
        self.net = ShuffleX2()
        if spec.path is not None:
            self.net.load_state_dict(torch.load(spec.path, map_location="cpu", weights_only=True))
        self.net = self.net.to(spec.device).eval()
        if spec.precision == "fp16":
            self.net = self.net.half()
        self.device = spec.device
        self.dtype = torch.float16 if spec.precision == "fp16" else torch.float32

    @torch.inference_mode()
    def run(self, job: worker.Job, ctx: worker.Context) -> Any:
        images = np.asarray(job.images)  # uint8 [N,H,W,3]
        out = []
        for i, image in enumerate(images):
            ctx.check()
            x = torch.from_numpy(image).to(self.device).permute(2, 0, 1)[None].to(self.dtype) / 255
            out.append(self.net(x).float().permute(0, 2, 3, 1).cpu())
            ctx.progress(i + 1, len(images))
        return torch.cat(out).numpy()  # float [N,2H,2W,3] in 0..1


if __name__ == "__main__":
    worker.serve(EagerUpscaler)
