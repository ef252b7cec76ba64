"""One ``denoise(states)`` call of a family spread over a parallel group.

Every rank holds the same request states (prepared from the same conditioning and seed) and runs
the same scheduler steps, so only the transformer call is distributed:

- CFG-parallel: the call's rows (each request's conditional branch, then the negative branches of
  the true-CFG ones) are cut into ``cfg`` equal slices, padded by repeating the last row; each
  ``cfg`` rank runs its slice and an all-gather puts the rows back together before the family
  combines them. One request with true CFG: its two branches run on two ranks.
- Ulysses / Ring / tensor parallel live inside the transformer (diffusers hooks, model_parallel.py).
- Pipeline parallel runs the slice's rows as micro-batches through the ``pp`` stages (pipeline.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from omni_backend.distributed.groups import ParallelGroups
from omni_backend.distributed.model_parallel import apply_model_parallel
from omni_backend.distributed.pipeline import PipelineStage
from omni_backend.distributed.spec import ParallelSpec, RowStages
from omni_backend.pipelines.base import DenoiseState, PipelineStages


def cfg_slice(rows: Sequence[Any], ranks: int, rank: int) -> list[Any]:
    """This rank's equal share of ``rows``; the last row repeats so that every share has the same size."""
    per_rank = math.ceil(len(rows) / ranks)
    padded = list(rows) + [rows[-1]] * (per_rank * ranks - len(rows))
    return padded[rank * per_rank : (rank + 1) * per_rank]


class ParallelDenoiser:
    """Drop-in for ``stages.denoise`` on a rank of a parallel group."""

    def __init__(self, stages: PipelineStages, spec: ParallelSpec, groups: ParallelGroups):
        self.stages: RowStages = stages  # type: ignore[assignment]
        self.spec = spec
        self.groups = groups
        self.transformer = spec.transformer(stages)
        spec.prepare(self.transformer, groups.parallel)
        apply_model_parallel(self.transformer, groups)
        self.pipeline = PipelineStage(self.transformer, spec, groups) if groups.size("pp") > 1 else None

    @torch.inference_mode()
    def denoise(self, states: Sequence[DenoiseState]) -> list[torch.Tensor]:
        states = list(states)
        rows = self.stages.denoise_rows(states)
        cfg_ranks = self.groups.size("cfg")
        mine = cfg_slice(rows, cfg_ranks, self.groups.local_rank("cfg"))
        if self.pipeline is not None:
            noise = self.pipeline.forward([self.stages.transformer_inputs([row]) for row in mine])
        else:
            noise = self._transformer(self.stages.transformer_inputs(mine))
        if cfg_ranks > 1:
            parts = [torch.empty_like(noise) for _ in range(cfg_ranks)]
            dist.all_gather(parts, noise.contiguous(), group=self.groups.group("cfg"))
            noise = torch.cat(parts)[: len(rows)]
        return self.stages.combine_rows(states, noise)

    def _transformer(self, inputs: dict) -> torch.Tensor:
        ulysses, ring = self.groups.size("ulysses"), self.groups.size("ring")
        if ulysses * ring == 1:
            return self.transformer(**inputs, return_dict=False)[0]
        inputs, length = self.spec.pad_sequences(inputs, ulysses, ring, self.groups.local_rank("ulysses"))
        return self.transformer(**inputs, return_dict=False)[0][:, :length]

