"""A diffusers DDPMPipeline served by gpuctld as a `generate` model.

    [models.ddpm]
    kind = "generate"
    command = ["/path/to/venv/bin/python", "/path/to/ddpm_worker.py"]
    path = "tiny-ddpm"                      # a folder made by save_pretrained
    defaults = { size = "32x32", steps = 20 }

Without `path`, the pipeline is a small randomly initialised UNet2DModel
built from a config (`options = { init_seed = 0 }`), so nothing is
downloaded. A seed reproduces an image bit for bit; each denoising step is
a progress event; a cancelled request stops at the next step.
"""
from __future__ import annotations

from typing import Any

import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from gpuctl import worker


def random_pipeline(seed: int) -> DDPMPipeline:
    """A small DDPM pipeline with random weights, the same for the same seed."""
    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    return DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000))


class Ddpm(worker.Model):
    def load(self, spec: worker.Spec) -> None:
        if spec.path is not None:
            self.pipe = DDPMPipeline.from_pretrained(spec.path)
        else:
            self.pipe = random_pipeline(int(spec.options.get("init_seed", 0)))
        self.pipe.to(spec.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.device = spec.device

    def run(self, job: worker.Job, ctx: worker.Context) -> Any:
        steps = job.steps
        done = 0

        # DDPMPipeline walks its timesteps through `progress_bar`: each one
        # is a step to report, and a point where a cancelled job stops.
        def steps_of(timesteps: Any) -> Any:
            nonlocal done
            for t in timesteps:
                ctx.check()
                yield t
                done += 1
                ctx.progress(done, steps)

        self.pipe.progress_bar = steps_of
        # The UNet is fully convolutional: the request's size is the sample's.
        self.pipe.unet.register_to_config(sample_size=(job.height, job.width))
        generator = torch.Generator(device="cpu").manual_seed(job.seed)
        result = self.pipe(batch_size=1, generator=generator, num_inference_steps=steps, output_type="np")
        return result.images  # float [1,H,W,3] in 0..1


if __name__ == "__main__":
    worker.serve(Ddpm)
