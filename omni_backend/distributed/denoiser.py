"""One ``denoise(states)`` call of a family spread over a parallel group.

Every rank holds the same request states (prepared from the same conditioning and seed) and, except
under pipeline parallel, runs the same scheduler steps, so only the transformer call is distributed:

- CFG-parallel: the call's rows (each request's conditional branch, then the negative branches of
  the true-CFG ones) are cut into ``cfg`` equal slices, padded by repeating the last row; each
  ``cfg`` rank runs its slice and an all-gather puts the rows back together before the family
  combines them. One request with true CFG: its two branches run on two ranks.
- Ulysses / Ring / tensor parallel live inside the transformer (diffusers hooks, model_parallel.py).
- Families with several experts (Wan2.2's high- and low-noise transformers): every rank holds all of
  them, each parallelized the same way; a call groups the states by the expert of their step.
- Pipeline parallel runs the slice's rows as micro-batches through the ``pp`` stages (pipeline.py);
  only the last stage gets the predictions, and it alone runs the scheduler step (async_latents.py).
  Without CFG-parallel the micro-batches go request by request, each built only when it runs, and
  the last stage steps a request as soon as its rows are through, so the first stage starts the
  request's next step while the last one finishes the current step of the others.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

from omni_backend.distributed.async_latents import PipelineStepper
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
        self.stages = stages
        self.rows: RowStages = stages  # type: ignore[assignment]
        self.spec = spec
        self.groups = groups
        self.experts = spec.transformers(stages)
        for transformer in self.experts:
            spec.prepare_model_parallel(transformer, groups)
            apply_model_parallel(transformer, groups)
        # every expert's blocks split the same way: a rank holds the same slice of each
        self.pipelines = [PipelineStage(t, spec, groups) for t in self.experts] if groups.size("pp") > 1 else None
        self.stepper = PipelineStepper(stages, groups) if self.pipelines is not None else None

    def install(self) -> None:
        """Make this rank's stages run distributed: ``denoise`` (and, with pipeline parallel, the step)."""
        self.stages.denoise = self.denoise  # type: ignore[method-assign]
        if self.stepper is not None:
            self.stepper.install()

    @torch.inference_mode()
    def denoise(self, states: Sequence[DenoiseState]) -> list[torch.Tensor | None]:
        """One transformer call per expert in use (every rank holds the same states, so picks the same).

        Under pipeline parallel the predictions are on the last stage only (None on the others)."""
        states = list(states)
        experts = [self.spec.expert(self.stages, s) for s in states]
        if self.stepper is not None:
            early = self.groups.size("cfg") == 1
            order = sorted(range(len(states)), key=experts.__getitem__)  # the experts' calls run in turn
            self.stepper.plan_sends([states[i] for i in order], early)
            if not early:
                self.stepper.resolve(states)  # the first stage reads their latents now
        preds: list[torch.Tensor | None] = [None] * len(states)
        for expert in sorted(set(experts)):
            group = [i for i, e in enumerate(experts) if e == expert]
            for i, pred in zip(group, self._expert_denoise(expert, [states[i] for i in group]), strict=True):
                preds[i] = pred
        return preds

    def _expert_denoise(self, expert: int, states: list[DenoiseState]) -> list[torch.Tensor | None]:
        cfg_ranks = self.groups.size("cfg")
        if self.pipelines is not None and cfg_ranks == 1:
            return self._pipeline_denoise(self.pipelines[expert], states)
        rows = self.rows.denoise_rows(states)
        mine = cfg_slice(rows, cfg_ranks, self.groups.local_rank("cfg"))
        if self.pipelines is not None:
            noise = self.pipelines[expert].forward([partial(self.rows.transformer_inputs, [row]) for row in mine])
            if noise is None:  # not the last stage; the cfg all-gather below runs among the last stages
                return [None] * len(states)
        else:
            noise = self._transformer(self.experts[expert], self.rows.transformer_inputs(mine))
        if cfg_ranks > 1:
            parts = [torch.empty_like(noise) for _ in range(cfg_ranks)]
            dist.all_gather(parts, noise.contiguous(), group=self.groups.group("cfg"))
            noise = torch.cat(parts)[: len(rows)]
        return self.rows.combine_rows(states, noise)  # type: ignore[return-value]

    def _pipeline_denoise(self, pipeline: PipelineStage, states: list[DenoiseState]) -> list[torch.Tensor | None]:
        """Micro-batches request by request; the last stage steps each request once its rows are through."""
        assert self.stepper is not None
        stepper = self.stepper
        rows = [self.rows.denoise_rows([state]) for state in states]  # rows reference states, read nothing yet
        owners = [k for k, its in enumerate(rows) for _ in its]
        outputs: list[list[torch.Tensor]] = [[] for _ in states]
        preds: list[torch.Tensor | None] = [None] * len(states)

        def inputs(state: DenoiseState, row: Any) -> dict[str, Any]:
            stepper.resolve([state])  # first stage: waits for this request's latents only now
            return self.rows.transformer_inputs([row])

        def on_output(i: int, noise: torch.Tensor) -> None:
            k = owners[i]
            outputs[k].append(noise)
            if len(outputs[k]) == len(rows[k]):
                preds[k] = self.rows.combine_rows([states[k]], torch.cat(outputs[k]))[0]
                stepper.step_early(states[k], preds[k])

        micro_batches = [partial(inputs, state, row) for state, its in zip(states, rows, strict=True) for row in its]
        pipeline.forward(micro_batches, on_output)
        return preds

    def _transformer(self, transformer: torch.nn.Module, inputs: dict) -> torch.Tensor:
        ulysses, ring = self.groups.size("ulysses"), self.groups.size("ring")
        if ulysses * ring == 1:
            return transformer(**inputs, return_dict=False)[0]
        rank = self.groups.local_rank("ulysses")
        return self.spec.sequence_parallel_forward(transformer, inputs, ulysses, ring, rank)
