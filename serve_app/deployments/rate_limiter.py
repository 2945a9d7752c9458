"""RateLimiter deployment: the per-key request and image windows, shared by every ingress replica.

One replica, so that there is one window per key. It is asked once per
generation request (a small call with no arrays); it holds no model and
asks for no CPU.
"""

from __future__ import annotations

import asyncio

from serve_app.config import RateLimits
from serve_app.rate_limits import Decision, SlidingWindowLimiter

FORGET_EVERY_S = 300.0


class RateLimiter:
    def __init__(self, limits: RateLimits):
        self.limiter = SlidingWindowLimiter(limits.requests_per_minute, limits.images_per_minute)
        self._sweeping: asyncio.Task | None = None

    async def acquire(self, identity: str, images: int) -> Decision:
        if self._sweeping is None:
            self._sweeping = asyncio.get_running_loop().create_task(self._forget_idle())
        return self.limiter.acquire(identity, images)

    async def _forget_idle(self) -> None:
        while True:
            await asyncio.sleep(FORGET_EVERY_S)
            self.limiter.forget_idle()
