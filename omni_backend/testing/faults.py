"""Test-only fault injection: device out-of-memory errors on demand, for the reliability tests.

Off unless the server process was started with ``OMNI_FAULT_INJECTION=1`` in its environment; the
variable is read once, when a model loads (``OmniModel.initialize``), so no request can switch it on.
When on, a denoising call whose batch holds a request with :data:`OOM_MARKER` in its prompt raises
``torch.OutOfMemoryError``, as a real device would: the runner then retries each request of that
batch alone, and only the marked one fails. In a worker group, the last rank's scheduler step raises
for a batch holding :data:`LAST_RANK_STEP_MARKER`: a fault on one rank alone.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from omni_backend.pipelines.base import DenoiseState, PipelineStages

ENV = "OMNI_FAULT_INJECTION"
OOM_MARKER = "[[inject-oom]]"
LAST_RANK_STEP_MARKER = "[[inject-last-rank-step-fault]]"


def enabled() -> bool:
    return os.environ.get(ENV) == "1"


class OomInjectingStages:
    """Wraps a family's stages; ``denoise`` runs out of memory for batches holding a marked request."""

    def __init__(self, stages: PipelineStages):
        self._stages = stages
        self.injected = 0  # denoising calls failed on purpose

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stages, name)

    def denoise(self, states: Sequence[DenoiseState]) -> list[torch.Tensor]:
        if any(OOM_MARKER in (state.request.prompt or "") for state in states):
            self.injected += 1
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected by {ENV} for a batch of {len(states)})")
        return self._stages.denoise(states)


class StepFaultStages:
    """Wraps a rank's stages; ``step`` raises for batches holding a request marked LAST_RANK_STEP_MARKER."""

    def __init__(self, stages: PipelineStages):
        self._stages = stages

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stages, name)

    def step(self, states: Sequence[DenoiseState], noise_preds: Sequence[torch.Tensor]) -> None:
        if any(LAST_RANK_STEP_MARKER in (state.request.prompt or "") for state in states):
            raise RuntimeError(f"scheduler step fault injected by {ENV} on the last rank")
        self._stages.step(states, noise_preds)


def maybe_inject_on_rank(stages: PipelineStages, rank: int, world: int) -> PipelineStages:
    """A worker rank's stages; the last rank's wrapped when the environment enables fault injection."""
    return StepFaultStages(stages) if enabled() and rank == world - 1 else stages  # type: ignore[return-value]


def maybe_inject(stages: PipelineStages) -> PipelineStages:
    """The stages as they are, or wrapped when the server's environment enables fault injection."""
    return OomInjectingStages(stages) if enabled() else stages  # type: ignore[return-value]
