"""Dynamic batching: batched images equal unbatched ones, and the queue batches what arrives together."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from serve_app.config import StageOptions
from serve_app.deployments.batching import BatchRunner
from serve_app.pipeline.components import PipelineLayout
from serve_app.pipeline.decoders import LatentDecoder
from serve_app.pipeline.denoise import LatentDenoiser
from serve_app.pipeline.encoders import PromptEncoder
from serve_app.pipeline.types import DenoiseJob

# Batched convolutions may take other kernels than single ones; latents agree
# to within this fraction of their largest magnitude, and decoded pixels to
# within this many levels of 255.
LATENT_RTOL = 1e-5
PIXEL_TOL = 1


@pytest.fixture(scope="module")
def stage_code(tiny_sd_dir, tiny_sdxl_dir):
    out = {}
    for kind, d in (("sd", tiny_sd_dir), ("sdxl", tiny_sdxl_dir)):
        layout = PipelineLayout.read(d)
        out[kind] = (PromptEncoder(layout), LatentDenoiser(layout), LatentDecoder(layout))
    return out


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_batched_images_equal_images_made_alone(stage_code, kind):
    enc, den, dec = stage_code[kind]
    jobs = [
        DenoiseJob(enc.encode("a sea otter"), [11, 12], 128, 128, 3, 7.5),
        DenoiseJob(enc.encode("a red fox in snow"), [13], 128, 128, 3, 7.5),
        DenoiseJob(enc.encode("a lighthouse"), [14], 64, 128, 3, 7.5),  # other size: its own group
        DenoiseJob(enc.encode("a lighthouse"), [15], 128, 128, 2, 7.5),  # other steps: its own group
    ]
    batched = den.denoise_many(jobs)
    alone = [den.denoise(j) for j in jobs]
    for b, a, j in zip(batched, alone, jobs):
        assert b.shape == a.shape == (len(j.seeds), 4, j.height // 8, j.width // 8)
        np.testing.assert_allclose(b, a, atol=LATENT_RTOL * np.abs(a).max(), rtol=0)
    pixels_batched = dec.decode_many(batched)
    for pb, a in zip(pixels_batched, alone):
        assert np.abs(pb.astype(int) - dec.decode(a).astype(int)).max() <= PIXEL_TOL
    # and the batch really mixed prompts: different jobs, different images
    assert not np.allclose(batched[0][0], batched[1][0])


def run_concurrently(runner, calls):
    async def main():
        return await asyncio.gather(*(runner.run(item, n) for item, n in calls))

    return asyncio.run(main())


def test_calls_arriving_together_run_as_one_batch():
    seen = []

    def compute(items):
        seen.append(list(items))
        return [f"done-{i}" for i in items]

    runner = BatchRunner("t", compute, StageOptions(max_batch_size=8, batch_wait_timeout_s=0.05))
    results = run_concurrently(runner, [(i, 1) for i in range(5)])
    assert results == [f"done-{i}" for i in range(5)]
    assert seen == [[0, 1, 2, 3, 4]]


def test_batches_respect_the_image_limit_and_big_requests_run_alone():
    seen = []

    def compute(items):
        seen.append([i for i, _ in items])
        return [i for i, _ in items]

    runner = BatchRunner("t", compute, StageOptions(max_batch_size=4, batch_wait_timeout_s=0.05))
    calls = [((i, n), n) for i, n in enumerate([2, 2, 2, 9])]
    assert run_concurrently(runner, calls) == [0, 1, 2, 3]
    assert sorted(map(sorted, seen)) == [[0, 1], [2], [3]]


def test_no_batching_when_limit_is_one():
    seen = []
    runner = BatchRunner("t", lambda items: seen.append(items) or items, StageOptions(max_batch_size=1))
    assert run_concurrently(runner, [(i, 1) for i in range(3)]) == [0, 1, 2]
    assert all(len(s) == 1 for s in seen)


def test_an_error_reaches_every_caller_of_the_batch():
    def compute(items):
        raise ValueError("boom")

    runner = BatchRunner("t", compute, StageOptions(max_batch_size=8, batch_wait_timeout_s=0.02))

    async def main():
        return await asyncio.gather(*(runner.run(i, 1) for i in range(3)), return_exceptions=True)

    assert all(isinstance(r, ValueError) for r in asyncio.run(main()))


def stepper(log, steps=50):
    def compute(items):
        for i in range(steps):
            log.append(i)
            time.sleep(0.01)
            yield None
        yield [f"done-{x}" for x in items]

    return compute


def test_stepwise_batch_stops_when_every_caller_has_gone():
    log = []
    runner = BatchRunner("t", stepper(log), StageOptions(max_batch_size=4, batch_wait_timeout_s=0.01), stepwise=True)

    async def main():
        tasks = [asyncio.create_task(runner.run(i, 1)) for i in range(2)]
        await asyncio.sleep(0.15)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0.1)
        # the runner still serves later calls
        return await runner.run(7, 1)

    assert asyncio.run(main()) == "done-7"
    first_batch_steps = log.index(0, 1)  # where the second batch started over
    assert first_batch_steps < 30, f"the abandoned batch ran {first_batch_steps} of 50 steps"


def test_stepwise_batch_finishes_while_one_caller_remains():
    log = []
    runner = BatchRunner("t", stepper(log, steps=10), StageOptions(max_batch_size=4, batch_wait_timeout_s=0.05), stepwise=True)

    async def main():
        tasks = [asyncio.create_task(runner.run(i, 1)) for i in range(2)]
        await asyncio.sleep(0.08)
        tasks[0].cancel()
        return await tasks[1]

    assert asyncio.run(main()) == "done-1" and len(log) == 10


def test_cancelled_denoise_stops_within_a_step(stage_code, tiny_sd_dir):
    from serve_app.config import PipelineConfig
    from serve_app.deployments.denoiser import Denoiser

    enc = stage_code["sd"][0]
    dn = Denoiser({"tiny-sd": PipelineConfig(source=str(tiny_sd_dir))}, StageOptions(torch_threads=1), "/tmp/unused-cache")
    job = DenoiseJob(enc.encode("otter"), [1], 512, 512, 200, 7.5)

    async def main():
        task = asyncio.create_task(dn.denoise(job))
        await asyncio.sleep(1.0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return dn.describe()["steps_run"]

    ran = asyncio.run(main())
    assert 0 < ran < 200, f"{ran} of 200 steps ran"


@pytest.mark.parametrize("batch_size", [1, 4])
def test_free_memory_goes_back_once_idle_not_between_batches(monkeypatch, batch_size):
    """After release_memory_after_idle_s without a batch the runner trims the
    allocator once; a call inside that window puts it off."""
    from serve_app.deployments import batching

    trims = []
    monkeypatch.setattr(batching.allocator, "trim", lambda: trims.append(time.monotonic()) or True)
    options = StageOptions(max_batch_size=batch_size, batch_wait_timeout_s=0.0, release_memory_after_idle_s=0.2)
    runner = BatchRunner("vae_decoder", lambda items: list(items), options)

    async def main():
        assert await runner.run("a", 1) == "a"
        first = runner._release
        assert first is not None and trims == []  # scheduled for later, not run after the batch
        assert await runner.run("b", 1) == "b"
        assert first.cancelled() and runner._release is not None and trims == []  # a new call puts it off
        await asyncio.sleep(0.3)
        assert len(trims) == 1 and runner._release is None
        await asyncio.sleep(0.3)
        assert len(trims) == 1  # once per quiet spell, not again and again

    asyncio.run(main())


def test_no_release_when_turned_off(monkeypatch):
    from serve_app.deployments import batching

    trims = []
    monkeypatch.setattr(batching.allocator, "trim", lambda: trims.append(1) or True)
    runner = BatchRunner("denoiser", lambda items: list(items), StageOptions(max_batch_size=4, release_memory_after_idle_s=None))

    async def main():
        await runner.run("a", 1)
        assert runner._release is None  # nothing scheduled
        await asyncio.sleep(0.05)

    asyncio.run(main())
    assert trims == []
