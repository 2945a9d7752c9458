"""The builder: the ``import_path`` of serve_config.yaml.

Deployment classes are plain classes; this is the one place that turns them
into Ray Serve deployments, with options from the validated config, and binds
the graph: per pipeline (or per stage group of pipelines) a TextEncoder, a
Denoiser and a VaeDecoder; one PostProcessor; one ImageSweeper when the
image store is swept; one RateLimiter when rate limits are set; one
ImagesIngress in front.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from serve_app.config import StageOptions, load_app_config
from serve_app.deployments.denoiser import Denoiser
from serve_app.deployments.ingress import ImagesIngress
from serve_app.deployments.post_processor import PostProcessor
from serve_app.deployments.rate_limiter import RateLimiter
from serve_app.deployments.sweeper import ImageSweeper
from serve_app.deployments.text_encoder import TextEncoder
from serve_app.deployments.vae_decoder import VaeDecoder
from serve_app.security import resolve_signing_key


def deployment_name(stage: str, pipeline: str) -> str:
    return f"{stage}-{pipeline}"


# The deployment class of each model stage. Tests swap in stand-ins that
# sleep instead of computing (tests/stub_stages.py) and keep everything else.
MODEL_STAGES: dict[str, type] = {"text_encoder": TextEncoder, "denoiser": Denoiser, "vae_decoder": VaeDecoder}
# The image sweeper and the rate limiter: one replica each, no CPU asked (they
# mostly wait), and the stages' default shutdown check, since Ray's 2 s is the
# least every application delete or redeploy waits for them.
SINGLETON_OPTIONS: dict[str, Any] = {
    "num_replicas": 1,
    "ray_actor_options": {"num_cpus": 0},
    "graceful_shutdown_wait_loop_s": StageOptions.model_fields["graceful_shutdown_wait_loop_s"].default,
}


def build_app(args: dict[str, Any]) -> Application:
    """The builder ``serve run`` calls with the config's ``args:`` (Ray
    requires a builder to take exactly that one parameter)."""
    return build_graph(args)


def build_graph(args: dict[str, Any] | None = None, model_stages: dict[str, type] | None = None) -> Application:
    """The graph for ``args``; ``model_stages`` swaps model stage classes (tests only)."""
    config, registry = load_app_config(args)
    classes = {**MODEL_STAGES, **(model_stages or {})}
    stages = config.stages
    model_cache = config.model_cache_setting  # resolved by each replica on its node
    # One TextEncoder, Denoiser and VaeDecoder per stage group (by default
    # each pipeline is a group of its own); the ingress gets each pipeline's
    # three handles, shared by the pipelines of a group.
    pipelines: dict[str, dict[str, Application]] = {}
    for group, names in config.stage_group_members(list(registry.pipelines)).items():
        members = {name: registry.pipelines[name] for name in names}
        handles = {
            key: serve.deployment(
                cls, name=deployment_name(MODEL_STAGES[key].__name__, group), **getattr(stages, key).deployment_options()
            ).bind(members, getattr(stages, key), model_cache)
            for key, cls in classes.items()
        }
        for name in names:
            pipelines[name] = handles
    post_processor = serve.deployment(
        PostProcessor, name="PostProcessor", **stages.post_processor.deployment_options()
    ).bind(config)
    # Exactly one replica, so that no two sweepers race over the same objects.
    sweeper = (
        serve.deployment(ImageSweeper, name="ImageSweeper", **SINGLETON_OPTIONS).bind(config)
        if config.sweeps_image_store
        else None
    )
    # Exactly one replica: every ingress replica counts against the same windows.
    rate_limiter = (
        serve.deployment(RateLimiter, name="RateLimiter", **SINGLETON_OPTIONS).bind(config.rate_limits)
        if config.rate_limits.enabled
        else None
    )
    # Generated once here, not per replica, so every ingress replica accepts
    # every other one's URLs.
    signing_key = resolve_signing_key(config.url_signing_key)
    ingress = serve.deployment(
        serve.ingress()(ImagesIngress), name="ImagesIngress", **stages.ingress.deployment_options()
    )
    return ingress.bind(config, registry, signing_key, pipelines, post_processor, sweeper, rate_limiter)
