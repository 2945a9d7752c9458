"""The ingress's view of one pipeline's stages: Ray Serve deployment handles,
with Ray's failures turned into OpenAI errors.

- A stage whose bounded queue is full (Ray's BackPressureError) is a 429
  ``server_overloaded`` with Retry-After, answered at once.
- A stage call that fails because its replica died or went away is retried
  once (Serve routes the retry to a live replica; the request's seeds make
  the result the same), then it is a 503 ``stage_unavailable`` with Retry-After.
Ray's own answers to these are plain text, which OpenAI clients cannot read.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

import numpy as np
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from serve_app.errors import invalid_request, server_overloaded, stage_unavailable
from serve_app.generation import PostProcessSpec
from serve_app.pipeline.types import DenoiseJob, EditInputs, EditLatents, EditsUnsupported, NeedsInputImage, PromptEmbeddings

logger = logging.getLogger("serve_app")

T = TypeVar("T")
REPLICA_GONE = (ActorDiedError, ActorUnavailableError, RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)


# How often a retry that has not started yet asks Serve whether any replica
# of its stage is left (only while a retry waits: retries are rare).
RETRY_WATCH_S = 1.0


async def call_stage(
    stage: str, make_call: Callable[[], Awaitable[T]], replicas_left: Callable[[], Awaitable[int | None]] | None = None
) -> T:
    """Run one stage call with the overload and retry rules above.

    ``replicas_left`` says how many replicas of the stage still run. When
    none does (its node went and no node can hold a new one), a retry would
    wait in Serve's queue until the request's deadline, so the client is
    told at once instead (503 with Retry-After). Serve's controller notices
    a lost node some seconds after the call on it failed, so the retry is
    watched: once the controller reports no replica left, it is cancelled."""
    for attempt in (1, 2):
        try:
            if attempt == 2 and replicas_left is not None:
                return await _watched(stage, make_call, replicas_left)
            return await make_call()
        except BackPressureError:
            raise server_overloaded(f"the {stage} stage") from None
        except REPLICA_GONE as exc:
            logger.warning("%s call failed (attempt %d): %s", stage, attempt, type(exc).__name__)
            if attempt == 2 or (replicas_left is not None and await _none_left(stage, replicas_left)):
                raise stage_unavailable(stage) from exc
    raise AssertionError("unreachable")


async def _watched(stage: str, make_call: Callable[[], Awaitable[T]], replicas_left: Callable[[], Awaitable[int | None]]) -> T:
    async def call() -> T:
        return await make_call()

    task = asyncio.ensure_future(call())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=RETRY_WATCH_S)
            if done:
                return task.result()
            if await _none_left(stage, replicas_left):
                raise stage_unavailable(stage)
    finally:
        task.cancel()  # no-op when it finished; else Serve drops the queued request


async def _none_left(stage: str, replicas_left: Callable[[], Awaitable[int | None]]) -> bool:
    try:
        left = await replicas_left()
    except Exception as exc:  # noqa: BLE001 - the controller is unreachable too: retry as usual
        logger.warning("could not ask Serve how many %s replicas run: %s", stage, type(exc).__name__)
        return False
    if left == 0:
        logger.warning("%s has no running replica left; not retrying", stage)
    return left == 0


def running_replicas(deployment_status: Any) -> int:
    """Replicas in state RUNNING, from a deployment's entry in ``serve.status()``."""
    # Keys are Serve's ReplicaState enum, whose values are the state names.
    return sum(n for state, n in deployment_status.replica_states.items() if getattr(state, "value", state) == "RUNNING")


def _needs_input_image() -> Exception:
    # Ray re-raises a replica's exception as a subclass of its own type.
    return invalid_request(
        "This model only edits images (an inpainting model): send an image to /v1/images/edits.",
        "model",
        "unsupported_model",
    )


class HandleStages:
    """One pipeline's stages, backed by Ray Serve deployment handles. A model
    stage deployment may serve several pipelines (a stage group), so every
    call to one names this pipeline."""

    def __init__(self, pipeline: str, text_encoder: Any, denoiser: Any, vae_decoder: Any, post_processor: Any):
        self.pipeline = pipeline
        self._te, self._dn, self._vae, self._pp = text_encoder, denoiser, vae_decoder, post_processor
        self._edit_inputs: EditInputs | None = None

    async def encode(self, prompt: str, count_prompt: str, images: list[np.ndarray] | None = None) -> PromptEmbeddings:
        return await call_stage("text encoder", lambda: self._te.encode.remote(prompt, count_prompt, images, pipeline=self.pipeline), self._left(self._te))

    async def edit_inputs(self) -> EditInputs:
        # A property of the model's architecture: asked once, from the stage that knows it.
        if self._edit_inputs is None:
            self._edit_inputs = await call_stage("text encoder", lambda: self._te.edit_inputs.remote(pipeline=self.pipeline), self._left(self._te))
        return self._edit_inputs

    async def encode_image(
        self, pixels: np.ndarray, alpha: np.ndarray | None, references: list[np.ndarray] | None = None
    ) -> EditLatents:
        # The VAE encoder lives in the VAE decoder's replica (it loads the whole VAE).
        try:
            return await call_stage(
                "VAE encoder", lambda: self._vae.encode.remote(pixels, alpha, references, pipeline=self.pipeline), self._left(self._vae)
            )
        except EditsUnsupported:
            # Ray re-raises a replica's exception as a subclass of its own type.
            raise invalid_request(
                "This model cannot make this edit: its architecture does not edit images, or not with a mask "
                "(masked edits need an inpainting-capable model). See README, Architectures.",
                "model",
                "unsupported_model",
            ) from None

    async def denoise(self, job: DenoiseJob) -> np.ndarray:
        try:
            return await call_stage("denoiser", lambda: self._dn.denoise.remote(job, pipeline=self.pipeline), self._left(self._dn))
        except NeedsInputImage:
            raise _needs_input_image() from None

    async def denoise_stream(self, job: DenoiseJob, partial_images: int) -> AsyncIterator[tuple[str, np.ndarray]]:
        # Not retried: previews already sent cannot be taken back.
        try:
            async for item in self._dn.options(stream=True).denoise_stream.remote(job, partial_images, pipeline=self.pipeline):
                yield item
        except NeedsInputImage:
            raise _needs_input_image() from None
        except BackPressureError:
            raise server_overloaded("the denoiser stage") from None
        except REPLICA_GONE as exc:
            raise stage_unavailable("denoiser") from exc

    async def decode(self, latents: np.ndarray) -> np.ndarray:
        return await call_stage("VAE decoder", lambda: self._vae.decode.remote(latents, pipeline=self.pipeline), self._left(self._vae))

    async def postprocess(self, pixels: np.ndarray, spec: PostProcessSpec) -> dict[str, str]:
        return await call_stage("post-processor", lambda: self._pp.process.remote(pixels, spec), self._left(self._pp))

    async def discard(self, names: list[str]) -> None:
        await self._pp.discard.remote(names)

    def _left(self, handle: Any) -> Callable[[], Awaitable[int | None]] | None:
        """How many replicas of a handle's deployment run, from Serve's
        controller; None outside a Serve replica (in-process tests)."""
        name = getattr(handle, "deployment_name", None)
        if not isinstance(name, str):
            return None

        async def left() -> int | None:
            status = await asyncio.to_thread(serve.status)
            app = status.applications.get(handle.app_name)
            deployment = app.deployments.get(name) if app is not None else None
            return None if deployment is None else running_replicas(deployment)

        return left

    async def stages_starting(self) -> list[str]:
        """This pipeline's deployments that have no running replica yet (starting
        up, or replacing the one that died), from Serve's controller.

        Asked before any call to them: Ray routes requests to the ingress as
        soon as it runs, while a model stage may still be loading, and a call
        to a stage without replicas waits, with no answer, until one is up.
        Outside a Serve replica (in-process tests) there is nothing to ask.
        """
        handles = (self._te, self._dn, self._vae, self._pp)
        names = [getattr(h, "deployment_name", None) for h in handles]
        if not all(isinstance(n, str) for n in names):
            return []
        status = await asyncio.to_thread(serve.status)
        app = status.applications.get(self._te.app_name)
        if app is None:
            return list(names)
        return [n for n in names if n not in app.deployments or not running_replicas(app.deployments[n])]

    async def problem(self) -> str | None:
        """Why this pipeline's model stages cannot serve, or None."""
        problems = await asyncio.gather(
            *(h.problem.remote(self.pipeline) for h in (self._te, self._dn, self._vae))
        )
        return next((p for p in problems if p), None)
