"""Per-API-key limits on requests and images per minute.

A sliding window of the last 60 seconds per key: each admitted request is
remembered with its image count until it is a minute old. A request is
admitted only if both limits still hold with it counted; a refused request
counts for nothing. No Ray here: the RateLimiter deployment holds one
instance, so every ingress replica shares the same windows.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

WINDOW_S = 60.0


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after_s: int = 0  # whole seconds until enough of the window frees up (refusals only)
    limit_requests: int | None = None
    remaining_requests: int | None = None
    limit_images: int | None = None
    remaining_images: int | None = None

    def headers(self) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers, for the limits that are set."""
        out: dict[str, str] = {}
        if self.limit_requests is not None:
            out["x-ratelimit-limit-requests"] = str(self.limit_requests)
            out["x-ratelimit-remaining-requests"] = str(self.remaining_requests)
        if self.limit_images is not None:
            out["x-ratelimit-limit-images"] = str(self.limit_images)
            out["x-ratelimit-remaining-images"] = str(self.remaining_images)
        return out


class SlidingWindowLimiter:
    def __init__(
        self,
        requests_per_minute: int | None,
        images_per_minute: int | None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.requests_per_minute = requests_per_minute
        self.images_per_minute = images_per_minute
        self._clock = clock
        self._windows: dict[str, deque[tuple[float, int]]] = {}

    def acquire(self, identity: str, images: int) -> Decision:
        """Admit (and count) one request of ``images`` images for ``identity``, or refuse it."""
        now = self._clock()
        window = self._windows.setdefault(identity, deque())
        while window and window[0][0] <= now - WINDOW_S:
            window.popleft()
        rpm, ipm = self.requests_per_minute, self.images_per_minute
        used_images = sum(n for _, n in window)
        # Seconds until enough of the window has expired for this request to fit; 0: it fits now.
        wait = 0.0
        if rpm is not None and len(window) + 1 > rpm:
            wait = window[len(window) - rpm][0] + WINDOW_S - now
        if ipm is not None and images > ipm:
            # Never fits, however long it waits (the ingress answers it 400 on n before asking).
            wait = WINDOW_S
        elif ipm is not None and used_images + images > ipm:
            freed, i = 0, 0
            while used_images - freed + images > ipm:
                freed += window[i][1]
                i += 1
            wait = max(wait, window[i - 1][0] + WINDOW_S - now)
        allowed = wait <= 0
        if allowed:
            window.append((now, images))
            used_images += images
        return Decision(
            allowed,
            retry_after_s=0 if allowed else max(1, math.ceil(wait)),
            limit_requests=rpm,
            remaining_requests=None if rpm is None else max(0, rpm - len(window)),
            limit_images=ipm,
            remaining_images=None if ipm is None else max(0, ipm - used_images),
        )

    def forget_idle(self) -> None:
        """Drop the windows of keys with nothing in the last minute (bounded memory)."""
        now = self._clock()
        for identity in [k for k, w in self._windows.items() if not w or w[-1][0] <= now - WINDOW_S]:
            del self._windows[identity]
