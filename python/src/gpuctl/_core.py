"""The connection without I/O: bytes in, calls updated; calls out, bytes to
send. `Client` (threads, blocking sockets) and `AsyncClient` (asyncio) drive
the same core, as h11 and wsproto are driven."""
from __future__ import annotations

import collections
import struct
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from . import errors, tensors
from .codec import CODEC, LENGTH, DecodeError
from .messages import (
    CancelRequest,
    ClientMessage,
    ClientMessageHello,
    ClientMessageRequest,
    ClientMessageTensorBegin,
    DaemonMessage,
    DaemonMessageClosing,
    DaemonMessageError,
    DaemonMessageEvent,
    DaemonMessageResponse,
    DaemonMessageTensorBegin,
    DaemonMessageTensorEnd,
    DaemonMessageWelcome,
    DType,
    Event,
    GenerateResponse,
    Hello,
    ProtocolVersion,
    Request,
    RequestCancel,
    RequestGenerate,
    RequestGenerateThen,
    Response,
    ResponseGenerate,
    ResponseGenerateThen,
    Welcome,
    WireTensor,
)

# What this client speaks: 1.5 (pixel rows in, RetryLater).
PROTOCOL = ProtocolVersion(1, 6)

_U32 = struct.Struct("<I")
_CHUNK_HEADER = struct.Struct("<IQQ")  # variant, id, data length
_CLIENT_TENSOR_CHUNK, _CLIENT_TENSOR_END = 3, 4
_DAEMON_TENSOR_CHUNK = 6

# A frame as buffers written back to back (a header and a chunk's bytes,
# without joining them).
Frame = Tuple[Any, ...]
Allocator = Callable[[DType, Tuple[int, ...]], Tuple[Any, memoryview]]


@dataclass
class Upload:
    """A tensor a request carries: inline when small, streamed otherwise."""

    dtype: DType
    shape: Tuple[int, ...]
    parts: Iterable[Any]  # bytes-like pieces that concatenate to the tensor's bytes
    nbytes: int


class _Stream:
    """An output arriving in chunks, written straight into its destination."""

    __slots__ = ("dtype", "shape", "target", "view", "filled")

    def __init__(self, dtype: DType, shape: Tuple[int, ...], target: Any, view: memoryview) -> None:
        self.dtype = dtype
        self.shape = shape
        self.target = target
        self.view = view
        self.filled = 0


class Call:
    """One request in flight: its events as they come, then its answer."""

    def __init__(self, id: int, allocate: Allocator, max_output: int) -> None:
        self.id = id
        self.events: Deque[Event] = collections.deque()
        self.response: Optional[Response] = None
        self.error: Optional[errors.GpuctlError] = None
        # Outputs streamed ahead of the response, in order: (dtype, shape, target).
        self.streamed: List[Tuple[DType, Tuple[int, ...], Any]] = []
        self._stream: Optional[_Stream] = None
        self._allocate = allocate
        self._max_output = max_output
        self.streamed_bytes = 0

    @property
    def finished(self) -> bool:
        return self.response is not None or self.error is not None

    def has_news(self) -> bool:
        return bool(self.events) or self.finished

    def _fail(self, error: errors.GpuctlError) -> None:
        if not self.finished:
            self.error = error
        self._stream = None


def _placeholder_count(response: Response) -> int:
    outputs = (
        response.value.outputs if isinstance(response, ResponseGenerate)
        else response.value.response.outputs if isinstance(response, ResponseGenerateThen)
        else []
    )
    return sum(1 for t in outputs if not t.data and tensors.nbytes(t.dtype, t.shape) > 0)


class Core:
    """The state of one connection to gpuctld."""

    def __init__(self, client_name: str, *, max_frame: int = 64 << 20, max_output: int = 16 << 30) -> None:
        self.client_name = client_name
        self.max_frame = max_frame
        self.max_output = max_output
        self.welcome: Optional[Welcome] = None
        # Why the connection ended, once it has.
        self.closed: Optional[errors.GpuctlError] = None
        self.calls: Dict[int, Call] = {}
        self._next_id = 1
        self._buf = bytearray(4 << 20)
        self._start = 0
        self._end = 0
        self._need = 0  # the size of the frame being received, once its prefix is in

    # --- handshake ------------------------------------------------------

    def hello(self) -> bytes:
        payload = CODEC.encode("ClientMessage", ClientMessageHello(Hello(PROTOCOL, self.client_name)))
        return LENGTH.pack(len(payload)) + payload

    @property
    def peer(self) -> Optional[ProtocolVersion]:
        return self.welcome.protocol if self.welcome else None

    # --- receiving ------------------------------------------------------

    def read_buffer(self) -> memoryview:
        """Where the next bytes from the socket go (`recv_into`)."""
        free = len(self._buf) - self._end
        frame_end = self._start + self._need
        if free < 65536 or frame_end > len(self._buf):
            pending = self._end - self._start
            room = max(len(self._buf), self._need + 65536)
            if room > len(self._buf):
                # A new buffer, not a resize: views handed out earlier may
                # still be alive, and a bytearray with views cannot change size.
                grown = bytearray(room)
                grown[:pending] = self._buf[self._start : self._end]
                self._buf = grown
            elif self._start:
                self._buf[:pending] = self._buf[self._start : self._end]
            self._start, self._end = 0, pending
        return memoryview(self._buf)[self._end :]

    def received(self, count: int) -> None:
        """`count` bytes were written into the last read buffer."""
        self._end += count
        with memoryview(self._buf) as view:
            while self.closed is None:
                available = self._end - self._start
                if available < 4:
                    break
                (length,) = LENGTH.unpack_from(view, self._start)
                if length > self.max_frame:
                    self._close(errors.FrameTooLarge(f"gpuctld sent a frame of {length} bytes, over this client's limit of {self.max_frame}"))
                    break
                self._need = 4 + length
                if available < 4 + length:
                    break
                payload = view[self._start + 4 : self._start + 4 + length]
                try:
                    self._frame(payload)
                finally:
                    payload.release()
                self._start += 4 + length
                self._need = 0
        if self._start == self._end:
            self._start = self._end = 0

    def data_received(self, data: bytes) -> None:
        """Bytes from a source that does not read into our buffer."""
        offset = 0
        while offset < len(data):
            target = self.read_buffer()
            count = min(len(target), len(data) - offset)
            target[:count] = data[offset : offset + count]
            target.release()
            self.received(count)
            offset += count

    def connection_lost(self, why: str = "gpuctld closed the connection") -> None:
        if self.closed is None:
            self._close(errors.ConnectionClosed(why))

    def _close(self, error: errors.GpuctlError) -> None:
        self.closed = error
        for call in self.calls.values():
            call._fail(error)

    def _frame(self, payload: memoryview) -> None:
        # The bulk of large answers: straight into the destination, not
        # through the generic decoder.
        if len(payload) >= 20 and _U32.unpack_from(payload, 0)[0] == _DAEMON_TENSOR_CHUNK:
            _, id, size = _CHUNK_HEADER.unpack_from(payload, 0)
            if size != len(payload) - 20:
                self._close(errors.MalformedFrame(f"a tensor chunk says {size} bytes and carries {len(payload) - 20}"))
                return
            call = self.calls.get(id)
            if call is not None:
                self._chunk(call, payload[20:])
            return
        try:
            message: DaemonMessage = CODEC.decode("DaemonMessage", payload)
        except DecodeError as error:
            self._close(errors.MalformedFrame(f"gpuctld sent a frame this client cannot decode: {error}"))
            return
        if isinstance(message, DaemonMessageWelcome):
            if self.welcome is not None:
                self._close(errors.MalformedFrame("gpuctld sent a second Welcome"))
            elif message.value.protocol.major != PROTOCOL.major:
                version = message.value.protocol
                self._close(errors.Incompatible(
                    f"gpuctld speaks protocol {version.major}.{version.minor}, this client {PROTOCOL.major}.{PROTOCOL.minor}"
                ))
            else:
                self.welcome = message.value
            return
        if isinstance(message, DaemonMessageClosing):
            self._close(errors.from_wire(message.value))
            return
        call = self.calls.get(getattr(message, "id", 0))
        if call is None:
            return  # an answer for a call given up on (cancelled, timed out)
        if isinstance(message, DaemonMessageEvent):
            call.events.append(message.event)
        elif isinstance(message, DaemonMessageResponse):
            self._respond(call, message.response)
        elif isinstance(message, DaemonMessageError):
            call._fail(errors.from_wire(message.error))
            del self.calls[call.id]
        elif isinstance(message, DaemonMessageTensorBegin):
            self._begin(call, message.dtype, tuple(message.shape))
        elif isinstance(message, DaemonMessageTensorEnd):
            stream = call._stream
            if stream is None:
                self._drop(call, errors.MalformedFrame("gpuctld ended a tensor stream it had not begun"))
            elif stream.filled != len(stream.view):
                self._drop(call, errors.MalformedFrame(f"a streamed output ended after {stream.filled} of {len(stream.view)} bytes"))
            else:
                stream.view.release()
                call.streamed.append((stream.dtype, stream.shape, stream.target))
                call._stream = None

    def _drop(self, call: Call, error: errors.GpuctlError) -> None:
        call._fail(error)
        self.calls.pop(call.id, None)

    def _begin(self, call: Call, dtype: DType, shape: Tuple[int, ...]) -> None:
        if call._stream is not None:
            self._drop(call, errors.MalformedFrame("gpuctld began a tensor stream inside another"))
            return
        size = tensors.nbytes(dtype, shape)
        if call.streamed_bytes + size > call._max_output:
            self._drop(call, errors.TooLarge(
                f"an output of shape {list(shape)} ({size} bytes) is over this client's max_output of {call._max_output} bytes"
            ))
            return
        try:
            target, view = call._allocate(dtype, shape)
        except MemoryError:
            self._drop(call, errors.TooLarge(f"no memory for an output of shape {list(shape)} ({size} bytes)"))
            return
        call.streamed_bytes += size
        call._stream = _Stream(dtype, shape, target, view)

    def _chunk(self, call: Call, data: memoryview) -> None:
        stream = call._stream
        if stream is None:
            self._drop(call, errors.MalformedFrame("gpuctld sent a tensor chunk outside a stream"))
            return
        end = stream.filled + len(data)
        if end > len(stream.view):
            self._drop(call, errors.MalformedFrame(f"a streamed output overflows its shape {list(stream.shape)}"))
            return
        stream.view[stream.filled : end] = data
        stream.filled = end

    def _respond(self, call: Call, response: Response) -> None:
        del self.calls[call.id]
        if call._stream is not None:
            call._fail(errors.MalformedFrame("gpuctld answered while an output was still streaming"))
            return
        wanted = _placeholder_count(response)
        if wanted != len(call.streamed):
            call._fail(errors.MalformedFrame(f"{len(call.streamed)} outputs streamed for {wanted} placeholders"))
            return
        call.response = response

    # --- sending ------------------------------------------------------

    def start(self, request: Request, uploads: Sequence[Upload] = (), allocate: Allocator = tensors.allocate) -> Tuple[Call, Iterator[Frame]]:
        """A new call, and the frames that make it (streamed tensors first).
        `uploads` fill the request's placeholders in order: a
        `GenerateRequest`'s `input`, then its `inputs`."""
        if self.closed is not None:
            raise self.closed
        id = self._next_id
        self._next_id += 1
        call = Call(id, allocate, self.max_output)
        self.calls[id] = call
        return call, self._frames(id, request, uploads)

    def _frames(self, id: int, request: Request, uploads: Sequence[Upload]) -> Iterator[Frame]:
        wires: List[WireTensor] = []
        for upload in uploads:
            if upload.nbytes <= tensors.CHUNK:
                data = b"".join(bytes(part) for part in upload.parts)
                wires.append(WireTensor(upload.dtype, list(upload.shape), data))
                continue
            wires.append(WireTensor(upload.dtype, list(upload.shape), b""))
            begin = bytearray()
            CODEC.encode_into("ClientMessage", ClientMessageTensorBegin(id, upload.dtype, list(upload.shape)), begin)
            yield (LENGTH.pack(len(begin)) + begin,)
            sent = 0
            for part in upload.parts:
                view = memoryview(part).cast("B")
                for start in range(0, len(view), tensors.CHUNK):
                    piece = view[start : start + tensors.CHUNK]
                    sent += len(piece)
                    yield (LENGTH.pack(20 + len(piece)) + _CHUNK_HEADER.pack(_CLIENT_TENSOR_CHUNK, id, len(piece)), piece)
            if sent != upload.nbytes:
                raise ValueError(f"an input of shape {list(upload.shape)} gave {sent} bytes, not {upload.nbytes}")
            end = _U32.pack(_CLIENT_TENSOR_END) + struct.pack("<Q", id)
            yield (LENGTH.pack(len(end)) + end,)
        if wires:
            assert isinstance(request, (RequestGenerate, RequestGenerateThen)), "only generate requests carry tensors"
            generate = request.value if isinstance(request, RequestGenerate) else request.value.request
            if generate.input is not None:
                generate.input = wires.pop(0)
            generate.inputs = wires + generate.inputs[len(wires):]
        yield (self._encode(ClientMessageRequest(id, request)),)

    def cancel(self, call: Call) -> Optional[bytes]:
        """Gives up on `call`: the frame asking the daemon to stop it (None
        when it has already finished); later frames for it are dropped."""
        if self.calls.pop(call.id, None) is None or self.closed is not None:
            return None
        call._fail(errors.Cancelled("cancelled by the client", None))
        id = self._next_id
        self._next_id += 1
        # Nobody waits for the Cancel's answer: no call is registered for it.
        return self._encode(ClientMessageRequest(id, RequestCancel(CancelRequest(call.id))))

    def forget(self, call: Call) -> None:
        self.calls.pop(call.id, None)

    @staticmethod
    def _encode(message: ClientMessage) -> bytes:
        out = bytearray(4)
        CODEC.encode_into("ClientMessage", message, out)
        LENGTH.pack_into(out, 0, len(out) - 4)
        return bytes(out)


def fill_placeholders(response: GenerateResponse, streamed: List[Tuple[DType, Tuple[int, ...], Any]]) -> List[Any]:
    """The response's outputs as arrays (or `Tensor`s): inline ones copied
    out of the frame, streamed ones as they were filled."""
    outputs: List[Any] = []
    pending = iter(streamed)
    for wire in response.outputs:
        shape = tuple(int(d) for d in wire.shape)
        if not wire.data and tensors.nbytes(wire.dtype, shape) > 0:
            outputs.append(next(pending)[2])
            continue
        if len(wire.data) != tensors.nbytes(wire.dtype, shape):
            raise errors.MalformedFrame(f"an output of shape {list(shape)} carries {len(wire.data)} bytes")
        target, view = tensors.allocate(wire.dtype, shape)
        view[:] = wire.data
        outputs.append(target)
    return outputs
