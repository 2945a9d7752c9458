"""Where a pipeline's files come from: a local directory, any fsspec URL, or a Hugging Face model id.

Each stage asks only for the files it loads (the text encoder never fetches
the UNet). A remote source is copied into a local cache once per node: each
stage's subset gets its own cache folder, downloaded into a temporary folder
and renamed into place when complete, under a file lock so that the replicas
on one node download it once. A cache folder that exists is therefore always
complete; a crashed download leaves only a temporary folder, which the next
attempt removes. The cache is keyed by the source URL, never refreshed: to
change a model, point `source` at a new URL (or delete its cache folder).
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import fsspec
from filelock import FileLock

from serve_app.config import PipelineConfig
from serve_app.pipeline.components import ModelLayoutError

# Weights for other frameworks, which diffusers' torch loaders never read.
IGNORED_PATTERNS = ("*.msgpack", "*.onnx", "*.onnx_data", "*.pb", "*.h5", "*.ckpt")


class ModelSourceError(ModelLayoutError):
    """A pipeline source cannot be read, or lacks files a stage needs. The
    message starts with the source, so it says which model is broken."""


@dataclass(frozen=True)
class SourceFiles:
    """The part of a pipeline one stage loads.

    ``patterns`` are fnmatch globs over paths relative to the pipeline root,
    as Hugging Face's ``allow_patterns``; ``*`` also matches ``/``. Each must
    match at least one file. ``name`` names the stage's cache folder.
    """

    name: str
    patterns: tuple[str, ...]


def fetch_source(pipeline: PipelineConfig, files: SourceFiles, cache_dir: Path) -> Path:
    """A local directory holding ``files`` of the pipeline's source.

    Raises ModelSourceError naming the source and what is missing or unreadable.
    """
    kind = pipeline.source_kind
    if kind == "local":
        root = pipeline.path
    elif kind == "huggingface":
        root = _snapshot(pipeline, files, cache_dir)
    else:
        root = _download(pipeline, files, cache_dir / _cache_key(pipeline) / files.name)
    _check_complete(pipeline.source, files, _relative_files(root))
    return root


def _cache_key(pipeline: PipelineConfig) -> str:
    endpoint = str(pipeline.storage_options.get("endpoint_url", ""))
    digest = hashlib.sha256(f"{endpoint}\n{pipeline.source}".encode()).hexdigest()[:12]
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", pipeline.source.split("://", 1)[-1]).strip("-.")[-60:]
    return f"{readable}-{digest}"


def _wanted(path: str, files: SourceFiles) -> bool:
    return any(fnmatch.fnmatchcase(path, p) for p in files.patterns) and not any(
        fnmatch.fnmatchcase(path.rsplit("/", 1)[-1], p) for p in IGNORED_PATTERNS
    )


def _check_complete(source: str, files: SourceFiles, present: list[str]) -> None:
    missing = [p for p in files.patterns if not any(fnmatch.fnmatchcase(f, p) for f in present)]
    if missing:
        raise ModelSourceError(f"{source}: missing {', '.join(missing)}")


def _relative_files(root: Path) -> list[str]:
    return [
        os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/") for d, _, names in os.walk(root) for f in names
    ]


def _download(pipeline: PipelineConfig, files: SourceFiles, target: Path) -> Path:
    if target.is_dir():  # only ever renamed into place whole
        return target
    source = pipeline.source
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{target}.lock"):
        if target.is_dir():  # another replica finished it while we waited
            return target
        # We hold the lock, so any temporary folder here is from a crashed attempt.
        for stale in target.parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        try:
            fs, root = fsspec.core.url_to_fs(source, **pipeline.storage_options)
            listing = fs.find(root, detail=True)
        except Exception as exc:
            raise ModelSourceError(f"{source}: cannot be read ({type(exc).__name__}: {exc})") from exc
        sizes = {
            path[len(root) :].lstrip("/"): info.get("size")
            for path, info in listing.items()
            if info.get("type") == "file"
        }
        wanted = {rel: size for rel, size in sizes.items() if _wanted(rel, files)}
        if not sizes:
            raise ModelSourceError(f"{source}: no files there (wrong bucket, prefix or credentials?)")
        _check_complete(source, files, list(wanted))
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            for rel, size in sorted(wanted.items()):
                local = tmp / rel
                local.parent.mkdir(parents=True, exist_ok=True)
                try:
                    fs.get_file(f"{root}/{rel}", str(local))
                except Exception as exc:
                    raise ModelSourceError(f"{source}: cannot download {rel} ({type(exc).__name__}: {exc})") from exc
                if size is not None and local.stat().st_size != size:
                    raise ModelSourceError(f"{source}: {rel} arrived with {local.stat().st_size} of {size} bytes")
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _snapshot(pipeline: PipelineConfig, files: SourceFiles, cache_dir: Path) -> Path:
    """Hugging Face's own cache already downloads atomically under file locks."""
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(
            pipeline.source,
            allow_patterns=list(files.patterns),
            ignore_patterns=list(IGNORED_PATTERNS),
            cache_dir=str(cache_dir / "huggingface"),
            **pipeline.storage_options,
        )
    except Exception as exc:
        raise ModelSourceError(f"{pipeline.source}: Hugging Face download failed ({type(exc).__name__}: {exc})") from exc
    return Path(path)
