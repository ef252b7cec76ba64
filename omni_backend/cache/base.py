"""What every step cache shares: the row a decision is made for, what a family tells the caches
about its transformer (``StepCacheAdapter``), and the cache interface (``StepCache``).

The caches themselves: ``step_cache.py`` (ours, TeaCache; one cache per transformer) and
``diffusers_cache.py`` (diffusers' hooks)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch

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
