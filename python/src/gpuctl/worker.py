"""Host a model of your own under gpuctld's life cycle.

A model that is not one TorchScript file (a diffusers pipeline, a detector
with Python around it) runs in a program gpuctld starts from the model's
`command`; this module is that program's side of the worker protocol
(protocol/README.md, "gpuctld ↔ workers"):

    from gpuctl import worker

    class Upscaler(worker.Model):
        def load(self, spec):
            ...                      # spec.device, spec.path, spec.options
        def run(self, job, ctx):
            ctx.progress(1, 1)
            return job.images        # uint8 [N,H,W,3]

    worker.serve(Upscaler)

`serve` does the rest: the handshake, framing, tensors streamed both ways,
a reader thread that sees Cancel, Unload and gpuctld going away while a job
runs, and exit on unload, so that everything the process held is freed.
"""
from __future__ import annotations

import ctypes
import importlib
import json
import os
import queue
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, NoReturn, Optional, Sequence, Tuple, Type, Union

from . import codec, messages
from .messages import (
    DaemonToWorker,
    DType,
    Error,
    ErrorCode,
    ImageLayout,
    Loaded,
    ModelKind,
    ProtocolVersion,
    SwitchMode,
    TensorFrame,
    WireTensor,
    WorkerCapabilities,
    WorkerHello,
    WorkerToDaemon,
)
from .tensors import CHUNK, NUMPY, nbytes, to_wire

# The worker protocol this module speaks (protocol/src/worker.rs, WORKER_PROTOCOL).
PROTOCOL = ProtocolVersion(1, 1)

# Where gpuctld says the worker protocol it speaks (none: 1.0).
PROTOCOL_VARIABLE = "GPUCTL_WORKER_PROTOCOL"

__all__ = ["Cancelled", "Context", "Job", "Model", "Spec", "serve", "PROTOCOL"]


class Cancelled(Exception):
    """Raise it (or let `Context.check` raise it) to stop a cancelled job."""


@dataclass
class Spec:
    """What to load, from the model's configuration."""

    #: The model's name in gpuctld's configuration.
    name: str
    #: `image`, `generate` or `tensor`.
    kind: str
    #: Where to run: `cpu`, `cuda` or `cuda:N`; `auto` is resolved to
    #: `cuda` when torch sees a GPU, else `cpu`.
    device: str
    #: The model's `path`, resolved against `model_root`, or None.
    path: Optional[str]
    #: `fp16` (asked for, on CUDA) or `fp32`.
    precision: str
    #: CPU threads to use; 0: the library's default.
    threads: int
    #: The model's `options` table.
    options: Dict[str, Any] = field(default_factory=dict)
    #: The model's `loras`: [{"path": resolved path, "strength": float}],
    #: for the program to apply.
    loras: List[Dict[str, Any]] = field(default_factory=list)


@dataclass
class Job:
    """One request. Image models read `images`; generate models the prompt
    and its settings; tensor models `inputs`."""

    id: int
    kind: str
    #: image: uint8 numpy array [N,H,W,3].
    images: Any = None
    #: image: the model's tiling (tile, overlap, batch), for authors who
    #: tile themselves; None when the model has none.
    tiling: Optional[messages.Tiling] = None
    prompt: str = ""
    negative: str = ""
    #: gpuctld's pick when the request gave none; seed your generator with it.
    seed: int = 0
    steps: int = 0
    guidance: float = 0.0
    width: int = 0
    height: int = 0
    #: generate: gpuctld's noise for the seed, float32 [1,C,h,w] (optional to use).
    noise: Any = None
    #: tensor: the request's tensors, as numpy arrays.
    inputs: List[Any] = field(default_factory=list)

    @property
    def size(self) -> Tuple[int, int]:
        """(width, height) of the image to generate."""
        return (self.width, self.height)


class Context:
    """What a running job can tell gpuctld, and hear from it."""

    def __init__(self, job: int, send: Callable[[Any], None], cancelled: threading.Event) -> None:
        self._job = job
        self._send = send
        self._cancelled = cancelled

    @property
    def cancelled(self) -> bool:
        """True once the request was cancelled, timed out or its client left."""
        return self._cancelled.is_set()

    def check(self) -> None:
        """Raises `Cancelled` when the job should stop."""
        if self._cancelled.is_set():
            raise Cancelled()

    def progress(self, done: int, total: int) -> None:
        """Tells the client how far the job is (e.g. steps done of all)."""
        self._send(WorkerToDaemon.Progress(id=self._job, done=max(0, int(done)), total=max(0, int(total))))


class Model:
    """Subclass it: `load` once, then `run` per job, one at a time."""

    def load(self, spec: Spec) -> None:
        raise NotImplementedError("implement Model.load(spec)")

    def run(self, job: Job, ctx: Context) -> Any:
        raise NotImplementedError("implement Model.run(job, ctx)")

    def switch(self, spec: Spec) -> None:
        """Optional: become the mode `spec` describes without loading the
        base again. `spec` differs from the loaded one only in `name` and
        `loras` (e.g. a diffusers pipeline's `set_adapters`, or
        `unload_lora_weights` then `load_lora_weights`). Define it and
        gpuctld switches between modes of one base (models with the same
        command, path and options and other `loras`, in a group or under
        `max_loaded`) in this process instead of starting another; an
        exception fails the new mode's load and ends this process."""
        raise NotImplementedError("this model does not switch modes in place")

    def memory(self, spec: Spec) -> Optional[int]:
        """Bytes the loaded model holds on its device, for `gpuctl status`.
        The default: torch's reserved CUDA memory on CUDA, else the bytes of
        the parameters and buffers of the torch modules (and diffusers
        pipelines) among the model's attributes."""
        return None


class ProtocolError(Exception):
    """gpuctld sent something this worker cannot read."""


class _BadOutput(Exception):
    """`run` returned something that is not its kind's output."""


# --- the socket ----------------------------------------------------------------


class _Channel:
    """Frames over the inherited socket: u32 big-endian length, then bincode."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._codec = codec.Codec()
        self._lock = threading.Lock()

    def send(self, message: Any) -> None:
        payload = bytearray(4)
        self._codec.encode_into("WorkerToDaemon", message, payload)
        codec.LENGTH.pack_into(payload, 0, len(payload) - 4)
        with self._lock:
            self._sock.sendall(payload)

    def receive(self) -> Optional[Any]:
        """The next message; None when gpuctld closed the socket."""
        head = self._exactly(4)
        if head is None:
            return None
        (length,) = codec.LENGTH.unpack(head)
        if length > 64 << 20:
            raise ProtocolError(f"a frame of {length} bytes is larger than any gpuctld sends")
        payload = self._exactly(length)
        if payload is None:
            return None
        try:
            return self._codec.decode("DaemonToWorker", payload)
        except codec.DecodeError as error:
            raise ProtocolError(f"a frame from gpuctld does not decode: {error}") from None

    def _exactly(self, count: int) -> Optional[bytearray]:
        buf = bytearray(count)
        view = memoryview(buf)
        got = 0
        while got < count:
            n = self._sock.recv_into(view[got:])
            if n == 0:
                return None
            got += n
        return buf


# --- tensors -------------------------------------------------------------------


def _numpy() -> Any:
    try:
        import numpy
    except ImportError:  # pragma: no cover - numpy is a dependency of any model
        raise RuntimeError("gpuctl.worker needs numpy: pip install numpy") from None
    return numpy


def _to_array(tensor: WireTensor) -> Any:
    """A tensor's bytes as a numpy array the model may write to (streamed
    ones are not copied; those that came inside their message, at most
    1 MiB, are)."""
    np = _numpy()
    array = np.frombuffer(tensor.data, dtype=NUMPY[DType(tensor.dtype)]).reshape([int(d) for d in tensor.shape])
    return array if array.flags.writeable else array.copy()


def _to_wire(array: Any, what: str) -> WireTensor:
    dtype, shape, view = to_wire(array, what)
    return WireTensor(dtype=dtype, shape=list(shape), data=bytes(view))


def _as_numpy(value: Any) -> Any:
    """numpy arrays, torch tensors (detached, on the CPU) and PIL images as numpy."""
    np = _numpy()
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu()
        if str(getattr(value, "dtype", "")) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    if hasattr(value, "convert") and hasattr(value, "size") and not isinstance(value, np.ndarray):
        return np.asarray(value.convert("RGB"))
    return np.asarray(value)


def _pixels(value: Any, what: str) -> Any:
    """An image output as uint8 [N,H,W,3]: from arrays (uint8, or float 0..1)
    in [N,H,W,3], [H,W,3], [N,3,H,W] or [3,H,W], PIL images, or a list of them."""
    np = _numpy()
    if isinstance(value, (list, tuple)):
        if not value:
            raise TypeError(f"{what}: an empty list is no image")
        return np.concatenate([_pixels(v, what) for v in value], axis=0)
    array = _as_numpy(value)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4:
        raise TypeError(f"{what}: an image output must be [N,H,W,3] (or [H,W,3], [N,3,H,W]), got shape {list(array.shape)}")
    if array.shape[-1] != 3 and array.shape[1] == 3:
        array = array.transpose(0, 2, 3, 1)
    if array.shape[-1] != 3:
        raise TypeError(f"{what}: an image output must have 3 channels (RGB), got shape {list(array.shape)}")
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if array.dtype.kind != "f":
        raise TypeError(f"{what}: image outputs are uint8 0..255 or float 0..1, got {array.dtype}")
    return _rgb8(array)


def _rgb8(array: Any) -> Any:
    """float 0..1 → uint8, as gpuctl-worker does: NaN as 0, clamped,
    rounded half away from zero."""
    np = _numpy()
    array = np.nan_to_num(array.astype(np.float32), nan=0.0)
    return np.floor(np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _image_input(tensor: WireTensor, layout: ImageLayout) -> Any:
    np = _numpy()
    array = _to_array(tensor)
    if array.ndim != 4:
        raise ValueError(f"an image input must be 4-dimensional, got shape {list(array.shape)}")
    if layout == ImageLayout.Planes:
        array = array.transpose(0, 2, 3, 1)
    if array.dtype != np.uint8:
        array = _rgb8(array)
    return np.ascontiguousarray(array)


class _Streamed:
    """Tensors streamed ahead of a `Run`, filling its placeholders in order."""

    def __init__(self) -> None:
        self.done: List[bytearray] = []
        self._current: Optional[bytearray] = None
        self._at = 0

    def frame(self, frame: Any) -> None:
        if isinstance(frame, TensorFrame.Begin):
            size = nbytes(DType(frame.dtype), frame.shape)
            if size > 16 << 30:
                raise ProtocolError(f"a streamed tensor of {size} bytes is larger than gpuctld sends")
            self._current, self._at = bytearray(size), 0
        elif isinstance(frame, TensorFrame.Chunk):
            if self._current is None or self._at + len(frame.value) > len(self._current):
                raise ProtocolError("a tensor chunk without a begin, or past its tensor's size")
            self._current[self._at:self._at + len(frame.value)] = frame.value
            self._at += len(frame.value)
        else:
            if self._current is None or self._at != len(self._current):
                raise ProtocolError("a tensor ended before all its bytes came")
            self.done.append(self._current)
            self._current = None

    def fill(self, tensors: Sequence[WireTensor]) -> None:
        for tensor in tensors:
            if not tensor.data and nbytes(DType(tensor.dtype), tensor.shape) > 0:
                if not self.done:
                    raise ProtocolError("a job names more streamed tensors than came")
                tensor.data = self.done.pop(0)  # type: ignore[assignment] # kept writable
        self.done.clear()


def _job_tensors(job: Any) -> List[WireTensor]:
    if isinstance(job, messages.Job.Image):
        return [job.input]
    if isinstance(job, messages.Job.Generate):
        return [job.value.noise]
    return list(job.inputs)


# --- errors --------------------------------------------------------------------


def _is_out_of_memory(error: BaseException) -> bool:
    return type(error).__name__ == "OutOfMemoryError" or "out of memory" in str(error).lower()


def _error(model: str, doing: str, error: BaseException) -> Error:
    """An exception in the author's code as gpuctld's error: the model, what
    it was doing, the exception's type and its message's last line."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    message = f"{type(error).__name__}: {lines[-1].strip()}" if lines else type(error).__name__
    if _is_out_of_memory(error):
        return Error(ErrorCode.InsufficientVram, f"model {model}: out of memory while {doing}: {message}")
    code = ErrorCode.Internal if doing == "running" else ErrorCode.LoadFailed
    return Error(code, f"model {model}: {doing} failed: {message}")


# --- memory --------------------------------------------------------------------


def _module_bytes(model: Any) -> int:
    """Bytes of parameters and buffers of the torch modules a model holds,
    directly or in a pipeline's components, each counted once."""
    seen: set[int] = set()
    total = 0
    candidates = list(vars(model).values())
    for value in list(candidates):
        components = getattr(value, "components", None)
        if isinstance(components, dict):
            candidates.extend(components.values())
    for value in candidates:
        tensors = []
        if hasattr(value, "parameters") and hasattr(value, "buffers"):
            try:
                tensors = list(value.parameters()) + list(value.buffers())
            except TypeError:
                continue
        for tensor in tensors:
            if id(tensor) in seen or not hasattr(tensor, "element_size"):
                continue
            seen.add(id(tensor))
            total += int(tensor.numel()) * int(tensor.element_size())
    return total


def _held(model: Model, spec: Spec) -> Tuple[int, int]:
    """(parameter bytes, bytes on the device)."""
    parameters = _module_bytes(model)
    own = model.memory(spec)
    if own is not None:
        return parameters, int(own)
    torch = sys.modules.get("torch")
    if torch is not None and spec.device.startswith("cuda") and torch.cuda.is_available():
        return parameters, int(torch.cuda.memory_reserved(torch.device(spec.device)))
    return parameters, parameters


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    try:
        torch: Any = importlib.import_module("torch")  # deciding needs torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def _set_threads(threads: int) -> None:
    torch = sys.modules.get("torch")
    if threads > 0 and torch is not None:
        torch.set_num_threads(threads)


# --- serving -------------------------------------------------------------------


def _die_with_parent() -> None:
    """SIGKILL when our parent goes (Linux). gpuctld arms this for the
    process it starts; a wrapper in between (`uv run`) may not, so it is
    armed here too, and the socket closing ends us whatever the parent."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _socket_from_environment() -> socket.socket:
    variable = os.environ.get("GPUCTL_WORKER_FD")
    if variable is None:
        sys.stderr.write(
            "gpuctl.worker: GPUCTL_WORKER_FD is not set: this program is started by gpuctld, "
            "as the command of a model in its configuration (see the README, \"Serving a Python model\")\n"
        )
        raise SystemExit(2)
    try:
        fd = int(variable)
        sock = socket.socket(fileno=fd)
    except (ValueError, OSError) as error:
        sys.stderr.write(f"gpuctl.worker: GPUCTL_WORKER_FD={variable!r} is not a socket: {error}\n")
        raise SystemExit(2) from None
    sock.setblocking(True)
    return sock


def _daemon_takes_capabilities() -> bool:
    """gpuctld said it speaks worker protocol 1.1 or later (of major 1)."""
    major, _, minor = os.environ.get(PROTOCOL_VARIABLE, "").partition(".")
    return major == str(PROTOCOL.major) and minor.isdigit() and int(minor) >= 1


def _switches(model: Union[Model, Type[Model]]) -> bool:
    cls = model if isinstance(model, type) else type(model)
    return getattr(cls, "switch", Model.switch) is not Model.switch


def _program() -> str:
    from . import __version__

    return f"gpuctl.worker {__version__} (python {sys.version.split()[0]}, {os.path.basename(sys.argv[0] or 'python')})"


def serve(model: Union[Model, Type[Model]], *, sock: Optional[socket.socket] = None) -> NoReturn:
    """Serves `model` (a `Model` subclass or instance) to the gpuctld that
    started this process, until it is unloaded; never returns."""
    _die_with_parent()
    channel = _Channel(sock if sock is not None else _socket_from_environment())
    try:
        _Server(channel, model).run()
    except (BrokenPipeError, ConnectionResetError):
        pass
    except ProtocolError as error:
        sys.stderr.write(f"gpuctl.worker: {error}\n")
        os._exit(3)
    sys.stdout.flush()
    sys.stderr.flush()
    # Threads a library started must not keep the process (and its memory).
    os._exit(0)


@dataclass
class _Queued:
    id: int
    job: Any
    cancelled: threading.Event


@dataclass
class _Switch:
    mode: SwitchMode


class _Server:
    def __init__(self, channel: _Channel, model: Union[Model, Type[Model]]) -> None:
        self.channel = channel
        self.model_or_class = model
        self.jobs: "queue.Queue[Union[_Queued, _Switch, None]]" = queue.Queue()
        self.cancels: Dict[int, threading.Event] = {}
        self.lock = threading.Lock()

    def run(self) -> None:
        self.channel.send(WorkerToDaemon.Hello(WorkerHello(PROTOCOL, _program())))
        if _daemon_takes_capabilities():
            self.channel.send(WorkerToDaemon.Capabilities(WorkerCapabilities(switch_loras=_switches(self.model_or_class))))
        first = self.channel.receive()
        if first is None:
            return
        if not isinstance(first, DaemonToWorker.Load):
            raise ProtocolError(f"gpuctld's first message must be Load, got {first.name}")
        spec_message = first.value
        loaded = self._load(spec_message)
        if loaded is None:
            return
        model, spec = loaded
        threading.Thread(target=self._read, name="gpuctl-worker-reader", daemon=True).start()
        while True:
            item = self.jobs.get()
            if item is None:
                return
            if isinstance(item, _Switch):
                switched = self._switch(model, spec, item.mode)
                if switched is None:
                    return
                spec = switched
                continue
            self._run(model, spec, item)

    def _load(self, message: messages.LoadModel) -> Optional[Tuple[Model, Spec]]:
        started = time.monotonic()
        name = message.name
        try:
            device = _resolve_device(message.device)
            options = json.loads(message.options or "{}")
            spec = Spec(
                name=name,
                kind=ModelKind(message.kind).name.lower(),
                device=device,
                path=message.path,
                precision="fp16" if message.fp16 and device.startswith("cuda") else "fp32",
                threads=int(message.threads),
                options=options if isinstance(options, dict) else {},
                loras=[{"path": lora.path, "strength": float(lora.strength)} for lora in message.loras],
            )
            _set_threads(spec.threads)
            model = self.model_or_class() if isinstance(self.model_or_class, type) else self.model_or_class
            model.load(spec)
            _set_threads(spec.threads)
            parameters, device_bytes = _held(model, spec)
        except BaseException as error:  # noqa: BLE001 - every failure is the author's to read
            traceback.print_exc(file=sys.stderr)
            self.channel.send(WorkerToDaemon.Failed(id=None, error=_error(name, "loading", error)))
            return None
        self.channel.send(
            WorkerToDaemon.Loaded(
                Loaded(
                    device=device,
                    load_ms=int((time.monotonic() - started) * 1000),
                    parameter_bytes=parameters,
                    device_bytes=device_bytes,
                    precision=spec.precision,
                )
            )
        )
        return model, spec

    def _switch(self, model: Model, spec: Spec, mode: SwitchMode) -> Optional[Spec]:
        """Becomes `mode`; None when it failed (said to gpuctld, which ends us)."""
        started = time.monotonic()
        new = replace(spec, name=mode.name, loras=[{"path": lora.path, "strength": float(lora.strength)} for lora in mode.loras])
        try:
            model.switch(new)
            parameters, device_bytes = _held(model, new)
        except BaseException as error:  # noqa: BLE001 - the author's to read
            traceback.print_exc(file=sys.stderr)
            self.channel.send(WorkerToDaemon.Failed(id=None, error=_error(mode.name, "switching to it", error)))
            return None
        self.channel.send(
            WorkerToDaemon.Switched(
                Loaded(
                    device=new.device,
                    load_ms=int((time.monotonic() - started) * 1000),
                    parameter_bytes=parameters,
                    device_bytes=device_bytes,
                    precision=new.precision,
                )
            )
        )
        return new

    def _read(self) -> None:
        """Sees Cancel, Unload and the socket closing while jobs run."""
        streamed = _Streamed()
        try:
            while True:
                message = self.channel.receive()
                if message is None:
                    # gpuctld is gone: nobody wants the result.
                    os._exit(0)
                if isinstance(message, DaemonToWorker.Tensor):
                    streamed.frame(message.value)
                elif isinstance(message, DaemonToWorker.Run):
                    streamed.fill(_job_tensors(message.job))
                    cancelled = threading.Event()
                    with self.lock:
                        self.cancels[message.id] = cancelled
                    self.jobs.put(_Queued(message.id, message.job, cancelled))
                elif isinstance(message, DaemonToWorker.Cancel):
                    with self.lock:
                        event = self.cancels.get(message.id)
                    if event is not None:
                        event.set()
                elif isinstance(message, DaemonToWorker.Switch):
                    self.jobs.put(_Switch(message.value))
                elif isinstance(message, DaemonToWorker.Unload):
                    self.jobs.put(None)
                    return
                else:
                    raise ProtocolError(f"unexpected message {message.name} after Load")
        except ProtocolError as error:
            sys.stderr.write(f"gpuctl.worker: {error}\n")
            os._exit(3)
        except OSError:
            os._exit(0)

    def _run(self, model: Model, spec: Spec, item: _Queued) -> None:
        started = time.monotonic()
        ctx = Context(item.id, self.channel.send, item.cancelled)
        try:
            if item.cancelled.is_set():
                raise Cancelled()
            job = self._job(item.id, item.job, spec)
            result = model.run(job, ctx)
            outputs = self._outputs(spec, result)
        except BaseException as error:  # noqa: BLE001 - reported, the worker goes on
            if isinstance(error, (Cancelled, KeyboardInterrupt)) or item.cancelled.is_set():
                failure = Error(ErrorCode.Cancelled, f"model {spec.name}: the request was cancelled")
            elif isinstance(error, _BadOutput):
                failure = Error(ErrorCode.Internal, f"model {spec.name}: {error}")
            else:
                traceback.print_exc(file=sys.stderr)
                failure = _error(spec.name, "running", error)
            self.channel.send(WorkerToDaemon.Failed(id=item.id, error=failure))
            return
        finally:
            with self.lock:
                self.cancels.pop(item.id, None)
        sent = []
        for output in outputs:
            if len(output.data) > CHUNK:
                self._stream(item.id, output)
                output = WireTensor(dtype=output.dtype, shape=output.shape, data=b"")
            sent.append(output)
        self.channel.send(
            WorkerToDaemon.Done(id=item.id, outputs=sent, run_ms=int((time.monotonic() - started) * 1000), notes=[])
        )

    def _stream(self, job: int, tensor: WireTensor) -> None:
        send = self.channel.send
        send(WorkerToDaemon.Tensor(id=job, frame=TensorFrame.Begin(dtype=tensor.dtype, shape=tensor.shape)))
        data = memoryview(tensor.data)
        for at in range(0, len(data), CHUNK):
            send(WorkerToDaemon.Tensor(id=job, frame=TensorFrame.Chunk(bytes(data[at:at + CHUNK]))))
        send(WorkerToDaemon.Tensor(id=job, frame=TensorFrame.End()))

    @staticmethod
    def _job(id: int, job: Any, spec: Spec) -> Job:
        if isinstance(job, messages.Job.Image):
            return Job(id=id, kind="image", images=_image_input(job.input, ImageLayout(job.layout)), tiling=job.tiling)
        if isinstance(job, messages.Job.Generate):
            g = job.value
            return Job(
                id=id, kind="generate", prompt=g.prompt, negative=g.negative, seed=int(g.seed), steps=int(g.steps),
                guidance=float(g.guidance), width=int(g.width), height=int(g.height), noise=_to_array(g.noise),
            )
        return Job(id=id, kind="tensor", inputs=[_to_array(t) for t in job.inputs])

    @staticmethod
    def _outputs(spec: Spec, result: Any) -> List[WireTensor]:
        try:
            if spec.kind in ("image", "generate"):
                return [_to_wire(_pixels(result, "run's result"), "run's result")]
            values = list(result) if isinstance(result, (list, tuple)) else [result]
            return [_to_wire(_numpy().ascontiguousarray(_as_numpy(v)), f"run's output {i}") for i, v in enumerate(values)]
        except (TypeError, ValueError) as error:
            raise _BadOutput(str(error)) from None
