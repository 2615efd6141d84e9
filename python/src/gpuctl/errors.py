"""One exception class per `ErrorCode`, under `GpuctlError`.

Catch `gpuctl.GpuctlError` for everything, or a class for one cause:
`except gpuctl.InsufficientVram: …`. Each has `.code` (an `ErrorCode`, or
None for failures on the client's side such as an unreachable socket) and
`.message` (the daemon's words).
"""
from __future__ import annotations

from typing import Dict, Optional, Type

from .messages import Error, ErrorCode


class GpuctlError(Exception):
    """Something gpuctld refused or could not do, or the connection to it failed."""

    code: Optional[ErrorCode] = None

    def __init__(self, message: str, code: Optional[ErrorCode] = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        if self.code is None:
            return self.message
        return f"{self.message} ({_snake(self.code.name)})"


class Internal(GpuctlError):
    """A bug or unexpected failure in the daemon."""

    code = ErrorCode.Internal


class InvalidRequest(GpuctlError):
    """The request makes no sense (wrong fields for the model's kind, a bad shape)."""

    code = ErrorCode.InvalidRequest


class NotFound(GpuctlError):
    """No such model or request."""

    code = ErrorCode.NotFound


class Unauthorized(GpuctlError):
    """The operation needs an administrator, or a reservation beyond your limit."""

    code = ErrorCode.Unauthorized


class Busy(GpuctlError):
    """Too many connections, or the daemon-wide upload budget is spent: try again."""

    code = ErrorCode.Busy


class QueueFull(GpuctlError):
    """The model's wait queue is full."""

    code = ErrorCode.QueueFull


class InsufficientVram(GpuctlError):
    """Not enough GPU memory came free in time."""

    code = ErrorCode.InsufficientVram


class Timeout(GpuctlError):
    """A time limit passed (the request's `timeout`, an idle connection, …)."""

    code = ErrorCode.Timeout


class Cancelled(GpuctlError):
    """The request was cancelled."""

    code = ErrorCode.Cancelled


class Incompatible(GpuctlError):
    """The daemon speaks another major version of the protocol."""

    code = ErrorCode.Incompatible


class InvalidConfig(GpuctlError):
    """A configuration file is invalid (e.g. on reload)."""

    code = ErrorCode.InvalidConfig


class ShuttingDown(GpuctlError):
    """The daemon is stopping."""

    code = ErrorCode.ShuttingDown


class FrameTooLarge(GpuctlError):
    """A frame over the daemon's `max_frame`."""

    code = ErrorCode.FrameTooLarge


class MalformedFrame(GpuctlError):
    """A frame that did not decode (on either side)."""

    code = ErrorCode.MalformedFrame


class TooLarge(GpuctlError):
    """A tensor, image or answer over a limit of the daemon (or of this client)."""

    code = ErrorCode.TooLarge


class LoadFailed(GpuctlError):
    """The model could not be loaded (missing or corrupt file, a broken contract)."""

    code = ErrorCode.LoadFailed


class RetryLater(LoadFailed):
    """The model failed and backs off: the message names the failure and when
    the next attempt is allowed (protocol 1.5; a `LoadFailed`, so code that
    catches that catches this too)."""

    code = ErrorCode.RetryLater


class ConnectError(GpuctlError):
    """Nothing answers at the socket: gpuctld is not running there."""


class ConnectionClosed(GpuctlError):
    """The connection ended before the answer came."""


BY_CODE: Dict[ErrorCode, Type[GpuctlError]] = {
    cls.code: cls
    for cls in (
        Internal, InvalidRequest, NotFound, Unauthorized, Busy, QueueFull, InsufficientVram, Timeout,
        Cancelled, Incompatible, InvalidConfig, ShuttingDown, FrameTooLarge, MalformedFrame, TooLarge,
        LoadFailed, RetryLater,
    )
}


def from_wire(error: Error) -> GpuctlError:
    """The exception for an `Error` the daemon sent."""
    cls = BY_CODE.get(error.code, GpuctlError)
    return cls(error.message, error.code)


def _snake(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() and i else c.lower() for i, c in enumerate(name))
