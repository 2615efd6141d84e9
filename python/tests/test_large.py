"""A 2048² image through the client to 8192², in tiles: progress seen, the
right pixels, and the Python process's peak memory within the input plus the
output plus a fixed margin (no list of chunks joined at the end)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import torch
from conftest import MODELS, ROOT, Daemon

# Measured in a fresh process, so that pytest's own memory does not count.
PROBE = r"""
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import gpuctl

def status_mib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no " + field)

image = np.frombuffer(np.random.default_rng(3).bytes(2048 * 2048 * 3), np.uint8).reshape(2048, 2048, 3)
client = gpuctl.Client(sys.argv[2])
client.ping()
# Resets the peak (VmHWM) to the present, so that it measures the call only.
with open("/proc/self/clear_refs", "w") as clear:
    clear.write("5")
before = status_mib("VmRSS")
events = []
result = client.generate("x4", image, on_progress=events.append)
peak = status_mib("VmHWM")
np.save(sys.argv[3], result.image[4000:4096, 6000:6096])
print(json.dumps({
    "shape": list(result.image.shape), "before_mib": before, "peak_mib": peak,
    "events": [[e.done, e.total] for e in events], "notes": result.notes,
}))
"""

# The bound the README states: input (12 MiB) + output (192 MiB) + 48 MiB.
MARGIN_MIB = 48


def test_2048_to_8192_streams_into_one_array(daemon: Daemon, tmp_path) -> None:  # type: ignore[no-untyped-def]
    crop = tmp_path / "crop.npy"
    run = subprocess.run(
        [sys.executable, "-c", PROBE, str(ROOT / "python" / "src"), daemon.path, str(crop)],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["shape"] == [8192, 8192, 3]
    events = report["events"]
    assert len(events) >= 2 and events[-1][0] == events[-1][1]
    assert [done for done, _ in events] == sorted(done for done, _ in events)
    input_mib, output_mib = 2048 * 2048 * 3 / 2**20, 8192 * 8192 * 3 / 2**20
    # The input was made before `before`; the output and buffers come after.
    grown = report["peak_mib"] - report["before_mib"]
    print(f"peak {report['peak_mib']:.0f} MiB, grown {grown:.0f} MiB (output {output_mib:.0f} MiB)")
    assert grown <= output_mib + MARGIN_MIB, report
    assert report["peak_mib"] - report["before_mib"] >= output_mib * 0.9  # the measure measures
    # The right pixels: tiny-x4 is local (2 input pixels), so a crop computed
    # directly from its neighbourhood must match the tiled result inside.
    image = np.frombuffer(np.random.default_rng(3).bytes(2048 * 2048 * 3), np.uint8).reshape(2048, 2048, 3)
    y0, x0 = 1000 - 8, 1500 - 8
    patch = image[y0 : y0 + 40, x0 : x0 + 40]
    module = torch.jit.load(str(MODELS / "tiny-x4.pt"))
    with torch.no_grad():
        out = module(torch.from_numpy(patch.copy()).permute(2, 0, 1).unsqueeze(0).float() / 255.0)
    expected = (out.clamp(0, 1) * 255).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()
    # Output pixel 4000 is input pixel 1000, which is offset 8 in the patch: 32 px in.
    expected = expected[32 : 32 + 96, 32 : 32 + 96]
    got = np.load(crop)
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
