"""What distributed/ needs to know about FLUX.1's transformer: its heads and blocks, and its forward
cut into embed -> blocks -> head so pipeline parallel can run a contiguous slice of blocks per rank.

The pieces restate ``FluxTransformer2DModel.forward`` (diffusers 0.42) without the ControlNet and
IP-Adapter branches, which the stage API never passes.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FluxTransformer2DModel

from omni_backend.distributed.spec import Carry
from omni_backend.pipelines.base import PipelineStages


class FluxParallelSpec:
    @staticmethod
    def transformer(stages: PipelineStages) -> FluxTransformer2DModel:
        return stages.pipe.transformer  # type: ignore[attr-defined]

    @staticmethod
    def num_heads(config: dict[str, Any]) -> int:
        return config["num_attention_heads"]

    @staticmethod
    def num_blocks(config: dict[str, Any]) -> int:
        return config["num_layers"] + config["num_single_layers"]

    @staticmethod
    def blocks(transformer: FluxTransformer2DModel) -> list[torch.nn.Module]:
        """Every block in call order: the double-stream (MMDiT) blocks, then the single-stream ones."""
        return [*transformer.transformer_blocks, *transformer.single_transformer_blocks]

    @staticmethod
    def embed(transformer: FluxTransformer2DModel, inputs: dict[str, Any]) -> Carry:
        hidden = transformer.x_embedder(inputs["hidden_states"])
        timestep = inputs["timestep"].to(hidden.dtype) * 1000
        guidance = inputs["guidance"]
        pooled = inputs["pooled_projections"]
        if guidance is None:
            temb = transformer.time_text_embed(timestep, pooled)
        else:
            temb = transformer.time_text_embed(timestep, guidance.to(hidden.dtype) * 1000, pooled)
        context = transformer.context_embedder(inputs["encoder_hidden_states"])
        rotary = transformer.pos_embed(torch.cat((inputs["txt_ids"], inputs["img_ids"]), dim=0))
        return Carry(hidden=hidden, context=context, extras={"temb": temb, "image_rotary_emb": rotary})

    @staticmethod
    def run_block(block: torch.nn.Module, carry: Carry) -> None:
        carry.context, carry.hidden = block(
            hidden_states=carry.hidden, encoder_hidden_states=carry.context, **carry.extras
        )

    @staticmethod
    def head(transformer: FluxTransformer2DModel, carry: Carry) -> torch.Tensor:
        return transformer.proj_out(transformer.norm_out(carry.hidden, carry.extras["temb"]))
