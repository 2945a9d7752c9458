"""Where generated images are kept: one fsspec URL (a local folder by default, or S3)."""

from __future__ import annotations

import logging
import secrets
from datetime import datetime
from typing import TYPE_CHECKING, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from serve_app.codecs import CONTENT_TYPES
from serve_app.security import IMAGE_NAME_RE

if TYPE_CHECKING:
    from serve_app.config import AppConfig

logger = logging.getLogger("serve_app")

# Object stores make an object visible only once its one PUT has completed,
# so writing the final name directly is already all-or-nothing there.
_ATOMIC_PUT_PROTOCOLS = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"}
_TMP_PREFIX = ".tmp-"


class StorageError(OSError):
    """The store could not keep an image; clients see 503 storage_unavailable."""


def local_store_warning(store: "ImageStore", alive_nodes: int) -> str | None:
    """What to warn about when a local image store serves a cluster of more
    than one node, else None.

    A local store is a folder on each node: an image is written on the node
    whose post-processor made it, and its URL may be answered by an ingress on
    another node, which does not have it (404), and each node sweeps only its
    own folder. S3 or a filesystem every node mounts at the same path fixes both.
    """
    if not store.is_local or alive_nodes <= 1:
        return None
    return (
        f"The image store {store.url} is a local folder, and this Ray cluster has {alive_nodes} nodes: an image "
        "URL answered by an ingress on another node than the one that stored it is a 404. Use a shared store: "
        "image_store: s3://bucket/prefix, or a folder every node mounts at the same path (README \"Deployment\")."
    )


class ImageStore:
    """Stores encoded images under random names, reads them back by name,
    makes URLs for them where the store can sign its own, and deletes old ones.

    No name is returned before its image is completely stored: object stores
    get one PUT, other filesystems a temporary name renamed into place, and
    either way the stored size is checked first.
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.url = url.rstrip("/")
        options = dict(storage_options or {})
        protocol = fsspec.utils.get_protocol(self.url)
        if protocol in ("s3", "s3a"):
            # botocore presigns S3 URLs with the deprecated SigV2 unless told
            # otherwise; SigV4 is what every S3-compatible store accepts.
            options["config_kwargs"] = {"signature_version": "s3v4", **options.get("config_kwargs", {})}
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **options)
        protocols = {self.fs.protocol} if isinstance(self.fs.protocol, str) else set(self.fs.protocol)
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self._atomic_put = bool(protocols & _ATOMIC_PUT_PROTOCOLS)
        self._content_type_key = "ContentType" if protocols & {"s3", "s3a"} else None
        if not self._atomic_put:
            self.fs.makedirs(self.root, exist_ok=True)

    @classmethod
    def from_config(cls, config: AppConfig) -> "ImageStore":
        return cls(config.image_store_url, config.image_store_options)

    def _path(self, name: str) -> str:
        if not IMAGE_NAME_RE.match(name):
            raise ValueError("invalid image name")
        return f"{self.root}/{name}"

    @staticmethod
    def new_name(ext: str) -> str:
        return f"{secrets.token_urlsafe(24)}.{ext}"

    def put(self, data: bytes, ext: str) -> str:
        """Store one image; its name once it is completely stored, else StorageError."""
        name = self.new_name(ext)
        final = self._path(name)
        target = final if self._atomic_put else f"{self.root}/{_TMP_PREFIX}{secrets.token_hex(8)}-{name}"
        options = {self._content_type_key: CONTENT_TYPES[ext]} if self._content_type_key else {}
        try:
            self.fs.pipe_file(target, data, **options)
            stored = self.fs.size(target)
            if stored != len(data):
                raise StorageError(f"short write to {self.url}: stored {stored} of {len(data)} bytes")
            if target != final:
                self.fs.mv(target, final)
        except Exception as exc:
            self._remove_quietly([target])
            if isinstance(exc, StorageError):
                raise
            raise StorageError(f"could not store an image in {self.url}: {type(exc).__name__}: {exc}") from exc
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

    def url_for(self, name: str, ttl_s: int) -> str | None:
        """A URL that fetches the image without credentials for ``ttl_s``
        seconds, where the store signs its own (S3: a presigned GET); None
        where it cannot (a local folder): the ingress then signs its own route."""
        if self.is_local:
            return None
        try:
            return self.fs.sign(self._path(name), expiration=ttl_s)
        except NotImplementedError:
            return None

    def delete(self, names: list[str]) -> None:
        """Delete images by name, as far as the store lets us; never raises."""
        self._remove_quietly([self._path(n) for n in names])

    def delete_older_than(self, cutoff: float) -> list[str]:
        """Delete this store's images, and temporary files left by failed
        writes, last modified before ``cutoff`` (Unix time); return their
        names. Anything else under the store's root is left alone."""
        self.fs.invalidate_cache(self.root)
        try:
            entries = self.fs.ls(self.root, detail=True)
        except FileNotFoundError:
            return []
        old = []
        for info in entries:
            name = info["name"].rstrip("/").rsplit("/", 1)[-1]
            ours = IMAGE_NAME_RE.match(name) or name.startswith(_TMP_PREFIX)
            if info.get("type") == "file" and ours and self._modified(info) < cutoff:
                old.append(info["name"])
        if old:
            self.fs.rm(old)
        return [p.rsplit("/", 1)[-1] for p in old]

    def _modified(self, info: dict[str, Any]) -> float:
        value = info.get("mtime", info.get("LastModified"))  # local / S3 listings
        if value is None:
            value = self.fs.modified(info["name"])
        return value.timestamp() if isinstance(value, datetime) else float(value)

    def _remove_quietly(self, paths: list[str]) -> None:
        for path in paths:
            try:
                self.fs.rm(path)
            except Exception as exc:  # noqa: BLE001 - cleanup must not hide the original failure
                if not isinstance(exc, FileNotFoundError):
                    logger.warning("could not remove %s from %s: %s", path.rsplit("/", 1)[-1], self.url, exc)
