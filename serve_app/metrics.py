"""Per-stage Prometheus metrics, exported through Ray's metrics endpoint.

Ray Serve adds the deployment, replica and application tags itself. The
names below are prefixed `ray_` by Ray's exporter (e.g.
`ray_images_denoise_step_seconds_bucket`). Outside a Ray cluster (unit
tests) recording is a no-op.
"""

from __future__ import annotations

from ray.serve.metrics import Counter, Histogram

_LATENCY_BOUNDS = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]

QUEUE_WAIT = Histogram(
    "images_stage_queue_wait_seconds",
    description="Time a request waited in a stage's batch queue before its batch started.",
    boundaries=_LATENCY_BOUNDS,
    tag_keys=("stage",),
)
BATCH_SIZE = Histogram(
    "images_stage_batch_size",
    description="Images per batch a stage ran.",
    boundaries=[1, 2, 3, 4, 6, 8, 12, 16, 24, 32],
    tag_keys=("stage",),
)
STAGE_SECONDS = Histogram(
    "images_stage_run_seconds",
    description="Time a stage spent computing one batch.",
    boundaries=_LATENCY_BOUNDS,
    tag_keys=("stage",),
)
STEP_SECONDS = Histogram(
    "images_denoise_step_seconds",
    description="Time of one denoising step (UNet forward with guidance, scheduler step) for a batch.",
    boundaries=_LATENCY_BOUNDS,
)
IMAGES = Counter(
    "images_generated_total",
    description="Images returned to clients.",
    tag_keys=("model", "output_format"),
)
ERRORS = Counter(
    "images_errors_total",
    description="Error responses by OpenAI error type and status code.",
    tag_keys=("type", "status"),
)
