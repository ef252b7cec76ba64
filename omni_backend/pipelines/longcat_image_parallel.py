"""What distributed/ needs to know about LongCat-Image's transformer, a FLUX.1 transformer with other embeddings.

``LongCatImageTransformer2DModel`` (diffusers 0.42) has FLUX's double- and single-stream blocks under
FLUX's module names, FLUX's rotary over ``cat(txt_ids, img_ids)`` and FLUX's head; what differs:

- the timestep alone makes ``temb`` (``time_embed``: no pooled projection, no guidance embedding);
- the class declares no ``_cp_plan`` / ``_tp_plan``: its forward takes FLUX's sequence inputs under
  FLUX's names and its Linears have FLUX's names, so FLUX's plans are LongCat's (``prepare``);
- its attention processor splits the projections by ``attn.heads`` (FLUX's by ``head_dim``), so under
  tensor parallel each attention module is told the heads of its own shard;
- its forward takes no attention kwargs, so padded keys cannot be masked: with sequence parallel the
  text (512 tokens) and image tokens must be multiples of the degree (at 16 pixels a token side, e.g.
  any size multiple of 32 for a degree of 2 or 4; else the request fails naming the degree).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FluxTransformer2DModel, LongCatImageTransformer2DModel
from diffusers.models.transformers.transformer_longcat_image import (
    LongCatImageAttention,
    LongCatImageSingleTransformerBlock,
)

from omni_backend.config import ParallelConfig
from omni_backend.distributed.spec import Carry
from omni_backend.pipelines.flux_parallel import FluxParallelSpec


class LongCatImageParallelSpec(FluxParallelSpec):
    """FLUX's blocks, head, heads and block counts; LongCat's embeddings, plans and padding rule."""

    @staticmethod
    def prepare(transformer: LongCatImageTransformer2DModel, parallel: ParallelConfig) -> None:
        transformer._cp_plan = FluxTransformer2DModel._cp_plan
        transformer._tp_plan = FluxTransformer2DModel._tp_plan
        for module in transformer.modules():
            if isinstance(module, LongCatImageSingleTransformerBlock):
                # proj_out reads cat([attention, MLP]): two column-sharded streams (FLUX sets this in __init__)
                module.proj_out._tp_packed_row_blocks = [module.proj_out.out_features, module.mlp_hidden_dim]
            elif isinstance(module, LongCatImageAttention):
                module.heads //= parallel.tensor_parallel_size  # the processor unflattens by heads

    @staticmethod
    def embed(transformer: LongCatImageTransformer2DModel, inputs: dict[str, Any]) -> Carry:
        # the first lines of LongCatImageTransformer2DModel.forward
        hidden = transformer.x_embedder(inputs["hidden_states"])
        temb = transformer.time_embed(inputs["timestep"].to(hidden.dtype) * 1000, hidden.dtype)
        context = transformer.context_embedder(inputs["encoder_hidden_states"])
        rotary = transformer.pos_embed(torch.cat((inputs["txt_ids"], inputs["img_ids"]), dim=0))
        return Carry(hidden=hidden, context=context, extras={"temb": temb, "image_rotary_emb": rotary})

    @staticmethod
    def pad_sequences(inputs: dict[str, Any], ulysses: int, ring: int, ulysses_rank: int) -> tuple[dict[str, Any], int]:
        """Unchanged inputs when the degree divides both sequences; else a ValueError naming the degree."""
        degree = ulysses * ring
        text, image = inputs["encoder_hidden_states"].shape[1], inputs["hidden_states"].shape[1]
        if text % degree or image % degree:
            name = "ring_degree" if ring > 1 else "ulysses_degree"
            raise ValueError(
                f"{name} {ring if ring > 1 else ulysses}: {text} text and {image} image tokens must be multiples of "
                f"ulysses_degree x ring_degree = {degree} (LongCat-Image's transformer cannot mask padding)"
            )
        return inputs, image
