"""What both clients share: turning Python arguments into requests, and
answers into results."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple, Type, TypeVar, Union

from . import errors, tensors
from ._core import Upload
from .messages import (
    DType,
    GenerateRequest,
    GenerateResponse,
    GenerateThenRequest,
    KeepAlive,
    ProgressEvent,
    ProtocolVersion,
    QueuedEvent,
    RequestGenerate,
    RequestGenerateThen,
    Response,
    ResponseGenerate,
    ResponseGenerateThen,
    StepReport,
    Variant,
    WireTensor,
)

try:  # Pillow is optional
    from PIL import Image as _PILImage
except ImportError:  # pragma: no cover - exercised on machines without Pillow
    _PILImage = None  # type: ignore[assignment]

try:
    import numpy as _np
except ImportError:  # pragma: no cover
    _np = None  # type: ignore[assignment]

V = TypeVar("V", bound=Variant)


def expect(response: Response, variant: Type[V]) -> V:
    """The answer as the variant that answers the request sent."""
    if not isinstance(response, variant):
        raise errors.MalformedFrame(f"gpuctld answered {response.name} to a {variant.NAME} request")
    return response


ProgressCallback = Callable[[ProgressEvent], Any]
QueuedCallback = Callable[[QueuedEvent], Any]
KeepAliveArg = Union[None, int, float, str, KeepAlive]
SizeArg = Union[int, str]


def default_socket() -> str:
    """The socket `gpuctl` would use: $GPUCTL_SOCKET, else a per-user
    daemon's socket if one exists, else the system daemon's."""
    env = os.environ.get("GPUCTL_SOCKET")
    if env:
        return env
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        user = os.path.join(runtime, "gpuctl", "gpuctld.sock")
        if os.path.exists(user):
            return user
    return "/run/gpuctl/gpuctld.sock"


def connect_hint(path: str, error: OSError) -> errors.ConnectError:
    if isinstance(error, PermissionError):
        return errors.ConnectError(
            f"cannot connect to gpuctld at {path}: permission denied; the socket's group decides who may "
            f"connect (daemon.socket_group): ask to be added to it"
        )
    return errors.ConnectError(
        f"cannot connect to gpuctld at {path}: {error.strerror or error}. Is gpuctld running? Start it with "
        f"`systemctl start gpuctld` or `gpuctld --socket {path}`, or point the client elsewhere with "
        f"gpuctl.Client(path) or GPUCTL_SOCKET"
    )


def refused(path: str, error: errors.GpuctlError) -> errors.GpuctlError:
    """A handshake the daemon refused, saying which daemon."""
    if isinstance(error, errors.Incompatible):
        return errors.Incompatible(
            f"gpuctld at {path} cannot talk to this client: {error.message}; use a gpuctl Python package "
            f"that matches the daemon (pip install the python/ folder of the same gpuctl release)",
            error.code,
        )
    return type(error)(f"gpuctld at {path} refused the connection: {error.message}", error.code)


_UNITS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def duration_ms(value: Union[int, float, str], what: str) -> int:
    """Seconds as a number, or gpuctl's durations: "500ms", "30s", "5m", "1h30m"."""
    if isinstance(value, bool):
        raise TypeError(f"{what}: expected seconds or a duration such as \"5m\", got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"{what}: {value} is negative")
        return int(round(value * 1000))
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)", value.strip())
    if not parts or "".join(n + u for n, u in parts) != value.strip().replace(" ", ""):
        raise ValueError(f"{what}: {value!r} is not a duration (\"500ms\", \"30s\", \"5m\", \"1h30m\") or seconds")
    return int(round(sum(float(n) * _UNITS[u] for n, u in parts)))


def keep_alive(value: KeepAliveArg) -> Optional[KeepAlive]:
    """As Ollama's keep_alive: seconds or a duration string; negative or
    "forever" keeps the model loaded; 0 unloads it once the request is done."""
    if value is None or isinstance(value, KeepAlive):
        return value
    if isinstance(value, str) and value.strip().lower() in ("forever", "-1", "inf"):
        return KeepAlive.Forever()
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
        return KeepAlive.Forever()
    return KeepAlive.Millis(duration_ms(value, "keep_alive"))


_SIZE_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "kib": 1024, "mib": 1024**2, "gib": 1024**3}


def size_bytes(value: SizeArg) -> int:
    """Bytes as a number, or "512MiB", "2GiB", "1.5GB"."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"size: {value} is negative")
        return value
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", value)
        if match and match.group(2).lower() in _SIZE_UNITS:
            return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
    raise ValueError(f"size: {value!r} is not a number of bytes or a size such as \"2GiB\"")


@dataclass
class ImageInput:
    """An `image=` argument as the request will carry it, and how to give the
    output back in the same kind."""

    upload: Upload
    kind: str  # "numpy", "pil" or "tensor"
    batched: bool  # the caller gave [N,H,W,3], not one image


def image_input(image: Any, peer: ProtocolVersion) -> ImageInput:
    rows = (peer.major, peer.minor) >= (1, 4)
    if isinstance(image, (bytes, bytearray, memoryview)):
        # An encoded file (PNG, JPEG, WebP…), e.g. a web upload's body.
        if _PILImage is None:
            raise RuntimeError("decoding an image file needs Pillow: pip install pillow")
        import io

        try:
            with _PILImage.open(io.BytesIO(image)) as opened:
                image = opened.convert("RGB")
        except OSError as error:
            raise ValueError(f"image: {len(image)} bytes that are not an image file Pillow can read: {error}") from None
    if isinstance(image, (str, os.PathLike)):
        if _PILImage is None:
            raise RuntimeError("reading an image file needs Pillow: pip install pillow")
        try:
            with _PILImage.open(image) as opened:
                image = opened.convert("RGB")
        except OSError as error:
            raise ValueError(f"image: cannot read {os.fspath(image)!r}: {error}") from None
    if _PILImage is not None and isinstance(image, _PILImage.Image):
        picture = image if image.mode == "RGB" else image.convert("RGB")
        width, height = picture.size
        if width == 0 or height == 0:
            raise ValueError(f"image: {width}x{height} has no pixels")
        if not rows:
            if _np is None:
                raise errors.Incompatible("this gpuctld (protocol before 1.4) takes planar images only: install numpy, or upgrade gpuctld")
            planar = image_input(_np.asarray(picture), peer)
            planar.kind = "pil"
            return planar
        shape: Tuple[int, ...] = (1, height, width, 3)
        return ImageInput(Upload(DType.U8, shape, _pil_bands(picture), height * width * 3), "pil", False)
    if tensors.is_numpy(image) or isinstance(image, tensors.Tensor):
        dtype, shape, view = tensors.to_wire(image, "image")
        if dtype not in (DType.U8, DType.F32):
            raise ValueError(f"image: {dtype.name.lower()} pixels; images are uint8 (0..255) or float32 (0..1)")
        if len(shape) == 3 and shape[2] == 3:
            batched, shape = False, (1,) + shape
        elif len(shape) == 4 and shape[3] == 3:
            batched = True
        else:
            raise ValueError(f"image: shape {list(shape)}; expected [H,W,3] or [N,H,W,3] (RGB, channels last)")
        if 0 in shape:
            raise ValueError(f"image: shape {list(shape)} has no pixels")
        kind = "numpy" if tensors.is_numpy(image) else "tensor"
        if not rows:
            if _np is None:
                raise errors.Incompatible("this gpuctld (protocol before 1.4) takes planar images only: install numpy, or upgrade gpuctld")
            array = _np.frombuffer(bytes(view), dtype=tensors.NUMPY[dtype]).reshape(shape)
            planes = _np.ascontiguousarray(array.transpose(0, 3, 1, 2))
            dtype, shape, view = tensors.to_wire(planes, "image")
        return ImageInput(Upload(dtype, shape, [view], len(view)), kind, batched)
    raise TypeError(
        f"image: expected a PIL image, a numpy array [H,W,3], a gpuctl.Tensor, a path or an encoded "
        f"image file's bytes, got {type(image).__name__}"
    )


def _pil_bands(picture: Any) -> Iterator[bytes]:
    """A PIL image's pixels in bands of rows of about one chunk, so that the
    whole image is never copied at once."""
    width, height = picture.size
    rows = max(1, tensors.CHUNK // (width * 3))
    for top in range(0, height, rows):
        yield picture.crop((0, top, width, min(height, top + rows))).tobytes()


def generate_request(
    model: str,
    image: Any,
    inputs: Optional[Sequence[Any]],
    prompt: Optional[str],
    negative: Optional[str],
    seed: Optional[int],
    steps: Optional[int],
    guidance: Optional[float],
    size: Union[None, str, Tuple[int, int]],
    keep_alive_arg: KeepAliveArg,
    timeout: Union[None, int, float, str],
    tile: Optional[int],
    overlap: Optional[int],
    peer: ProtocolVersion,
    then: Optional[Sequence[str]] = None,
) -> Tuple[Union[RequestGenerate, RequestGenerateThen], List[Upload], Optional[ImageInput]]:
    given = [name for name, value in (("image", image), ("inputs", inputs), ("prompt", prompt)) if value is not None]
    if len(given) > 1:
        raise ValueError(f"generate: give one of image=, inputs= or prompt=, not {' and '.join(given)}")
    request = GenerateRequest(
        model=model,
        prompt=prompt or "",
        negative=negative or "",
        seed=seed,
        steps=steps,
        guidance=guidance,
        size=_size(size),
        keep_alive=keep_alive(keep_alive_arg),
        timeout_ms=None if timeout is None else duration_ms(timeout, "timeout"),
        tile=tile,
        overlap=overlap,
    )
    uploads: List[Upload] = []
    taken: Optional[ImageInput] = None
    if image is not None:
        taken = image_input(image, peer)
        uploads.append(taken.upload)
        request.input = placeholder(taken.upload)
    for index, value in enumerate(inputs or []):
        dtype, shape, view = tensors.to_wire(value, f"inputs[{index}]")
        uploads.append(Upload(dtype, shape, [view], len(view)))
        request.inputs.append(placeholder(uploads[-1]))
    if then:
        if isinstance(then, str):
            raise TypeError("then= takes a list of model names, e.g. then=[\"realesrgan-x4\"]")
        if (peer.major, peer.minor) < (1, 6):
            raise ValueError(f"then= needs a gpuctld of protocol 1.6 or later; this one speaks {peer.major}.{peer.minor}")
        return RequestGenerateThen(GenerateThenRequest(request, list(then))), uploads, taken
    return RequestGenerate(request), uploads, taken


def generate_response(response: Response) -> Tuple[GenerateResponse, List[StepReport]]:
    """The `Generate` response, from a `Generate` or a `GenerateThen`, and
    the chain's steps (empty for a single request)."""
    if isinstance(response, ResponseGenerateThen):
        return response.value.response, list(response.value.steps)
    return expect(response, ResponseGenerate).value, []


def placeholder(upload: Upload) -> WireTensor:
    return WireTensor(upload.dtype, list(upload.shape), b"")


def _size(size: Union[None, str, Tuple[int, int]]) -> Optional[Tuple[int, int]]:
    if size is None:
        return None
    if isinstance(size, str):
        match = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", size)
        if not match:
            raise ValueError(f"size: {size!r}; expected \"WIDTHxHEIGHT\" or (width, height)")
        return int(match.group(1)), int(match.group(2))
    width, height = size
    return int(width), int(height)


@dataclass
class GenerateResult:
    """What a `generate` call gave back.

    `image` is the first output image in the kind the input was given (numpy
    in, numpy out; PIL or a path in, PIL out); for `generate` models a numpy
    array if numpy is installed, else a PIL image; None for `tensor` models.
    `outputs` holds every output as it came: numpy arrays (or `gpuctl.Tensor`
    without numpy), images as [N,H,W,3] uint8.
    """

    model: str
    device: str
    seed: Optional[int]
    queue_ms: int
    load_ms: Optional[int]
    run_ms: int
    notes: List[str]
    outputs: List[Any] = field(repr=False)
    image: Any = field(repr=False, default=None)
    #: With `then=`: every step of the chain (model, device, queue_ms,
    #: load_ms, run_ms, notes), the first included.
    steps: List[StepReport] = field(default_factory=list)

    def png(self) -> bytes:
        """`image` encoded as PNG (needs Pillow)."""
        picture = self.pil()
        import io

        out = io.BytesIO()
        picture.save(out, format="PNG")
        return out.getvalue()

    def pil(self) -> Any:
        """The first output image as a PIL image (needs Pillow)."""
        if _PILImage is None:
            raise RuntimeError("PIL images need Pillow: pip install pillow")
        if not self.outputs:
            raise ValueError("this result has no outputs")
        return _to_pil(self.outputs[0])

    def save(self, path: Union[str, "os.PathLike[str]"]) -> None:
        """Writes `image` to a file; the format follows the name (needs Pillow)."""
        self.pil().save(path)


def _to_pil(output: Any) -> Any:
    data: Any
    if isinstance(output, tensors.Tensor):
        dtype, shape, data = output.dtype, output.shape, output.data
    else:
        dtype, shape, data = (DType.U8 if output.dtype.itemsize == 1 else DType.F32), tuple(output.shape), output
    if dtype != DType.U8 or len(shape) != 4 or shape[3] != 3:
        raise ValueError(f"an output of shape {list(shape)} is not an RGB8 image [N,H,W,3]")
    if _PILImage is None:
        raise RuntimeError("PIL images need Pillow: pip install pillow")
    height, width = shape[1], shape[2]
    first: Any = data if shape[0] == 1 else memoryview(data).cast("B")[: height * width * 3]
    return _PILImage.frombuffer("RGB", (width, height), first, "raw", "RGB", 0, 1)


def generate_result(
    response: GenerateResponse, outputs: List[Any], given: Optional[ImageInput], generated: bool, steps: Sequence[StepReport] = ()
) -> GenerateResult:
    result = GenerateResult(
        model=response.model,
        device=response.device,
        seed=response.seed,
        queue_ms=response.queue_ms,
        load_ms=response.load_ms,
        run_ms=response.run_ms,
        notes=list(response.notes),
        outputs=outputs,
        steps=list(steps),
    )
    if not outputs or (given is None and not generated):
        return result  # a tensor model's outputs are raw
    first = outputs[0]
    shape = tuple(first.shape)
    if len(shape) != 4 or shape[3] != 3:
        return result
    kind = given.kind if given is not None else ("numpy" if tensors.has_numpy() else "pil" if _PILImage is not None else "tensor")
    if kind == "pil" and _PILImage is not None:
        result.image = _to_pil(first)
    elif kind == "numpy":
        result.image = first if given is not None and given.batched else first[0]
    else:
        result.image = _as_tensor(first, given is not None and given.batched)
    return result


def _as_tensor(output: Any, batched: bool) -> tensors.Tensor:
    if isinstance(output, tensors.Tensor):
        shape, data = output.shape, output.data
    else:
        shape, data = tuple(output.shape), memoryview(output.reshape(-1))
    return tensors.Tensor(DType.U8, shape if batched else shape[1:], data)
