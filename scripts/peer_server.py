"""The server a user would otherwise run: one process, one diffusers
pipeline behind FastAPI, answering ``POST /v1/images/generations`` in
OpenAI's shape. scripts/bench.py runs it as the fair peer of the graph.

    .venv/bin/python scripts/peer_server.py MODEL_DIR --port 8100

What it shares with the graph: the same model directory loaded by
``DiffusionPipeline.from_pretrained``, the same size, steps, guidance and
per-image seeds, and the same PNG encoder and base64 (serve_app.codecs).
What it does not have: Ray, separate stages, cross-request batching. One
request runs at a time with every core given to torch, as a single-process
server does (two pipeline calls at once on the same cores only slow both).
"""

import argparse
import asyncio
import base64
import sys
import threading
import time
from pathlib import Path

from pydantic import BaseModel

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


class Generate(BaseModel):
    """The generation parameters the benchmark sends (OpenAI's names; `seed` as the service takes it)."""

    prompt: str
    model: str | None = None
    n: int = 1
    size: str = "512x512"
    quality: str | None = None
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None


def build_app(model_dir: str, device: str, dtype: str):
    import numpy as np
    import torch
    from diffusers import DiffusionPipeline
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    from serve_app.codecs import encode_image
    from serve_app.config import AppConfig

    png_level = AppConfig.model_fields["png_compress_level"].default  # the service's own default

    pipe = DiffusionPipeline.from_pretrained(model_dir, torch_dtype=getattr(torch, dtype))
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    defaults = {"steps": 4, "guidance": 7.5}
    lock = threading.Lock()
    app = FastAPI()

    def generate(body: Generate) -> list[str]:
        width, height = (int(v) for v in body.size.split("x"))
        seed = body.seed if body.seed is not None else int(time.time_ns() % 2**31)
        with lock:
            images = pipe(
                [body.prompt] * body.n,
                height=height,
                width=width,
                num_inference_steps=body.steps or defaults["steps"],
                guidance_scale=body.guidance if body.guidance is not None else defaults["guidance"],
                generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(body.n)],
                output_type="np",
            ).images
        pixels = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
        return [base64.b64encode(encode_image(p, "png", 100, png_level)).decode() for p in pixels]

    @app.post("/v1/images/generations")
    async def generations(body: Generate):
        data = await asyncio.to_thread(generate, body)
        return JSONResponse({"created": int(time.time()), "data": [{"b64_json": d} for d in data]})

    app.state.defaults = defaults
    return app


def main() -> None:
    import uvicorn

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--port", type=int, default=8100)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--guidance", type=float, default=7.5)
    a = ap.parse_args()
    app = build_app(a.model_dir, a.device, a.dtype)
    app.state.defaults.update(steps=a.steps, guidance=a.guidance)
    uvicorn.run(app, host="127.0.0.1", port=a.port, log_level="warning")


if __name__ == "__main__":
    main()
