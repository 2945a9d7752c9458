"""What every model stage does when its replica starts."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from serve_app.config import PipelineConfig, StageOptions, node_path
from serve_app.pipeline.components import PipelineLayout, pick_device, pick_dtype
from serve_app.pipeline.architectures import architecture_for
from serve_app.pipeline.architectures.base import Stage
from serve_app.pipeline.sources import ModelSourceError, SourceFiles, fetch_source
from serve_app.pipeline.tiny import save_tiny_pipeline

logger = logging.getLogger("serve_app")

# What every stage fetches first: the pipeline's index names its architecture.
MODEL_INDEX = SourceFiles("model_index", ("model_index.json",))


def use_torch_threads(options: StageOptions) -> None:
    """Apply the configured torch thread count to the calling thread.

    Ray sets OMP_NUM_THREADS to the actor's num_cpus (1 for fractions); with
    PyTorch's OpenMP backend the count is per thread, so it is set again at
    each compute entry point (it costs microseconds). The model stages also
    compute on the replica's event-loop thread, where Ray runs the
    constructor too, rather than on a thread pool: once two threads of a
    process have run parallel torch code, GNU OpenMP keeps two thread teams
    and throttles them (measured: 2.6x slower per UNet call, under one core
    busy; docs/benchmarks.md).
    """
    if options.torch_threads:
        torch.set_num_threads(options.torch_threads)


def prepare_replica(
    pipeline: PipelineConfig, options: StageOptions, stage: Stage, cache_dir: Path
) -> tuple[PipelineLayout, str, torch.dtype]:
    """Set torch's threads, make sure the stage's files are on local disk
    (model_index.json first: it names the architecture, which says what
    else the stage needs), pick device and dtype.

    Ray sets OMP_NUM_THREADS to the actor's num_cpus (one thread for
    fractional CPUs), which made a prototype of this graph 2.7x slower than
    one process; the thread count is therefore always set from config.
    """
    use_torch_threads(options)
    if pipeline.builtin and not (pipeline.path / "model_index.json").exists():
        logger.info("building the embedded %s model at %s", pipeline.builtin, pipeline.path)
        save_tiny_pipeline(pipeline.path, pipeline.builtin)
    index_root = fetch_source(pipeline, MODEL_INDEX, cache_dir)
    architecture = architecture_for(PipelineLayout.read(index_root))
    root = fetch_source(pipeline, architecture.files(stage), cache_dir)
    device = pick_device(options.device)
    return PipelineLayout.read(root), device, pick_dtype(pipeline.dtype, device)


class ModelUnavailable(RuntimeError):
    """A stage whose model could not be loaded was asked to work."""


class ModelStage:
    """What the three model stage deployments share.

    A replica loads its part of the pipeline when it starts. If that fails
    (an unreadable source, a missing component) it stays up and reports the
    problem through :meth:`problem` instead of failing its constructor:
    Ray Serve would otherwise fail the whole application, and one broken
    model must not take the others down. The ingress asks, hides the model
    and answers its requests with 503 model_unavailable.
    """

    stage: Stage  # which part of the pipeline this stage loads (its architecture says which files)

    def __init__(self, pipeline: PipelineConfig, options: StageOptions, cache_dir: str):
        self._problem: str | None = None
        self.options = options
        try:
            self.load(*prepare_replica(pipeline, options, self.stage, node_path(cache_dir)))
        except Exception as exc:  # noqa: BLE001 - reported by problem(), logged with its traceback
            detail = str(exc) if isinstance(exc, ModelSourceError) else f"{pipeline.source}: {type(exc).__name__}: {exc}"
            self._problem = f"cannot load the {self.stage} stage from {detail}"
            logger.error("%s: %s", type(self).__name__, self._problem, exc_info=True)

    def load(self, layout: PipelineLayout, device: str, dtype: torch.dtype) -> None:
        raise NotImplementedError

    def problem(self) -> str | None:
        """None when this replica can serve; else why not, naming the source and what is missing."""
        return self._problem

    def ready(self) -> None:
        """Raise unless this replica can serve; set torch's threads for the calling thread."""
        if self._problem:
            raise ModelUnavailable(self._problem)
        use_torch_threads(self.options)

    def probe(self) -> bool:
        """One forward pass of the stage's model on its smallest input; True
        when the output is finite. Each stage defines it."""
        raise NotImplementedError

    async def check_health(self) -> None:
        """Called by Ray every ``health_check_period_s``; raising marks the
        replica unhealthy and Ray replaces it.

        It runs a real forward pass (cheap: the smallest input) rather than
        only answering, so weights that went bad (NaNs, a corrupted device)
        are noticed. It runs on the event loop like all compute here, so it is
        answered between denoising steps, never in the middle of one.
        """
        if self._problem is not None:
            return  # it stays up to report why (problem()); a new replica would fail the same way
        use_torch_threads(self.options)
        if not self.probe():
            raise RuntimeError(f"{type(self).__name__}: a forward pass on the smallest input gave non-finite values")

    def inject_fault(self) -> None:
        """The fault switch of the health-check test: every weight becomes NaN.
        Refused unless the stage's config sets ``fault_injection``."""
        if not self.options.fault_injection:
            raise PermissionError("fault injection is off for this stage (stages.<stage>.fault_injection)")
        logger.warning("%s: fault injected, every weight is now NaN", type(self).__name__)
        with torch.no_grad():
            for module in held_modules(self):
                for param in module.parameters():
                    param.fill_(float("nan"))

    def describe(self) -> dict[str, Any]:
        """What this replica actually runs with, for tests and debugging."""
        return {
            "modules": sorted({type(m).__name__ for m in held_modules(self)}),
            "torch_threads": torch.get_num_threads(),
            "problem": self._problem,
            "pid": os.getpid(),
        }


def held_modules(obj: Any) -> list[torch.nn.Module]:
    """The torch modules an object holds (attributes, and containers of
    them, a few levels deep). Used to prove that a stage loaded only its own
    components, and by the fault switch."""
    found: dict[int, torch.nn.Module] = {}

    def visit(value: Any, depth: int) -> None:
        if isinstance(value, torch.nn.Module):
            found[id(value)] = value
        elif depth > 0 and isinstance(value, (list, tuple)):
            for v in value:
                visit(v, depth - 1)
        elif depth > 0 and isinstance(value, dict):
            for v in value.values():
                visit(v, depth - 1)
        elif depth > 0 and hasattr(value, "__dict__") and not isinstance(value, type):
            for v in vars(value).values():
                visit(v, depth - 1)

    visit(obj, 5)
    return list(found.values())


def optimize_module(module: torch.nn.Module, options: StageOptions, device: str) -> torch.nn.Module:
    """GPU-only speedups from config. diffusers already uses PyTorch's SDPA
    attention on torch >= 2, so nothing is needed for that here."""
    if device == "cpu":
        return module
    if options.channels_last:
        module = module.to(memory_format=torch.channels_last)
    if options.compile:
        # Compile the forward in place so the module keeps its attributes
        # (config, dtype) that the stage code reads.
        module.forward = torch.compile(module.forward, mode="max-autotune-no-cudagraphs", fullgraph=False)
    return module


def optimize_modules(architecture: Any, options: StageOptions, device: str) -> None:
    """:func:`optimize_module` on every torch module the stage's architecture loaded."""
    for name, value in list(vars(architecture).items()):
        if isinstance(value, torch.nn.Module):
            setattr(architecture, name, optimize_module(value, options, device))
