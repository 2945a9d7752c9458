"""ImageSweeper deployment: deletes stored images once their URLs have expired.

One replica with a background loop, so that several ingress or
post-processor replicas never race to delete the same objects.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from serve_app.config import AppConfig
from serve_app.storage import ImageStore

logger = logging.getLogger("serve_app")

# A URL is signed a little after its image is written (once the request's
# other images are done), so it outlives the image's age by that much.
SWEEP_GRACE_S = 60


class ImageSweeper:
    def __init__(self, config: AppConfig, clock: Callable[[], float] = time.time):
        self.store = ImageStore.from_config(config)
        self.max_age_s = config.url_ttl_s + SWEEP_GRACE_S
        self.interval_s = config.sweep_interval_s
        self.clock = clock
        if self.interval_s > 0:
            # Ray Serve runs the constructor on the replica's event loop.
            self._task = asyncio.get_running_loop().create_task(self._run())

    def sweep(self, now: float | None = None) -> list[str]:
        """Delete the images older than the URL lifetime (plus a grace) at
        ``now`` (default: the clock); return their names."""
        now = self.clock() if now is None else now
        deleted = self.store.delete_older_than(now - self.max_age_s)
        if deleted:
            logger.info("deleted %d expired images from %s", len(deleted), self.store.url)
        return deleted

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.sweep)
            except Exception:  # noqa: BLE001 - a failed sweep is retried at the next interval
                logger.exception("sweeping %s failed; trying again in %d s", self.store.url, self.interval_s)
            await asyncio.sleep(self.interval_s)
