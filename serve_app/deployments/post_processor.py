"""PostProcessor deployment: pixels -> encoded file, as base64 or stored for a URL."""

from __future__ import annotations

import base64

import numpy as np

from serve_app.codecs import encode_image
from serve_app.config import AppConfig
from serve_app.storage import ImageStore


class PostProcessor:
    def __init__(self, config: AppConfig):
        self.store = ImageStore.from_config(config)
        self.png_level = config.png_compress_level

    def process(self, pixels: np.ndarray, output_format: str, compression: int, response_format: str) -> dict[str, str]:
        """Returns {"b64_json": ...} or {"name": stored image name}; StorageError if it cannot be stored."""
        data = encode_image(pixels, output_format, compression, self.png_level)
        if response_format == "b64_json":
            return {"b64_json": base64.b64encode(data).decode("ascii")}
        return {"name": self.store.put(data, output_format)}

    def discard(self, names: list[str]) -> None:
        """Delete images stored for a request that failed, so none is left behind."""
        self.store.delete(names)
