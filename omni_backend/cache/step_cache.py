"""Step caches: skip transformer work on steps that change little, with per-request state in a step batch.

A step batch mixes requests at different step indices, so every skip decision and every piece of
cached state belongs to one *row*: a request's conditional or negative (true-CFG) branch, keyed
``"<request id>/<branch>"``. State is created when a row is at step 0, dropped after its last step
and released by the runner when a request fails or is aborted: it never leaks between requests.

- ``TeaCache`` (ours, no diffusers equivalent) decides per row inside ONE batched call: the rows
  that compute run the transformer together; the skipped rows only pay the embedders and the
  output head on their cached block residual.
- ``DiffusersStepCache`` runs diffusers' FirstBlockCache / MagCache / TaylorSeer hooks. Their
  state is module-level, keyed by ``cache_context`` name, so each row is its own transformer call
  inside ``cache_context(row key)``: step batching is given up for the transformer (measured in
  benchmarks/RESULTS.md), the hooks themselves are unchanged.

The family supplies what is model-specific (which inputs carry the batch, the embedders, the
modulated input of the first block, the rescale polynomial, MagCache ratios): a ``StepCacheAdapter``
declared in ``pipelines/<family>.py``.

A family with several transformers (Wan2.2 A14B's high- and low-noise experts) gets one cache per
transformer (``StepCaches``): residuals, input histories, MagCache ratios and TaylorSeer derivatives
describe one transformer's function, so a row's state lives in the cache of the transformer serving
it, and a row moving on to the next transformer starts afresh there (its first step computes).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch

from omni_backend.cache.config import (
    THRESHOLD_FIELD,
    FirstBlockCacheSettings,
    MagCacheSettings,
    StepCacheConfig,
    TaylorSeerSettings,
    TeaCacheConfig,
)
from omni_backend.config import ConfigError
from omni_backend.engine.observer import AccelerationObserver


@dataclass(frozen=True)
class CacheRow:
    """One row of a transformer call, as the cache sees it."""

    request_id: str
    branch: str  # "cond" or "uncond" (true-CFG negative branch): separate state, separate decisions
    step_index: int  # this request's step, 0-based
    num_steps: int
    threshold: float | None  # the request's cache_threshold override, None: the configured one

    @property
    def key(self) -> str:
        return f"{self.request_id}/{self.branch}"

    @property
    def is_last(self) -> bool:
        return self.step_index == self.num_steps - 1


class StepCacheAdapter(Protocol):
    """What a family tells the caches about its transformer (implemented in pipelines/<family>.py)."""

    row_inputs: tuple[str, ...]  # transformer kwargs that carry one row per CacheRow (tensors, lists or None)
    tea_cache_coefficients: tuple[float, ...]  # rescale polynomial of the relative L1 change, highest power first
    mag_ratios: tuple[float, ...]  # MagCache magnitude ratios calibrated for the family
    # modules TaylorSeer predicts (full-match regexes over module names), None: diffusers' defaults
    taylorseer_identifiers: tuple[str, ...] | None

    def embed(self, transformer: torch.nn.Module, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states entering the first block, the timestep embedding)."""

    def modulated_input(self, transformer: torch.nn.Module, hidden: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """The first block's modulated (normalised, shifted, scaled) input: TeaCache's change signal."""

    def head(
        self, transformer: torch.nn.Module, hidden: torch.Tensor, temb: torch.Tensor, inputs: dict[str, Any]
    ) -> torch.Tensor:
        """The output head applied to the hidden states leaving the last block (``inputs``: the same rows'
        transformer kwargs, for heads that unpatchify to the input's shape)."""

    def blocks_exit(self, transformer: torch.nn.Module) -> torch.nn.Module:
        """The module whose INPUT leaves the blocks: with ``embed``'s hidden states (what enters them),
        the blocks' residual."""

    def probe(self, transformer: torch.nn.Module) -> torch.nn.Module:
        """A leaf inside the last block that runs only when diffusers' hooks compute the step."""


def select_rows(inputs: dict[str, Any], names: Sequence[str], index: Sequence[int]) -> dict[str, Any]:
    """The transformer kwargs of a subset of rows. A row input is a tensor (rows on dim 0), a list or
    tuple (one entry per row) or None (an optional input left out: stays None)."""
    return {k: _pick(v, index) if k in names else v for k, v in inputs.items()}


def _pick(value: Any, index: Sequence[int]) -> Any:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value.index_select(0, torch.tensor(list(index), dtype=torch.long, device=value.device))
    if isinstance(value, list | tuple):
        return type(value)(value[i] for i in index)
    raise TypeError(f"a row input must be a tensor, a list, a tuple or None, not {type(value).__name__}")


class StepCache(ABC):
    """A step cache applied to one transformer; ``forward`` replaces the plain transformer call."""

    backend: ClassVar[str]

    def __init__(self, transformer: torch.nn.Module, adapter: StepCacheAdapter, observer: AccelerationObserver):
        self.transformer = transformer
        self.adapter = adapter
        self.observer = observer
        self.skipped = 0  # rows served without the full transformer, since load
        self.computed = 0

    @abstractmethod
    def forward(self, rows: Sequence[CacheRow], inputs: dict[str, Any]) -> torch.Tensor:
        """The transformer output (first element of its tuple) for ``rows``, skipping what the cache allows."""

    @abstractmethod
    def release(self, request_ids: Sequence[str]) -> None:
        """Forget the state of requests that ended (finished, failed or aborted)."""

    @abstractmethod
    def forget(self, keys: Sequence[str]) -> None:
        """Drop the state of these row keys (those not held are ignored)."""

    @abstractmethod
    def live_keys(self) -> set[str]:
        """Row keys that hold state now (tests check nothing leaks)."""

    def _count(self, skipped: int, computed: int) -> None:
        self.skipped += skipped
        self.computed += computed
        self.observer.on_cache_steps(skipped, computed)


@dataclass
class _TeaRow:
    previous_modulated: torch.Tensor
    accumulated: float = 0.0
    residual: torch.Tensor | None = None  # blocks' output - input at the last computed step


class TeaCache(StepCache):
    """TeaCache (https://arxiv.org/abs/2411.19108): accumulate the rescaled relative L1 change of the first
    block's modulated input; while it stays under ``rel_l1_thresh`` reuse the row's last block residual.
    The first and last step of a request always compute."""

    backend = "tea_cache"

    def __init__(self, transformer, adapter, observer, config: TeaCacheConfig):
        super().__init__(transformer, adapter, observer)
        self.config = config
        self.rows: dict[str, _TeaRow] = {}
        self._poly = adapter.tea_cache_coefficients

    @torch.inference_mode()
    def forward(self, rows: Sequence[CacheRow], inputs: dict[str, Any]) -> torch.Tensor:
        hidden, temb = self.adapter.embed(self.transformer, inputs)
        modulated = self.adapter.modulated_input(self.transformer, hidden, temb)
        compute = [i for i, row in enumerate(rows) if self._decide(row, modulated[i : i + 1])]
        skip = [i for i in range(len(rows)) if i not in compute]
        outputs: list[torch.Tensor | None] = [None] * len(rows)
        if compute:
            with self._capture_exit() as captured:
                out = self.transformer(**select_rows(inputs, self.adapter.row_inputs, compute), return_dict=False)[0]
            for j, i in enumerate(compute):
                outputs[i] = out[j : j + 1]
                self.rows[rows[i].key].residual = captured["after"][j : j + 1] - hidden[i : i + 1]
        if skip:
            index = torch.tensor(skip, device=hidden.device)
            residual = torch.cat([self.rows[rows[i].key].residual for i in skip])  # type: ignore[misc]
            skipped = select_rows(inputs, self.adapter.row_inputs, skip)
            head = self.adapter.head(self.transformer, hidden[index] + residual, temb[index], skipped)
            for j, i in enumerate(skip):
                outputs[i] = head[j : j + 1]
        for row in rows:
            if row.is_last:
                self.rows.pop(row.key, None)
        self._count(len(skip), len(compute))
        return torch.cat(outputs)  # type: ignore[arg-type]

    def _decide(self, row: CacheRow, modulated: torch.Tensor) -> bool:
        """True: compute this row's step. Updates the row's accumulator."""
        state = self.rows.get(row.key)
        if row.step_index == 0 or state is None or state.residual is None:
            self.rows[row.key] = _TeaRow(modulated)  # a request starting: fresh state
            return True
        change = ((modulated - state.previous_modulated).abs().mean() / state.previous_modulated.abs().mean()).item()
        state.previous_modulated = modulated
        # a distance is never negative: a polynomial fitted on a range may dip below 0 outside it (Wan's does
        # near 0), and a negative step must not let threshold 0 skip
        state.accumulated += max(0.0, _polyval(self._poly, change))
        threshold = self.config.rel_l1_thresh if row.threshold is None else row.threshold
        if row.is_last or state.accumulated >= threshold:
            state.accumulated = 0.0
            return True
        return False

    @contextlib.contextmanager
    def _capture_exit(self) -> Iterator[dict[str, torch.Tensor]]:
        captured: dict[str, torch.Tensor] = {}
        exit_ = self.adapter.blocks_exit(self.transformer)
        handle = exit_.register_forward_pre_hook(lambda _m, args: captured.__setitem__("after", args[0]))
        try:
            yield captured
        finally:
            handle.remove()

    def release(self, request_ids: Sequence[str]) -> None:
        ended = set(request_ids)
        self.forget([k for k in self.rows if k.rsplit("/", 1)[0] in ended])

    def forget(self, keys: Sequence[str]) -> None:
        for key in keys:
            self.rows.pop(key, None)

    def live_keys(self) -> set[str]:
        return set(self.rows)


def _polyval(coefficients: Sequence[float], x: float) -> float:
    result = 0.0
    for c in coefficients:
        result = result * x + c
    return result


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


class StepCaches:
    """One ``StepCache`` per transformer of a family (Wan2.2 A14B: the high- and the low-noise expert);
    ``forward(rows, inputs, expert)`` replaces the call of transformer ``expert``."""

    def __init__(self, caches: Sequence[StepCache]):
        self.caches = list(caches)
        self.backend = self.caches[0].backend

    def forward(self, rows: Sequence[CacheRow], inputs: dict[str, Any], expert: int = 0) -> torch.Tensor:
        # a row's state belongs to the transformer serving it: one moving on leaves nothing behind, and
        # starts afresh in the next one (its first step there computes)
        keys = [row.key for row in rows]
        for index, cache in enumerate(self.caches):
            if index != expert:
                cache.forget(keys)
        return self.caches[expert].forward(rows, inputs)

    def release(self, request_ids: Sequence[str]) -> None:
        for cache in self.caches:
            cache.release(request_ids)

    def live_keys(self) -> set[str]:
        """Row keys holding state in any of the caches."""
        return set().union(*(cache.live_keys() for cache in self.caches))

    @property
    def skipped(self) -> int:
        return sum(cache.skipped for cache in self.caches)

    @property
    def computed(self) -> int:
        return sum(cache.computed for cache in self.caches)


def apply_step_cache(
    transformers: Sequence[torch.nn.Module],
    adapter: StepCacheAdapter,
    config: StepCacheConfig,
    observer: AccelerationObserver,
) -> StepCaches:
    """A cache of the configured backend on each of the family's transformers, in their order."""
    if isinstance(config, TeaCacheConfig):
        return StepCaches([TeaCache(t, adapter, observer, config) for t in transformers])
    backend = next(name for name, field in _BACKEND_OF.items() if isinstance(config, field))
    return StepCaches([DiffusersStepCache(t, adapter, observer, backend, config) for t in transformers])


_BACKEND_OF: dict[str, type] = {
    "first_block_cache": FirstBlockCacheSettings,
    "mag_cache": MagCacheSettings,
    "taylorseer": TaylorSeerSettings,
}
