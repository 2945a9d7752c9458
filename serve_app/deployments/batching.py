"""Dynamic batching shared by the Denoiser and VaeDecoder deployments.

Calls that arrive while a batch is forming (up to ``batch_wait_timeout_s``
after the first, and up to ``max_batch_size`` images) run as one call of
``compute(list_of_inputs) -> list_of_outputs``; the stage code then groups
them by shape. A request larger than the limit runs on its own. Compute runs
on the replica's event-loop thread (see replica.use_torch_threads for why):
calls that arrive while a batch computes wait for the loop and form the
next batch; a stepwise compute gives the loop a turn between steps. Only
one batch computes at a time.

After a quiet spell (``release_memory_after_idle_s``) the runner hands the
allocator's free pages back to the system: glibc keeps the buffers of the
last large batch (hundreds of MB for a VAE decode of 1024² images) mapped
for reuse, which is right while busy and only costs memory once idle. Not on
every batch: the next batch would fault them all in again
(docs/reliability.md, "Memory").

A queue of our own rather than ``@serve.batch``: Ray keeps one queue per
decorated function per process, which two stages in one process (as in the
tests) would share; this one belongs to its instance and needs no Ray.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Callable

from serve_app import allocator
from serve_app.config import StageOptions
from serve_app.metrics import BATCH_SIZE, QUEUE_WAIT, STAGE_SECONDS


class BatchAbandoned(Exception):
    """Every caller of a batch went away; its work was stopped."""


@dataclass
class _Pending:
    arrived: float
    item: Any
    images: int
    future: asyncio.Future


class BatchRunner:
    """``compute`` is either a function returning the outputs, or (``stepwise``)
    a generator function that yields None between units of work and the
    outputs last: the runner then gives the event loop a turn at each None,
    and abandons the batch once every caller of it has gone (client
    disconnect, deadline), so cancelled work stops within a step."""

    def __init__(
        self, stage: str, compute: Callable[[list[Any]], Any], options: StageOptions, stepwise: bool = False
    ):
        self.stage = stage
        self.compute = compute
        self.stepwise = stepwise
        self.max_images = options.max_batch_size
        self.wait_s = options.batch_wait_timeout_s
        self._pending: list[_Pending] = []
        self._arrival = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self._lock = asyncio.Lock()  # one batch computes at a time
        # Process CPU seconds per wall second of the last batch: ~torch_threads
        # when intra-op parallelism works, ~1 when it silently does not.
        self.last_cpu_per_wall: float | None = None
        self.release_after_s = options.release_memory_after_idle_s
        self._release: asyncio.TimerHandle | None = None

    async def run(self, item: Any, images: int) -> Any:
        self._cancel_release()
        if self.max_images <= 1 or images >= self.max_images:
            async with self._lock:
                try:
                    return (await self._compute([_Pending(time.monotonic(), item, images, None)]))[0]  # type: ignore[arg-type]
                finally:
                    self._release_when_idle()
        future = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(time.monotonic(), item, images, future))
        self._arrival.set()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._loop())
        return await future

    def _queued_images(self) -> int:
        return sum(p.images for p in self._pending)

    def _cancel_release(self) -> None:
        if self._release is not None:
            self._release.cancel()
            self._release = None

    def _release_when_idle(self) -> None:
        """Hand free memory back once nothing has run for ``release_after_s``."""
        if self.release_after_s is None or self._pending:
            return
        self._cancel_release()
        self._release = asyncio.get_running_loop().call_later(self.release_after_s, self._release_if_idle)

    def _release_if_idle(self) -> None:
        self._release = None
        if not self._pending and not self._lock.locked():
            allocator.trim()

    async def _loop(self) -> None:
        try:
            await self._run_batches()
        finally:
            self._release_when_idle()

    async def _run_batches(self) -> None:
        while self._pending:
            # Wait for company until the first call has waited wait_s or the batch is full.
            deadline = self._pending[0].arrived + self.wait_s
            while self._queued_images() < self.max_images and (left := deadline - time.monotonic()) > 0:
                self._arrival.clear()
                try:
                    await asyncio.wait_for(self._arrival.wait(), left)
                except asyncio.TimeoutError:
                    break
            batch, total = [], 0
            while self._pending and total + self._pending[0].images <= self.max_images:
                p = self._pending.pop(0)
                total += p.images
                if not p.future.cancelled():  # its client went away
                    batch.append(p)
            if not batch:
                continue
            async with self._lock:
                try:
                    results = await self._compute(batch)
                except BatchAbandoned:
                    continue
                except Exception as exc:  # noqa: BLE001 - every caller of the batch gets it
                    for p in batch:
                        if not p.future.done():
                            p.future.set_exception(exc)
                    continue
            for p, result in zip(batch, results):
                if not p.future.done():
                    p.future.set_result(result)

    async def _compute(self, batch: list[_Pending]) -> list[Any]:
        started = time.monotonic()
        tags = {"stage": self.stage}
        for p in batch:
            QUEUE_WAIT.observe(started - p.arrived, tags=tags)
        BATCH_SIZE.observe(sum(p.images for p in batch), tags=tags)
        cpu = time.process_time()
        results = await self._run_compute(batch)
        wall = time.monotonic() - started
        self.last_cpu_per_wall = (time.process_time() - cpu) / wall if wall > 0 else None
        STAGE_SECONDS.observe(wall, tags=tags)
        return results

    async def _run_compute(self, batch: list[_Pending]) -> list[Any]:
        if not self.stepwise:
            return self.compute([p.item for p in batch])
        steps = self.compute([p.item for p in batch])
        try:
            for out in steps:
                if out is not None:
                    return out
                # A turn for the loop: it delivers cancellations (and new calls).
                await asyncio.sleep(0)
                if all(p.future is not None and p.future.cancelled() for p in batch):
                    raise BatchAbandoned(f"every caller of this {self.stage} batch has gone")
        finally:
            steps.close()
        raise RuntimeError(f"{self.stage} compute yielded no result")
