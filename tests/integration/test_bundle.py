"""scripts/bundle and scripts/gpu_bench as a GPU host runs them: the offline
bundle installs into a fresh virtual environment that already has the
"host" packages, with no index; the service imports from it; and the GPU
benchmark runs from it, here on the CPU with a tiny model of the same
architecture (--device cpu --tiny), so that the one GPU command cannot rot.

The host is simulated: a fresh venv of this Python sees a folder of links
to the packages named by --host-has (and those packages' own dependencies)
in the project's venv, as a GPU host's python3 sees its preinstalled torch.
The bundle is built for this interpreter at xz level 0 (speed); the size
limit for a Python 3.12 GPU host is measured by the full build (README,
"Running on an offline GPU host").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
HOST_HAS = ["torch", "transformers", "numpy", "pillow", "safetensors", "accelerate", "huggingface-hub", "scipy", "numba", "llvmlite"]


def host_closure(names: list[str]) -> set[str]:
    """The named installed distributions and everything they require (as installed here)."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen.add(name)
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def link_host_packages(names: set[str], farm: Path) -> None:
    """Links to each distribution's top-level files and its metadata folder."""
    farm.mkdir()
    for name in names:
        dist = metadata.distribution(name)
        site = Path(dist.locate_file(""))
        for top in {Path(str(f)).parts[0] for f in dist.files or []}:
            src, dst = site / top, farm / top
            if top.startswith("..") or not src.exists() or dst.exists():
                continue
            dst.symlink_to(src)


def test_the_bundle_installs_offline_and_runs_the_gpu_benchmark_on_a_cpu(tmp_path):
    archive = tmp_path / "bundle.tar.xz"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bundle.py"), "--host-has", *HOST_HAS, "--out", str(archive), "--xz-level", "0"],
        check=True, cwd=tmp_path,
    )
    with tarfile.open(archive) as tar:
        first = tar.next()  # the manifest comes first: no need to decompress the wheels to read it
        assert first.name == "bundle/manifest.json"
        manifest = json.load(tar.extractfile(first))
    wheels = {w.split("-")[0].lower() for w in manifest["wheels"]}
    # What the host has is left out, with what only it needs (torch's sympy);
    # what the service and the benchmark need is in.
    assert {"ray", "diffusers", "fastapi", "serve_app", "openai"} <= wheels
    assert not wheels & {"torch", "numpy", "transformers", "scipy", "llvmlite", "sympy"}
    assert manifest["ray_left_out"]["bytes"] > 0

    # The host's pip and setuptools too: a venv's own (ensurepip's) would
    # shadow the host's, and torch asks for a newer setuptools.
    host = host_closure([*HOST_HAS, "pip", "setuptools", "psutil"])
    link_host_packages(host, tmp_path / "host-site")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = Path(subprocess.check_output([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    (site / "host.pth").write_text(str(tmp_path / "host-site") + "\n")

    env = {**os.environ, "PYTHON": str(py), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "", "PIP_CONSTRAINT": "", "PIP_CONFIG_FILE": os.devnull}
    for name in ("PYTHONPATH", "RAY_ADDRESS"):
        env.pop(name, None)
    out = tmp_path / "out"
    subprocess.run(
        [str(ROOT / "scripts" / "gpu_bench"), str(out), "--bundle", str(archive), "--device", "cpu", "--tiny", "--quick", "--models", "sdxl"],
        check=True, env=env, cwd=tmp_path, timeout=600,
    )
    summary = json.loads(next(out.glob("bench-*.json")).read_text())
    assert list(out.glob("bench-*.png")) and (out / "gpu_bench.log").exists()
    run = summary["models"]["sdxl"]
    assert run["baseline"]["sequential"]["images_per_s"] > 0 and run["baseline"]["batched"]["batch_size"] == 8
    assert {c: r["images"] for c, r in run["graph"].items()} == {"c1": 2, "c8": 8, "c32": 32}
    # Guidance doubles the UNet's batch: 8 images -> 16 rows per call.
    assert run["baseline"]["denoiser"]["batch"] == 16 and run["baseline"]["denoiser"]["flop_per_call"] > 0
    assert run["c8_vs_batched"] > 0 and run["c1_latency_ratio"] > 0

    probe = (
        "import serve_app, serve_app.app, ray, diffusers, torch, os;"
        "print(serve_app.__file__); print(os.path.isdir(os.path.join(os.path.dirname(ray.__file__), 'jars')))"
    )
    found = subprocess.run([py, "-c", probe], check=True, env=env, cwd=tmp_path, capture_output=True, text=True).stdout.split()
    assert found[0].startswith(str(venv)), found  # the bundle's copy, not this checkout's
    assert found[1] == "False"  # Ray's Java jars were left out
