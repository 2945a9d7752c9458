from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from serve_app.config import AppConfig, ModelRegistry, load_app_config, parse_size

ROOT = Path(__file__).resolve().parents[2]


def shipped_args(path: str) -> dict:
    cfg = yaml.safe_load((ROOT / path).read_text())
    (app,) = cfg["applications"]
    assert app["import_path"] == "serve_app.app:build_app"
    return app["args"]


SHIPPED_PROFILES = ["serve_config.yaml", "configs/serve_config.gpu.yaml", "configs/serve_config.autoscale.yaml"]


@pytest.mark.parametrize("path", SHIPPED_PROFILES)
def test_shipped_serve_configs_validate(path):
    config, registry = load_app_config(shipped_args(path))
    assert registry.default_model == "dall-e-2"
    assert {"dall-e-2", "dall-e-3", "gpt-image-1"} <= {m.id for m in registry.models}
    for stage in ("text_encoder", "denoiser", "vae_decoder"):
        assert getattr(config.stages, stage).torch_threads


def test_gpu_profile_packs_stages_on_one_gpu():
    config, _ = load_app_config(shipped_args("configs/serve_config.gpu.yaml"))
    gpus = {s: getattr(config.stages, s).ray_actor_options.get("num_gpus", 0) for s in ("text_encoder", "denoiser", "vae_decoder")}
    assert all(0 < g < 1 for g in gpus.values()) and sum(gpus.values()) <= 1
    assert gpus["denoiser"] == max(gpus.values())


@pytest.mark.parametrize("path", SHIPPED_PROFILES)
def test_shipped_profiles_bind_loopback_and_time_out_after_the_app_deadline(path):
    cfg = yaml.safe_load((ROOT / path).read_text())
    assert cfg["http_options"]["host"] == "127.0.0.1" and cfg["http_options"]["port"] == 8000
    config, _ = load_app_config(shipped_args(path))
    # The app's 504 must come before the proxy's plain-text 408.
    assert cfg["http_options"]["request_timeout_s"] > config.request_deadline_s


def registry(**over) -> dict:
    base = {
        "pipelines": {"p": {"source": "/m", "sizes": ["512x512"], "default_size": "512x512"}},
        "models": [{"id": "dall-e-2", "pipeline": "p", "family": "dall-e-2"}],
        "default_model": "dall-e-2",
    }
    base.update(over)
    return base


def test_valid_registry():
    assert ModelRegistry.model_validate(registry()).model("dall-e-2").pipeline == "p"


@pytest.mark.parametrize(
    "over",
    [
        {"default_model": "nope"},
        {"models": [{"id": "dall-e-2", "pipeline": "missing", "family": "dall-e-2"}]},
        {"models": [{"id": "dall-e-2", "pipeline": "p", "family": "dall-e-9"}]},
        {"models": [{"id": "dall-e-2", "pipeline": "p", "family": "dall-e-2"}] * 2},
        {"pipelines": {"p": {"source": "/m", "sizes": ["500x500"], "default_size": "500x500"}}},
        {"pipelines": {"p": {"source": "/m", "sizes": ["512x512"], "default_size": "1024x1024"}}},
        {"pipelines": {"p": {"source": "/m", "unknown_field": 1}}},
    ],
)
def test_invalid_registry_is_refused(over):
    with pytest.raises(ValidationError):
        ModelRegistry.model_validate(registry(**over))


def test_unknown_app_arg_is_refused():
    with pytest.raises(ValidationError):
        AppConfig.model_validate({"modles": "typo.yaml"})


def test_parse_size():
    assert parse_size("1792x1024") == (1792, 1024)
    for bad in ("auto", "512", "512x", "511x512", "0x0"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_relative_paths_resolve_against_project_root():
    config = AppConfig(data_dir="data")
    assert config.data_path == ROOT / "data"
    assert config.image_store_url == (ROOT / "data" / "images").as_uri()


def test_model_cache_dir_expands_variables_where_it_is_resolved(monkeypatch):
    """The builder hands replicas the setting as written; each resolves it on
    its own node, with that node's environment."""
    config = AppConfig(model_cache_dir="$NODE_DISK/model-cache")
    assert config.model_cache_setting == "$NODE_DISK/model-cache"
    monkeypatch.setenv("NODE_DISK", "/mnt/a")
    assert config.model_cache_path == Path("/mnt/a/model-cache")
    monkeypatch.setenv("NODE_DISK", "/mnt/b")
    assert config.model_cache_path == Path("/mnt/b/model-cache")


def test_storage_and_cache_defaults_and_limits():
    config = AppConfig(data_dir="data")
    assert config.model_cache_path == ROOT / "data" / "model-cache"
    assert AppConfig(model_cache_dir="/var/cache/models").model_cache_path == Path("/var/cache/models")
    with pytest.raises(ValidationError):
        AppConfig(url_ttl_s=8 * 24 * 3600)  # longer than an S3 presigned URL may live


def test_a_stage_given_in_part_keeps_its_other_defaults():
    from serve_app.config import AppConfig

    config = AppConfig.model_validate({"stages": {"denoiser": {"num_replicas": 2}, "ingress": {"ray_actor_options": {}}}})
    assert config.stages.denoiser.num_replicas == 2 and config.stages.denoiser.torch_threads == 2
    assert config.stages.ingress.max_ongoing_requests == 256


@pytest.mark.parametrize(
    "args, words",
    [
        ({"max_concurrent_requests": 64, "stages": {"ingress": {"max_ongoing_requests": 64}}}, "must be larger"),
        ({"stages": {"ingress": {"max_queued_requests": 10}}}, "must be left unset"),
    ],
)
def test_ingress_limits_that_would_hide_the_429_are_refused(args, words):
    from pydantic import ValidationError

    from serve_app.config import AppConfig

    with pytest.raises(ValidationError, match=words):
        AppConfig.model_validate(args)


def test_the_builder_takes_exactly_the_args_dict_as_serve_run_requires():
    # `serve run serve_config.yaml` refuses a builder with any other signature
    # ("Application builder functions should take exactly one parameter").
    import inspect

    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve import Application

    from serve_app.app import build_app

    assert len(inspect.signature(build_app).parameters) == 1
    app = call_user_app_builder_with_args_if_necessary(build_app, shipped_args("serve_config.yaml"))
    assert isinstance(app, Application)


def test_stage_groups_map_pipelines_to_shared_deployments():
    config = AppConfig.model_validate({"stage_groups": {"small": ["a", "b"]}})
    assert config.stage_group_members(["a", "b", "c"]) == {"small": ["a", "b"], "c": ["c"]}
    assert AppConfig().stage_group_members(["a", "b"]) == {"a": ["a"], "b": ["b"]}


@pytest.mark.parametrize(
    "groups, words",
    [
        ({"small": ["a", "zz"]}, "no pipeline 'zz'"),
        ({"one": ["a"], "two": ["a", "b"]}, "in both 'one' and 'two'"),
        ({"b": ["a"]}, "named like pipeline 'b'"),
        ({"empty": []}, "lists no pipeline"),
    ],
)
def test_stage_groups_that_do_not_fit_the_registry_are_refused(groups, words):
    with pytest.raises(ValueError, match=words):
        AppConfig.model_validate({"stage_groups": groups}).stage_group_members(["a", "b"])


def test_a_stage_group_naming_an_unknown_pipeline_fails_at_load(tmp_path):
    reg = tmp_path / "models.yaml"
    reg.write_text(yaml.safe_dump(registry()))
    with pytest.raises(ValueError, match="stage_groups.g: the registry has no pipeline 'nope'"):
        load_app_config({"models": str(reg), "stage_groups": {"g": ["nope"]}})
