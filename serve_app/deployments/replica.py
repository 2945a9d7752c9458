"""What every model stage does when its replica starts."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from serve_app.config import PipelineConfig, StageOptions, node_path
from serve_app.deployments.batching import BatchRunner
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


@dataclass
class Member:
    """One pipeline's part of a stage replica: the model it loaded (or why
    it could not) and, for batched stages, its own batch queue (a batch
    never mixes pipelines)."""

    model: Any = None
    problem: str | None = None
    batches: BatchRunner | None = None


class ModelStage:
    """What the three model stage deployments share.

    A deployment serves one stage of one or more pipelines (a stage group,
    ``stage_groups`` in the config): each replica loads that stage of every
    pipeline in the group when it starts, and every call names its pipeline.
    Small models share processes that way; one pipeline per deployment is
    the usual case and the default.

    If loading a pipeline fails (an unreadable source, a missing component)
    the replica stays up and reports the problem through :meth:`problem`
    instead of failing its constructor: Ray Serve would otherwise fail the
    whole application, and one broken model must not take the others down.
    The ingress asks, hides the model and answers its requests with 503
    model_unavailable.
    """

    stage: Stage  # which part of the pipeline this stage loads (its architecture says which files)
    batch_method: str | None = None  # the loaded model's method that computes a batch, for batched stages
    stepwise = False  # whether batch_method yields between steps (BatchRunner)

    def __init__(self, pipelines: dict[str, PipelineConfig], options: StageOptions, cache_dir: str):
        self.options = options
        self.members: dict[str, Member] = {}
        for name, pipeline in pipelines.items():
            member = self.members[name] = Member()
            try:
                member.model = self.load(*prepare_replica(pipeline, options, self.stage, node_path(cache_dir)))
            except Exception as exc:  # noqa: BLE001 - reported by problem(), logged with its traceback
                detail = str(exc) if isinstance(exc, ModelSourceError) else f"{pipeline.source}: {type(exc).__name__}: {exc}"
                member.problem = f"cannot load the {self.stage} stage from {detail}"
                logger.error("%s[%s]: %s", type(self).__name__, name, member.problem, exc_info=True)
                continue
            if self.batch_method:
                compute = getattr(member.model, self.batch_method)
                member.batches = BatchRunner(self.stage, compute, options, stepwise=self.stepwise)

    def load(self, layout: PipelineLayout, device: str, dtype: torch.dtype) -> Any:
        """Load this stage of one pipeline; returns the model the stage's methods call."""
        raise NotImplementedError

    def _member(self, pipeline: str | None) -> Member:
        if pipeline is None:
            if len(self.members) != 1:
                raise ValueError(f"{type(self).__name__} serves {sorted(self.members)}: name the pipeline")
            return next(iter(self.members.values()))
        try:
            return self.members[pipeline]
        except KeyError:
            raise ValueError(f"{type(self).__name__} does not serve pipeline {pipeline!r}") from None

    def problem(self, pipeline: str | None = None) -> str | None:
        """None when this replica can serve the pipeline; else why not, naming the source and what is missing."""
        return self._member(pipeline).problem

    def ready(self, pipeline: str | None = None) -> Member:
        """The pipeline's member, unless it cannot serve; sets torch's threads for the calling thread.
        ``pipeline`` may be left out when the deployment serves only one."""
        member = self._member(pipeline)
        if member.problem:
            raise ModelUnavailable(member.problem)
        use_torch_threads(self.options)
        return member

    async def check_health(self) -> None:
        """Called by Ray every ``health_check_period_s``; raising marks the
        replica unhealthy and Ray replaces it.

        It runs a real forward pass of every pipeline's model (cheap: the
        smallest input) rather than only answering, so weights that went bad
        (NaNs, a corrupted device) are noticed. It runs on the event loop like
        all compute here, so it is answered between denoising steps, never in
        the middle of one. A pipeline that could not load is skipped: it stays
        up to report why (problem()), and a new replica would fail the same way.
        """
        use_torch_threads(self.options)
        for name, member in self.members.items():
            # Each loaded model's probe(): one forward pass on its smallest input, True when finite.
            if member.problem is None and not member.model.probe():
                raise RuntimeError(
                    f"{type(self).__name__}[{name}]: a forward pass on the smallest input gave non-finite values"
                )

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

    def describe(self, pipeline: str | None = None) -> dict[str, Any]:
        """What this replica actually runs with for one pipeline, for tests and debugging."""
        member = self._member(pipeline)
        return {
            "modules": sorted({type(m).__name__ for m in held_modules(member.model)}),
            "torch_threads": torch.get_num_threads(),
            "problem": member.problem,
            "pipelines": sorted(self.members),
            "pid": os.getpid(),
            "last_batch_cpu_per_wall": member.batches.last_cpu_per_wall if member.batches else None,
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

    visit(obj, 7)
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
