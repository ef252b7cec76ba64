"""``DiffusersStepCache``: diffusers' FirstBlockCache / MagCache / TaylorSeer hooks under a step batch
(see ``step_cache.py`` for why each row is its own call)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from omni_backend.cache.base import CacheRow, StepCache, StepCacheAdapter, select_rows
from omni_backend.cache.config import (
    THRESHOLD_FIELD,
    FirstBlockCacheSettings,
    MagCacheSettings,
    StepCacheConfig,
    TaylorSeerSettings,
)
from omni_backend.config import ConfigError


class DiffusersStepCache(StepCache):
    """diffusers' cache hooks, one transformer call per row inside ``cache_context(row key)``."""

    def __init__(self, transformer, adapter, observer, backend: str, config: StepCacheConfig):
        super().__init__(transformer, adapter, observer)
        self.backend = backend  # type: ignore[misc]
        self.settings = config
        self._diffusers_config = _diffusers_config(config, adapter)
        transformer.enable_cache(self._diffusers_config)
        self._hooks = _threshold_hooks(transformer, backend)
        self._keys: set[str] = set()
        self._probe_calls = 0
        adapter.probe(transformer).register_forward_hook(self._probed)

    def _probed(self, *_: object) -> None:
        self._probe_calls += 1

    @torch.inference_mode()
    def forward(self, rows: Sequence[CacheRow], inputs: dict[str, Any]) -> torch.Tensor:
        outputs = []
        computed = 0
        for i, row in enumerate(rows):
            if row.step_index == 0:
                self._forget(row.key)  # a request starting: fresh state
            self._set_threshold(row)
            if isinstance(self.settings, MagCacheSettings):
                self._fit_mag_ratios(row.num_steps)
            before = self._probe_calls
            with self.transformer.cache_context(row.key):
                if row.key not in self._keys and isinstance(self.settings, MagCacheSettings):
                    self._start_mag_cache_at(row.step_index)
                single = select_rows(inputs, self.adapter.row_inputs, [i])
                outputs.append(self.transformer(**single, return_dict=False)[0])
            computed += self._probe_calls > before
            self._keys.add(row.key)
            if row.is_last:
                self._forget(row.key)
        self._count(len(rows) - computed, computed)
        return torch.cat(outputs)

    def _set_threshold(self, row: CacheRow) -> None:
        field_name = THRESHOLD_FIELD.get(self.backend)
        if field_name is None:
            return
        value = getattr(self.settings, field_name) if row.threshold is None else row.threshold
        if value == 0 and isinstance(self.settings, MagCacheSettings):
            value = -1.0  # MagCache skips while error <= threshold: at 0 it would still skip error-free steps
        for hook in self._hooks:
            target = hook.config if isinstance(self.settings, MagCacheSettings) else hook
            target.threshold = value

    def _fit_mag_ratios(self, num_steps: int) -> None:
        """MagCache's ratios are per step of a fixed schedule: stretch them to this request's step count."""
        from diffusers.hooks.mag_cache import nearest_interp

        config = self._diffusers_config
        if config.num_inference_steps != num_steps:
            config.num_inference_steps = num_steps
            assert isinstance(self.settings, MagCacheSettings)
            ratios = self.settings.mag_ratios or self.adapter.mag_ratios
            config.mag_ratios = nearest_interp(torch.tensor(ratios), num_steps)

    def _start_mag_cache_at(self, step_index: int) -> None:
        """A row arriving mid-schedule (from another expert): MagCache's own step counter, which picks the
        ratio and the retention phase, starts at the row's step instead of 0. Its residual is empty, so
        this step computes."""
        for hook in self._hooks:
            hook.state_manager.get_state().step_index = step_index  # the context cache_context just set

    def _forget(self, key: str) -> None:
        """Drop one context's hook state (diffusers' StateManager keeps one per cache_context name)."""
        from diffusers.hooks.hooks import HookRegistry, StateManager

        registry = HookRegistry.check_if_exists_or_initialize(self.transformer)
        for child in (registry, *registry._get_child_registries()):
            for hook in child.hooks.values():
                for attr in vars(hook).values():
                    if isinstance(attr, StateManager):
                        attr._state_cache.pop(key, None)  # no public per-context reset in diffusers 0.42
        self._keys.discard(key)

    def release(self, request_ids: Sequence[str]) -> None:
        ended = set(request_ids)
        self.forget([k for k in self._keys if k.rsplit("/", 1)[0] in ended])

    def forget(self, keys: Sequence[str]) -> None:
        for key in keys:
            if key in self._keys:
                self._forget(key)

    def live_keys(self) -> set[str]:
        return set(self._keys)


def _threshold_hooks(transformer: torch.nn.Module, backend: str) -> list[Any]:
    """The hooks whose threshold a request may override: FBC's head hook (``.threshold``), MagCache's
    head hook (``.config.threshold``, a config object its block hooks share)."""
    from diffusers.hooks.first_block_cache import FBCHeadBlockHook
    from diffusers.hooks.hooks import HookRegistry
    from diffusers.hooks.mag_cache import MagCacheHeadHook

    kind = {"first_block_cache": FBCHeadBlockHook, "mag_cache": MagCacheHeadHook}.get(backend)
    if kind is None:
        return []
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    children = (registry, *registry._get_child_registries())
    return [hook for child in children for hook in child.hooks.values() if isinstance(hook, kind)]


def _diffusers_config(config: StepCacheConfig, adapter: StepCacheAdapter) -> Any:
    from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    if isinstance(config, FirstBlockCacheSettings):
        return FirstBlockCacheConfig(threshold=config.threshold)
    if isinstance(config, MagCacheSettings):
        ratios = list(config.mag_ratios or adapter.mag_ratios)
        return MagCacheConfig(
            threshold=config.threshold,
            max_skip_steps=config.max_skip_steps,
            retention_ratio=config.retention_ratio,
            num_inference_steps=len(ratios),
            mag_ratios=ratios,
        )
    if isinstance(config, TaylorSeerSettings):
        if config.cache_interval < 1:
            raise ConfigError("cache_config.cache_interval: must be at least 1")
        return TaylorSeerCacheConfig(
            cache_interval=config.cache_interval,
            disable_cache_before_step=config.disable_cache_before_step,
            max_order=config.max_order,
            taylor_factors_dtype=torch.float32,  # exactness at interval 1 and CPU float32 parity
            cache_identifiers=None if adapter.taylorseer_identifiers is None else list(adapter.taylorseer_identifiers),
        )
    raise TypeError(f"not a diffusers cache config: {config!r}")
