"""PostProcessor deployment: pixels -> encoded file, as base64 or stored for a URL."""

from __future__ import annotations

import base64

import numpy as np

from serve_app.codecs import encode_image
from serve_app.storage import ImageStore


class PostProcessor:
    def __init__(self, store_url: str, png_compress_level: int = 1):
        self.store = ImageStore(store_url)
        self.png_level = png_compress_level

    def process(self, pixels: np.ndarray, output_format: str, compression: int, response_format: str) -> dict[str, str]:
        """Returns {"b64_json": ...} or {"name": stored image name}."""
        data = encode_image(pixels, output_format, compression, self.png_level)
        if response_format == "b64_json":
            return {"b64_json": base64.b64encode(data).decode("ascii")}
        return {"name": self.store.put(data, output_format)}
