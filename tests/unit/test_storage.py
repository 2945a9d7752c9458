"""ImageStore on a local folder and on the S3 endpoint; ImageSweeper with an injected clock."""

from __future__ import annotations

import asyncio
import json
import os
import time

import httpx
import pytest

from serve_app.config import AppConfig
from serve_app.deployments.sweeper import SWEEP_GRACE_S, ImageSweeper
from serve_app.storage import ImageStore, StorageError


@pytest.fixture()
def local_store(tmp_path) -> ImageStore:
    return ImageStore((tmp_path / "images").as_uri())


@pytest.fixture(scope="module")
def s3_bucket(s3_endpoint) -> str:
    s3_endpoint.client().create_bucket(Bucket="unit-images")
    return "unit-images"


def test_local_put_get_and_no_temporary_files_left(local_store, tmp_path):
    name = local_store.put(b"\x89PNG data", "png")
    assert local_store.get(name) == b"\x89PNG data"
    assert os.listdir(tmp_path / "images") == [name]
    assert local_store.url_for(name, 60) is None  # the ingress signs its own route
    assert local_store.get("../../etc/passwd") is None


@pytest.mark.parametrize("fault", ["rename", "short_write"])
def test_local_failed_write_raises_and_leaves_nothing(local_store, tmp_path, monkeypatch, fault):
    if fault == "rename":
        monkeypatch.setattr(local_store.fs, "mv", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    else:
        real_size = local_store.fs.size
        monkeypatch.setattr(local_store.fs, "size", lambda path: real_size(path) - 1)
    with pytest.raises(StorageError):
        local_store.put(b"0123456789", "png")
    assert os.listdir(tmp_path / "images") == []


def test_local_sweep_deletes_only_our_old_files(local_store, tmp_path):
    root = tmp_path / "images"
    old, fresh = local_store.put(b"old", "png"), local_store.put(b"fresh", "webp")
    (root / ".tmp-0123abcd-leftover.png").write_bytes(b"half")
    (root / "notes.txt").write_text("not ours")
    now = time.time()
    for f in (old, ".tmp-0123abcd-leftover.png", "notes.txt"):
        os.utime(root / f, (now - 7200, now - 7200))
    assert sorted(local_store.delete_older_than(now - 3600)) == sorted([old, ".tmp-0123abcd-leftover.png"])
    assert sorted(os.listdir(root)) == sorted([fresh, "notes.txt"])


def sweeper_config(store_url: str, **over) -> AppConfig:
    return AppConfig(image_store=store_url, url_ttl_s=3600, **over)


def test_sweeper_sweeps_by_the_injected_clock(tmp_path):
    config = sweeper_config((tmp_path / "images").as_uri(), sweep_interval_s=0)
    store = ImageStore.from_config(config)
    name = store.put(b"img", "png")
    written = os.path.getmtime(tmp_path / "images" / name)
    sweeper = ImageSweeper(config, clock=lambda: written + 3600 + SWEEP_GRACE_S - 1)
    assert sweeper.sweep() == []  # its URL may still be valid
    assert sweeper.sweep(now=written + 3600 + SWEEP_GRACE_S + 1) == [name]
    assert store.get(name) is None


def test_sweeper_runs_in_the_background_from_the_start(tmp_path):
    config = sweeper_config((tmp_path / "images").as_uri(), sweep_interval_s=3600)
    store = ImageStore.from_config(config)
    expired, fresh = store.put(b"a", "png"), store.put(b"b", "png")
    os.utime(tmp_path / "images" / expired, (time.time() - 3 * 3600,) * 2)

    async def run():
        sweeper = ImageSweeper(config)
        for _ in range(100):
            await asyncio.sleep(0.05)
            if store.get(expired) is None:
                break
        sweeper._task.cancel()

    asyncio.run(run())
    assert store.get(expired) is None and store.get(fresh) == b"b"


def test_builder_sweeps_local_stores_and_s3_only_when_asked():
    assert AppConfig().sweeps_image_store
    assert not AppConfig(sweep_interval_s=0).sweeps_image_store
    assert not AppConfig(image_store="s3://bucket/images").sweeps_image_store
    assert AppConfig(image_store="s3://bucket/images", sweep_remote_store=True).sweeps_image_store


@pytest.mark.parametrize("fmt, content_type", [("png", "image/png"), ("jpeg", "image/jpeg"), ("webp", "image/webp")])
def test_s3_put_is_one_object_with_content_type_and_a_presigned_url(s3_endpoint, s3_bucket, fmt, content_type):
    store = ImageStore(f"s3://{s3_bucket}/generated", s3_endpoint.storage_options)
    name = store.put(b"image bytes " + fmt.encode(), fmt)
    assert s3_endpoint.keys(s3_bucket, "generated/") == [f"generated/{name}"]  # no temporary object
    head = s3_endpoint.client().head_object(Bucket=s3_bucket, Key=f"generated/{name}")
    assert head["ContentType"] == content_type and head["ContentLength"] == len(b"image bytes " + fmt.encode())
    url = store.url_for(name, 600)
    assert url.startswith(f"{s3_endpoint.url}/{s3_bucket}/generated/{name}?") and "X-Amz-Expires=600" in url
    resp = httpx.get(url)  # no credentials
    assert resp.status_code == 200 and resp.headers["content-type"] == content_type
    assert resp.content == b"image bytes " + fmt.encode()
    store.delete([name])
    assert s3_endpoint.keys(s3_bucket, "generated/") == []


def test_s3_missing_bucket_is_a_storage_error(s3_endpoint):
    store = ImageStore("s3://no-such-bucket/generated", s3_endpoint.storage_options)
    with pytest.raises(StorageError, match="no-such-bucket"):
        store.put(b"x", "png")


def test_s3_sweep_keeps_fresh_and_foreign_objects(s3_endpoint, s3_bucket):
    store = ImageStore(f"s3://{s3_bucket}/swept", s3_endpoint.storage_options)
    name = store.put(b"x", "png")
    s3_endpoint.client().put_object(Bucket=s3_bucket, Key="swept/README.txt", Body=b"not ours")
    assert store.delete_older_than(time.time() - 60) == []
    assert store.delete_older_than(time.time() + 60) == [name]
    assert s3_endpoint.keys(s3_bucket, "swept/") == ["swept/README.txt"]


def test_readme_lifecycle_rule_is_accepted_by_s3(s3_endpoint):
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    rules = json.loads(readme.split("`lifecycle.json`:\n\n```json\n", 1)[1].split("```", 1)[0])
    assert "image_store: s3://my-bucket/generated" in readme  # the rule's prefix is the example store's
    client = s3_endpoint.client()
    client.create_bucket(Bucket="lifecycle")
    client.put_bucket_lifecycle_configuration(Bucket="lifecycle", LifecycleConfiguration=rules)
    (rule,) = client.get_bucket_lifecycle_configuration(Bucket="lifecycle")["Rules"]
    assert rule["Status"] == "Enabled" and rule["Expiration"] == {"Days": 1}
    assert rule["Filter"] == {"Prefix": "generated/"}
