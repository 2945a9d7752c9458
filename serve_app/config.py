"""The one config tree and its one loader.

``serve_config.yaml`` is a standard Ray Serve config whose application
``args:`` are validated by :class:`AppConfig`. The model registry lives in
its own YAML file (``configs/models.yaml`` by default) and is validated by
:class:`ModelRegistry`. Every field documents itself through ``description``.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from fsspec.utils import get_protocol
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serve_app.families import FAMILIES, FAMILY_ALIASES

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# Every size any OpenAI image model accepts; a pipeline lists the subset it serves.
OPENAI_SIZES = ("256x256", "512x512", "1024x1024", "1792x1024", "1024x1792", "1536x1024", "1024x1536")
_SIZE_RE = re.compile(r"^(\d{2,5})x(\d{2,5})$")


def resolve_path(path: str | os.PathLike) -> Path:
    """Relative paths in configs are relative to the project root, so the
    service finds its files whatever directory Ray starts a replica in."""
    p = Path(os.path.expanduser(str(path)))
    return p if p.is_absolute() else PROJECT_ROOT / p


def node_path(path: str) -> Path:
    """A path that means a place on each node: ``$VARS`` (and ``~``) expand
    from the environment of the process that asks, so a replica resolves it
    on its own node (nodes that mount their local disks in different places
    can say ``$LOCAL_DISK/model-cache``)."""
    return resolve_path(os.path.expandvars(path))


RAY_ENV_FILE = PROJECT_ROOT / "configs" / "ray.env"


def read_env_file(path: str | os.PathLike = RAY_ENV_FILE) -> dict[str, str]:
    """``KEY=VALUE`` lines (``#`` comments, blank lines) -> a dict: the
    environment the project's Ray clusters run with (configs/ray.env)."""
    env = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            if not sep:
                raise ValueError(f"{path}: not KEY=VALUE: {line!r}")
            env[key.strip()] = value.strip()
    return env


def use_ray_env(path: str | os.PathLike = RAY_ENV_FILE) -> None:
    """Put configs/ray.env into this process's environment, where a variable
    is not set already, before it starts a Ray cluster (whose processes inherit it)."""
    for key, value in read_env_file(path).items():
        os.environ.setdefault(key, value)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# A Hugging Face model id: owner/name, nothing more.
_HF_MODEL_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")


class PipelineConfig(_Strict):
    source: str = Field(
        description="Where the pipeline is, in the standard diffusers layout (model_index.json, unet/, vae/, "
        "text_encoder/, tokenizer/, scheduler/): a local directory (relative paths are relative to the "
        "project root), any fsspec URL such as s3://bucket/models/sdxl-base/ (downloaded once per node into "
        "model_cache_dir, each stage fetching only its own subfolders), or a Hugging Face model id "
        "owner/name (needs internet). A relative path that does not exist and looks like owner/name is "
        "taken as a Hugging Face id; write ./owner/name for a local folder."
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="For an fsspec URL source: options of its filesystem, e.g. for s3:// {endpoint_url, key, "
        "secret, client_kwargs: {region_name}}; what is left out comes from the standard AWS environment "
        "variables and files. For a Hugging Face id: keyword arguments of huggingface_hub.snapshot_download "
        "(revision, token, ...).",
    )
    builtin: str | None = Field(
        default=None,
        description="If set and `source` holds no model yet, build this tiny random-weight "
        "model there on startup (the embedded offline default). Leave unset for real models.",
    )
    default_steps: int = Field(default=4, ge=1, le=500, description="Denoising steps per image.")
    default_guidance: float = Field(
        default=7.5,
        ge=0.0,
        le=50.0,
        description="Classifier-free guidance scale as the architecture's diffusers pipeline reads it: "
        "1 or less disables guidance for most, 0 for Z-Image (README: Architectures).",
    )
    default_size: str = Field(default="512x512", description="Size used when a request says `auto` or names none.")
    sizes: list[str] = Field(
        default_factory=lambda: list(OPENAI_SIZES),
        description="Sizes (WxH) this pipeline serves; each side a multiple of 8.",
    )
    max_pixels: int = Field(
        default=1536 * 1536,
        ge=64 * 64,
        description="Largest width*height a free-size request (gpt-image family: any WxH) may ask for.",
    )
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        default="float32", description="Weights' dtype on GPU. CPU always runs float32."
    )

    @field_validator("builtin")
    @classmethod
    def _known_tiny_kind(cls, kind: str | None) -> str | None:
        from serve_app.pipeline.tiny import TINY_KINDS  # no torch: tiny.py imports it inside its builders

        if kind is not None and kind not in TINY_KINDS:
            raise ValueError(f"unknown builtin model {kind!r}; expected one of {list(TINY_KINDS)}")
        return kind

    @field_validator("sizes")
    @classmethod
    def _check_sizes(cls, sizes: list[str]) -> list[str]:
        for s in sizes:
            parse_size(s)
        return sizes

    @model_validator(mode="after")
    def _default_size_is_served(self) -> "PipelineConfig":
        parse_size(self.default_size)
        if self.default_size not in self.sizes:
            raise ValueError(f"default_size {self.default_size} is not in sizes")
        if self.builtin and self.source_kind != "local":
            raise ValueError(f"builtin models are built in a local directory; source {self.source!r} is not one")
        return self

    @property
    def source_kind(self) -> Literal["local", "url", "huggingface"]:
        """How `source` is read: a local directory, an fsspec URL, or a Hugging Face model id."""
        if self.source.startswith("file://"):
            return "local"
        if "://" in self.source:
            return "url"
        if self.builtin or self.source.startswith(("/", ".", "~")) or resolve_path(self.source).exists():
            return "local"
        return "huggingface" if _HF_MODEL_ID_RE.match(self.source) else "local"

    @property
    def path(self) -> Path:
        """The directory of a local source."""
        if self.source.startswith("file://"):
            return Path(self.source[len("file://") :])
        return resolve_path(self.source)


class Tier(_Strict):
    """The work one quality tier (or complexity preset) does."""

    steps: int | None = Field(default=None, ge=1, le=500, description="Denoising steps; default from the pipeline.")
    guidance: float | None = Field(default=None, ge=0.0, le=50.0, description="Guidance scale; default from the pipeline.")


class StylePreset(_Strict):
    guidance: float | None = Field(default=None, ge=0.0, le=50.0, description="Guidance scale for this style.")
    template: str = Field(default="{prompt}", description="Prompt template; {prompt} is the user's prompt.")

    @field_validator("template")
    @classmethod
    def _has_prompt(cls, t: str) -> str:
        if "{prompt}" not in t:
            raise ValueError("a style template must contain {prompt}")
        return t


def _default_styles() -> dict[str, StylePreset]:
    return {
        "vivid": StylePreset(guidance=9.0, template="{prompt}, vivid colors, dramatic lighting, hyper-detailed"),
        "natural": StylePreset(guidance=6.0, template="{prompt}"),
    }


class EditPreset(_Strict):
    """How an edit of this model starts from its input image."""

    strength: dict[str, float] = Field(
        default_factory=lambda: {"low": 0.75, "high": 0.45},
        description="Image-to-image strength (0: keep the input, 1: start from pure noise) per input_fidelity "
        "(low, high). Requests without input_fidelity use `low`. The denoiser runs strength x steps of the schedule.",
    )
    inpaint_strength: float = Field(
        default=1.0, ge=0.0, le=1.0, description="Strength where a mask marks the region to edit (1: repaint it whole)."
    )
    variation_strength: float = Field(
        default=0.7, ge=0.0, le=1.0, description="Strength of /v1/images/variations (dall-e-2 family)."
    )
    variation_prompt: str = Field(default="", description="Prompt a variation is conditioned on; empty by default.")
    feather_px: int = Field(
        default=4,
        ge=0,
        le=64,
        description="After decoding, the input's pixels are put back wherever the mask is opaque, blending over "
        "this many pixels into the edited region so the seam does not show. Protected pixels are never changed.",
    )

    @field_validator("strength")
    @classmethod
    def _fidelities(cls, strength: dict[str, float]) -> dict[str, float]:
        for key, value in strength.items():
            if key not in ("low", "high"):
                raise ValueError(f"strength keys are input_fidelity values, low and high; not {key!r}")
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"strength[{key}] must be between 0 and 1")
        return {"low": 0.75, "high": 0.45, **strength}


class ModelEntry(_Strict):
    id: str = Field(description="Model id clients send as `model`.")
    pipeline: str = Field(description="Key of the pipeline (in `pipelines`) that serves this id.")
    family: str = Field(
        description="OpenAI model family whose rules and defaults this id follows: "
        + ", ".join(sorted(FAMILIES))
        + "; older configs' "
        + ", ".join(f"{old} means {new}" for old, new in FAMILY_ALIASES.items())
    )
    owned_by: str = Field(default="self-hosted", description="`owned_by` reported by /v1/models.")
    default_size: str | None = Field(
        default=None,
        description="Size for `auto` or no size; default: the pipeline's where the family allows it (not dall-e-2/3, "
        "which OpenAI documents as 1024x1024) and serves it, else the family's.",
    )
    tiers: dict[str, Tier] = Field(
        default_factory=dict,
        description="Quality tiers -> steps and guidance. Unset tiers derive from the pipeline's default steps S: "
        "low S/2, medium and standard S, high and hd 2S, xhigh 3S, max 4S. Which tiers a request may ask for is "
        "the family's rule.",
    )
    styles: dict[str, StylePreset] = Field(
        default_factory=_default_styles, description="Style (dall-e-3 family) -> guidance and prompt template."
    )
    complexity: dict[str, Tier] = Field(
        default_factory=dict,
        description="Optional presets for the SDK's `complexity` (low, medium, high); unmapped values are ignored.",
    )
    background_auto: Literal["opaque", "transparent"] = Field(
        default="opaque", description="What `background=auto` means for this model."
    )
    transparent_template: str = Field(
        default="{prompt}, isolated on a plain flat white background",
        description="Prompt template used for `background=transparent`, asking for a backdrop easy to matte out.",
    )
    edit: EditPreset = Field(default_factory=EditPreset, description="Edits and variations: strengths, variation prompt, feathering.")

    @field_validator("family")
    @classmethod
    def _known_family(cls, family: str) -> str:
        family = FAMILY_ALIASES.get(family, family)
        if family not in FAMILIES:
            raise ValueError(f"unknown family {family!r}; expected one of {sorted(FAMILIES)}")
        return family

    def tier(self, quality: str, pipeline: "PipelineConfig") -> tuple[int, float] | None:
        """(steps, guidance) for a quality tier, or None if this model has no such tier."""
        steps = pipeline.default_steps
        derived = {
            "low": max(1, steps // 2),
            "medium": steps,
            "standard": steps,
            "high": 2 * steps,
            "hd": 2 * steps,
            "xhigh": 3 * steps,
            "max": 4 * steps,
        }
        if quality in self.tiers:
            t = self.tiers[quality]
            return (t.steps or derived.get(quality, steps), t.guidance if t.guidance is not None else pipeline.default_guidance)
        if quality in derived:
            return derived[quality], pipeline.default_guidance
        return None


class ModelRegistry(_Strict):
    pipelines: dict[str, PipelineConfig] = Field(description="Pipelines by name; each gets its own stage deployments.")
    models: list[ModelEntry] = Field(description="Model ids (and aliases) clients can name.")
    default_model: str = Field(default="dall-e-2", description="Model used when a request names none.")
    default_gpt_image_model: str | None = Field(
        default=None,
        description="Model used when a request names none but uses a gpt-image-only parameter (background, moderation, "
        "output_format, output_compression, stream, partial_images); default: the first gpt-image model listed, "
        "else default_model.",
    )
    fallback_model: str | None = Field(
        default=None,
        description="Model that serves requests naming a model id not listed here (gateways in front of many "
        "backends send names such as `image` or `random`); it applies its own family's rules. Null (default): such "
        "requests get 400 model_not_found.",
    )
    moderation: str | None = Field(
        default="configs/moderation.yaml", description="Prompt moderation list (YAML); null disables moderation."
    )

    @model_validator(mode="after")
    def _consistent(self) -> "ModelRegistry":
        ids = [m.id for m in self.models]
        dupes = {i for i in ids if ids.count(i) > 1}
        if dupes:
            raise ValueError(f"model ids listed twice: {sorted(dupes)}")
        for m in self.models:
            if m.pipeline not in self.pipelines:
                raise ValueError(f"model {m.id!r} names unknown pipeline {m.pipeline!r}")
        if self.default_model not in ids:
            raise ValueError(f"default_model {self.default_model!r} is not a listed model id")
        if self.fallback_model is not None and self.fallback_model not in ids:
            raise ValueError(f"fallback_model {self.fallback_model!r} is not a listed model id")
        if self.default_gpt_image_model is not None:
            gpt = self.model(self.default_gpt_image_model)
            if gpt is None or not FAMILIES[gpt.family].uses_gpt_image_params:
                raise ValueError(f"default_gpt_image_model {self.default_gpt_image_model!r} is not a listed gpt-image model")
        for name in self.pipelines:
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
                raise ValueError(f"pipeline name {name!r} may only hold letters, digits, '_', '.', '-'")
        return self

    def model(self, model_id: str) -> ModelEntry | None:
        return next((m for m in self.models if m.id == model_id), None)

    def gpt_image_default(self) -> str:
        if self.default_gpt_image_model is not None:
            return self.default_gpt_image_model
        return next((m.id for m in self.models if FAMILIES[m.family].uses_gpt_image_params), self.default_model)


class StageOptions(_Strict):
    """Ray Serve options of one stage's deployment, plus its torch threads."""

    ray_actor_options: dict[str, Any] = Field(
        default_factory=dict, description="Ray actor options, e.g. num_cpus, num_gpus (fractions pack stages on one GPU)."
    )
    num_replicas: int | None = Field(default=None, ge=1, description="Fixed replica count (ignored if autoscaling_config is set).")
    autoscaling_config: dict[str, Any] | None = Field(
        default=None,
        description="Ray Serve autoscaling_config: min_replicas, max_replicas, target_ongoing_requests, "
        "look_back_period_s, upscale_delay_s, downscale_delay_s, ... (README \"Scaling each stage\").",
    )
    max_ongoing_requests: int = Field(default=8, ge=1, description="Requests one replica works on at once.")
    max_queued_requests: int | None = Field(
        default=None,
        ge=1,
        description="Model stages and post-processor: calls that may wait for a replica of this stage; beyond it "
        "the client gets 429 server_overloaded with Retry-After at once. None: Ray's default (unbounded). Not for "
        "the ingress, whose overflow Ray would answer in plain text; it has max_concurrent_requests instead.",
    )
    health_check_period_s: float | None = Field(
        default=None, gt=0, description="Seconds between Ray's health checks of each replica (Ray's default: 10)."
    )
    health_check_timeout_s: float | None = Field(
        default=None,
        gt=0,
        description="A health check slower than this fails (Ray's default: 30). Model stages answer it between "
        "compute steps, so keep it above one step (or one VAE batch) on slow hardware.",
    )
    graceful_shutdown_timeout_s: float | None = Field(
        default=None,
        ge=0,
        description="On scale-down or redeploy, how long a replica may finish its in-flight requests before it "
        "is stopped (Ray's default: 20). Keep it above a request's duration.",
    )
    graceful_shutdown_wait_loop_s: float = Field(
        default=0.5,
        gt=0,
        description="How often a stopping replica checks whether its in-flight requests are done. Ray's default "
        "(2 s) is the least a redeploy, scale-down or application delete waits, even for an idle replica.",
    )
    fault_injection: bool = Field(
        default=False,
        description="Tests only: lets inject_fault() through a deployment handle break this stage's model, "
        "to prove that check_health notices and Ray replaces the replica.",
    )
    torch_threads: int | None = Field(
        default=None,
        ge=1,
        description="torch.set_num_threads for this replica. Ray sets OMP_NUM_THREADS to the actor's "
        "num_cpus (1 for fractions), which makes CPU inference several times slower; set this explicitly.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="Where the stage runs; auto picks CUDA when the replica was given a GPU."
    )
    max_batch_size: int = Field(
        default=1,
        ge=1,
        le=256,
        description="Denoiser and VAE decoder: most images run as one batch. Requests that arrive together and "
        "share size, steps and guidance are batched; 1 turns batching off.",
    )
    batch_wait_timeout_s: float = Field(
        default=0.005, ge=0.0, le=10.0, description="How long a batch waits for more requests before it starts."
    )
    release_memory_after_idle_s: float | None = Field(
        default=10.0,
        gt=0,
        description="Denoiser and VAE decoder: once no batch has run for this many seconds, give the C allocator's free "
        "pages back to the system (glibc malloc_trim), so a replica idles at its model's size rather than at its "
        "busiest moment's; the next batch pays to fault them in again. None: never.",
    )
    channels_last: bool = Field(default=False, description="GPU: run UNet/VAE convolutions in channels_last memory format.")
    compile: bool = Field(default=False, description="GPU: torch.compile the UNet (denoiser) or VAE decoder on load.")

    @field_validator("autoscaling_config")
    @classmethod
    def _ray_autoscaling_config(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        # Ray's own model ignores keys it does not know, so a misspelt
        # upscale_delay_s would silently keep Ray's default; refuse it here.
        if value is None:
            return value
        from ray.serve.config import AutoscalingConfig

        unknown = sorted(set(value) - set(AutoscalingConfig.model_fields))
        if unknown:
            raise ValueError(f"unknown autoscaling_config keys {unknown}; Ray's are {sorted(AutoscalingConfig.model_fields)}")
        AutoscalingConfig.model_validate(value)
        return value

    def deployment_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {
            "ray_actor_options": dict(self.ray_actor_options),
            "max_ongoing_requests": self.max_ongoing_requests,
            "graceful_shutdown_wait_loop_s": self.graceful_shutdown_wait_loop_s,
        }
        for name in ("max_queued_requests", "health_check_period_s", "health_check_timeout_s", "graceful_shutdown_timeout_s"):
            if getattr(self, name) is not None:
                options[name] = getattr(self, name)
        if self.autoscaling_config is not None:
            options["autoscaling_config"] = dict(self.autoscaling_config)
        elif self.num_replicas is not None:
            options["num_replicas"] = self.num_replicas
        return options


# Each stage's defaults; a stage given in the config overrides them key by key.
_STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    # Above AppConfig.max_concurrent_requests, so that overflow reaches the
    # ingress's own admission check (a 429 in OpenAI's shape) instead of
    # waiting in Ray's queue in front of it.
    "ingress": {"max_ongoing_requests": 256},
    "text_encoder": {"torch_threads": 2},
    "denoiser": {"torch_threads": 2},
    "vae_decoder": {"torch_threads": 2},
    "post_processor": {"max_ongoing_requests": 16},
}


class StagesConfig(_Strict):
    ingress: StageOptions
    text_encoder: StageOptions
    denoiser: StageOptions
    vae_decoder: StageOptions
    post_processor: StageOptions

    @model_validator(mode="before")
    @classmethod
    def _merge_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        merged = {}
        for stage, defaults in _STAGE_DEFAULTS.items():
            given = data.get(stage) or {}
            if isinstance(given, StageOptions):
                given = given.model_dump(exclude_unset=True)
            merged[stage] = {"ray_actor_options": {"num_cpus": 0.25}, **defaults, **given}
        return {**data, **merged}


class RateLimits(_Strict):
    """Per API key (per client address when no key is configured), over a sliding minute."""

    requests_per_minute: int | None = Field(
        default=None, ge=1, description="Generation requests one key may make per minute; unset: no limit."
    )
    images_per_minute: int | None = Field(
        default=None, ge=1, description="Images (the sum of n) one key may ask for per minute; unset: no limit."
    )

    @property
    def enabled(self) -> bool:
        return self.requests_per_minute is not None or self.images_per_minute is not None


# A host name (IDNA, i.e. xn-- for non-ASCII), an IPv4 address or a bracketed
# IPv6 address, optionally "*." in front and ":port" behind.
_HOST_PATTERN_RE = re.compile(r"^(\*\.)?([a-z0-9_-]+(\.[a-z0-9_-]+)*|\[[0-9a-f:.]+\])(:(\d{1,5}))?$")


class ImageFetchSettings(_Strict):
    """Fetching the http(s) image URLs clients name (edits' image_url). Off unless allowed_hosts lists hosts.

    Every URL, and every redirect, must name an allowed host, and every address
    that host resolves to must be public (or inside allowed_networks); the
    connection then goes to that checked address, so DNS cannot change it."""

    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Hosts image URLs may name: 'host' (the scheme's default port only) or 'host:port', matched "
        "exactly and case-insensitively; '*.example.com' also matches any subdomain of example.com (not "
        "example.com itself). IPv6 addresses in brackets, non-ASCII names in their xn-- form. Empty (the "
        "default): the server fetches no URLs, and clients must send images as uploads or data URLs.",
    )
    allowed_networks: list[str] = Field(
        default_factory=list,
        description="CIDRs (e.g. 10.1.2.0/24, 127.0.0.1/32) that an allowed host may resolve to although they "
        "are loopback, private, link-local or otherwise non-public, which are refused by default: for an "
        "internal image server, and for tests. Public addresses need no entry.",
    )
    max_bytes: int = Field(default=50 << 20, ge=1, description="Largest image body fetched; a longer one is refused.")
    timeout_s: float = Field(
        default=10.0, gt=0, description="Limit on a whole fetch (DNS, connections, redirects, body) in seconds."
    )
    max_redirects: int = Field(
        default=3, ge=0, le=20, description="Redirects followed per fetch, each checked like the first URL."
    )

    @field_validator("allowed_hosts")
    @classmethod
    def _host_patterns(cls, hosts: list[str]) -> list[str]:
        normalized = []
        for entry in hosts:
            host = entry.strip().lower()
            m = _HOST_PATTERN_RE.match(host)
            if m is None or (m.group(5) is not None and not 0 < int(m.group(5)) < 65536):
                raise ValueError(
                    f"allowed_hosts entry {entry!r} is not a host name, IP address or [IPv6 address], "
                    "with an optional '*.' in front and ':port' behind"
                )
            normalized.append(host)
        return normalized

    @field_validator("allowed_networks")
    @classmethod
    def _networks(cls, networks: list[str]) -> list[str]:
        # ip_network raises ValueError on a typo, which pydantic reports naming the field.
        return [str(ipaddress.ip_network(n.strip(), strict=False)) for n in networks]


class AppConfig(_Strict):
    """The `args:` of the application in serve_config.yaml."""

    models: str = Field(default="configs/models.yaml", description="Path of the model registry YAML.")
    data_dir: str = Field(default="data", description="Where generated images (and the embedded model) are kept.")
    image_store: str | None = Field(
        default=None,
        description="fsspec URL where generated images are stored: file://... (default file://<data_dir>/images), "
        "s3://bucket/prefix (URLs are then presigned S3 GETs), or any fsspec protocol whose package is installed.",
    )
    image_store_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec options of image_store's filesystem, e.g. for s3:// {endpoint_url, key, secret, "
        "client_kwargs: {region_name}} (MinIO, R2 and other S3-compatible stores need endpoint_url); what is "
        "left out comes from the standard AWS environment variables and files.",
    )
    url_ttl_s: int = Field(
        default=3600,
        ge=1,
        le=7 * 24 * 3600,
        description="Lifetime of image URLs in seconds (OpenAI: 60 minutes; S3 presigned URLs allow at most 7 days).",
    )
    sweep_interval_s: int = Field(
        default=600,
        ge=0,
        description="Seconds between sweeps that delete stored images whose URLs have expired; 0 turns the sweeper off.",
    )
    sweep_remote_store: bool = Field(
        default=False,
        description="Also sweep an image_store that is not a local folder (e.g. S3) by listing it. Off by default: "
        "an S3 lifecycle rule (README) does the same server-side without listing the bucket.",
    )
    model_cache_dir: str | None = Field(
        default=None,
        description="Where remote model sources (fsspec URLs, Hugging Face ids) are downloaded on each node; "
        "$VARS expand on each node from its own environment. Default <data_dir>/model-cache.",
    )
    url_signing_key: str | None = Field(
        default=None,
        description="HMAC key for image URLs. Env IMAGES_URL_SIGNING_KEY wins; if neither is set a random "
        "key is generated at startup (URLs then die with the app).",
    )
    public_base_url: str | None = Field(
        default=None,
        description="Base URL put in image URLs (e.g. https://images.example.com); default: the request's own "
        "(see trusted_proxies). Set, it wins over any request header.",
    )
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="Addresses (IPs or CIDR networks) of reverse proxies whose Forwarded / X-Forwarded-Host / "
        "X-Forwarded-Proto headers say the scheme and host of image URLs. Headers from any other peer are "
        "ignored. Empty (default): none are trusted.",
    )
    api_keys_file: str | None = Field(
        default=None, description="File with one API key per line (# comments allowed), in addition to env IMAGES_API_KEYS."
    )
    max_concurrent_requests: int = Field(
        default=64,
        ge=1,
        description="Generations (streams included) one ingress replica works on at once; beyond it a request gets 429 "
        "server_overloaded with Retry-After at once instead of waiting in an unbounded queue.",
    )
    request_deadline_s: float = Field(
        default=300.0,
        gt=0,
        description="Per-request deadline, streams included; past it the client gets 504 "
        "(x-should-retry: false; a stream gets it as an error event). Keep it below the HTTP timeout (http_options.request_timeout_s) and clients' timeouts.",
    )
    rate_limits: RateLimits = Field(
        default_factory=RateLimits,
        description="Per-key limits, shared by all ingress replicas; beyond them 429 rate_limit_exceeded with Retry-After.",
    )
    image_fetch: ImageFetchSettings = Field(
        default_factory=ImageFetchSettings,
        description="Whether and from where the server fetches http(s) image URLs named in edit requests "
        "(off by default; data URLs and uploads always work).",
    )
    max_body_bytes: int = Field(
        default=1 << 20, ge=1024, description="Largest JSON (or other non-multipart) request body accepted (413 beyond)."
    )
    max_upload_bytes: int = Field(
        default=64 << 20,
        ge=1024,
        description="Largest multipart/form-data body (edits and variations with uploaded images), counted while "
        "it streams in (413 beyond). Each image's own limit comes from its model family.",
    )
    max_input_pixels: int = Field(
        default=4096 * 4096,
        ge=64 * 64,
        description="Largest width*height of an input image, checked from its header before it is decoded "
        "(a decompression bomb is refused without being unpacked).",
    )
    png_compress_level: int = Field(
        default=1,
        ge=0,
        le=3,
        description="Deflate effort for PNG output (ISA-L level 0-3): higher gives smaller files and takes longer.",
    )
    stages: StagesConfig = Field(
        default_factory=lambda: StagesConfig.model_validate({}),
        description="Deployment options per stage; each stage's keys override its defaults one by one.",
    )

    stage_groups: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Pipelines that share their model stages: {group: [pipeline, ...]} deploys one TextEncoder, one "
        "Denoiser and one VaeDecoder per group, each replica holding that stage of every pipeline in it (small "
        "models in fewer processes). A pipeline in no group has its own three deployments, named after it.",
    )

    def stage_group_members(self, pipelines: list[str]) -> dict[str, list[str]]:
        """Deployment group -> the registry's pipelines it serves; a pipeline
        in no group is a group of its own, under its own name. ValueError names
        a group member the registry lacks, a pipeline in two groups, or a group
        named like another pipeline."""
        members: dict[str, list[str]] = {}
        grouped: dict[str, str] = {}
        for group, names in self.stage_groups.items():
            if not names:
                raise ValueError(f"stage_groups.{group} lists no pipeline")
            for name in names:
                if name not in pipelines:
                    raise ValueError(f"stage_groups.{group}: the registry has no pipeline {name!r}; it has {sorted(pipelines)}")
                if name in grouped:
                    raise ValueError(f"stage_groups: pipeline {name!r} is in both {grouped[name]!r} and {group!r}")
                grouped[name] = group
            if group in pipelines and group not in names:
                raise ValueError(f"stage_groups.{group}: a group may not be named like pipeline {group!r}, which it does not hold")
            members[group] = list(names)
        for name in pipelines:
            if name not in grouped:
                members[name] = [name]
        return members

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, values: list[str]) -> list[str]:
        for v in values:
            ipaddress.ip_network(v, strict=False)  # ValueError names the bad entry
        return values

    @model_validator(mode="after")
    def _ingress_admits_before_ray_queues(self) -> "AppConfig":
        ingress = self.stages.ingress
        if ingress.max_ongoing_requests <= self.max_concurrent_requests:
            raise ValueError(
                f"stages.ingress.max_ongoing_requests ({ingress.max_ongoing_requests}) must be larger than "
                f"max_concurrent_requests ({self.max_concurrent_requests}): requests beyond Ray's limit wait in "
                "its queue and never reach the ingress's 429."
            )
        if ingress.max_queued_requests is not None:
            raise ValueError(
                "stages.ingress.max_queued_requests must be left unset: Ray answers the ingress's overflow in "
                "plain text; max_concurrent_requests bounds the ingress instead."
            )
        return self

    @property
    def data_path(self) -> Path:
        return resolve_path(self.data_dir)

    @property
    def image_store_url(self) -> str:
        return self.image_store or (self.data_path / "images").as_uri()

    @property
    def model_cache_setting(self) -> str:
        """model_cache_dir as configured, which each replica resolves on its own node (``node_path``)."""
        return self.model_cache_dir or str(self.data_path / "model-cache")

    @property
    def model_cache_path(self) -> Path:
        """The model cache as this process's node sees it."""
        return node_path(self.model_cache_setting)

    @property
    def sweeps_image_store(self) -> bool:
        local = get_protocol(self.image_store_url) in ("file", "local")
        return self.sweep_interval_s > 0 and (local or self.sweep_remote_store)


def load_registry(path: str | os.PathLike) -> ModelRegistry:
    with open(resolve_path(path)) as f:
        return ModelRegistry.model_validate(yaml.safe_load(f) or {})


def load_app_config(args: dict[str, Any] | None) -> tuple[AppConfig, ModelRegistry]:
    """Validate the application args and load the registry they name."""
    config = AppConfig.model_validate(args or {})
    registry = load_registry(config.models)
    config.stage_group_members(list(registry.pipelines))  # raises on a group that does not fit the registry
    return config, registry


def parse_size(size: str) -> tuple[int, int]:
    """'WxH' -> (width, height); raises ValueError unless both are positive multiples of 8."""
    m = _SIZE_RE.match(size)
    if not m:
        raise ValueError(f"size {size!r} is not of the form WIDTHxHEIGHT")
    w, h = int(m.group(1)), int(m.group(2))
    if w % 8 or h % 8 or w <= 0 or h <= 0:
        raise ValueError(f"size {size!r}: both sides must be positive multiples of 8")
    return w, h
