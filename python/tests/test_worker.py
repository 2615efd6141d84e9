"""The worker SDK (`gpuctl.worker`) against a stand-in for gpuctld: the
test speaks the worker protocol to a real worker process over a socketpair,
frame by frame, as gpuctld does."""
from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pytest

import gpuctl
from gpuctl import codec, worker
from gpuctl.messages import (
    DaemonToWorker,
    DType,
    ErrorCode,
    GenerateJob,
    ImageLayout,
    Job,
    LoadModel,
    Lora,
    ModelKind,
    SwitchMode,
    TensorFrame,
    WireTensor,
    WorkerToDaemon,
)

HERE = pathlib.Path(__file__).resolve().parent
WORKER = HERE / "workers" / "numpy_worker.py"
SRC = HERE.parent / "src"


class FakeDaemon:
    """gpuctld's end of one worker's socket."""

    def __init__(self, tmp: pathlib.Path, script: pathlib.Path = WORKER, protocol: Optional[str] = None, args: Sequence[str] = ()) -> None:
        """`protocol`: the worker protocol this daemon says it speaks (None: 1.0, which does not say)."""
        ours, theirs = socket.socketpair()
        env = dict(os.environ, GPUCTL_WORKER_FD=str(theirs.fileno()), PYTHONPATH=str(SRC), GPUCTL_TEST_DIR=str(tmp))
        env.pop("GPUCTL_WORKER_PROTOCOL", None)
        if protocol is not None:
            env["GPUCTL_WORKER_PROTOCOL"] = protocol
        self.process = subprocess.Popen([sys.executable, str(script), *args], pass_fds=[theirs.fileno()], env=env, stderr=subprocess.PIPE)
        theirs.close()
        ours.settimeout(30)
        self.sock = ours
        self.codec = codec.Codec()

    def send(self, message: Any) -> None:
        payload = self.codec.encode("DaemonToWorker", message)
        self.sock.sendall(codec.LENGTH.pack(len(payload)) + payload)

    def receive(self) -> Any:
        head = self._exactly(4)
        (length,) = codec.LENGTH.unpack(head)
        return self.codec.decode("WorkerToDaemon", self._exactly(length))

    def _exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise EOFError("the worker closed its socket")
            data += chunk
        return data

    def load(self, kind: ModelKind, options: Dict[str, Any], path: Optional[str] = None) -> Any:
        hello = self.receive()
        assert isinstance(hello, WorkerToDaemon.Hello), hello
        self.send(DaemonToWorker.Load(LoadModel(name="m", path=path, kind=kind, device="cpu", threads=1, rgb8=True, fp16=False, options=json.dumps(options))))
        return self.receive()

    def run(self, id: int, job: Any) -> Any:
        """Sends a job, its tensors over 1 MiB streamed ahead of it."""
        tensors = [job.input] if isinstance(job, Job.Image) else [job.value.noise] if isinstance(job, Job.Generate) else job.inputs
        for tensor in tensors:
            if len(tensor.data) > 1 << 20:
                self.send(DaemonToWorker.Tensor(TensorFrame.Begin(dtype=tensor.dtype, shape=tensor.shape)))
                for at in range(0, len(tensor.data), 1 << 20):
                    self.send(DaemonToWorker.Tensor(TensorFrame.Chunk(tensor.data[at:at + (1 << 20)])))
                self.send(DaemonToWorker.Tensor(TensorFrame.End()))
                tensor.data = b""
        self.send(DaemonToWorker.Run(id=id, job=job))

    def answer(self) -> Any:
        """The next Done or Failed, with streamed outputs filled in; progress is kept."""
        streamed: List[bytes] = []
        self.progress: List[Any] = []
        current = b""
        while True:
            message = self.receive()
            if isinstance(message, WorkerToDaemon.Tensor):
                frame = message.frame
                if isinstance(frame, TensorFrame.Chunk):
                    current += frame.value
                elif isinstance(frame, TensorFrame.End):
                    streamed.append(current)
                    current = b""
            elif isinstance(message, WorkerToDaemon.Progress):
                self.progress.append((message.done, message.total))
            else:
                self.streamed = len(streamed)
                if isinstance(message, WorkerToDaemon.Done):
                    for output in message.outputs:
                        if not output.data:
                            output.data = streamed.pop(0)
                return message

    def exit_code(self, within: float = 10.0) -> int:
        return self.process.wait(timeout=within)

    def close(self) -> None:
        self.sock.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def daemon(tmp_path: pathlib.Path) -> Any:
    fake = FakeDaemon(tmp_path)
    yield fake
    fake.close()


def wire(array: np.ndarray) -> WireTensor:
    dtype = {np.dtype("uint8"): DType.U8, np.dtype("float32"): DType.F32, np.dtype("int64"): DType.I64}[array.dtype]
    return WireTensor(dtype=dtype, shape=list(array.shape), data=array.tobytes())


def array(tensor: WireTensor) -> np.ndarray:
    dtype = {DType.U8: np.uint8, DType.F32: np.float32, DType.I64: np.int64}[DType(tensor.dtype)]
    return np.frombuffer(tensor.data, dtype=dtype).reshape(tensor.shape)


def test_says_hello_first_then_loads_and_reports_what_it_holds(daemon: FakeDaemon, tmp_path: pathlib.Path) -> None:
    hello = daemon.receive()
    assert isinstance(hello, WorkerToDaemon.Hello)
    assert (hello.value.protocol.major, hello.value.protocol.minor) == (1, 1)
    assert hello.value.program.startswith("gpuctl.worker ")
    # A daemon that did not say it speaks 1.1 hears nothing of 1.1: Loaded comes next.
    daemon.send(DaemonToWorker.Load(LoadModel(name="m", path="/models/m", kind=ModelKind.Tensor, device="cpu", threads=1, options='{"holds": 123456}')))
    loaded = daemon.receive()
    assert isinstance(loaded, WorkerToDaemon.Loaded), loaded
    assert (loaded.value.device, loaded.value.device_bytes, loaded.value.precision) == ("cpu", 123456, "fp32")
    assert [p.read_text() for p in tmp_path.glob("loaded-m-*")] == ["/models/m"], "spec.path reaches load"


def test_tensors_over_a_mebibyte_stream_both_ways(daemon: FakeDaemon) -> None:
    assert isinstance(daemon.load(ModelKind.Tensor, {}), WorkerToDaemon.Loaded)
    big = np.arange(3 * 1024 * 1024 // 4 + 7, dtype=np.float32).reshape(1, -1)
    small = np.array([[1.5, -2.0]], dtype=np.float32)
    daemon.run(1, Job.Tensor(inputs=[wire(big), wire(small)]))
    done = daemon.answer()
    assert isinstance(done, WorkerToDaemon.Done), done
    assert done.id == 1
    outputs = [array(t) for t in done.outputs]
    np.testing.assert_array_equal(outputs[0], big * 2)
    np.testing.assert_array_equal(outputs[1], small * 2)
    assert outputs[2].tolist() == [big.size + 2]
    assert done.outputs[0].shape == list(big.shape)
    assert daemon.streamed == 1, "the 3 MiB output streamed, the small ones rode in Done"


def test_image_jobs_arrive_as_rgb8_rows_whatever_the_layout(daemon: FakeDaemon) -> None:
    assert isinstance(daemon.load(ModelKind.Image, {"scale": 2}), WorkerToDaemon.Loaded)
    rows = np.random.default_rng(0).integers(0, 256, (1, 5, 7, 3), dtype=np.uint8)
    daemon.run(1, Job.Image(input=wire(rows), tiling=None, layout=ImageLayout.Rows))
    done = daemon.answer()
    expected = rows.repeat(2, axis=1).repeat(2, axis=2)
    np.testing.assert_array_equal(array(done.outputs[0]), expected)
    # Planar floats 0..1, as clients of old protocols send them.
    planes = (rows.transpose(0, 3, 1, 2).astype(np.float32) / 255)
    daemon.run(2, Job.Image(input=wire(planes), tiling=None, layout=ImageLayout.Planes))
    np.testing.assert_array_equal(array(daemon.answer().outputs[0]), expected)
    # Large enough to stream both ways: 1024x512 in, 2048x1024 out.
    large = np.random.default_rng(1).integers(0, 256, (1, 512, 1024, 3), dtype=np.uint8)
    daemon.run(3, Job.Image(input=wire(large), tiling=None, layout=ImageLayout.Rows))
    np.testing.assert_array_equal(array(daemon.answer().outputs[0]), large.repeat(2, axis=1).repeat(2, axis=2))
    assert daemon.streamed == 1


def test_generate_jobs_carry_the_prompt_seed_and_size(daemon: FakeDaemon) -> None:
    assert isinstance(daemon.load(ModelKind.Generate, {}), WorkerToDaemon.Loaded)
    noise = np.zeros((1, 4, 6, 8), dtype=np.float32)
    job = GenerateJob(noise=wire(noise), prompt="a cat", negative="", steps=3, guidance=7.0, seed=258, width=64, height=48)
    daemon.run(1, Job.Generate(job))
    out = array(daemon.answer().outputs[0])
    assert out.shape == (1, 48, 64, 3)
    assert out[0, 0, 0].tolist() == [2, 1, 5]


def test_progress_is_told_and_a_cancelled_job_stops_at_its_next_step(daemon: FakeDaemon) -> None:
    assert isinstance(daemon.load(ModelKind.Tensor, {"steps": 200, "step_s": 0.05}), WorkerToDaemon.Loaded)
    daemon.run(1, Job.Tensor(inputs=[wire(np.ones((1, 2), np.float32))]))
    first = daemon.receive()
    assert isinstance(first, WorkerToDaemon.Progress) and (first.id, first.done, first.total) == (1, 1, 200)
    daemon.send(DaemonToWorker.Cancel(id=1))
    started = time.monotonic()
    failed = daemon.answer()
    assert isinstance(failed, WorkerToDaemon.Failed), failed
    assert (failed.id, failed.error.code) == (1, ErrorCode.Cancelled)
    assert "model m: the request was cancelled" in failed.error.message
    assert time.monotonic() - started < 2, "stopped at the next step, not after all 200"
    assert len(daemon.progress) < 50
    # The worker goes on: a cancel is for one job.
    daemon.send(DaemonToWorker.Cancel(id=99))
    daemon.run(2, Job.Tensor(inputs=[wire(np.ones((1, 2), np.float32))]))


def test_an_exception_in_load_names_the_model_and_its_last_line(daemon: FakeDaemon) -> None:
    failed = daemon.load(ModelKind.Tensor, {"load_error": "conv1.weight: shape [64, 3] vs [32, 3]"})
    assert isinstance(failed, WorkerToDaemon.Failed) and failed.id is None, failed
    assert failed.error.code == ErrorCode.LoadFailed
    assert failed.error.message == "model m: loading failed: ValueError: conv1.weight: shape [64, 3] vs [32, 3]"
    assert daemon.exit_code() == 0, "a worker that failed to load exits"


def test_out_of_memory_in_run_is_reported_as_such(daemon: FakeDaemon) -> None:
    assert isinstance(daemon.load(ModelKind.Tensor, {"oom": True}), WorkerToDaemon.Loaded)
    daemon.run(1, Job.Tensor(inputs=[wire(np.ones((1, 2), np.float32))]))
    failed = daemon.answer()
    assert failed.error.code == ErrorCode.InsufficientVram
    assert failed.error.message.startswith("model m: out of memory while running: OutOfMemoryError: CUDA out of memory")


def test_a_result_of_the_wrong_shape_is_a_clear_error_and_the_worker_goes_on(daemon: FakeDaemon) -> None:
    assert isinstance(daemon.load(ModelKind.Image, {"bad_output": True}), WorkerToDaemon.Loaded)
    rows = np.zeros((1, 2, 2, 3), dtype=np.uint8)
    daemon.run(1, Job.Image(input=wire(rows), tiling=None, layout=ImageLayout.Rows))
    failed = daemon.answer()
    assert isinstance(failed, WorkerToDaemon.Failed)
    assert failed.error.message == "model m: run's result: an image output must be [N,H,W,3] (or [H,W,3], [N,3,H,W]), got shape [2, 2]"
    daemon.run(2, Job.Image(input=wire(rows), tiling=None, layout=ImageLayout.Rows))
    assert isinstance(daemon.answer(), WorkerToDaemon.Failed), "answered, not wedged"


def test_unload_and_a_closed_socket_end_the_process(tmp_path: pathlib.Path) -> None:
    unloaded = FakeDaemon(tmp_path)
    assert isinstance(unloaded.load(ModelKind.Tensor, {}), WorkerToDaemon.Loaded)
    unloaded.send(DaemonToWorker.Unload())
    assert unloaded.exit_code() == 0
    unloaded.close()
    # gpuctld gone mid-job: the worker does not finish it first.
    orphaned = FakeDaemon(tmp_path)
    assert isinstance(orphaned.load(ModelKind.Tensor, {"steps": 1000, "step_s": 0.05}), WorkerToDaemon.Loaded)
    orphaned.run(1, Job.Tensor(inputs=[wire(np.ones((1, 2), np.float32))]))
    orphaned.receive()
    started = time.monotonic()
    orphaned.sock.close()
    assert orphaned.exit_code() == 0
    assert time.monotonic() - started < 5


def test_serve_outside_gpuctld_says_what_it_is(tmp_path: pathlib.Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "GPUCTL_WORKER_FD"}
    env["PYTHONPATH"] = str(SRC)
    done = subprocess.run([sys.executable, str(WORKER)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "GPUCTL_WORKER_FD is not set: this program is started by gpuctld" in done.stderr


def test_outputs_become_rgb8_rows() -> None:
    pixels = worker._pixels
    floats = np.array([[[[0.0, 0.5, 1.0]]]], dtype=np.float32)
    assert pixels(floats, "out").tolist() == [[[[0, 128, 255]]]], "rounded half away from zero, as gpuctl-worker"
    assert pixels(np.full((1, 1, 3), np.nan, np.float32), "out").tolist() == [[[[0, 0, 0]]]]
    planes = np.arange(12, dtype=np.uint8).reshape(1, 3, 2, 2)
    np.testing.assert_array_equal(pixels(planes, "out"), planes.transpose(0, 2, 3, 1))
    assert pixels([np.zeros((2, 2, 3), np.uint8)] * 3, "out").shape == (3, 2, 2, 3)
    with pytest.raises(TypeError, match=r"out: an image output must have 3 channels \(RGB\), got shape \[1, 2, 2, 4\]"):
        pixels(np.zeros((1, 2, 2, 4), np.uint8), "out")
    with pytest.raises(TypeError, match="an image output must be"):
        pixels(np.zeros((5,), np.uint8), "out")
    pil = pytest.importorskip("PIL.Image")
    image = pil.new("RGB", (3, 2), (10, 20, 30))
    assert pixels(image, "out")[0, 1, 2].tolist() == [10, 20, 30]


def modes_toml(test_dir: pathlib.Path, extra_args: str = "") -> str:
    def mode(name: str, loras: str, more: str = "") -> str:
        return (
            f'\n[models.{name}]\nkind = "image"\ngroup = "modes"\n'
            f'command = ["{sys.executable}", "{HERE / "workers" / "modes_worker.py"}"{extra_args}]\n'
            f'env = {{ PYTHONPATH = "{SRC}", GPUCTL_TEST_DIR = "{test_dir}" }}\n'
            f'loras = [{loras}]\n{more}'
        )

    return "".join([
        mode("plain", ""),
        mode("warm", '{ path = "warm.safetensors", strength = 0.5 }'),
        mode("warmer", '{ path = "warm.safetensors", strength = 0.5 }, { path = "more.safetensors", strength = 0.7 }'),
        mode("broken", '{ path = "broken.safetensors" }'),
        mode("tuned", '{ path = "warm.safetensors", strength = 0.5 }', 'options = { variant = 2 }\n'),
        mode("slow", '{ path = "slow.safetensors" }', 'load_timeout = "1s"\n'),
    ])


def events(test_dir: pathlib.Path) -> list:
    path = test_dir / "events"
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def test_a_python_model_with_switch_changes_modes_in_its_process(tmp_path: pathlib.Path) -> None:
    from conftest import Daemon

    image = np.full((2, 3, 3), 100, dtype=np.uint8)
    d = Daemon('[policy]\nkeep_alive = "forever"\n', models=modes_toml(tmp_path))
    try:
        with gpuctl.Client(d.path) as client:
            for mode, shift in (("plain", 0), ("warm", 5), ("warmer", 12), ("plain", 0)):
                assert int(client.generate(mode, image).image[0, 0, 0]) == 100 + shift, mode
            kinds = [(what, name) for what, name, _ in events(tmp_path)]
            assert kinds == [("load", "plain"), ("switch", "warm"), ("switch", "warmer"), ("switch", "plain")]
            assert len({pid for _, _, pid in events(tmp_path)}) == 1, "one process throughout"
            # Other options are another base: a new process.
            assert int(client.generate("tuned", image).image[0, 0, 0]) == 105
            assert events(tmp_path)[-1][:2] == ["load", "tuned"]
            # A switch that raises fails that mode's load by name; the
            # process is let go and the next mode loads afresh.
            client.generate("plain", image)
            with pytest.raises(gpuctl.LoadFailed, match=r"model broken: switching to it failed: ValueError: cannot apply broken.safetensors"):
                client.generate("broken", image)
            assert int(client.generate("warm", image).image[0, 0, 0]) == 105
            assert events(tmp_path)[-1][:2] == ["load", "warm"]
    finally:
        d.stop()


def test_a_python_model_without_switch_is_unloaded_and_loaded_as_before(tmp_path: pathlib.Path) -> None:
    from conftest import Daemon

    image = np.full((2, 3, 3), 100, dtype=np.uint8)
    d = Daemon('[policy]\nkeep_alive = "forever"\n', models=modes_toml(tmp_path, ', "--no-switch"'))
    try:
        with gpuctl.Client(d.path) as client:
            for mode, shift in (("plain", 0), ("warm", 5), ("plain", 0)):
                assert int(client.generate(mode, image).image[0, 0, 0]) == 100 + shift, mode
        assert [what for what, _, _ in events(tmp_path)] == ["load", "load", "load"]
        assert len({pid for _, _, pid in events(tmp_path)}) == 3
    finally:
        d.stop()


MODES_WORKER = HERE / "workers" / "modes_worker.py"


@pytest.mark.parametrize("args,switches", [((), True), (("--no-switch",), False)])
def test_capabilities_follow_hello_for_a_daemon_of_1_1_and_say_whether_the_model_switches(tmp_path: pathlib.Path, args: Sequence[str], switches: bool) -> None:
    d = FakeDaemon(tmp_path, MODES_WORKER, protocol="1.1", args=args)
    try:
        assert isinstance(d.receive(), WorkerToDaemon.Hello)
        capabilities = d.receive()
        assert isinstance(capabilities, WorkerToDaemon.Capabilities), capabilities
        assert capabilities.value.switch_loras is switches
    finally:
        d.close()


def test_a_switch_is_answered_with_switched_and_a_failing_one_with_failed(tmp_path: pathlib.Path) -> None:
    d = FakeDaemon(tmp_path, MODES_WORKER, protocol="1.1")
    try:
        d.receive(), d.receive()
        d.send(DaemonToWorker.Load(LoadModel(name="a", path=None, kind=ModelKind.Image, device="cpu", threads=1, rgb8=True, options="{}")))
        assert isinstance(d.receive(), WorkerToDaemon.Loaded)
        d.send(DaemonToWorker.Switch(SwitchMode(name="b", loras=[Lora(path="/l/warm.safetensors", strength=0.5)])))
        switched = d.receive()
        assert isinstance(switched, WorkerToDaemon.Switched), switched
        assert switched.value.device == "cpu"
        d.run(1, Job.Image(input=wire(np.full((1, 1, 2, 3), 10, dtype=np.uint8)), tiling=None, layout=ImageLayout.Rows))
        done = d.answer()
        assert array(done.outputs[0]).tolist() == [[[[15, 15, 15], [15, 15, 15]]]]
        d.send(DaemonToWorker.Switch(SwitchMode(name="c", loras=[Lora(path="/l/broken.safetensors", strength=1.0)])))
        failed = d.receive()
        assert isinstance(failed, WorkerToDaemon.Failed) and failed.id is None, failed
        assert failed.error.code == ErrorCode.LoadFailed
        assert failed.error.message == "model c: switching to it failed: ValueError: cannot apply broken.safetensors"
        assert d.process.wait(10) == 0, "the worker ends after a failed switch"
    finally:
        d.close()


def test_a_switch_past_load_timeout_is_killed_and_named_and_the_next_mode_loads_afresh(tmp_path: pathlib.Path) -> None:
    from conftest import Daemon

    image = np.full((2, 3, 3), 100, dtype=np.uint8)
    d = Daemon('[policy]\nkeep_alive = "forever"\n', models=modes_toml(tmp_path))
    try:
        with gpuctl.Client(d.path) as client:
            client.generate("plain", image)
            pid = int(events(tmp_path)[-1][2])
            started = time.monotonic()
            with pytest.raises(gpuctl.LoadFailed, match=rf"model slow: its worker \(pid {pid}\) did not switch to it within load_timeout \(1s\); it was killed"):
                client.generate("slow", image)
            assert time.monotonic() - started < 10
            deadline = time.monotonic() + 10
            while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not os.path.exists(f"/proc/{pid}"), "the stuck worker was killed"
            assert int(client.generate("warm", image).image[0, 0, 0]) == 105
            assert events(tmp_path)[-1][:2] == ["load", "warm"]
    finally:
        d.stop()
