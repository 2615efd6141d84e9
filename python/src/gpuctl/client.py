"""The blocking client: one Unix socket, shared by every thread that uses it."""
from __future__ import annotations

import os
import select
import socket
import threading
import time
from typing import Any, Iterator, List, Optional, Sequence, Tuple, Union

from . import errors
from ._core import Call, Core, Upload
from ._requests import (
    GenerateResult,
    KeepAliveArg,
    ProgressCallback,
    QueuedCallback,
    SizeArg,
    connect_hint,
    default_socket,
    duration_ms,
    expect,
    refused,
    generate_request,
    generate_response,
    generate_result,
    keep_alive as parse_keep_alive,
    size_bytes,
)
from ._core import fill_placeholders
from .messages import (
    EventNotice,
    EventProgress,
    EventQueued,
    CancelRequest,
    LoadRequest,
    LoadResponse,
    ModelInfo,
    ModelsRequest,
    Notice,
    PingRequest,
    ReleaseRequest,
    ReloadRequest,
    ReloadResponse,
    Request,
    RequestCancel,
    RequestLoad,
    RequestModels,
    RequestPing,
    RequestRelease,
    RequestReload,
    RequestReserve,
    RequestStatus,
    RequestUnload,
    RequestVram,
    RequestWatch,
    ReserveRequest,
    ReserveResponse,
    Response,
    ResponseCancel,
    ResponseLoad,
    ResponseModels,
    ResponseRelease,
    ResponseReload,
    ResponseReserve,
    ResponseStatus,
    ResponseUnload,
    ResponseVram,
    StatusRequest,
    StatusResponse,
    UnloadRequest,
    VramRequest,
    VramResponse,
    WatchRequest,
    Welcome,
)

Path = Union[str, "os.PathLike[str]"]


class Client:
    """A connection to gpuctld, for threads.

    ``Client(path)`` connects on first use to ``path``, or to the socket
    ``gpuctl`` would use (``$GPUCTL_SOCKET``, the per-user daemon's, then
    ``/run/gpuctl/gpuctld.sock``). Any number of threads may call it at once:
    their requests share the connection and are answered in any order. A
    connection the daemon closed while idle is made again on the next call.
    """

    def __init__(self, path: Optional[Path] = None, *, connect_timeout: float = 10.0, name: str = "gpuctl-python") -> None:
        self.path = os.fspath(path) if path is not None else default_socket()
        self.connect_timeout = connect_timeout
        self.name = name
        self._cv = threading.Condition(threading.Lock())
        self._send_lock = threading.Lock()
        self._connect_lock = threading.Lock()
        self._sock: Optional[socket.socket] = None
        self._core: Optional[Core] = None
        self._reading = False

    # --- life cycle ----------------------------------------------------

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Closes the connection: reservations it holds end, calls in flight fail."""
        with self._cv:
            sock, self._sock = self._sock, None
            if self._core is not None:
                self._core.connection_lost("the client was closed")
            self._cv.notify_all()
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    @property
    def welcome(self) -> Welcome:
        """The daemon's `Welcome` (its version and capabilities); connects if needed."""
        core, _ = self._connection()
        assert core.welcome is not None
        return core.welcome

    def _connection(self) -> Tuple[Core, socket.socket]:
        with self._connect_lock:
            core, sock = self._core, self._sock
            if core is not None and sock is not None and core.closed is None:
                self._poll_idle(core, sock)
            if core is None or sock is None or core.closed is not None:
                core, sock = self._connect()
            return core, sock

    def _poll_idle(self, core: Core, sock: socket.socket) -> None:
        """With nothing in flight, notices that the daemon closed an idle
        connection (Closing(Timeout), or a restart) before a new request is
        sent into it."""
        with self._cv:
            if core.calls or self._reading:
                return
            try:
                readable, _, _ = select.select([sock], [], [], 0)
            except (OSError, ValueError):
                core.connection_lost()
                return
            if readable:
                try:
                    count = sock.recv_into(core.read_buffer(), 0, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    return
                except OSError:
                    count = 0
                if count == 0:
                    core.connection_lost()
                else:
                    core.received(count)

    def _connect(self) -> Tuple[Core, socket.socket]:
        old = self._sock
        if old is not None:
            old.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.connect_timeout)
        try:
            sock.connect(self.path)
        except OSError as error:
            sock.close()
            raise connect_hint(self.path, error) from None
        core = Core(self.name)
        try:
            sock.sendall(core.hello())
            deadline = time.monotonic() + self.connect_timeout
            while core.welcome is None and core.closed is None:
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                view = core.read_buffer()
                try:
                    count = sock.recv_into(view)
                finally:
                    view.release()
                if count == 0:
                    core.connection_lost(f"gpuctld at {self.path} closed the connection during the handshake")
                else:
                    core.received(count)
        except socket.timeout:
            sock.close()
            raise errors.Timeout(f"gpuctld at {self.path} did not answer the handshake within {self.connect_timeout} s") from None
        except OSError as error:
            sock.close()
            raise errors.ConnectionClosed(f"the connection to gpuctld at {self.path} failed during the handshake: {error}") from None
        if core.closed is not None:
            sock.close()
            raise refused(self.path, core.closed)
        sock.settimeout(None)
        with self._cv:
            self._sock, self._core = sock, core
        return core, sock

    # --- calls ----------------------------------------------------------

    def _start(
        self, request: Request, uploads: Sequence[Upload] = (), connection: Optional[Tuple[Core, socket.socket]] = None
    ) -> Tuple[Call, Core, socket.socket]:
        core, sock = connection or self._connection()
        with self._cv:
            call, frames = core.start(request, uploads)
        try:
            for frame in frames:
                with self._send_lock:
                    for part in frame:
                        sock.sendall(part)
        except BaseException as error:
            with self._cv:
                core.forget(call)
            if isinstance(error, OSError):
                raise errors.ConnectionClosed(f"sending to gpuctld at {self.path} failed: {error}") from None
            raise
        return call, core, sock

    def _next(self, call: Call, core: Core, sock: socket.socket) -> Optional[Any]:
        """The call's next event, or None once it is answered. One waiting
        thread at a time reads the socket for everyone."""
        while True:
            with self._cv:
                if call.events:
                    return call.events.popleft()
                if call.finished:
                    return None
                if self._reading:
                    self._cv.wait()
                    continue
                self._reading = True
            try:
                self._read_until_news(call, core, sock)
            finally:
                with self._cv:
                    self._reading = False
                    self._cv.notify_all()

    def _read_until_news(self, call: Call, core: Core, sock: socket.socket) -> None:
        while not call.has_news():
            view = core.read_buffer()
            try:
                count = sock.recv_into(view)
            except OSError as error:
                count, why = 0, f"reading from gpuctld at {self.path} failed: {error}"
            else:
                why = f"gpuctld at {self.path} closed the connection"
            finally:
                view.release()
            with self._cv:
                if count == 0:
                    core.connection_lost(why)
                else:
                    core.received(count)
                self._cv.notify_all()

    def _cancel(self, call: Call, core: Core, sock: socket.socket) -> None:
        with self._cv:
            frame = core.cancel(call)
        if frame is not None:
            try:
                with self._send_lock:
                    sock.sendall(frame)
            except OSError:
                pass

    def _finish(self, call: Call) -> Response:
        if call.error is not None:
            raise call.error
        assert call.response is not None
        return call.response

    def request(self, request: Request) -> Response:
        """Sends any request and waits for its answer (events are dropped)."""
        call, core, sock = self._start(request)
        try:
            while self._next(call, core, sock) is not None:
                pass
        except BaseException:
            self._cancel(call, core, sock)
            raise
        return self._finish(call)

    # --- requests ---------------------------------------------------------

    def ping(self) -> float:
        """Round trip to the daemon, in seconds."""
        started = time.perf_counter()
        self.request(RequestPing(PingRequest()))
        return time.perf_counter() - started

    def status(self) -> StatusResponse:
        return expect(self.request(RequestStatus(StatusRequest())), ResponseStatus).value

    def models(self) -> List[ModelInfo]:
        return expect(self.request(RequestModels(ModelsRequest())), ResponseModels).value.models

    def vram(self) -> VramResponse:
        return expect(self.request(RequestVram(VramRequest())), ResponseVram).value

    def reload(self) -> ReloadResponse:
        """Re-reads the daemon's config file (administrators only)."""
        return expect(self.request(RequestReload(ReloadRequest())), ResponseReload).value

    def load(self, model: str, *, keep_alive: KeepAliveArg = None) -> LoadResponse:
        """Loads `model` now (administrators only); `load_ms` is None when it was loaded."""
        return expect(self.request(RequestLoad(LoadRequest(model, parse_keep_alive(keep_alive)))), ResponseLoad).value

    def unload(self, model: Optional[str] = None, *, force: bool = False) -> List[str]:
        """Unloads `model`, or every model when None (administrators only); the names unloaded."""
        return expect(self.request(RequestUnload(UnloadRequest(model, force))), ResponseUnload).value.unloaded

    def reserve(
        self,
        size: SizeArg,
        *,
        device: Optional[int] = None,
        timeout: Union[int, float, str] = 60,
        ttl: Union[None, int, float, str] = None,
    ) -> "Reservation":
        """Reserves GPU memory for this process; idle models are unloaded to
        make room. Use as a context manager: the reservation is released when
        the block ends (or when this client closes)."""
        request = ReserveRequest(
            size_bytes(size), device, duration_ms(timeout, "timeout"), None if ttl is None else duration_ms(ttl, "ttl")
        )
        granted: ReserveResponse = expect(self.request(RequestReserve(request)), ResponseReserve).value
        return Reservation(self, granted)

    def release(self, reservation: int) -> int:
        """Ends a reservation made by this client; the bytes it held."""
        return expect(self.request(RequestRelease(ReleaseRequest(reservation))), ResponseRelease).value.bytes

    def watch(self) -> Iterator[Notice]:
        """The daemon's notices (loads, unloads, pressure, reservations,
        reloads) as they happen, until the iterator is closed."""
        call, core, sock = self._start(RequestWatch(WatchRequest()))
        try:
            while True:
                event = self._next(call, core, sock)
                if event is None:
                    self._finish(call)
                    return
                if isinstance(event, EventNotice):
                    yield event.value
        finally:
            self._cancel(call, core, sock)

    def generate(
        self,
        model: str,
        image: Any = None,
        *,
        inputs: Optional[Sequence[Any]] = None,
        prompt: Optional[str] = None,
        negative: Optional[str] = None,
        seed: Optional[int] = None,
        steps: Optional[int] = None,
        guidance: Optional[float] = None,
        size: Union[None, str, Tuple[int, int]] = None,
        keep_alive: KeepAliveArg = None,
        timeout: Union[None, int, float, str] = None,
        tile: Optional[int] = None,
        overlap: Optional[int] = None,
        then: Optional[Sequence[str]] = None,
        on_progress: Optional[ProgressCallback] = None,
        on_queued: Optional[QueuedCallback] = None,
    ) -> GenerateResult:
        """Runs `model`: `image=` for image models (a PIL image, a numpy uint8
        [H,W,3] or [N,H,W,3] array, or a path), `prompt=` and friends for
        generate models, `inputs=[arrays]` for tensor models. `timeout` (seconds
        or "5m") bounds the request in the daemon. Ctrl-C cancels the job."""
        job = self.start_generate(
            model, image, inputs=inputs, prompt=prompt, negative=negative, seed=seed, steps=steps,
            guidance=guidance, size=size, keep_alive=keep_alive, timeout=timeout, tile=tile, overlap=overlap, then=then,
        )
        return job.result(on_progress=on_progress, on_queued=on_queued)

    def start_generate(
        self,
        model: str,
        image: Any = None,
        *,
        inputs: Optional[Sequence[Any]] = None,
        prompt: Optional[str] = None,
        negative: Optional[str] = None,
        seed: Optional[int] = None,
        steps: Optional[int] = None,
        guidance: Optional[float] = None,
        size: Union[None, str, Tuple[int, int]] = None,
        keep_alive: KeepAliveArg = None,
        timeout: Union[None, int, float, str] = None,
        tile: Optional[int] = None,
        overlap: Optional[int] = None,
        then: Optional[Sequence[str]] = None,
    ) -> "GenerateJob":
        """Sends a generate request and returns at once: `job.result()` waits
        for it, `job.cancel()` (from any thread) stops it."""
        connection = self._connection()
        peer = connection[0].peer
        assert peer is not None
        request, uploads, given = generate_request(
            model, image, inputs, prompt, negative, seed, steps, guidance, size, keep_alive, timeout, tile, overlap, peer, then
        )
        call, core, sock = self._start(request, uploads, connection)
        return GenerateJob(self, call, core, sock, given, prompt is not None)

    def cancel(self, request_id: int) -> bool:
        """Asks the daemon to stop request `request_id` of this client; False
        when it had already finished. The request then fails with `gpuctl.Cancelled`."""
        return expect(self.request(RequestCancel(CancelRequest(request_id))), ResponseCancel).value.cancelled


class GenerateJob:
    """A generate request in flight (`Client.start_generate`)."""

    def __init__(self, client: Client, call: Call, core: Core, sock: socket.socket, given: Any, generated: bool) -> None:
        self.client = client
        self._call, self._core, self._sock = call, core, sock
        self._given, self._generated = given, generated

    @property
    def id(self) -> int:
        """The request's id on its connection."""
        return self._call.id

    def cancel(self) -> bool:
        """Stops the job in the daemon at its next batch; `result()` then
        raises `gpuctl.Cancelled`. False when it had already finished."""
        return self.client.cancel(self._call.id)

    def result(self, on_progress: Optional[ProgressCallback] = None, on_queued: Optional[QueuedCallback] = None) -> GenerateResult:
        """Waits for the answer, passing events to the callbacks on the way.
        Ctrl-C (or a callback's exception) cancels the job."""
        client, call, core, sock = self.client, self._call, self._core, self._sock
        try:
            while True:
                event = client._next(call, core, sock)
                if event is None:
                    break
                if isinstance(event, EventProgress) and on_progress is not None:
                    on_progress(event.value)
                elif isinstance(event, EventQueued) and on_queued is not None:
                    on_queued(event.value)
        except BaseException:
            client._cancel(call, core, sock)
            raise
        response, chain = generate_response(client._finish(call))
        outputs = fill_placeholders(response, call.streamed)
        return generate_result(response, outputs, self._given, self._generated, chain)


class Reservation:
    """GPU memory held for this process until `release()` or the end of the
    `with` block."""

    def __init__(self, client: Client, granted: ReserveResponse) -> None:
        self.client = client
        self.id = granted.reservation
        self.device = granted.device
        self.bytes = granted.bytes
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.client.release(self.id)

    def __enter__(self) -> "Reservation":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"Reservation(id={self.id}, device={self.device}, bytes={self.bytes})"
