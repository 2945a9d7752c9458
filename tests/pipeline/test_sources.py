"""Model sources: local folders, s3:// on the S3 endpoint (per-stage cache, one
download per node, never a half-finished folder), Hugging Face ids, and the
broken state of a stage whose source cannot be read."""

from __future__ import annotations

import asyncio

import os
import threading
from pathlib import Path

import numpy as np
import pytest
import fsspec

from serve_app.config import PipelineConfig, StageOptions
from serve_app.deployments.denoiser import Denoiser
from serve_app.deployments.replica import ModelUnavailable
from serve_app.deployments.text_encoder import TextEncoder
from serve_app.pipeline.architectures.sd import StableDiffusion
from serve_app.pipeline.sources import ModelSourceError, fetch_source
from serve_app.pipeline.types import DenoiseJob

TEXT_FILES, DENOISER_FILES, VAE_FILES = (StableDiffusion.files(s) for s in ("text_encoder", "denoiser", "vae_decoder"))
STAGE_FILES = [TEXT_FILES, DENOISER_FILES, VAE_FILES]


def s3_pipeline(s3_endpoint, s3_models, name="tiny-sd") -> PipelineConfig:
    return PipelineConfig(source=f"{s3_models}/{name}/", storage_options=s3_endpoint.storage_options)


def tree(root: Path) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), root) for d, _, names in os.walk(root) for f in names}


@pytest.mark.parametrize(
    "source, kind",
    [
        ("s3://bucket/models/sdxl/", "url"),
        ("gs://bucket/m", "url"),
        ("file:///models/sdxl", "local"),
        ("/models/sdxl", "local"),
        ("./owner/name", "local"),
        ("data/models/tiny-sd", "local"),
        ("stabilityai/stable-diffusion-xl-base-1.0", "huggingface"),
    ],
)
def test_source_kind(source, kind):
    assert PipelineConfig(source=source).source_kind == kind


def test_builtin_needs_a_local_source():
    with pytest.raises(ValueError, match="local directory"):
        PipelineConfig(source="s3://bucket/tiny", builtin="tiny-sd")


def test_each_stage_downloads_only_its_files(s3_endpoint, s3_models, tiny_sd_dir, tmp_path):
    pipeline = s3_pipeline(s3_endpoint, s3_models)
    roots = [fetch_source(pipeline, files, tmp_path) for files in STAGE_FILES]
    everything = tree(tiny_sd_dir)
    te, dn, vae = (tree(r) for r in roots)
    assert te == {f for f in everything if f.split("/")[0] in ("model_index.json", "tokenizer", "text_encoder")}
    assert dn == {f for f in everything if f.split("/")[0] in ("model_index.json", "unet", "scheduler")} | {"vae/config.json"}
    assert vae == {f for f in everything if f.split("/")[0] in ("model_index.json", "vae")} | {"unet/config.json"}
    for rel in te | dn | vae:
        assert (tiny_sd_dir / rel).read_bytes() == next(r / rel for r in roots if (r / rel).exists()).read_bytes()
    # The cache holds the three complete folders and their locks, nothing half-done.
    (key,) = os.listdir(tmp_path)
    assert sorted(os.listdir(tmp_path / key)) == sorted(
        [n for f in STAGE_FILES for n in (f.name, f"{f.name}.lock")]
    )


def test_replicas_on_one_node_download_once(s3_endpoint, s3_models, tmp_path):
    pipeline = s3_pipeline(s3_endpoint, s3_models)
    unet = "/models/tiny-sd/unet/diffusion_pytorch_model.safetensors"
    before = s3_endpoint.requests.count(("GET", unet))
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(fetch_source(pipeline, DENOISER_FILES, tmp_path)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and len(set(results)) == 1
    assert s3_endpoint.requests.count(("GET", unet)) - before == 1


def test_a_failed_download_is_never_used_and_is_cleaned_up(s3_endpoint, s3_models, tmp_path, monkeypatch):
    pipeline = s3_pipeline(s3_endpoint, s3_models)
    fs, _ = fsspec.core.url_to_fs(pipeline.source, **pipeline.storage_options)  # fsspec caches instances
    real_get_file = fs.get_file

    def failing_get_file(rpath, lpath, **kw):
        if "unet/" in rpath:
            Path(lpath).write_bytes(b"half")
            raise ConnectionError("connection reset")
        return real_get_file(rpath, lpath, **kw)

    monkeypatch.setattr(fs, "get_file", failing_get_file)
    with pytest.raises(ModelSourceError, match="cannot download unet/"):
        fetch_source(pipeline, DENOISER_FILES, tmp_path)
    (key,) = os.listdir(tmp_path)
    assert os.listdir(tmp_path / key) == ["denoiser.lock"]  # no folder, not even a temporary one
    # A crash (not an exception) would leave a temporary folder: the next attempt removes it.
    (tmp_path / key / ".denoiser.tmp-crashed").mkdir()
    monkeypatch.setattr(fs, "get_file", real_get_file)
    root = fetch_source(pipeline, DENOISER_FILES, tmp_path)
    assert (root / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size > 1000
    assert sorted(os.listdir(tmp_path / key)) == ["denoiser", "denoiser.lock"]


@pytest.mark.parametrize(
    "source, message",
    [
        ("s3://models/partial", r"^s3://models/partial: missing unet/\*$"),
        ("s3://no-such-bucket/sdxl", r"^s3://no-such-bucket/sdxl: "),
        ("s3://models/nothing-here", r"^s3://models/nothing-here: no files there"),
        ("s3://models/wrong-key", r"^s3://models/wrong-key: cannot be read \(PermissionError"),
    ],
)
def test_unreadable_sources_name_the_source_and_the_missing_part(s3_endpoint, s3_models, tmp_path, source, message):
    pipeline = PipelineConfig(source=source, storage_options=s3_endpoint.storage_options)
    if source == "s3://models/wrong-key":
        pipeline.storage_options["key"] = "AKIAWRONGKEY00000000"
    with pytest.raises(ModelSourceError, match=message):
        fetch_source(pipeline, DENOISER_FILES, tmp_path)
    # Nothing, complete or half-made, is left to load.
    assert not list(tmp_path.rglob("denoiser")) and not list(tmp_path.rglob(".denoiser.tmp-*"))


def test_local_sources_are_used_in_place_and_checked(tiny_sd_dir, tmp_path):
    assert fetch_source(PipelineConfig(source=str(tiny_sd_dir)), VAE_FILES, tmp_path) == tiny_sd_dir
    with pytest.raises(ModelSourceError, match="missing model_index.json, vae/"):
        fetch_source(PipelineConfig(source=str(tmp_path / "none")), VAE_FILES, tmp_path)


def test_huggingface_ids_download_only_the_stage_files(tmp_path, monkeypatch, tiny_sd_dir):
    """Only the call is checked here: no machine running the tests reaches the Hub."""
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(tiny_sd_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    pipeline = PipelineConfig(source="owner/model", storage_options={"revision": "v1"})
    assert fetch_source(pipeline, TEXT_FILES, tmp_path) == tiny_sd_dir
    ((repo, kwargs),) = calls
    assert repo == "owner/model" and kwargs["revision"] == "v1"
    assert kwargs["allow_patterns"] == list(TEXT_FILES.patterns)
    assert kwargs["cache_dir"] == str(tmp_path / "huggingface")


def test_a_stage_with_an_unreadable_source_stays_up_and_says_why(s3_endpoint, s3_models, tmp_path):
    pipeline = s3_pipeline(s3_endpoint, s3_models, "partial")
    opts = StageOptions(torch_threads=1)
    encoder = TextEncoder({"partial": pipeline}, opts, str(tmp_path))
    assert encoder.problem() is None  # the text encoder's files are all there
    denoiser = Denoiser({"partial": pipeline}, opts, str(tmp_path))
    problem = denoiser.problem()
    assert problem.startswith("cannot load the denoiser stage from s3://models/partial/: missing unet/*")
    assert denoiser.describe()["problem"] == problem and denoiser.describe()["modules"] == []
    job = DenoiseJob(asyncio.run(encoder.encode("otter")), [1], 64, 64, 1, 1.0)
    assert isinstance(job.embeddings.prompt_embeds, np.ndarray)
    with pytest.raises(ModelUnavailable, match="unet"):
        asyncio.run(denoiser.denoise(job))
