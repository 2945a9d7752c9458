"""The scale-out configs (autoscaling profiles, the KubeRay manifest) against
Ray Serve's own schemas and our AppConfig, and the shared-store warning."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from serve_app.config import AppConfig, StageOptions, load_app_config
from serve_app.storage import ImageStore, local_store_warning

ROOT = Path(__file__).resolve().parents[2]
MODEL_STAGES = ("text_encoder", "denoiser", "vae_decoder")


def load(path: str) -> dict:
    return yaml.safe_load((ROOT / path).read_text())


def rayservice_serve_config() -> dict:
    manifest = load("configs/kuberay/rayservice.yaml")
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    return yaml.safe_load(manifest["spec"]["serveConfigV2"])


def test_rayservice_serve_config_is_a_valid_serve_deploy_config_of_the_shipped_app():
    from ray.serve.schema import ServeDeploySchema

    serve_config = rayservice_serve_config()
    schema = ServeDeploySchema.model_validate(serve_config)
    (app,) = schema.applications
    assert app.import_path == "serve_app.app:build_app" and app.route_prefix == "/"
    # The args as build_app validates them: an unknown or misspelt key, or a
    # stage option that no longer exists, fails here.
    config, registry = load_app_config(app.args)
    assert AppConfig.model_validate(app.args) == config
    assert registry.pipelines
    # Pods are nodes with disks of their own: images go to a shared store.
    assert not ImageStore(config.image_store_url).is_local


def test_rayservice_scales_like_the_shipped_autoscaling_profile():
    """The manifest's stages autoscale with the profile's targets, so tuning one
    without the other fails here."""
    manifest_stages = rayservice_serve_config()["applications"][0]["args"]["stages"]
    profile_stages = load("configs/serve_config.autoscale.yaml")["applications"][0]["args"]["stages"]
    assert set(manifest_stages) == set(profile_stages)
    for stage, options in profile_stages.items():
        assert manifest_stages[stage]["autoscaling_config"] == options["autoscaling_config"], stage


def test_rayservice_has_a_head_without_replicas_and_a_worker_group():
    cluster = load("configs/kuberay/rayservice.yaml")["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == "2.60.0"
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (workers,) = cluster["workerGroupSpecs"]
    assert workers["minReplicas"] <= workers["replicas"] <= workers["maxReplicas"]


def test_rayservice_pods_run_with_the_shipped_ray_env():
    """Every pod (head and workers share one env list) gets configs/ray.env's
    variables with its values, so changing one without the other fails here."""
    from serve_app.config import read_env_file

    cluster = load("configs/kuberay/rayservice.yaml")["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    shipped = read_env_file()
    assert shipped
    for group in groups:
        (container,) = group["template"]["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert {k: env.get(k) for k in shipped} == shipped, group.get("groupName", "head")


def test_the_ray_env_file_parses_and_refuses_a_line_without_a_value(tmp_path):
    from serve_app.config import read_env_file

    good = tmp_path / "good.env"
    good.write_text("# a comment\n\nA=1\n B = two words \n")
    assert read_env_file(good) == {"A": "1", "B": "two words"}
    bad = tmp_path / "bad.env"
    bad.write_text("JUST_A_NAME\n")
    with pytest.raises(ValueError, match="JUST_A_NAME"):
        read_env_file(bad)


@pytest.mark.parametrize("path", ["configs/serve_config.autoscale.yaml", "configs/serve_config.gpu.yaml"])
def test_autoscaling_profiles_scale_each_model_stage_on_its_own(path):
    from ray.serve.schema import ServeDeploySchema

    serve_config = load(path)
    ServeDeploySchema.model_validate(serve_config)
    # Ray warns of settings it will refuse in a later release (e.g. a look-back
    # window no longer than the metrics interval).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config, _ = load_app_config(serve_config["applications"][0]["args"])
    stages = {name: getattr(config.stages, name) for name in MODEL_STAGES}
    for name, options in stages.items():
        assert options.autoscaling_config and options.autoscaling_config["min_replicas"] >= 1, name
    denoiser = stages["denoiser"]
    # Batches fill before another denoiser is asked for (README "Scaling each stage").
    assert denoiser.autoscaling_config["target_ongoing_requests"] == denoiser.max_batch_size
    assert denoiser.max_ongoing_requests >= denoiser.autoscaling_config["target_ongoing_requests"]
    # The text encoder is cheap (7 ms a prompt against 280 ms of denoising on
    # a CPU): it takes several times the denoiser's requests per replica before growing.
    encoder_target = stages["text_encoder"].autoscaling_config["target_ongoing_requests"]
    assert encoder_target >= 4 * denoiser.autoscaling_config["target_ongoing_requests"]
    # Slow to give a loaded model back, quicker to ask for one.
    for options in stages.values():
        assert options.autoscaling_config["downscale_delay_s"] > options.autoscaling_config["upscale_delay_s"]


def test_a_misspelt_autoscaling_key_is_refused_not_ignored():
    # Ray's AutoscalingConfig would accept it and keep its own default.
    with pytest.raises(ValidationError, match="upscale_delay"):
        StageOptions.model_validate({"autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "upscale_delay": 5}})
    with pytest.raises(ValidationError, match="min_replicas"):
        StageOptions.model_validate({"autoscaling_config": {"min_replicas": 3, "max_replicas": 2}})


def test_a_local_store_on_more_than_one_node_is_warned_about(tmp_path):
    local = ImageStore(tmp_path.as_uri())
    message = local_store_warning(local, alive_nodes=3)
    assert message and "3 nodes" in message and "s3://" in message
    assert local_store_warning(local, alive_nodes=1) is None
    s3 = ImageStore("s3://bucket/generated", {"endpoint_url": "http://127.0.0.1:9", "key": "k", "secret": "s"})
    assert local_store_warning(s3, alive_nodes=3) is None
