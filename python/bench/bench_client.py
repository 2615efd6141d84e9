#!/usr/bin/env python3
"""The Python client's overhead, measured against the Rust client in one run.

1. Warm round trips through a real gpuctld (release build), one call at a
   time on one connection: `ping` and a 64x64 `image` request through the
   identity model, Rust client (tests/benches/roundtrip.rs) and Python client
   (sync and asyncio) in interleaved rounds; medians of the rounds' p50s.
   Target: Python adds at most 100 µs per ping.
2. Streaming: a 2048x2048 RGB8 image up and down through the client against
   a stand-in daemon that answers with canned frames as fast as the kernel
   takes them (so that the client, not a model, is measured). Target: ≥ 1 GB/s.
3. For context: the same 2048² image through the real gpuctld's identity
   model, Rust vs Python.

Run by scripts/bench-python, which builds what it needs; or directly:
`bench_client.py --bin-dir target/release --roundtrip PATH --models target/models`.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import numpy as np  # noqa: E402

import gpuctl  # noqa: E402
from gpuctl.codec import CODEC, LENGTH  # noqa: E402
from gpuctl.messages import (  # noqa: E402
    DaemonMessageResponse,
    DaemonMessageTensorBegin,
    DaemonMessageTensorEnd,
    DaemonMessageWelcome,
    DType,
    GenerateResponse,
    ProtocolVersion,
    ResponseGenerate,
    Welcome,
    WireTensor,
)

CONFIG = """model_root = "{models}"
[gpu]
backend = "none"
[policy]
keep_alive = "forever"
[models.view]
path = "tiny-view.pt"
kind = "image"
"""


def start_daemon(bin_dir: pathlib.Path, config_text: str, where: pathlib.Path) -> subprocess.Popen:  # type: ignore[type-arg]
    """gpuctld (release build) on `config_text`, with its socket, state and
    log in `where`, once it accepts connections."""
    config = where / "gpuctld.toml"
    config.write_text(config_text)
    sock = where / "gpuctld.sock"
    env = dict(os.environ, STATE_DIRECTORY=str(where / "state"), RUST_LOG="warn")
    env.pop("GPUCTL_SOCKET", None)
    process = subprocess.Popen(
        [str(bin_dir / "gpuctld"), "--config", str(config), "--socket", str(sock)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=open(where / "gpuctld.log", "wb"), env=env,
    )
    for _ in range(500):
        try:
            with socket.socket(socket.AF_UNIX) as probe:
                probe.connect(str(sock))
            return process
        except OSError:
            time.sleep(0.02)
    raise SystemExit(f"gpuctld did not start: {(where / 'gpuctld.log').read_text()}")


def percentile(values: List[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def python_times(call: Callable[[], Any], count: int, warmup: int = 50) -> Dict[str, float]:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(count):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1e6)
    return {"p50_us": percentile(times, 0.5), "p99_us": percentile(times, 0.99), "mean_us": statistics.fmean(times)}


def async_times(path: str, count: int) -> Dict[str, float]:
    async def main() -> Dict[str, float]:
        async with gpuctl.AsyncClient(path) as client:
            for _ in range(50):
                await client.ping()
            times = []
            for _ in range(count):
                started = time.perf_counter()
                await client.ping()
                times.append((time.perf_counter() - started) * 1e6)
            return {"p50_us": percentile(times, 0.5), "p99_us": percentile(times, 0.99), "mean_us": statistics.fmean(times)}

    return asyncio.run(main())


def rust_times(roundtrip: str, sock: str, args: List[str]) -> Dict[str, float]:
    run = subprocess.run([roundtrip, sock, *args], capture_output=True, text=True, timeout=600)
    if run.returncode != 0:
        raise SystemExit(f"roundtrip {args} failed: {run.stderr}")
    return json.loads(run.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


# --- the stand-in daemon for streaming ------------------------------------------


def frame(message: Any) -> bytes:
    payload = CODEC.encode("DaemonMessage", message)
    return LENGTH.pack(len(payload)) + payload


def serve_canned(listener: socket.socket, side: int) -> None:
    """Answers every request with a streamed [1,side,side,3] output, reading
    and dropping whatever the client streams up."""
    conn, _ = listener.accept()
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    welcome = frame(DaemonMessageWelcome(Welcome(ProtocolVersion(1, 4), "stand-in", ["generate"])))
    pixels = bytes(side * side * 3)
    buf = bytearray(64 << 20)
    view = memoryview(buf)

    def read_exactly(count: int) -> memoryview:
        got = 0
        while got < count:
            n = conn.recv_into(view[got:count], count - got, socket.MSG_WAITALL)
            if n == 0:
                raise EOFError
            got += n
        return view[:count]

    def read_frame() -> bytes:
        (length,) = LENGTH.unpack(read_exactly(4))
        # Only the first 12 bytes (variant, request id) matter here.
        return bytes(read_exactly(length)[:12])

    try:
        read_frame()  # Hello
        conn.sendall(welcome)
        while True:
            payload = read_frame()
            variant = int.from_bytes(payload[:4], "little")
            if variant != 1:
                continue  # an upload frame: dropped
            request_id = int.from_bytes(payload[4:12], "little")
            conn.sendall(frame(DaemonMessageTensorBegin(request_id, DType.U8, [1, side, side, 3])))
            for start in range(0, len(pixels), 1 << 20):
                piece = pixels[start : start + (1 << 20)]
                conn.sendall(LENGTH.pack(20 + len(piece)) + (6).to_bytes(4, "little") + request_id.to_bytes(8, "little") + len(piece).to_bytes(8, "little"))
                conn.sendall(piece)
            conn.sendall(frame(DaemonMessageTensorEnd(request_id)))
            placeholder = WireTensor(DType.U8, [1, side, side, 3], b"")
            conn.sendall(frame(DaemonMessageResponse(request_id, ResponseGenerate(GenerateResponse("m", "cpu", None, [placeholder], 0, None, 0, [])))))
    except (EOFError, OSError):
        pass
    finally:
        conn.close()


def streaming(side: int, count: int) -> Dict[str, float]:
    with tempfile.TemporaryDirectory() as where:
        path = os.path.join(where, "stand-in.sock")
        # A separate process, so that the stand-in does not share our GIL.
        child = subprocess.Popen(
            [sys.executable, __file__, "--serve-canned", path, str(side)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE
        )
        assert child.stdout is not None
        child.stdout.readline()  # "listening"
        try:
            image = np.frombuffer(np.random.default_rng(0).bytes(side * side * 3), np.uint8).reshape(side, side, 3)
            with gpuctl.Client(path) as client:
                for _ in range(3):
                    client.generate("m", image)
                times = []
                for _ in range(count):
                    started = time.perf_counter()
                    result = client.generate("m", image)
                    times.append(time.perf_counter() - started)
                    assert result.image.shape == (side, side, 3)
        finally:
            child.wait(10)
    moved = 2 * side * side * 3  # up and down
    best = min(times)
    median = statistics.median(times)
    return {"median_ms": median * 1e3, "best_ms": best * 1e3, "gb_per_s": moved / median / 1e9}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bin-dir", type=pathlib.Path, required=True)
    parser.add_argument("--roundtrip", required=True)
    parser.add_argument("--models", type=pathlib.Path, required=True)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--pings", type=int, default=2000)
    parser.add_argument("--images", type=int, default=300)
    args = parser.parse_args()

    print(f"python {sys.version.split()[0]}, numpy {np.__version__}, {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory(prefix="gpuctl-bench-") as where:
        daemon = start_daemon(args.bin_dir, CONFIG.format(models=args.models), pathlib.Path(where))
        sock = os.path.join(where, "gpuctld.sock")
        rounds: Dict[str, List[float]] = {k: [] for k in ("rust_ping", "py_ping", "aio_ping", "rust_image", "py_image", "rust_2048", "py_2048")}
        try:
            small = np.full((64, 64, 3), 128, np.uint8)
            large = np.full((2048, 2048, 3), 128, np.uint8)
            with gpuctl.Client(sock) as client:
                client.generate("view", small)  # load the model
                for _ in range(args.rounds):
                    rounds["rust_ping"].append(rust_times(args.roundtrip, sock, ["ping", str(args.pings)])["p50_us"])
                    rounds["py_ping"].append(python_times(client.ping, args.pings)["p50_us"])
                    rounds["aio_ping"].append(async_times(sock, args.pings)["p50_us"])
                    rounds["rust_image"].append(rust_times(args.roundtrip, sock, ["image", str(args.images), "view", "64"])["p50_us"])
                    rounds["py_image"].append(python_times(lambda: client.generate("view", small), args.images)["p50_us"])
                    rounds["rust_2048"].append(rust_times(args.roundtrip, sock, ["image", "5", "view", "2048"])["p50_us"])
                    rounds["py_2048"].append(python_times(lambda: client.generate("view", large), 5, warmup=1)["p50_us"])
        finally:
            daemon.terminate()
            daemon.wait(10)
    med = {k: statistics.median(v) for k, v in rounds.items()}
    print(f"\nwarm round trips through gpuctld, one connection, medians of {args.rounds} interleaved rounds' p50:")
    print(f"  ping          rust {med['rust_ping']:8.1f} µs   python {med['py_ping']:8.1f} µs (asyncio {med['aio_ping']:.1f})   python adds {med['py_ping'] - med['rust_ping']:6.1f} µs (target ≤ 100), ratio {med['py_ping'] / med['rust_ping']:.2f}")
    print(f"  image 64²     rust {med['rust_image']:8.1f} µs   python {med['py_image']:8.1f} µs   python adds {med['py_image'] - med['rust_image']:6.1f} µs, ratio {med['py_image'] / med['rust_image']:.2f}")
    print(f"  image 2048²   rust {med['rust_2048'] / 1e3:8.1f} ms   python {med['py_2048'] / 1e3:8.1f} ms   ratio {med['py_2048'] / med['rust_2048']:.2f}")
    stream = streaming(2048, 20)
    print("\nstreaming 2048² RGB8 (12 MiB) up and down against a stand-in daemon, 20 calls:")
    print(f"  median {stream['median_ms']:.1f} ms per call, {stream['gb_per_s']:.2f} GB/s through the client (target ≥ 1)")
    ok = med["py_ping"] - med["rust_ping"] <= 100 and stream["gb_per_s"] >= 1.0
    print("\n" + ("targets met" if ok else "TARGETS MISSED"))
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--serve-canned":
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(sys.argv[2])
        listener.listen(1)
        print("listening", flush=True)
        serve_canned(listener, int(sys.argv[3]))
        raise SystemExit(0)
    raise SystemExit(main())
