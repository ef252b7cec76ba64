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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from omni_backend.cache.base import CacheRow, StepCache, StepCacheAdapter, select_rows
from omni_backend.cache.config import (
    FirstBlockCacheSettings,
    MagCacheSettings,
    StepCacheConfig,
    TaylorSeerSettings,
    TeaCacheConfig,
)
from omni_backend.cache.diffusers_cache import DiffusersStepCache
from omni_backend.engine.observer import AccelerationObserver


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
