"""Shared fixtures: tiny models built once per session, and a test registry."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from serve_app.pipeline.tiny import save_tiny_pipeline

TEST_API_KEY = "sk-test-key-for-the-suite"
TEST_SIGNING_KEY = "test-signing-key"


def pytest_collection_modifyitems(config, items):
    """Run the modules that need no session Ray cluster first. Once that
    cluster starts it stays up to the end of the session, and even idle it
    takes a share of this 2-core machine (its controller loop, health checks
    and metrics); the in-process tests, and the modules that start a cluster
    or a whole install of their own (multinode, the offline bundle), should
    not run beside it. Whole modules move, in their own order, so that a
    module's fixtures are still set up once."""
    def module(item) -> str:
        return item.nodeid.split("::")[0]

    on_session_ray = {module(item) for item in items if "ray_cluster" in item.fixturenames}
    items.sort(key=lambda item: module(item) in on_session_ray)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd", "tiny-sd")


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sdxl", "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """tiny_model_dir(kind): a tiny model of any architecture, built once per session."""
    built: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in built:
            built[kind] = save_tiny_pipeline(tmp_path_factory.mktemp("models") / kind, kind)
        return built[kind]

    return get


@pytest.fixture(scope="session")
def tiny_sd_inpaint_dir(tiny_model_dir) -> Path:
    return tiny_model_dir("tiny-sd-inpaint")


def write_registry(path: Path, model_dir: Path) -> Path:
    """A registry shaped like the shipped one (its ids, families and sizes),
    with one pipeline, ``tiny-sd``, on a test model at 4 steps: the shipped
    default is the trained embedded model, whose steps and weights the
    tests that only need shapes and speed do without. dall-e-3 gets the
    built-in styles (vivid adds a prompt template), not the embedded
    model's, which add no words."""
    shipped = yaml.safe_load((Path(__file__).resolve().parent.parent / "configs" / "models.yaml").read_text())
    (settings,) = shipped["pipelines"].values()
    settings.update(source=str(model_dir), default_steps=4)
    shipped["pipelines"] = {"tiny-sd": settings}
    for model in shipped["models"]:
        model["pipeline"] = "tiny-sd"
        if model["id"] == "embedded-sd":
            model["id"] = "tiny-sd"  # the pipeline's native id
        model.pop("styles", None)
    path.write_text(yaml.safe_dump(shipped))
    return path


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on 127.0.0.1 at a free port, for the whole session (tests/s3.py)."""
    from tests.s3 import S3Endpoint

    endpoint = S3Endpoint()
    yield endpoint
    endpoint.stop()


@pytest.fixture(scope="session")
def s3_models(s3_endpoint, tiny_sd_dir) -> str:
    """The tiny model uploaded whole to s3://models/tiny-sd, and without its
    UNet to s3://models/partial; returns the bucket's URL."""
    s3_endpoint.client().create_bucket(Bucket="models")
    s3_endpoint.upload_dir(tiny_sd_dir, "models", "tiny-sd")
    s3_endpoint.upload_dir(tiny_sd_dir, "models", "partial", skip=("unet/",))
    return "s3://models"


@pytest.fixture(scope="session")
def app_args(tmp_path_factory, tiny_sd_dir) -> dict:
    """Application args for the service under test: the shipped registry on the
    session's tiny model, an API key file, a known signing key, a temp data dir."""
    root = tmp_path_factory.mktemp("service")
    keys = root / "api_keys"
    keys.write_text(f"# test keys\n{TEST_API_KEY}\n")
    return {
        "models": str(write_registry(root / "models.yaml", tiny_sd_dir)),
        "data_dir": str(root / "data"),
        "api_keys_file": str(keys),
        "url_signing_key": TEST_SIGNING_KEY,
        "max_body_bytes": 64 * 1024,
    }


class LocalHandle:
    """Stands in for a Ray DeploymentHandle: ``handle.method.remote(...)`` runs
    the method of an in-process object in a worker thread; with
    ``.options(stream=True)`` it iterates a generator method the same way."""

    def __init__(self, obj, stream: bool = False):
        self._obj = obj
        self._stream = stream

    def options(self, stream: bool = False, **_):
        return LocalHandle(self._obj, stream)

    def __getattr__(self, name):
        import asyncio
        import inspect

        method = getattr(self._obj, name)
        stream = self._stream

        async def iterate(*args, **kwargs):
            if inspect.isasyncgenfunction(method):
                async for item in method(*args, **kwargs):
                    yield item
                return
            gen = method(*args, **kwargs)
            done = object()
            while (item := await asyncio.to_thread(next, gen, done)) is not done:
                yield item

        class _Method:
            @staticmethod
            def remote(*args, **kwargs):
                if stream:
                    return iterate(*args, **kwargs)
                if inspect.iscoroutinefunction(method):
                    return method(*args, **kwargs)
                return asyncio.to_thread(method, *args, **kwargs)

        return _Method()


@pytest.fixture(scope="session")
def local_stages(app_args):
    """The real stage deployment classes, in-process, keyed like the builder's graph."""
    from serve_app.config import load_app_config
    from serve_app.deployments.post_processor import PostProcessor

    config, registry = load_app_config(app_args)
    return config, registry, real_stages(config, registry), LocalHandle(PostProcessor(config))


def real_stages(config, registry) -> dict[str, dict[str, "LocalHandle"]]:
    """Each pipeline's real TextEncoder, Denoiser and VaeDecoder, in-process, keyed like the builder's graph."""
    from serve_app.app import MODEL_STAGES

    return in_process_stages(config, registry, MODEL_STAGES)


def in_process_stages(config, registry, classes: dict[str, type]) -> dict[str, dict[str, "LocalHandle"]]:
    """What serve_app.app.build_graph deploys, as in-process objects: one
    instance of each model stage class per stage group, shared by the group's
    pipelines; keyed by pipeline, then stage."""
    cache = str(config.model_cache_path)
    pipelines = {}
    for names in config.stage_group_members(list(registry.pipelines)).values():
        members = {name: registry.pipelines[name] for name in names}
        handles = {stage: LocalHandle(cls(members, getattr(config.stages, stage), cache)) for stage, cls in classes.items()}
        pipelines.update({name: handles for name in names})
    return pipelines


def in_process_app(models: str | Path, data_dir: str | Path):
    """The real ingress ASGI app over a registry file, its model stages and
    post-processor in this process (no Ray), accepting TEST_API_KEY: what
    the embedded model's tests, its evaluation and the playground
    screenshot run against."""
    from serve_app.config import load_app_config
    from serve_app.deployments.ingress import ImagesIngress
    from serve_app.deployments.post_processor import PostProcessor

    keys = Path(data_dir) / "api_keys"
    keys.parent.mkdir(parents=True, exist_ok=True)
    keys.write_text(f"{TEST_API_KEY}\n")
    config, registry = load_app_config(
        {"models": str(models), "data_dir": str(data_dir), "api_keys_file": str(keys), "url_signing_key": TEST_SIGNING_KEY}
    )
    ingress = ImagesIngress(config, registry, TEST_SIGNING_KEY, real_stages(config, registry), LocalHandle(PostProcessor(config)))
    return ingress.__serve_build_asgi_app__()


@pytest.fixture()
def ingress_client(local_stages, monkeypatch):
    """The real FastAPI ingress (middleware, routes, error mapping) without Ray,
    built the way a replica builds it."""
    from fastapi.testclient import TestClient

    from serve_app.deployments.ingress import ImagesIngress

    config, registry, pipelines, post = local_stages
    monkeypatch.delenv("IMAGES_API_KEYS", raising=False)
    monkeypatch.delenv("IMAGES_URL_SIGNING_KEY", raising=False)
    instance = ImagesIngress(config, registry, TEST_SIGNING_KEY, pipelines, post)
    with TestClient(instance.__serve_build_asgi_app__(), raise_server_exceptions=False) as client:
        client.headers["Authorization"] = f"Bearer {TEST_API_KEY}"
        client.instance = instance
        yield client


def stub_ingress(app_args) -> "ImagesIngress":  # noqa: F821
    """The real ingress and post-processor on model stages that compute
    nothing (tests/stub_stages.py, at zero sleep), in-process."""
    from serve_app.config import load_app_config
    from serve_app.deployments.ingress import ImagesIngress
    from serve_app.deployments.post_processor import PostProcessor
    from tests.stub_stages import stub_model_stages

    config, registry = load_app_config(app_args)
    pipelines = in_process_stages(config, registry, stub_model_stages(step_s=0, decode_s=0))
    with pytest.MonkeyPatch.context() as env:
        env.delenv("IMAGES_API_KEYS", raising=False)
        env.delenv("IMAGES_URL_SIGNING_KEY", raising=False)
        return ImagesIngress(config, registry, TEST_SIGNING_KEY, pipelines, LocalHandle(PostProcessor(config)))
