"""A worker-SDK model that needs only numpy, for the tests: what it does is
chosen by the model's `options`.

- image: each pixel repeated `scale` times both ways (default 2).
- tensor: each input times 2, and their element count as int64.
- generate: a flat image of the seed's colour, `width`×`height`.
- `steps` (default 1; a generate job's own steps): the job takes this many steps of `step_s` seconds
  each, telling its progress and stopping when cancelled between steps.
- `load_s`: sleep that long in load; `load_error`: raise it in load (a
  message of several lines); `oom`: raise a CUDA-like out-of-memory error
  in run; `bad_output`: return a 2-D array;
`child_pid_file`: start a `sleep` child in load and write its pid.
"""
from __future__ import annotations

import os
import subprocess
import time
from typing import Any

import numpy as np

from gpuctl import worker


class OutOfMemoryError(RuntimeError):
    """Named as torch's, which is how the SDK knows it."""


class NumpyModel(worker.Model):
    def load(self, spec: worker.Spec) -> None:
        self.spec = spec
        self.options = spec.options
        time.sleep(float(self.options.get("load_s", 0)))
        if "load_error" in self.options:
            raise ValueError(f"cannot read the weights\n{self.options['load_error']}")
        pid_file = self.options.get("child_pid_file")
        if pid_file:
            child = subprocess.Popen(["sleep", "1000"])
            with open(pid_file, "w") as f:
                f.write(str(child.pid))
        with open(os.path.join(os.environ.get("GPUCTL_TEST_DIR", "/tmp"), f"loaded-{spec.name}-{os.getpid()}"), "w") as f:
            f.write(spec.path or "")

    def memory(self, spec: worker.Spec) -> int:
        return int(self.options.get("holds", 0))

    def run(self, job: worker.Job, ctx: worker.Context) -> Any:
        steps = job.steps if job.kind == "generate" else int(self.options.get("steps", 1))
        for step in range(steps):
            ctx.check()
            time.sleep(float(self.options.get("step_s", 0)))
            ctx.progress(step + 1, steps)
        if self.options.get("oom"):
            raise OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        if self.options.get("bad_output"):
            return np.zeros((2, 2), dtype=np.uint8)
        if job.kind == "image":
            scale = int(self.options.get("scale", 2))
            return job.images.repeat(scale, axis=1).repeat(scale, axis=2)
        if job.kind == "tensor":
            return [x * 2 for x in job.inputs] + [np.array([sum(x.size for x in job.inputs)], dtype=np.int64)]
        colour = np.array([job.seed % 256, (job.seed // 256) % 256, len(job.prompt) % 256], dtype=np.uint8)
        return np.broadcast_to(colour, (1, job.height, job.width, 3)).copy()


if __name__ == "__main__":
    worker.serve(NumpyModel)
