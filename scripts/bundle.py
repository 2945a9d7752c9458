"""Build an offline bundle: the service and every package it needs, for a
host with no network.

    scripts/bundle --python 3.12 --platform manylinux_2_28_x86_64 \\
        --host-has torch transformers numpy pillow safetensors accelerate huggingface-hub \\
        --out dist/bundle-py312.tar.xz

On the host (no network; ``python3`` is the interpreter that already has
the packages named by ``--host-has``)::

    tar xf bundle-py312.tar.xz && bundle/install.sh        # into python3's environment
    bundle/install.sh --target /tmp/site                   # or into a folder, then PYTHONPATH=/tmp/site

What is in it: ``wheels/`` (the project's own wheel and every dependency
that the host does not have, resolved by pip for the target Python and
platform), ``configs/`` and ``scripts/`` (the benchmark and its configs),
``install.sh`` and ``manifest.json``.

Size: Ray's wheel is most of it. Serving never loads Ray's Java jars or
the dashboard's JavaScript source maps, so they are left out of Ray's wheel
(and out of its RECORD, so pip installs it cleanly). Wheels are deflate
zips, which xz cannot shrink further; every wheel is re-stored uncompressed
so that the one xz stream over the whole bundle compresses across files.
``--max-mib`` makes the build fail when the archive is larger than the
host can take.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent

# What serving never loads from Ray's wheel (path prefixes and suffixes
# inside the wheel): the Java worker's jars, RLlib (a reinforcement-learning
# library nothing in Serve imports), the dashboard's source maps.
RAY_LEFT_OUT_PREFIXES = ("ray/jars/", "ray/rllib/")
RAY_LEFT_OUT_SUFFIXES = (".map",)

# The project files a bundle carries besides its wheels: what scripts/gpu_bench runs.
PROJECT_FILES = ("configs", "scripts/bench.py", "scripts/local_graph.py", "scripts/peer_server.py", "scripts/gpu_bench", "serve_config.yaml")


def log(msg: str) -> None:
    print(f"[bundle] {msg}", flush=True)


# --- resolving ------------------------------------------------------------------

def target_flags(python: str | None, platforms: list[str]) -> list[str]:
    """pip's flags for a foreign interpreter (none for this one)."""
    if not python:
        return []
    flags = ["--python-version", python, "--implementation", "cp"]
    for p in platforms:
        flags += ["--platform", p]
    return flags


def marker_environment(python: str | None) -> dict[str, str]:
    """The target's PEP 508 marker values (Linux x86-64 when cross-building)."""
    env = default_environment()
    if python:
        env.update(
            python_version=python,
            python_full_version=f"{python}.0",
            implementation_name="cpython",
            platform_python_implementation="CPython",
            sys_platform="linux",
            platform_system="Linux",
            platform_machine="x86_64",
            os_name="posix",
        )
    return env


def resolve(requirement: str, flags: list[str], work: Path) -> list[dict]:
    """pip's resolution of the project for the target: its report's ``install`` list (no download)."""
    report = work / "report.json"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed", "--only-binary=:all:",
         "--report", str(report), "--target", str(work / "unused"), *flags, requirement],
        check=True,
    )
    return json.loads(report.read_text())["install"]


def needed(items: list[dict], root: str, extras: frozenset[str], host_has: set[str], env: dict[str, str]) -> list[dict]:
    """The resolved packages reachable from the project without passing
    through one the host already has (whose own dependencies the host
    therefore has too)."""
    by_name = {canonicalize_name(i["metadata"]["name"]): i for i in items}
    keep: dict[str, dict] = {}
    queue: list[tuple[str, frozenset[str]]] = [(root, extras)]
    seen: set[tuple[str, frozenset[str]]] = set()
    while queue:
        name, extras = queue.pop()
        if (name, extras) in seen or name in host_has:
            continue
        seen.add((name, extras))
        item = by_name[name]
        keep[name] = item
        for spec in item["metadata"].get("requires_dist", []):
            req = Requirement(spec)
            if req.marker and not any(req.marker.evaluate({**env, "extra": e}) for e in (extras or {""})):
                continue
            dep = canonicalize_name(req.name)
            if dep not in by_name and dep not in host_has:
                raise SystemExit(f"pip's resolution lacks {dep}, needed by {name}")
            queue.append((dep, frozenset(req.extras)))
    return [keep[n] for n in sorted(keep)]


# --- wheels ---------------------------------------------------------------------------

def download(items: list[dict], flags: list[str], dest: Path) -> None:
    pins = [f"{i['metadata']['name']}=={i['metadata']['version']}" for i in items]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "-d", str(dest), *flags, *pins],
        check=True,
    )


def record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def restore_wheel(path: Path, leave_out=lambda name: False) -> int:
    """Rewrite a wheel with its members stored uncompressed, leaving out the
    members ``leave_out`` names (and their RECORD lines); returns the bytes left out."""
    dropped = 0
    buf = io.BytesIO()
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as dst:
        record_name = next(n for n in src.namelist() if n.endswith(".dist-info/RECORD"))
        kept_records = []
        for info in src.infolist():
            if info.filename == record_name:
                continue
            if leave_out(info.filename):
                dropped += info.file_size
                continue
            data = src.read(info)
            out = zipfile.ZipInfo(info.filename, info.date_time)
            out.external_attr = info.external_attr
            out.compress_type = zipfile.ZIP_STORED
            dst.writestr(out, data)
            kept_records.append(record_line(info.filename, data))
        kept_records.append(f"{record_name},,")
        dst.writestr(record_name, "\n".join(kept_records) + "\n")
    path.write_bytes(buf.getvalue())
    return dropped


def ray_leaves_out(name: str) -> bool:
    return name.startswith(RAY_LEFT_OUT_PREFIXES) or (name.startswith("ray/dashboard/") and name.endswith(RAY_LEFT_OUT_SUFFIXES))


# --- the bundle -------------------------------------------------------------------------

INSTALL_SH = """#!/bin/sh
# Install this bundle with no network. Default: into the environment of
# $PYTHON (python3), resolving against what it already has, so that a
# missing package is an error here rather than at import time. With
# --target DIR: every wheel into DIR (then export PYTHONPATH=DIR).
set -eu
here="$(cd "$(dirname "$0")" && pwd)"
py="${PYTHON:-python3}"
# Bytecode is compiled afterwards, on every core: left to first import,
# each Ray worker process compiled the same modules at once (in the
# bundle's test, the CPU benchmark's graph came up at 61 s instead of 77 s).
if [ "${1:-}" = "--target" ]; then
  "$py" -m pip install --quiet --no-index --no-deps --no-compile --disable-pip-version-check --target "$2" "$here"/wheels/*.whl
  site="$2"
else
  "$py" -m pip install --quiet --no-index --no-compile --disable-pip-version-check --find-links "$here/wheels" "serve-app[$(cat "$here/extras")]"
  site="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
fi
"$py" -m compileall -q -j 0 "$site" >/dev/null || echo "some modules did not compile; they compile on first import"
echo "installed the bundle's $(ls "$here"/wheels | wc -l) wheels"
"""


def build(args: argparse.Namespace) -> Path:
    started = time.perf_counter()
    host_has = {canonicalize_name(n) for n in args.host_has}
    flags = target_flags(args.python, args.platform)
    out = Path(args.out).resolve()
    with tempfile.TemporaryDirectory(prefix="bundle-") as tmp:
        work = Path(tmp)
        bundle = work / "bundle"
        wheels = bundle / "wheels"
        wheels.mkdir(parents=True)
        log("building the project's wheel")
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(wheels), str(ROOT)], check=True)
        project_wheel = next(wheels.glob("serve_app-*.whl"))
        log(f"resolving for {'Python ' + args.python + ' ' + ','.join(args.platform) if args.python else 'this interpreter'}")
        items = resolve(f"{project_wheel}[{args.extras}]" if args.extras else str(project_wheel), flags, work)
        keep = needed(items, "serve-app", frozenset(args.extras.split(",")) if args.extras else frozenset(), host_has, marker_environment(args.python))
        deps = [i for i in keep if canonicalize_name(i["metadata"]["name"]) != "serve-app"]
        left = sorted({canonicalize_name(i["metadata"]["name"]) for i in items} - {canonicalize_name(i["metadata"]["name"]) for i in keep})
        log(f"{len(deps)} packages to bundle; {len(left)} left to the host")
        download(deps, flags, wheels)
        dropped = 0
        for whl in sorted(wheels.glob("*.whl")):
            dropped += restore_wheel(whl, ray_leaves_out) if whl.name.startswith("ray-") else restore_wheel(whl)
        log(f"left out of Ray's wheel: {dropped / 2**20:.1f} MiB (jars, RLlib, dashboard source maps)")
        for rel in PROJECT_FILES:
            src = ROOT / rel
            if src.is_dir():
                shutil.copytree(src, bundle / rel, ignore=shutil.ignore_patterns("__pycache__"))
            elif src.exists():
                (bundle / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, bundle / rel)
        (bundle / "extras").write_text(args.extras)
        (bundle / "install.sh").write_text(INSTALL_SH)
        (bundle / "install.sh").chmod(0o755)
        manifest = {
            "python": args.python or f"{sys.version_info.major}.{sys.version_info.minor}",
            "platforms": args.platform if args.python else ["this machine's"],
            "host_has": sorted(host_has),
            "left_to_host": left,
            "wheels": sorted(p.name for p in wheels.glob("*.whl")),
            "ray_left_out": {"prefixes": RAY_LEFT_OUT_PREFIXES, "dashboard_suffixes": RAY_LEFT_OUT_SUFFIXES, "bytes": dropped},
        }
        (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2))
        raw = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
        log(f"compressing {raw / 2**20:.1f} MiB with xz -{args.xz_level}")
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "wb") as f:
            # The manifest first, so that reading it needs no decompression of the wheels.
            entries = ["bundle/manifest.json"] + sorted(f"bundle/{p.name}" for p in bundle.iterdir() if p.name != "manifest.json")
            tar = subprocess.Popen(["tar", "-C", str(work), "-cf", "-", *entries], stdout=subprocess.PIPE)
            # xz's own threads: the stream is one archive, so level 9's window spans wheels.
            subprocess.run(["xz", f"-{args.xz_level}", "-T0", "-c"], stdin=tar.stdout, stdout=f, check=True)
            if tar.wait():
                raise SystemExit("tar failed")
    size = out.stat().st_size
    log(f"wrote {out}: {size / 2**20:.1f} MiB ({len(manifest['wheels'])} wheels) in {time.perf_counter() - started:.0f} s")
    if args.max_mib and size > args.max_mib * 2**20:
        raise SystemExit(f"bundle is {size / 2**20:.1f} MiB, over the {args.max_mib} MiB limit")
    return out


def host_names(arg: str) -> list[str]:
    """A package name, or ``@FILE``: the names in a file (whitespace separated, ``#`` comments)."""
    if not arg.startswith("@"):
        return [arg]
    text = re.sub(r"#.*", "", Path(arg[1:]).read_text())
    return text.split()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", help="target Python version, e.g. 3.12 (default: this interpreter, this platform)")
    ap.add_argument("--platform", nargs="+", default=["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"],
                    help="pip platform tags the target accepts (with --python)")
    ap.add_argument("--host-has", nargs="*", default=[], metavar="PACKAGE",
                    help="packages the host already has (names, or @FILE of names): left out, with the dependencies only they need")
    ap.add_argument("--extras", default="bench", help="the project's extras to include (default: bench, what scripts/gpu_bench needs)")
    ap.add_argument("--out", default=str(ROOT / "dist" / "bundle.tar.xz"))
    ap.add_argument("--xz-level", type=int, default=9, choices=range(10), help="xz preset (9: smallest)")
    ap.add_argument("--max-mib", type=float, default=None, help="fail when the archive is larger")
    args = ap.parse_args(argv)
    args.host_has = [name for arg in args.host_has for name in host_names(arg)]
    build(args)


if __name__ == "__main__":
    main()
