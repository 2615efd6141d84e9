"""The asyncio client: many coroutines on one connection, progress as an
async iterator, cancellation by cancelling the task."""
from __future__ import annotations

import asyncio

import numpy as np
from conftest import Daemon

import gpuctl


def run(coroutine):  # type: ignore[no-untyped-def]
    return asyncio.run(coroutine)


def test_sixteen_coroutines_share_one_connection(daemon: Daemon) -> None:
    async def main() -> None:
        async with gpuctl.AsyncClient(daemon.path) as client:
            before = (await client.status()).connections

            async def one(i: int) -> np.ndarray:
                a = np.full((3, 5), float(i), dtype=np.float32)
                b = np.full((3, 5), 1.0, dtype=np.float32)
                if i % 4 == 0:
                    await client.ping()
                result = await client.generate("ten", inputs=[a, b])
                return result.outputs[0]  # type: ignore[no-any-return]

            outputs = await asyncio.gather(*(one(i) for i in range(16)))
            for i, out in enumerate(outputs):
                assert np.array_equal(out, np.full((3, 5), 2.0 * i + 1.0, dtype=np.float32)), i
            assert (await client.status()).connections == before
            images = await asyncio.gather(*(client.generate("up", np.full((8, 8 + i, 3), 10 * i, np.uint8)) for i in range(4)))
            assert [r.image.shape for r in images] == [(16, 16 + 2 * i, 3) for i in range(4)]

    run(main())


def test_stream_generate_yields_progress_then_the_result(daemon: Daemon) -> None:
    async def main() -> None:
        async with gpuctl.AsyncClient(daemon.path) as client:
            image = np.random.default_rng(1).integers(0, 256, (256, 256, 3), dtype=np.uint8)
            items = [item async for item in client.stream_generate("x4", image, tile=64, overlap=8)]
            progress = [i for i in items if isinstance(i, gpuctl.ProgressEvent)]
            assert progress and progress[-1].done == progress[-1].total
            assert isinstance(items[-1], gpuctl.GenerateResult)
            assert items[-1].image.shape == (1024, 1024, 3)
            whole = await client.generate("x4", image)
            assert np.abs(whole.image.astype(int) - items[-1].image.astype(int)).max() <= 1

    run(main())


def test_cancelling_the_task_cancels_the_job(daemon: Daemon) -> None:
    async def main() -> None:
        async with gpuctl.AsyncClient(daemon.path) as client:
            image = np.zeros((1024, 1024, 3), np.uint8)
            started = asyncio.Event()

            async def upscale() -> None:
                async for item in client.stream_generate("x4", image, tile=128, overlap=8):
                    if isinstance(item, gpuctl.ProgressEvent):
                        started.set()

            task = asyncio.create_task(upscale())
            await asyncio.wait_for(started.wait(), 60)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            else:
                raise AssertionError("the task finished instead of being cancelled")
            for _ in range(500):
                x4 = {m.name: m for m in (await client.status()).models}["x4"]
                if x4.in_flight == 0 and x4.queued == 0:
                    break
                await asyncio.sleep(0.02)
            assert x4.in_flight == 0 and x4.state == gpuctl.ModelState.Ready(), x4
            assert (await client.generate("x4", np.zeros((4, 4, 3), np.uint8))).image.shape == (16, 16, 3)

    run(main())


def test_watch_reserve_load_unload(daemon: Daemon) -> None:
    async def main() -> None:
        async with gpuctl.AsyncClient(daemon.path) as client, gpuctl.AsyncClient(daemon.path) as watcher:
            seen: list = []  # type: ignore[type-arg]

            async def watch() -> None:
                async for notice in watcher.watch():
                    seen.append(notice.what)
                    if isinstance(notice.what, gpuctl.NoticeKind.Released):
                        return

            task = asyncio.create_task(watch())
            await asyncio.sleep(0.2)
            await client.unload("gen")
            assert (await client.load("gen", keep_alive=30)).load_ms is not None
            async with client.reserve(64 << 20) as reservation:
                assert reservation.bytes == 64 << 20
                assert [r.id for r in (await client.vram()).reservations] == [reservation.id]
            await asyncio.wait_for(task, 10)
            names = [what.name for what in seen]
            assert "Loaded" in names and "Reserved" in names and names[-1] == "Released"
            assert (await client.unload("gen")) == ["gen"]

    run(main())
