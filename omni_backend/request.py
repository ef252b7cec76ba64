"""User-facing request types and their validation.

``SamplingParams`` is what the user asked for, ``DiffusionRequest`` is one validated request
as the engine sees it, ``DiffusionOutput`` is what goes back. Validation works on plain
numpy arrays (one request, batch dimension removed) so it is tested without Triton; every
rejection is an :class:`InvalidRequestError` naming the field and the allowed range.
"""

from __future__ import annotations

import enum
import math
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from omni_backend.config import RequestLimits

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_CACHE_THRESHOLD = 10.0  # far above any useful step-cache threshold (0.05 - 1.5 in the field)
MAX_LORA_SCALE = 8.0  # |lora_scale|: LoRA weights are trained for ~1; far beyond is noise, not style


class InvalidRequestError(ValueError):
    """A request input is missing, malformed or out of range."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass(frozen=True)
class SamplingDefaults:
    """What a family uses when a request leaves a parameter out, and what sizes it takes."""

    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    true_cfg_scale: float = 1.0
    size_multiple: int = 16  # height and width must be multiples of this
    num_frames: int | None = None  # video families: the default frame count (they take `num_frames`); None: images
    frame_step: int = 1  # num_frames must be frame_step * k + 1 (the VAE's temporal compression)
    takes_guidance_scale_2: bool = False  # the family takes `guidance_scale_2` (a second expert's CFG scale)


@dataclass(frozen=True)
class SamplingParams:
    """The parameters of one generation, defaults filled in."""

    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    true_cfg_scale: float
    seed: int
    cache_threshold: float | None = None  # overrides the step cache's configured threshold (None: keep it)
    num_frames: int = 1  # 1 for image families
    guidance_scale_2: float | None = None  # None: the family's own fallback (e.g. guidance_scale)


@dataclass(frozen=True)
class LoraSelection:
    """The LoRA adapter a request runs with (part of its batching key: one adapter per transformer call)."""

    name: str  # adapter folder name under the model's lora_dir
    scale: float = 1.0  # multiplies the adapter's update, as diffusers' set_adapters(weights=...)


@dataclass(eq=False)  # identity: two requests are never "equal", and tensors don't compare to bools
class DiffusionRequest:
    """One validated request, as the engine schedules it."""

    request_id: str
    params: SamplingParams
    prompt: str | None = None  # None when the text-encoder stage already produced conditioning
    negative_prompt: str | None = None
    # Tensors from the text-encoder stage (ensemble): skip encode. Names are the family's.
    conditioning: dict[str, Any] | None = None
    lora: LoraSelection | None = None  # None: the base weights
    input_image: np.ndarray | None = None  # uint8 [H, W, 3] RGB of edit / image-to-video families
    preview_every: int = 0  # stream a preview (image or video) every N steps (0: none)
    queue_deadline: float | None = None  # time.monotonic() by which it must have started, else it fails
    arrival_time: float = field(default_factory=time.monotonic)

    @property
    def num_steps(self) -> int:
        return self.params.num_inference_steps


@dataclass
class StageTimings:
    """Where one request's time went, in seconds (the stages of vLLM-Omni's DiffusionPipelineProfiler)."""

    queue_s: float = 0.0  # arrival to joining the running set
    encode_s: float = 0.0  # its (batched) text-encoder pass and preparation
    denoise_s: float = 0.0  # the transformer calls it took part in, shared with their batches
    decode_s: float = 0.0  # its (batched) VAE pass
    steps: int = 0

    def summary(self) -> str:
        total = self.queue_s + self.encode_s + self.denoise_s + self.decode_s
        return (
            f"queue {self.queue_s:.3f} s, encode {self.encode_s:.3f} s, denoise {self.denoise_s:.3f} s "
            f"({self.steps} steps), decode {self.decode_s:.3f} s, total {total:.3f} s"
        )


class ErrorKind(enum.Enum):
    """Why a request failed after validation (the Triton layer maps these to status codes)."""

    INTERNAL = "internal"  # a fault while running it
    CANCELLED = "cancelled"  # the client cancelled it
    UNAVAILABLE = "unavailable"  # queue timeout, shutdown, model asleep: retry elsewhere or later
    INVALID_ARG = "invalid_arg"  # a control op the model's state refuses (engine/control.py)


@dataclass
class DiffusionOutput:
    """The result of one request: named output arrays, or an error message."""

    request_id: str
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    error: str | None = None
    error_kind: ErrorKind = ErrorKind.INTERNAL
    timings: StageTimings | None = None  # set for requests that completed


# ---------------------------------------------------------------------------- parsing


def _scalar(inputs: Mapping[str, np.ndarray], name: str) -> Any | None:
    if name not in inputs:
        return None
    array = np.asarray(inputs[name])
    if array.size != 1:
        raise InvalidRequestError(name, f"expected exactly one value, got shape {list(array.shape)}")
    return array.reshape(-1)[0]


def parse_text(inputs: Mapping[str, np.ndarray], name: str, limits: RequestLimits) -> str | None:
    """Decode a TYPE_STRING input as strict UTF-8 within ``max_prompt_bytes``."""
    raw = _scalar(inputs, name)
    if raw is None:
        return None
    if isinstance(raw, str):
        raw = raw.encode("utf-8", errors="surrogatepass")
    if not isinstance(raw, bytes | np.bytes_):
        raise InvalidRequestError(name, "expected a UTF-8 string (TYPE_STRING / BYTES)")
    if len(raw) > limits.max_prompt_bytes:
        raise InvalidRequestError(
            name, f"{len(raw)} bytes is longer than the limit of {limits.max_prompt_bytes} UTF-8 bytes"
        )
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequestError(name, f"is not valid UTF-8 (byte {exc.start})") from None
    if "\x00" in text:
        raise InvalidRequestError(name, "must not contain NUL characters")
    return text


def parse_int(inputs: Mapping[str, np.ndarray], name: str, default: int, low: int, high: int) -> int:
    raw = _scalar(inputs, name)
    if raw is None:
        return default
    if not isinstance(raw, np.integer | int):
        raise InvalidRequestError(name, f"expected an integer, got {type(raw).__name__}")
    value = int(raw)
    if not low <= value <= high:
        raise InvalidRequestError(name, f"{value} is outside the allowed range [{low}, {high}]")
    return value


def _float_in(inputs: Mapping[str, np.ndarray], name: str, default: float, low: float, high: float) -> float:
    raw = _scalar(inputs, name)
    if raw is None:
        return default
    if not isinstance(raw, np.floating | float | np.integer | int):
        raise InvalidRequestError(name, f"expected a number, got {type(raw).__name__}")
    value = float(raw)
    if not math.isfinite(value):
        raise InvalidRequestError(name, f"{value} is not a finite number")
    if not low <= value <= high:
        raise InvalidRequestError(name, f"{value} is outside the allowed range [{low}, {high}]")
    return value


def parse_sampling_params(
    inputs: Mapping[str, np.ndarray], defaults: SamplingDefaults, limits: RequestLimits
) -> SamplingParams:
    """Validate the sampling inputs of one request and fill in the family's defaults."""
    multiple = defaults.size_multiple
    side_max = limits.max_side - limits.max_side % multiple
    height = parse_int(inputs, "height", defaults.height, multiple, side_max)
    width = parse_int(inputs, "width", defaults.width, multiple, side_max)
    for name, value in (("height", height), ("width", width)):
        if value % multiple:
            raise InvalidRequestError(name, f"{value} is not a multiple of {multiple} (this model's size step)")
    if height * width > limits.max_pixels:
        raise InvalidRequestError(
            "height", f"height x width = {height}x{width} exceeds the limit of {limits.max_pixels} pixels"
        )
    steps = parse_int(inputs, "num_inference_steps", defaults.num_inference_steps, 1, limits.max_steps)
    guidance = _float_in(inputs, "guidance_scale", defaults.guidance_scale, 0.0, limits.max_guidance)
    true_cfg = _float_in(inputs, "true_cfg_scale", defaults.true_cfg_scale, 0.0, limits.max_guidance)
    seed = parse_int(inputs, "seed", random.randint(0, 2**31 - 1), INT64_MIN, INT64_MAX)
    cache_threshold = None
    if "cache_threshold" in inputs:
        cache_threshold = _float_in(inputs, "cache_threshold", 0.0, 0.0, MAX_CACHE_THRESHOLD)
    guidance_2 = None
    if defaults.takes_guidance_scale_2 and "guidance_scale_2" in inputs:
        guidance_2 = _float_in(inputs, "guidance_scale_2", guidance, 0.0, limits.max_guidance)
    return SamplingParams(
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=guidance,
        true_cfg_scale=true_cfg,
        seed=seed,
        cache_threshold=cache_threshold,
        num_frames=_parse_num_frames(inputs, defaults, limits, height * width),
        guidance_scale_2=guidance_2,
    )


def parse_lora(inputs: Mapping[str, np.ndarray], limits: RequestLimits) -> LoraSelection | None:
    """``lora_name`` / ``lora_scale``; whether the name exists is the model's LoRA registry's to check."""
    name = parse_text(inputs, "lora_name", limits)
    if name is None:
        if "lora_scale" in inputs:
            raise InvalidRequestError("lora_scale", "only applies with lora_name")
        return None
    return LoraSelection(name, _float_in(inputs, "lora_scale", 1.0, -MAX_LORA_SCALE, MAX_LORA_SCALE))


def _parse_num_frames(
    inputs: Mapping[str, np.ndarray], defaults: SamplingDefaults, limits: RequestLimits, pixels: int
) -> int:
    """Video families: ``num_frames`` within the limits and a count the VAE can take (step * k + 1)."""
    if defaults.num_frames is None:
        return 1
    step = defaults.frame_step
    frames = parse_int(inputs, "num_frames", defaults.num_frames, 1, limits.max_frames)
    if (frames - 1) % step:
        raise InvalidRequestError(
            "num_frames", f"{frames} is not {step}k+1 (this model's VAE compresses {step} frames into one latent)"
        )
    if frames * pixels > limits.max_video_pixels:
        raise InvalidRequestError(
            "num_frames", f"num_frames x height x width = {frames * pixels} exceeds {limits.max_video_pixels}"
        )
    return frames


def parse_prompt_request(
    request_id: str,
    inputs: Mapping[str, np.ndarray],
    defaults: SamplingDefaults,
    limits: RequestLimits,
) -> DiffusionRequest:
    """A text-to-image request: ``prompt`` (required), ``negative_prompt`` and sampling params."""
    prompt = parse_text(inputs, "prompt", limits)
    if prompt is None:
        raise InvalidRequestError("prompt", "is required")
    return DiffusionRequest(
        request_id=request_id,
        params=parse_sampling_params(inputs, defaults, limits),
        prompt=prompt,
        negative_prompt=parse_text(inputs, "negative_prompt", limits),
    )


def parse_input_image(inputs: Mapping[str, np.ndarray], limits: RequestLimits) -> np.ndarray:
    """``input_image`` (required): uint8 [H, W, 3] RGB within ``max_side`` and ``max_input_image_pixels``."""
    if "input_image" not in inputs:
        raise InvalidRequestError("input_image", "is required (uint8 [H, W, 3] RGB)")
    image = np.asarray(inputs["input_image"])
    if image.dtype != np.uint8:
        raise InvalidRequestError("input_image", f"expected uint8 (TYPE_UINT8) pixels, got {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise InvalidRequestError("input_image", f"expected shape [H, W, 3] (RGB), got {list(image.shape)}")
    height, width = image.shape[:2]
    if not (1 <= height <= limits.max_side and 1 <= width <= limits.max_side):
        raise InvalidRequestError("input_image", f"{height}x{width}: each side must be in [1, {limits.max_side}]")
    if height * width > limits.max_input_image_pixels:
        raise InvalidRequestError(
            "input_image",
            f"{height}x{width} = {height * width} pixels exceeds the limit of {limits.max_input_image_pixels}",
        )
    return image
