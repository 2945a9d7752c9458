"""API keys and signed image URLs."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import time
from typing import Callable, Iterable

logger = logging.getLogger("serve_app")

API_KEYS_ENV = "IMAGES_API_KEYS"
SIGNING_KEY_ENV = "IMAGES_URL_SIGNING_KEY"

# Stored image names are random ids we made, plus an extension; nothing else
# is ever looked up, so a path from a request can never reach the filesystem.
IMAGE_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{16,64}\.(png|jpeg|webp|svg)$")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class ApiKeys:
    """Holds only SHA-256 digests of the configured keys."""

    def __init__(self, keys: Iterable[str]):
        self._digests = [_digest(k) for k in {k.strip() for k in keys} if k]

    @classmethod
    def from_sources(cls, env_value: str | None, file_path: str | None) -> "ApiKeys":
        keys: list[str] = []
        if env_value:
            keys += env_value.split(",")
        if file_path:
            with open(file_path) as f:
                keys += [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
        return cls(keys)

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def identify(self, authorization: str | None) -> str | None:
        """The SHA-256 hex digest of the configured key the header carries, or None.
        The digest, never the key, is what rate limits are kept under."""
        if not authorization or not authorization.startswith("Bearer "):
            return None
        presented = _digest(authorization[len("Bearer ") :].strip())
        # Compare against every key so timing does not reveal which matched.
        matched = False
        for d in self._digests:
            matched |= secrets.compare_digest(presented, d)
        return presented.hex() if matched else None


def resolve_signing_key(configured: str | None) -> str:
    key = os.environ.get(SIGNING_KEY_ENV) or configured
    if key:
        return key
    logger.warning(
        "No image URL signing key configured (%s or url_signing_key); generated a random one. "
        "Image URLs stop working when the app restarts.",
        SIGNING_KEY_ENV,
    )
    return secrets.token_urlsafe(32)


class UrlSigner:
    """HMAC-SHA256 signatures over an image name and its expiry time."""

    def __init__(self, key: str, ttl_s: int, clock: Callable[[], float] = time.time):
        self._key = key.encode("utf-8")
        self.ttl_s = ttl_s
        self._clock = clock

    def _sig(self, name: str, expires: int) -> str:
        return hmac.new(self._key, f"{name}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def sign(self, name: str) -> tuple[int, str]:
        expires = int(self._clock()) + self.ttl_s
        return expires, self._sig(name, expires)

    def verify(self, name: str, expires: int, sig: str) -> str | None:
        """None if valid, else the reason: 'bad_signature' or 'expired'."""
        if not secrets.compare_digest(self._sig(name, expires), sig):
            return "bad_signature"
        if self._clock() > expires:
            return "expired"
        return None


def hash_for_log(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()[:16]
