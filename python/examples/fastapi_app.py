"""An upscaling service in the shape FastAPI apps have, with gpuctld holding
the model instead of a module-level singleton.

    GPUCTL_MODEL=upscale uvicorn fastapi_app:app --app-dir python/examples

`POST /upscale` takes an image file (multipart field `image`, or the raw
bytes as the body) and answers the upscaled PNG; `GET /status` reports the
daemon's view of the model. The app holds one `AsyncClient` for its lifetime:
every request shares its connection, gpuctld loads the model on the first
request and unloads it when idle, so the VRAM goes back to Ollama and friends
between bursts.
"""
from __future__ import annotations

import io
import os
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Dict, Optional

from fastapi import FastAPI, HTTPException, Request, Response
from PIL import Image, UnidentifiedImageError

import gpuctl

MODEL = os.environ.get("GPUCTL_MODEL", "upscale")
# Uploads larger than this are refused before they are decoded.
MAX_UPLOAD = int(os.environ.get("MAX_UPLOAD_BYTES", str(32 << 20)))

# gpuctl's errors as HTTP statuses: the client's fault, or try again later.
STATUS = {
    gpuctl.NotFound: 404,
    gpuctl.InvalidRequest: 422,
    gpuctl.TooLarge: 413,
    gpuctl.QueueFull: 429,
    gpuctl.Busy: 503,
    gpuctl.InsufficientVram: 503,
    gpuctl.Timeout: 504,
    gpuctl.ConnectError: 503,
}


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with gpuctl.AsyncClient(os.environ.get("GPUCTL_SOCKET")) as client:
        app.state.gpuctl = client
        yield


app = FastAPI(lifespan=lifespan)


async def read_image(request: Request) -> Image.Image:
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form = await request.form()
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise HTTPException(422, "send the image as the multipart field `image`")
        data = await upload.read(MAX_UPLOAD + 1)
    else:
        data = await request.body()
    if len(data) > MAX_UPLOAD:
        raise HTTPException(413, f"the image is over {MAX_UPLOAD} bytes")
    try:
        picture = Image.open(io.BytesIO(data))
        picture.load()
    except (UnidentifiedImageError, OSError) as error:
        raise HTTPException(422, f"not an image: {error}") from None
    return picture.convert("RGB")


@app.post("/upscale")
async def upscale(request: Request) -> Response:
    picture = await read_image(request)
    client: gpuctl.AsyncClient = request.app.state.gpuctl
    try:
        result = await client.generate(MODEL, picture, timeout="2m")
    except gpuctl.GpuctlError as error:
        raise HTTPException(STATUS.get(type(error), 500), error.message) from None
    out = io.BytesIO()
    result.image.save(out, format="PNG")
    headers = {"X-Model": result.model, "X-Device": result.device, "X-Run-Ms": str(result.run_ms)}
    if result.load_ms is not None:
        headers["X-Load-Ms"] = str(result.load_ms)
    return Response(out.getvalue(), media_type="image/png", headers=headers)


@app.get("/status")
async def status(request: Request) -> Dict[str, Any]:
    client: gpuctl.AsyncClient = request.app.state.gpuctl
    try:
        daemon = await client.status()
    except gpuctl.GpuctlError as error:
        raise HTTPException(STATUS.get(type(error), 500), error.message) from None
    model: Optional[gpuctl.ModelStatus] = next((m for m in daemon.models if m.name == MODEL), None)
    if model is None:
        raise HTTPException(404, f"gpuctld has no model {MODEL!r}")
    return {
        "model": model.name,
        "state": model.state.name,
        "device": model.device,
        "loads": model.loads,
        "in_flight": model.in_flight,
        "queued": model.queued,
        "unload_in_ms": model.unload_in_ms,
        "daemon_version": daemon.daemon_version,
    }
