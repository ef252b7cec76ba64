"""Step-cache config: ``cache_backend`` + ``cache_config`` (a JSON object) parsed into typed dataclasses.

Parsed once at load. Bad JSON, an unknown key or a value of the wrong type fails the load with
a ConfigError naming the key. No torch here: config parsing stays importable without it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

from omni_backend.config import ConfigError


@dataclass(frozen=True)
class TeaCacheConfig:
    """Ours: skip a row's transformer pass while the rescaled relative L1 change of its modulated input stays small."""

    rel_l1_thresh: float = 0.4  # accumulated rescaled change below which a step is skipped (0: never skip)


@dataclass(frozen=True)
class FirstBlockCacheSettings:
    """diffusers' FirstBlockCache: skip the other blocks while the first block's residual changes little."""

    threshold: float = 0.05


@dataclass(frozen=True)
class MagCacheSettings:
    """diffusers' MagCache. ``mag_ratios`` empty: the family's calibrated ratios (pipelines/<family>.py)."""

    threshold: float = 0.06
    max_skip_steps: int = 3
    retention_ratio: float = 0.2
    mag_ratios: tuple[float, ...] = ()


@dataclass(frozen=True)
class TaylorSeerSettings:
    """diffusers' TaylorSeer: predict module outputs by Taylor expansion between full steps (no threshold)."""

    cache_interval: int = 5  # 1: every step computed (the uncached image)
    disable_cache_before_step: int = 3
    max_order: int = 1


StepCacheConfig = TeaCacheConfig | FirstBlockCacheSettings | MagCacheSettings | TaylorSeerSettings

CACHE_BACKENDS: dict[str, type] = {
    "tea_cache": TeaCacheConfig,
    "first_block_cache": FirstBlockCacheSettings,
    "mag_cache": MagCacheSettings,
    "taylorseer": TaylorSeerSettings,
}

# The field a request's ``cache_threshold`` input overrides, per backend (TaylorSeer has none).
THRESHOLD_FIELD = {"tea_cache": "rel_l1_thresh", "first_block_cache": "threshold", "mag_cache": "threshold"}


def parse_cache_config(backend: str, text: str) -> StepCacheConfig | None:
    """``cache_backend`` / ``cache_config`` -> the backend's typed config, or None for ``none``."""
    if backend == "none":
        if text.strip() not in ("", "{}"):
            raise ConfigError("cache_config: given while cache_backend is 'none'")
        return None
    if backend not in CACHE_BACKENDS:
        raise ConfigError(f"cache_backend: {backend!r} is not one of none, {', '.join(CACHE_BACKENDS)}")
    try:
        values = json.loads(text or "{}")
    except json.JSONDecodeError as exc:
        raise ConfigError(f"cache_config: not valid JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(values, dict):
        raise ConfigError("cache_config: must be a JSON object")
    cls = CACHE_BACKENDS[backend]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"cache_config.{key}: unknown key for {backend} (known: {', '.join(fields)})")
        kwargs[key] = _typed(f"cache_config.{key}", value, fields[key].default)
    return cls(**kwargs)


def _typed(key: str, value: object, default: object) -> object:
    """Check a JSON value against the field's default type; numbers must be finite and non-negative."""
    if isinstance(default, tuple):
        if not isinstance(value, list) or not all(_number(v) for v in value):
            raise ConfigError(f"{key}: expected a list of non-negative numbers")
        return tuple(float(v) for v in value)
    if isinstance(default, int) and not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        raise ConfigError(f"{key}: expected a non-negative integer, got {value!r}")
    if isinstance(default, float):
        if not _number(value):
            raise ConfigError(f"{key}: expected a non-negative number, got {value!r}")
        return float(value)  # type: ignore[arg-type]
    return value


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def check_cache_threshold(backend: str, value: float | None) -> None:
    """A request's ``cache_threshold`` needs a backend with a threshold; else INVALID_ARG naming the field."""
    from omni_backend.request import InvalidRequestError

    if value is not None and backend not in THRESHOLD_FIELD:
        reason = "has no threshold (set cache_interval)" if backend in CACHE_BACKENDS else "is not configured"
        raise InvalidRequestError("cache_threshold", f"this model's step cache {reason} (cache_backend: {backend})")
