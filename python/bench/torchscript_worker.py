"""A TorchScript `tensor` model served through the worker SDK: the same
file gpuctl-worker serves, so that the two workers' per-request overheads
can be compared (bench_workers.py)."""
from __future__ import annotations

from typing import Any, List

import torch

from gpuctl import worker


class TorchScript(worker.Model):
    def load(self, spec: worker.Spec) -> None:
        if spec.path is None:
            raise ValueError("set the model's path to a TorchScript file")
        self.module = torch.jit.load(spec.path, map_location=spec.device).eval()
        self.device = spec.device

    @torch.inference_mode()
    def run(self, job: worker.Job, ctx: worker.Context) -> List[Any]:
        outputs = self.module(*[torch.from_numpy(x).to(self.device) for x in job.inputs])
        if isinstance(outputs, torch.Tensor):
            outputs = [outputs]
        return [o.cpu().numpy() for o in outputs]


if __name__ == "__main__":
    worker.serve(TorchScript)
