"""Where generated images are kept: one fsspec URL (a local folder by default)."""

from __future__ import annotations

import secrets

import fsspec

from serve_app.security import IMAGE_NAME_RE


class ImageStore:
    """Stores encoded images under random names and reads them back by name.

    Writes go to a temporary name first and are renamed into place once the
    stored size matches, so a name that exists is always a complete image.
    """

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.fs.makedirs(self.root, exist_ok=True)

    def _path(self, name: str) -> str:
        if not IMAGE_NAME_RE.match(name):
            raise ValueError("invalid image name")
        return f"{self.root}/{name}"

    @staticmethod
    def new_name(ext: str) -> str:
        return f"{secrets.token_urlsafe(24)}.{ext}"

    def put(self, data: bytes, ext: str) -> str:
        name = self.new_name(ext)
        final = self._path(name)
        tmp = f"{self.root}/.tmp-{secrets.token_hex(8)}-{name}"
        try:
            with self.fs.open(tmp, "wb") as f:
                f.write(data)
            if self.fs.size(tmp) != len(data):
                raise OSError(f"short write: stored {self.fs.size(tmp)} of {len(data)} bytes")
            self.fs.mv(tmp, final)
        except BaseException:
            try:
                self.fs.rm(tmp)
            except (FileNotFoundError, OSError):
                pass
            raise
        return name

    def get(self, name: str) -> bytes | None:
        """The image's bytes, or None if no such image exists."""
        try:
            path = self._path(name)
        except ValueError:
            return None
        try:
            with self.fs.open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None
