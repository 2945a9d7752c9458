"""PostProcessor deployment: pixels -> finished file (matted if transparent), as base64 or stored for a URL."""

from __future__ import annotations

import base64
import logging
import threading
from typing import Callable

import numpy as np

from serve_app.codecs import encode_image
from serve_app.compositing import composite
from serve_app.config import AppConfig
from serve_app.generation import PostProcessSpec
from serve_app.matting import BackdropMatting, Matting
from serve_app.storage import ImageStore

logger = logging.getLogger("serve_app")


def _warm_up(warm_up: Callable[[], None]) -> None:
    try:
        warm_up()
    except Exception:  # noqa: BLE001 - the first transparent request will compile, or say what is wrong
        logger.warning("matting warm-up failed", exc_info=True)


class PostProcessor:
    def __init__(self, config: AppConfig, matting: Matting | None = None):
        self.store = ImageStore.from_config(config)
        self.png_level = config.png_compress_level
        self.matting = matting or BackdropMatting()
        warm_up = getattr(self.matting, "warm_up", None)
        if warm_up is not None:
            # On a fresh install pymatting's JIT compiles for about 45 s on two
            # cores (cached on disk after). In a thread, so that the replica,
            # and every request that is not transparent, need not wait for it;
            # numba's compile lock makes a transparent request that comes
            # sooner wait for the compile instead of compiling again.
            threading.Thread(target=_warm_up, args=(warm_up,), name="matting-warm-up", daemon=True).start()

    def process(self, pixels: np.ndarray, spec: PostProcessSpec) -> dict[str, str]:
        """Returns {"b64_json": ...} or {"name": stored image name}; StorageError if it cannot be stored."""
        if spec.keep_alpha is not None and spec.keep_pixels is not None:
            pixels = composite(pixels, spec.keep_pixels, spec.keep_alpha, spec.feather_px)
        if spec.transparent:
            pixels = self.matting.matte(pixels[..., :3])
        data = encode_image(pixels, spec.output_format, spec.compression, self.png_level)
        if spec.response_format == "b64_json":
            return {"b64_json": base64.b64encode(data).decode("ascii")}
        return {"name": self.store.put(data, spec.output_format)}

    def discard(self, names: list[str]) -> None:
        """Delete images stored for a request that failed, so none is left behind."""
        self.store.delete(names)
