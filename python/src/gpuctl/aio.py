"""The asyncio client: one connection shared by every coroutine that uses it."""
from __future__ import annotations

import asyncio
import os
import time
from typing import Any, AsyncIterator, Dict, List, Optional, Sequence, Tuple, Union

from . import errors
from ._core import Call, Core, Upload, fill_placeholders
from ._requests import (
    GenerateResult,
    KeepAliveArg,
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
from .messages import (
    EventNotice,
    EventProgress,
    EventQueued,
    LoadRequest,
    LoadResponse,
    ModelInfo,
    ModelsRequest,
    Notice,
    PingRequest,
    ProgressEvent,
    QueuedEvent,
    ReleaseRequest,
    ReloadRequest,
    ReloadResponse,
    Request,
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
StreamItem = Union[ProgressEvent, QueuedEvent, GenerateResult]


class _Protocol(asyncio.BufferedProtocol):
    """Feeds the core straight from the socket, into its own buffer."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.waiters: Dict[int, asyncio.Event] = {}
        self.handshake: asyncio.Event = asyncio.Event()
        self.transport: Optional[asyncio.Transport] = None
        self._writable: Optional[asyncio.Future[None]] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.core.read_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self.core.received(nbytes)
        self._wake()

    def eof_received(self) -> Optional[bool]:
        self.core.connection_lost()
        self._wake()
        return False

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.core.connection_lost(f"the connection to gpuctld ended: {exc}" if exc else "gpuctld closed the connection")
        self._wake()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def _wake(self) -> None:
        if self.core.welcome is not None or self.core.closed is not None:
            self.handshake.set()
        calls = self.core.calls
        for id, waiter in self.waiters.items():
            call = calls.get(id)
            if call is None or call.has_news():
                waiter.set()
        if self.core.closed is not None:
            for waiter in self.waiters.values():
                waiter.set()

    def pause_writing(self) -> None:
        if self._writable is None or self._writable.done():
            self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    async def drain(self) -> None:
        if self._writable is not None and not self._writable.done():
            await self._writable


class AsyncClient:
    """A connection to gpuctld for asyncio: ``async with gpuctl.AsyncClient() as client:``.

    Any number of coroutines may use it at once; a FastAPI app holds one for
    its lifetime. Cancelling a coroutine that waits for an answer cancels the
    request in the daemon. A connection the daemon closed while idle is made
    again on the next call.
    """

    def __init__(self, path: Optional[Path] = None, *, connect_timeout: float = 10.0, name: str = "gpuctl-python") -> None:
        self.path = os.fspath(path) if path is not None else default_socket()
        self.connect_timeout = connect_timeout
        self.name = name
        self._protocol: Optional[_Protocol] = None
        self._connecting: Optional[asyncio.Lock] = None

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.transport is not None:
            protocol.core.connection_lost("the client was closed")
            protocol._wake()
            protocol.transport.close()

    async def welcome(self) -> Welcome:
        protocol = await self._connection()
        assert protocol.core.welcome is not None
        return protocol.core.welcome

    async def _connection(self) -> _Protocol:
        protocol = self._protocol
        if protocol is not None and protocol.core.closed is None:
            return protocol
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            protocol = self._protocol
            if protocol is not None and protocol.core.closed is None:
                return protocol
            if protocol is not None and protocol.transport is not None:
                protocol.transport.close()
            self._protocol = await self._connect()
            return self._protocol

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        core = Core(self.name)
        try:
            transport, protocol = await asyncio.wait_for(
                loop.create_unix_connection(lambda: _Protocol(core), self.path), self.connect_timeout
            )
        except asyncio.TimeoutError:
            raise errors.Timeout(f"connecting to gpuctld at {self.path} took over {self.connect_timeout} s") from None
        except OSError as error:
            raise connect_hint(self.path, error) from None
        transport.write(core.hello())
        try:
            await asyncio.wait_for(protocol.handshake.wait(), self.connect_timeout)
        except asyncio.TimeoutError:
            transport.close()
            raise errors.Timeout(f"gpuctld at {self.path} did not answer the handshake within {self.connect_timeout} s") from None
        if core.closed is not None:
            transport.close()
            raise refused(self.path, core.closed)
        return protocol

    async def _start(
        self, request: Request, uploads: Sequence[Upload] = (), protocol: Optional[_Protocol] = None
    ) -> Tuple[Call, _Protocol]:
        protocol = protocol or await self._connection()
        call, frames = protocol.core.start(request, uploads)
        protocol.waiters[call.id] = asyncio.Event()
        try:
            for frame in frames:
                if protocol.transport is None or protocol.transport.is_closing():
                    raise protocol.core.closed or errors.ConnectionClosed("the connection to gpuctld closed")
                for part in frame:
                    protocol.transport.write(part)
                await protocol.drain()
        except BaseException:
            protocol.core.forget(call)
            protocol.waiters.pop(call.id, None)
            raise
        return call, protocol

    async def _next(self, call: Call, protocol: _Protocol) -> Optional[Any]:
        waiter = protocol.waiters[call.id]
        while True:
            if call.events:
                return call.events.popleft()
            if call.finished:
                return None
            waiter.clear()
            await waiter.wait()

    def _cancel(self, call: Call, protocol: _Protocol) -> None:
        protocol.waiters.pop(call.id, None)
        frame = protocol.core.cancel(call)
        if frame is not None and protocol.transport is not None and not protocol.transport.is_closing():
            protocol.transport.write(frame)

    def _finish(self, call: Call, protocol: _Protocol) -> Response:
        protocol.waiters.pop(call.id, None)
        if call.error is not None:
            raise call.error
        assert call.response is not None
        return call.response

    async def request(self, request: Request) -> Response:
        """Sends any request and waits for its answer (events are dropped)."""
        call, protocol = await self._start(request)
        try:
            while await self._next(call, protocol) is not None:
                pass
        except BaseException:
            self._cancel(call, protocol)
            raise
        return self._finish(call, protocol)

    async def ping(self) -> float:
        """Round trip to the daemon, in seconds."""
        started = time.perf_counter()
        await self.request(RequestPing(PingRequest()))
        return time.perf_counter() - started

    async def status(self) -> StatusResponse:
        return expect(await self.request(RequestStatus(StatusRequest())), ResponseStatus).value

    async def models(self) -> List[ModelInfo]:
        return expect(await self.request(RequestModels(ModelsRequest())), ResponseModels).value.models

    async def vram(self) -> VramResponse:
        return expect(await self.request(RequestVram(VramRequest())), ResponseVram).value

    async def reload(self) -> ReloadResponse:
        return expect(await self.request(RequestReload(ReloadRequest())), ResponseReload).value

    async def load(self, model: str, *, keep_alive: KeepAliveArg = None) -> LoadResponse:
        return expect(await self.request(RequestLoad(LoadRequest(model, parse_keep_alive(keep_alive)))), ResponseLoad).value

    async def unload(self, model: Optional[str] = None, *, force: bool = False) -> List[str]:
        return expect(await self.request(RequestUnload(UnloadRequest(model, force))), ResponseUnload).value.unloaded

    def reserve(
        self,
        size: SizeArg,
        *,
        device: Optional[int] = None,
        timeout: Union[int, float, str] = 60,
        ttl: Union[None, int, float, str] = None,
    ) -> "AsyncReservation":
        """``async with client.reserve("2GiB") as r:`` holds GPU memory for this
        process while the block runs (``await client.reserve(...)`` also works;
        then call ``await r.release()``)."""
        request = ReserveRequest(
            size_bytes(size), device, duration_ms(timeout, "timeout"), None if ttl is None else duration_ms(ttl, "ttl")
        )
        return AsyncReservation(self, request)

    async def release(self, reservation: int) -> int:
        return expect(await self.request(RequestRelease(ReleaseRequest(reservation))), ResponseRelease).value.bytes

    async def watch(self) -> AsyncIterator[Notice]:
        """``async for notice in client.watch():`` the daemon's notices as they happen."""
        call, protocol = await self._start(RequestWatch(WatchRequest()))
        try:
            while True:
                event = await self._next(call, protocol)
                if event is None:
                    self._finish(call, protocol)
                    return
                if isinstance(event, EventNotice):
                    yield event.value
        finally:
            self._cancel(call, protocol)

    async def generate(
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
    ) -> GenerateResult:
        """As `Client.generate`; cancelling the awaiting task cancels the job."""
        result: Optional[GenerateResult] = None
        async for item in self.stream_generate(
            model, image, inputs=inputs, prompt=prompt, negative=negative, seed=seed, steps=steps,
            guidance=guidance, size=size, keep_alive=keep_alive, timeout=timeout, tile=tile, overlap=overlap, then=then,
        ):
            if isinstance(item, GenerateResult):
                result = item
        assert result is not None
        return result

    async def stream_generate(
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
    ) -> AsyncIterator[StreamItem]:
        """``async for item in client.stream_generate(...)``: `ProgressEvent`s and
        `QueuedEvent`s as they come, then the `GenerateResult` last. Leaving
        the loop early cancels the job."""
        protocol = await self._connection()
        assert protocol.core.peer is not None
        request, uploads, given = generate_request(
            model, image, inputs, prompt, negative, seed, steps, guidance, size, keep_alive, timeout, tile, overlap,
            protocol.core.peer, then,
        )
        call, protocol = await self._start(request, uploads, protocol)
        try:
            while True:
                event = await self._next(call, protocol)
                if event is None:
                    break
                if isinstance(event, (EventProgress, EventQueued)):
                    yield event.value
            response, chain = generate_response(self._finish(call, protocol))
            outputs = fill_placeholders(response, call.streamed)
            yield generate_result(response, outputs, given, prompt is not None, chain)
        finally:
            self._cancel(call, protocol)


class AsyncReservation:
    """GPU memory held for this process (see `AsyncClient.reserve`)."""

    def __init__(self, client: AsyncClient, request: ReserveRequest) -> None:
        self.client = client
        self._request = request
        self.id: Optional[int] = None
        self.device: Optional[int] = None
        self.bytes: Optional[int] = None
        self.released = False

    async def _acquire(self) -> "AsyncReservation":
        granted: ReserveResponse = expect(await self.client.request(RequestReserve(self._request)), ResponseReserve).value
        self.id, self.device, self.bytes = granted.reservation, granted.device, granted.bytes
        return self

    def __await__(self) -> Any:
        return self._acquire().__await__()

    async def release(self) -> None:
        if self.id is not None and not self.released:
            self.released = True
            await self.client.release(self.id)

    async def __aenter__(self) -> "AsyncReservation":
        return await self._acquire()

    async def __aexit__(self, *exc: Any) -> None:
        await self.release()

    def __repr__(self) -> str:
        return f"AsyncReservation(id={self.id}, device={self.device}, bytes={self.bytes})"
