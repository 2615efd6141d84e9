"""Each error class, raised for what a real gpuctld refuses."""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import time
from typing import Iterator

import numpy as np
import pytest
from conftest import MODELS_TOML, Daemon, wait_until

import gpuctl
from gpuctl.codec import CODEC
from gpuctl.messages import DaemonMessageWelcome, ProtocolVersion, Welcome

LIMITS = """
[daemon]
max_upload = "4MiB"
idle_timeout = "1s"
max_connections = 3
admin_connections = 1
shutdown_grace = "300ms"

[policy]
queue_max = 1
keep_alive = "forever"
"""

HUGE = """
[models.huge]
path = "tiny-tensor.pt"
kind = "tensor"
vram = "2GiB"
"""


@pytest.fixture(scope="module")
def limited() -> Iterator[Daemon]:
    d = Daemon(LIMITS, gpu='load_wait = "1s"', models=MODELS_TOML + HUGE)
    yield d
    d.stop()


@pytest.fixture()
def client(limited: Daemon) -> Iterator[gpuctl.Client]:
    with gpuctl.Client(limited.path) as c:
        yield c


def slow_image() -> np.ndarray:
    return np.zeros((1024, 1024, 3), np.uint8)


def test_not_found_invalid_request_load_failed(client: gpuctl.Client) -> None:
    with pytest.raises(gpuctl.NotFound, match="nope"):
        client.generate("nope", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(gpuctl.InvalidRequest):
        client.generate("up", prompt="a cat")
    with pytest.raises(ValueError, match=r"\[H,W,3\]"):
        client.generate("up", np.zeros((4, 4), np.uint8))
    with pytest.raises(gpuctl.LoadFailed, match="no-such-model.pt") as raised:
        client.generate("broken", np.zeros((4, 4, 3), np.uint8))
    assert raised.value.code == gpuctl.ErrorCode.LoadFailed
    assert isinstance(raised.value, gpuctl.GpuctlError)
    # While it backs off, a distinct code: still a LoadFailed to code that catches that.
    with pytest.raises(gpuctl.RetryLater, match="next attempt is allowed in") as again:
        client.generate("broken", np.zeros((4, 4, 3), np.uint8))
    assert again.value.code == gpuctl.ErrorCode.RetryLater
    assert isinstance(again.value, gpuctl.LoadFailed)


def test_too_large_and_insufficient_vram(client: gpuctl.Client) -> None:
    with pytest.raises(gpuctl.TooLarge, match="max_upload"):
        client.generate("up", np.zeros((1200, 1200, 3), np.uint8))
    started = time.monotonic()
    with pytest.raises(gpuctl.InsufficientVram):
        client.generate("huge", inputs=[np.ones(2, np.float32), np.ones(2, np.float32)])
    assert time.monotonic() - started >= 0.9  # it waited load_wait
    assert client.ping() > 0  # the connection goes on


def test_queue_full_timeout_and_cancelled(client: gpuctl.Client) -> None:
    job = client.start_generate("x4", slow_image(), tile=128, overlap=8)
    wait_until("the job to run", lambda: {m.name: m for m in client.status().models}["x4"].in_flight == 1, 60)
    with pytest.raises(gpuctl.QueueFull):
        client.generate("x4", np.zeros((4, 4, 3), np.uint8))
    assert job.cancel()
    with pytest.raises(gpuctl.Cancelled):
        job.result()
    wait_until("the job to stop", lambda: {m.name: m for m in client.status().models}["x4"].in_flight == 0)
    with pytest.raises(gpuctl.Timeout):
        client.generate("x4", slow_image(), tile=128, overlap=8, timeout=0.3)


def test_unauthorized_release_of_another_connections_reservation(limited: Daemon) -> None:
    with gpuctl.Client(limited.path) as owner, gpuctl.Client(limited.path) as other:
        with owner.reserve("16MiB") as reservation:
            with pytest.raises(gpuctl.Unauthorized):
                other.release(reservation.id)


def test_invalid_config_on_reload(client: gpuctl.Client, limited: Daemon) -> None:
    good = limited.config.read_text()
    try:
        limited.config.write_text(good + "\nthis is not toml [\n")
        with pytest.raises(gpuctl.InvalidConfig):
            client.reload()
    finally:
        limited.config.write_text(good)
    assert client.reload().generation >= 1


def test_busy_when_connections_run_out(limited: Daemon) -> None:
    held = [gpuctl.Client(limited.path) for _ in range(3)]
    try:
        for c in held:
            c.ping()
        with pytest.raises(gpuctl.Busy, match="connections"):
            gpuctl.Client(limited.path).ping()
    finally:
        for c in held:
            c.close()
        # The daemon counts a connection until it has seen it close: the
        # next test must not find the slots still taken.
        wait_until("the held connections to be let go", lambda: alone(limited.path))


def alone(path: str) -> bool:
    """Whether a new connection is the only one the daemon counts."""
    try:
        with gpuctl.Client(path) as probe:
            return probe.status().connections <= 1
    except gpuctl.Busy:
        return False


def test_an_idle_connection_closed_by_the_daemon_is_made_again(client: gpuctl.Client) -> None:
    client.ping()
    first = client.status().connections
    time.sleep(1.6)  # idle_timeout = 1s
    assert client.ping() > 0
    assert client.status().connections == first


def test_an_idle_async_connection_closed_by_the_daemon_is_made_again(limited: Daemon) -> None:
    async def main() -> None:
        async with gpuctl.AsyncClient(limited.path) as client:
            await client.ping()
            await asyncio.sleep(1.6)  # idle_timeout = 1s
            assert await client.ping() > 0
            assert (await client.generate("ten", inputs=[np.ones(2, np.float32)] * 2)).outputs[0].tolist() == [3.0, 3.0]

    asyncio.run(main())


def test_default_socket_as_gpuctl_finds_it(monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("GPUCTL_SOCKET", "/somewhere/else.sock")
    assert gpuctl.default_socket() == "/somewhere/else.sock"
    assert gpuctl.Client().path == "/somewhere/else.sock"
    monkeypatch.delenv("GPUCTL_SOCKET")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert gpuctl.default_socket() == "/run/gpuctl/gpuctld.sock"  # no per-user daemon
    (tmp_path / "gpuctl").mkdir()
    (tmp_path / "gpuctl" / "gpuctld.sock").touch()
    assert gpuctl.default_socket() == str(tmp_path / "gpuctl" / "gpuctld.sock")
    assert gpuctl.AsyncClient().path == str(tmp_path / "gpuctl" / "gpuctld.sock")


def test_connect_error_names_the_socket_and_how_to_start_gpuctld(tmp_path) -> None:  # type: ignore[no-untyped-def]
    missing = tmp_path / "nothing.sock"
    with pytest.raises(gpuctl.ConnectError) as raised:
        gpuctl.Client(missing).ping()
    assert str(missing) in str(raised.value) and "gpuctld --socket" in str(raised.value)
    assert raised.value.code is None


def test_incompatible_daemon(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = str(tmp_path / "future.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(1)

    def serve() -> None:
        conn, _ = server.accept()
        conn.recv(1024)
        payload = CODEC.encode("DaemonMessage", DaemonMessageWelcome(Welcome(ProtocolVersion(2, 0), "9.0.0", [])))
        conn.sendall(len(payload).to_bytes(4, "big") + payload)
        conn.close()

    thread = threading.Thread(target=serve)
    thread.start()
    with pytest.raises(gpuctl.Incompatible, match="2.0") as raised:
        gpuctl.Client(path).ping()
    assert path in str(raised.value)
    thread.join(5)
    server.close()


def test_shutting_down_fails_the_requests_that_did_not_finish() -> None:
    d = Daemon(LIMITS)
    try:
        with gpuctl.Client(d.path) as client:
            job = client.start_generate("x4", slow_image(), tile=128, overlap=8)
            wait_until("the job to run", lambda: {m.name: m for m in client.status().models}["x4"].in_flight == 1, 60)
            os.kill(d.process.pid, signal.SIGTERM)
            with pytest.raises(gpuctl.ShuttingDown):
                job.result()
    finally:
        d.stop()
