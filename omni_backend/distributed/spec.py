"""The per-family facts distributed/ needs, looked up by family name (like registry.py)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from omni_backend.distributed.groups import ParallelGroups
from omni_backend.pipelines.base import DenoiseState, PipelineStages

# family -> "module:Class"; the spec lives beside the family's pipeline file
_SPECS: dict[str, str] = {
    "flux": "omni_backend.pipelines.flux_parallel:FluxParallelSpec",
    "longcat_image": "omni_backend.pipelines.longcat_image_parallel:LongCatImageParallelSpec",
    "qwen_image": "omni_backend.pipelines.qwen_image_parallel:QwenImageParallelSpec",
    "qwen_image_edit": "omni_backend.pipelines.qwen_image_parallel:QwenImageParallelSpec",
    "wan22_t2v": "omni_backend.pipelines.wan_parallel:WanParallelSpec",
    "wan22_i2v": "omni_backend.pipelines.wan_parallel:WanParallelSpec",
}


@dataclass
class Carry:
    """Activations between transformer blocks: what pipeline parallel sends to the next stage."""

    hidden: torch.Tensor  # image / video stream [rows, S_img, inner]
    context: torch.Tensor | None  # text stream [rows, S_txt, inner]; None where blocks never change it
    extras: dict[str, Any] = field(default_factory=dict)  # recomputed on every rank (temb, rotary), never sent


class RowStages(Protocol):
    """The stage methods that lay one transformer call out as rows (see pipelines/flux.py); the states
    passed are those of one expert (``ParallelSpec.expert``)."""

    def denoise_rows(self, states: list[DenoiseState]) -> list[Any]: ...

    def transformer_inputs(self, rows: list[Any]) -> dict[str, Any]: ...

    def combine_rows(self, states: list[DenoiseState], noise: torch.Tensor) -> list[torch.Tensor]: ...


class ParallelSpec(Protocol):
    @staticmethod
    def transformers(stages: PipelineStages) -> list[torch.nn.Module]:
        """The experts every rank holds (one for most families); one transformer call uses one of them."""

    @staticmethod
    def expert(stages: PipelineStages, state: DenoiseState) -> int:
        """Index into ``transformers`` of the expert that runs ``state``'s current step."""

    @staticmethod
    def num_heads(config: dict[str, Any]) -> int: ...

    @staticmethod
    def num_blocks(config: dict[str, Any]) -> int: ...

    @staticmethod
    def blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]: ...

    @staticmethod
    def embed(transformer: torch.nn.Module, inputs: dict[str, Any]) -> Carry: ...

    @staticmethod
    def run_block(block: torch.nn.Module, carry: Carry) -> None: ...

    @staticmethod
    def head(transformer: torch.nn.Module, carry: Carry) -> torch.Tensor: ...

    @staticmethod
    def prepare_model_parallel(transformer: torch.nn.Module, groups: ParallelGroups) -> None:
        """Family changes needed before diffusers shards the model (e.g. a ``_tp_plan`` it lacks)."""

    @staticmethod
    def sequence_parallel_forward(
        transformer: torch.nn.Module, inputs: dict[str, Any], ulysses: int, ring: int, ulysses_rank: int
    ) -> torch.Tensor:
        """The transformer's output under Ulysses / Ring, padding sequences the degree does not divide."""


def resolve_spec(family: str) -> ParallelSpec:
    try:
        target = _SPECS[family]
    except KeyError:
        raise ValueError(f"family {family!r} has no parallel spec (known: {', '.join(sorted(_SPECS))})") from None
    module_name, class_name = target.split(":")
    return getattr(importlib.import_module(module_name), class_name)
