"""Deployment config: parsed once from a model's config.pbtxt ``parameters``, validated, typed.

Every key of a model's ``parameters`` block lands in exactly one field below or in the
family's own options dataclass (declared by its pipeline class). An unknown key or a bad
value fails the model load with a :class:`ConfigError` naming the key, so a typo never
silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

DEFAULT_MODEL_ROOT = "~/.cache/omni-triton/models"
_DTYPES = ("float32", "bfloat16", "float16")
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ConfigError(ValueError):
    """A config parameter is unknown, missing or out of range; the message names the key."""


@dataclass(frozen=True)
class RequestLimits:
    """Bounds on the work one request may ask for, enforced before any work starts."""

    max_pixels: int = 2048 * 2048  # height * width
    max_side: int = 4096  # height or width alone
    max_steps: int = 500  # num_inference_steps
    max_prompt_bytes: int = 8192  # UTF-8 bytes of prompt / negative_prompt
    max_guidance: float = 100.0  # |guidance_scale|, |true_cfg_scale|
    max_frames: int = 257  # num_frames of video families (Wan2.2 makes 81 at 16 fps, 121 at 24 fps)
    max_video_pixels: int = 257 * 1280 * 720  # num_frames * height * width
    max_input_image_pixels: int = 4096 * 4096  # height * width of input_image (uint8 RGB: 3 bytes a pixel)


@dataclass(frozen=True)
class EngineConfig:
    """How the engine batches requests."""

    max_num_seqs: int = 8  # requests running at once (and so at most in one transformer call)
    max_queue_size: int = 256  # waiting requests beyond which new ones are refused
    scheduling: str = "step"  # "step": join/leave between steps; "request": whole-request batches
    queue_timeout_s: float = 0.0  # fail requests still waiting after this long (0: no limit)
    max_request_rate: float = 0.0  # requests/s the queue takes, bursts up to max(1, rate) (0: no limit)
    log_stage_timings: bool = False  # log each request's queue/encode/denoise/decode seconds (syncs CUDA)
    # decode finished images on a second thread while the next steps run (runner/decoder.py): "auto"
    # (on a GPU only: two threads of torch kernels oversubscribe the CPU's cores), "true" or "false";
    # never with offload, where the VAE takes its turn on the device between the other stages
    background_decode: str = "auto"


@dataclass(frozen=True)
class AccelerationConfig:
    """Offload, step cache, prompt-embedding cache, compilation, VAE memory (README "Acceleration")."""

    offload: str = "none"  # "none", "model" (one stage's modules on the device) or "layerwise" (a block window)
    offload_window: int = 1  # layerwise: transformer blocks per group on the device (the next one prefetched)
    cache_backend: str = "none"  # "none", "tea_cache", "first_block_cache", "mag_cache", "taylorseer"
    cache_config: str = "{}"  # JSON object of the backend's settings (omni_backend/cache/config.py)
    enable_prompt_embed_cache: bool = False  # LRU of text-encoder outputs keyed on prompts + encoder params
    prompt_embed_cache_size: int = 64  # entries (one per prompt / negative prompt / encoder params)
    compile: str = "none"  # "none" or "regional": torch.compile the transformer's repeated blocks
    # "HxW,HxW" run at load before READY (runner/warmup.py); "": none (with compile: the default size)
    warmup_sizes: str = ""
    vae_tiling: bool = False  # decode large images tile by tile
    vae_slicing: bool = False  # decode a batch one image at a time


@dataclass(frozen=True)
class ControlConfig:
    """The in-band control channel: sleep / wake, profiling (README "Control: sleep, wake, profiling")."""

    enable_control: bool = False  # accept requests carrying the `control` input (off: refused, naming this key)
    wake_on_request: bool = False  # a request reaching a sleeping model wakes it (off: UNAVAILABLE "model is asleep")
    profile_dir: str = ""  # where profile_stop writes Chrome traces ("": profiling ops refused)
    profile_max_steps: int = 100  # a trace stops by itself after this many engine steps (bounds its size)


@dataclass(frozen=True)
class ParallelConfig:
    """How one model instance spreads a request over a group of devices (see distributed/)."""

    cfg_parallel_size: int = 1  # CFG branches (rows of the transformer batch) on different ranks
    ulysses_degree: int = 1  # sequence parallel: all-to-all over attention heads
    ring_degree: int = 1  # sequence parallel: key/value blocks passed around a ring
    tensor_parallel_size: int = 1  # transformer weights sharded column/row-wise
    pipeline_parallel_size: int = 1  # transformer blocks split into consecutive stages

    @property
    def world_size(self) -> int:
        return (
            self.cfg_parallel_size
            * self.ulysses_degree
            * self.ring_degree
            * self.tensor_parallel_size
            * self.pipeline_parallel_size
        )


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters served per request (omni_backend/lora/, README "LoRA adapters")."""

    lora_dir: str = ""  # absolute folder holding one sub-folder per adapter name ("" : no LoRA)
    max_loras: int = 4  # adapters resident on the transformer at once; least recently used evicted first
    pinned_loras: str = ""  # comma-separated adapter names loaded at load and never evicted

    @property
    def enabled(self) -> bool:
        return bool(self.lora_dir)

    @property
    def pinned(self) -> tuple[str, ...]:
        return tuple(name.strip() for name in self.pinned_loras.split(",") if name.strip())


@dataclass(frozen=True)
class ModelConfig:
    """The whole validated config of one Triton model."""

    family: str  # registry name of the pipeline, e.g. "flux"
    model: str  # checkpoint: absolute path, name under model_root, or Hugging Face id
    dtype: str = "float32"
    device: str = "auto"  # "auto" follows Triton's instance kind; or "cpu", "cuda", "cuda:N"
    model_root: str = DEFAULT_MODEL_ROOT
    limits: RequestLimits = field(default_factory=RequestLimits)
    engine: EngineConfig = field(default_factory=EngineConfig)
    acceleration: AccelerationConfig = field(default_factory=AccelerationConfig)
    step_cache: Any = None  # cache_backend + cache_config parsed (omni_backend.cache.config), None: no cache
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    options: Any = None  # the family's own options dataclass (see pipelines/<family>.py)

    def resolve_checkpoint(self) -> str:
        """Turn ``model`` into what ``from_pretrained`` takes: a local folder or a hub id."""
        if os.path.isabs(self.model):
            return self.model
        root = Path(os.path.expanduser(os.environ.get("OMNI_MODEL_ROOT", self.model_root)))
        candidate = (root / self.model).resolve()
        if candidate.is_dir():
            # a name must stay inside the model root: "../../etc" is not a model name
            if root.resolve() not in candidate.parents:
                raise ConfigError(f"model: {self.model!r} resolves outside the model root {root}")
            return str(candidate)
        if _HF_ID.match(self.model) and ".." not in self.model:
            return self.model
        raise ConfigError(
            f"model: {self.model!r} is neither an absolute path, a folder under {root} "
            "(set OMNI_MODEL_ROOT or model_root), nor a Hugging Face id"
        )


_T = TypeVar("_T")


def parse_dataclass(cls: type[_T], values: dict[str, str], prefix: str = "") -> _T:
    """Build ``cls`` from string values, consuming (popping) the keys it declares.

    Types come from the dataclass annotations (int, float, bool, str). Keys are matched
    as ``prefix + field name``; the caller checks that nothing unknown is left.
    """
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        key = prefix + f.name
        if key not in values:
            continue
        raw = values.pop(key)
        kwargs[f.name] = _convert(key, raw, f.type, f.default)
    return cls(**kwargs)


def _convert(key: str, raw: str, annotation: Any, default: Any) -> Any:
    kind = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    if kind == "Any":  # option values without a declared type keep their string form
        kind = type(default).__name__
    try:
        if kind == "bool":
            lowered = raw.strip().lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return lowered in ("true", "1", "yes")
        if kind == "int":
            value: Any = int(raw)
            if value < 0:
                raise ValueError
            return value
        if kind == "float":
            value = float(raw)
            if not math.isfinite(value) or value < 0:
                raise ValueError
            return value
    except ValueError:
        raise ConfigError(
            f"{key}: {raw!r} is not a valid {'non-negative ' if kind in ('int', 'float') else ''}{kind}"
        ) from None
    return raw


def parameters_from_model_config(model_config: Mapping[str, Any]) -> dict[str, str]:
    """Flatten Triton's ``{"key": {"string_value": "v"}}`` parameters into ``{"key": "v"}``."""
    params = model_config.get("parameters") or {}
    return {key: str(value.get("string_value", "")) for key, value in params.items()}


def parse_model_config(parameters: Mapping[str, str], options_cls: type | None = None) -> ModelConfig:
    """Validate a model's parameters; ``options_cls`` is the family's options dataclass."""
    values = {k: v for k, v in parameters.items()}
    for required in ("family", "model"):
        if not values.get(required):
            raise ConfigError(f"{required}: required parameter is missing from config.pbtxt")
    family, model = values.pop("family"), values.pop("model")
    dtype = values.pop("dtype", "float32")
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype: {dtype!r} is not one of {', '.join(_DTYPES)}")
    device = values.pop("device", "auto")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise ConfigError(f"device: {device!r} is not 'auto', 'cpu', 'cuda' or 'cuda:N'")
    model_root = values.pop("model_root", DEFAULT_MODEL_ROOT)
    limits = parse_dataclass(RequestLimits, values)
    engine = parse_dataclass(EngineConfig, values)
    parallel = parse_dataclass(ParallelConfig, values)
    for f in dataclasses.fields(ParallelConfig):
        if getattr(parallel, f.name) < 1:
            raise ConfigError(f"{f.name}: must be at least 1, got {getattr(parallel, f.name)}")
    for key, value in (("max_num_seqs", engine.max_num_seqs), ("max_steps", limits.max_steps)):
        if value < 1:
            raise ConfigError(f"{key}: must be at least 1, got {value}")
    if engine.scheduling not in ("step", "request"):
        raise ConfigError(f"scheduling: {engine.scheduling!r} is not 'step' or 'request'")
    if engine.background_decode not in ("auto", "true", "false"):
        raise ConfigError(f"background_decode: {engine.background_decode!r} is not 'auto', 'true' or 'false'")
    acceleration, step_cache = _parse_acceleration(values)
    control = parse_dataclass(ControlConfig, values)
    if control.profile_max_steps < 1:
        raise ConfigError(f"profile_max_steps: must be at least 1, got {control.profile_max_steps}")
    if parallel.world_size > 1:
        # the parallel denoiser runs the transformer itself: these would silently not apply
        for key, off in (("offload", "none"), ("cache_backend", "none"), ("compile", "none")):
            if getattr(acceleration, key) != off:
                raise ConfigError(f"{key}: not supported yet with a parallel group (world size {parallel.world_size})")
    lora = _parse_lora(values, acceleration, parallel)
    options = parse_dataclass(options_cls, values) if options_cls is not None else None
    if values:
        raise ConfigError(f"{sorted(values)[0]}: unknown config parameter (known keys: {_known_keys(options_cls)})")
    return ModelConfig(
        family=family,
        model=model,
        dtype=dtype,
        device=device,
        model_root=model_root,
        limits=limits,
        engine=engine,
        acceleration=acceleration,
        step_cache=step_cache,
        parallel=parallel,
        control=control,
        lora=lora,
        options=options,
    )


def _parse_acceleration(values: dict[str, str]) -> tuple[AccelerationConfig, Any]:
    from omni_backend.cache.config import parse_cache_config  # imports ConfigError from here

    accel = parse_dataclass(AccelerationConfig, values)
    choices = {"offload": ("none", "model", "layerwise"), "compile": ("none", "regional")}
    for key, allowed in choices.items():
        if getattr(accel, key) not in allowed:
            raise ConfigError(f"{key}: {getattr(accel, key)!r} is not one of {', '.join(allowed)}")
    if accel.offload_window < 1:
        raise ConfigError(f"offload_window: must be at least 1, got {accel.offload_window}")
    if accel.offload_window != 1 and accel.offload != "layerwise":
        raise ConfigError("offload_window: only applies with offload: layerwise")
    if accel.offload == "layerwise" and accel.compile != "none":
        # group-offloading hooks move weights inside the compiled blocks' forward: graph breaks every block
        raise ConfigError("compile: 'regional' cannot be combined with offload: layerwise")
    if accel.offload == "layerwise" and accel.cache_backend == "tea_cache":
        # its skip path runs the transformer's embedders and output head outside the transformer's
        # forward, where the group-offloading hooks would not have onloaded them
        raise ConfigError("cache_backend: 'tea_cache' cannot be combined with offload: layerwise")
    if accel.prompt_embed_cache_size < 1:
        raise ConfigError(f"prompt_embed_cache_size: must be at least 1, got {accel.prompt_embed_cache_size}")
    if accel.warmup_sizes and not re.fullmatch(r"\d+x\d+(,\d+x\d+)*", accel.warmup_sizes):
        raise ConfigError(f"warmup_sizes: {accel.warmup_sizes!r} is not 'HxW[,HxW...]'")
    return accel, parse_cache_config(accel.cache_backend, accel.cache_config)


def _parse_lora(values: dict[str, str], acceleration: AccelerationConfig, parallel: ParallelConfig) -> LoraConfig:
    from omni_backend.lora.names import AdapterNameError, adapter_path  # imports nothing from here

    given = [f.name for f in dataclasses.fields(LoraConfig) if f.name in values]
    lora = parse_dataclass(LoraConfig, values)
    if not lora.enabled:
        if given:
            raise ConfigError(f"{given[0]}: only applies with lora_dir")
        return lora
    root = Path(lora.lora_dir)
    if not root.is_absolute() or not root.is_dir():
        raise ConfigError(f"lora_dir: {lora.lora_dir!r} is not an absolute path of an existing folder")
    if lora.max_loras < 1:
        raise ConfigError(f"max_loras: must be at least 1, got {lora.max_loras}")
    pinned = lora.pinned
    if len(set(pinned)) != len(pinned):
        raise ConfigError(f"pinned_loras: {lora.pinned_loras!r} names an adapter twice")
    if len(pinned) > lora.max_loras:
        raise ConfigError(f"pinned_loras: {len(pinned)} adapters pinned but max_loras is {lora.max_loras}")
    for name in pinned:
        try:
            adapter_path(root, name)
        except AdapterNameError as exc:
            raise ConfigError(f"pinned_loras: {exc}") from None
    # Each of these changes how the transformer's modules run and was not made to follow adapters that
    # come and go at runtime: rejected rather than served wrong (README "LoRA adapters").
    if parallel.world_size > 1:
        raise ConfigError(f"lora_dir: not supported yet with a parallel group (world size {parallel.world_size})")
    for key, off in (("offload", "none"), ("compile", "none")):
        if getattr(acceleration, key) != off:
            raise ConfigError(f"{key}: {getattr(acceleration, key)!r} cannot be combined with lora_dir yet")
    return lora


def _known_keys(options_cls: type | None) -> str:
    names = ["family", "model", "dtype", "device", "model_root"]
    sections = (RequestLimits, EngineConfig, AccelerationConfig, ParallelConfig, ControlConfig, LoraConfig)
    for cls in (*sections, options_cls):
        if cls is not None:
            names += [f.name for f in dataclasses.fields(cls)]
    return ", ".join(names)
