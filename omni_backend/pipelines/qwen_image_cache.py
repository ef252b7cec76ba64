"""What the step caches need to know about ``QwenImageTransformer2DModel`` (see ``StepCacheAdapter``).

Serves Qwen-Image and Qwen-Image-Edit: the edit's transformer call is the same model over a longer
image sequence (the noisy latents, then the input image's), and the cache sees that whole call,
so embedder, first block, residual and head all cover both parts, as the model itself does.

No TeaCache polynomial or MagCache ratios are published for Qwen-Image (TeaCache's authors fit
FLUX.1, HunyuanVideo, Wan2.1, ...; diffusers 0.42 ships MagCache ratios for FLUX.1 only): FLUX.1's,
also a flow-matching MMDiT with a first-block modulation of the same kind, are the defaults, as
for LongCat-Image; ``cache_config`` overrides them (``mag_ratios``) or the threshold absorbs the
difference (``rel_l1_thresh``).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import QwenImageTransformer2DModel

from omni_backend.pipelines.flux import FluxCacheAdapter


class QwenImageCacheAdapter:
    """The pieces of ``QwenImageTransformer2DModel.forward`` the caches run apart."""

    # per-row inputs of the call ``QwenImageStages.transformer_inputs`` builds: ``img_shapes`` is a list
    # (one entry per row), the text mask and the guidance are None when no row needs them
    row_inputs = (
        "hidden_states",
        "timestep",
        "guidance",
        "encoder_hidden_states",
        "encoder_hidden_states_mask",
        "img_shapes",
    )
    tea_cache_coefficients = FluxCacheAdapter.tea_cache_coefficients  # none published for Qwen-Image
    mag_ratios = FluxCacheAdapter.mag_ratios  # none published for Qwen-Image
    taylorseer_identifiers = None  # diffusers' defaults find its attention modules

    def __init__(self, transformer: QwenImageTransformer2DModel):
        # zero_cond_t (Qwen-Image-Edit-2511) doubles the timestep rows and modulates the input image's
        # tokens apart: embed / head below would have to split them as forward does
        if transformer.config.zero_cond_t:
            raise NotImplementedError("step caches do not support a transformer with zero_cond_t")

    def embed(self, transformer: torch.nn.Module, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        # the first lines of QwenImageTransformer2DModel.forward; its timestep arrives already / 1000
        # (time_proj scales it back). No guidance: diffusers 0.42's time_text_embed takes none (a
        # guidance_embeds checkpoint fails in forward itself)
        hidden = transformer.img_in(inputs["hidden_states"])
        return hidden, transformer.time_text_embed(inputs["timestep"].to(hidden.dtype), hidden)

    def modulated_input(self, transformer: torch.nn.Module, hidden: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        # QwenImageTransformerBlock.forward's image stream up to attention: img_mod's first (shift, scale,
        # gate) third, then img_norm1 and _modulate
        block = transformer.transformer_blocks[0]
        img_mod1 = block.img_mod(temb).chunk(2, dim=-1)[0]
        return block._modulate(block.img_norm1(hidden), img_mod1)[0]

    def head(self, transformer: torch.nn.Module, hidden: torch.Tensor, temb: torch.Tensor, inputs: dict):
        return transformer.proj_out(transformer.norm_out(hidden, temb))

    def blocks_exit(self, transformer: torch.nn.Module) -> torch.nn.Module:
        return transformer.norm_out

    def probe(self, transformer: torch.nn.Module) -> torch.nn.Module:
        return transformer.transformer_blocks[-1].attn.to_q
