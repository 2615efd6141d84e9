"""A worker-SDK model with modes, for the tests: each pixel plus ten times
the sum of its LoRAs' strengths (mod 256), as if the LoRAs were merged.
`switch` changes them in place, unless a LoRA's path contains "broken"
(it raises) or "slow" (it takes 30 s);
every load and switch is written to $GPUCTL_TEST_DIR/events as
"<load|switch> <model> <pid>". Run with `--no-switch` it cannot switch."""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Dict, List

import numpy as np

from gpuctl import worker


def record(what: str, spec: worker.Spec) -> None:
    with open(os.path.join(os.environ.get("GPUCTL_TEST_DIR", "/tmp"), "events"), "a") as f:
        f.write(f"{what} {spec.name} {os.getpid()}\n")


class Plain(worker.Model):
    def load(self, spec: worker.Spec) -> None:
        self.loras: List[Dict[str, Any]] = spec.loras
        record("load", spec)

    def run(self, job: worker.Job, ctx: worker.Context) -> Any:
        shift = int(round(sum(lora["strength"] for lora in self.loras) * 10))
        return ((job.images.astype(np.int64) + shift) % 256).astype(np.uint8)


class Switching(Plain):
    def switch(self, spec: worker.Spec) -> None:
        broken = [lora["path"] for lora in spec.loras if "broken" in lora["path"]]
        if broken:
            raise ValueError(f"cannot apply {os.path.basename(broken[0])}")
        if any("slow" in lora["path"] for lora in spec.loras):
            time.sleep(30)
        self.loras = spec.loras
        record("switch", spec)


if __name__ == "__main__":
    worker.serve(Plain if "--no-switch" in sys.argv else Switching)
