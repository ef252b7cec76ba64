"""What distributed/ needs to know about LongCat-Image's transformer, a FLUX.1 transformer with other embeddings.

``LongCatImageTransformer2DModel`` (diffusers 0.42) has FLUX's double- and single-stream blocks under
FLUX's module names, FLUX's rotary over ``cat(txt_ids, img_ids)`` and FLUX's head; what differs:

- the timestep alone makes ``temb`` (``time_embed``: no pooled projection, no guidance embedding);
- the class declares no ``_cp_plan`` / ``_tp_plan``: its forward takes FLUX's sequence inputs under
  FLUX's names and its Linears have FLUX's names, so FLUX's plans are LongCat's (``prepare_model_parallel``);
- its attention processor splits the projections by ``attn.heads`` (FLUX's by ``head_dim``), so under
  tensor parallel each attention module is told the heads of its own shard;
- its forward takes no attention kwargs, which FLUX's padding for sequence parallel passes (the
  padded keys' mask, ``FluxParallelSpec.pad_sequences``), though its blocks hand them to attention:
  ``prepare_model_parallel`` routes them from the forward call to the attention modules with two forward pre-hooks.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FluxTransformer2DModel, LongCatImageTransformer2DModel
from diffusers.models.transformers.transformer_longcat_image import (
    LongCatImageAttention,
    LongCatImageSingleTransformerBlock,
)

from omni_backend.distributed.groups import ParallelGroups
from omni_backend.distributed.spec import Carry
from omni_backend.pipelines.flux_parallel import FluxParallelSpec


class LongCatImageParallelSpec(FluxParallelSpec):
    """FLUX's blocks, head, heads, block counts and sequence padding; LongCat's embeddings."""

    @staticmethod
    def prepare_model_parallel(transformer: LongCatImageTransformer2DModel, groups: ParallelGroups) -> None:
        parallel = groups.parallel
        transformer._cp_plan = FluxTransformer2DModel._cp_plan
        transformer._tp_plan = FluxTransformer2DModel._tp_plan
        if parallel.ulysses_degree * parallel.ring_degree > 1:
            _route_attention_kwargs(transformer)
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


def _route_attention_kwargs(transformer: LongCatImageTransformer2DModel) -> None:
    """Let the forward call take ``joint_attention_kwargs`` and give them to every attention module.

    The first hook runs before diffusers' context-parallel hooks split the inputs (they wrap
    ``forward``), takes the kwargs out of the call and holds them until the next call.
    """
    held: dict[str, Any] = {}

    def take(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        held.clear()
        held.update(kwargs.pop("joint_attention_kwargs", None) or {})
        return args, kwargs

    def give(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        return (args, {**kwargs, **held}) if held else None

    transformer.register_forward_pre_hook(take, with_kwargs=True)
    for module in transformer.modules():
        if isinstance(module, LongCatImageAttention):
            module.register_forward_pre_hook(give, with_kwargs=True)
