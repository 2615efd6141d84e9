"""gpuctl: a client for gpuctld, the daemon that shares one NVIDIA GPU
between models and the other programs that need it.

    import gpuctl
    with gpuctl.Client() as client:
        result = client.generate("upscale", image="photo.png")
        result.save("photo-x2.png")
"""
from ._requests import GenerateResult, default_socket
from .aio import AsyncClient, AsyncReservation
from .client import Client, Reservation
from .errors import (
    Busy,
    Cancelled,
    ConnectError,
    ConnectionClosed,
    FrameTooLarge,
    GpuctlError,
    Incompatible,
    InsufficientVram,
    Internal,
    InvalidConfig,
    InvalidRequest,
    LoadFailed,
    MalformedFrame,
    NotFound,
    QueueFull,
    RetryLater,
    ShuttingDown,
    Timeout,
    TooLarge,
    Unauthorized,
)
from .messages import (
    DType,
    ErrorCode,
    KeepAlive,
    ModelInfo,
    ModelKind,
    ModelState,
    ModelStatus,
    Notice,
    NoticeKind,
    ProgressEvent,
    QueuedEvent,
    StatusResponse,
    UnloadReason,
    VramResponse,
)
from .tensors import Tensor

__version__ = "0.1.0"

__all__ = [
    "AsyncClient", "AsyncReservation", "Busy", "Cancelled", "Client", "ConnectError", "ConnectionClosed", "DType",
    "ErrorCode", "FrameTooLarge", "GenerateResult", "GpuctlError", "Incompatible", "InsufficientVram", "Internal",
    "InvalidConfig", "InvalidRequest", "KeepAlive", "LoadFailed", "MalformedFrame", "ModelInfo", "ModelKind",
    "ModelState", "ModelStatus", "Notice", "NoticeKind", "NotFound", "ProgressEvent", "QueuedEvent", "QueueFull",
    "Reservation", "RetryLater", "ShuttingDown", "StatusResponse", "Tensor", "Timeout", "TooLarge", "Unauthorized",
    "UnloadReason", "VramResponse", "default_socket",
]
