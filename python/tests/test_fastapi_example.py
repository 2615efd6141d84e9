"""The FastAPI example through httpx's ASGI transport, against a real
gpuctld with the waifu2x demo model."""
from __future__ import annotations

import asyncio
import importlib.util
import io

import httpx
import numpy as np
from conftest import ROOT, Daemon
from PIL import Image

import gpuctl


def load_example(monkeypatch, daemon: Daemon):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("GPUCTL_SOCKET", daemon.path)
    monkeypatch.setenv("GPUCTL_MODEL", "up")
    spec = importlib.util.spec_from_file_location("fastapi_app", ROOT / "python" / "examples" / "fastapi_app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def png(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


def test_concurrent_uploads_one_load_correct_pixels(monkeypatch, daemon: Daemon) -> None:  # type: ignore[no-untyped-def]
    with gpuctl.Client(daemon.path) as admin:
        admin.unload("up")
        loads_before = {m.name: m for m in admin.status().models}["up"].loads
        rng = np.random.default_rng(5)
        images = [rng.integers(0, 256, (24 + i, 32, 3), dtype=np.uint8) for i in range(6)]
        expected = [admin.generate("up", image).image for image in images]
        admin.unload("up")
    app = load_example(monkeypatch, daemon).app

    async def main() -> None:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
                answers = await asyncio.gather(
                    *(http.post("/upscale", files={"image": ("in.png", png(image), "image/png")}) for image in images),
                    http.post("/upscale", content=png(images[0])),
                )
                for answer in answers:
                    assert answer.status_code == 200, answer.text
                    assert answer.headers["content-type"] == "image/png"
                for answer, want in zip(answers, expected + [expected[0]]):
                    got = np.asarray(Image.open(io.BytesIO(answer.content)))
                    assert got.shape == want.shape
                    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
                assert sum("x-load-ms" in a.headers for a in answers) >= 1
                status = (await http.get("/status")).json()
                assert status["state"] == "Ready" and status["model"] == "up"
                bad = await http.post("/upscale", content=b"not an image")
                assert bad.status_code == 422

    asyncio.run(main())
    with gpuctl.Client(daemon.path) as admin:
        # One load for all seven concurrent requests.
        assert {m.name: m for m in admin.status().models}["up"].loads == loads_before + 2
