"""What the step caches need to know about ``WanTransformer3DModel`` (see ``StepCacheAdapter``).

Serves both Wan2.2 A14B families and both of their experts (one adapter, one cache per expert: the
runner builds a ``StepCaches``). Image-to-video's call is the same model over more input channels
(the latents concatenated with the image condition), so nothing here tells the two apart but the
TeaCache polynomial.

TeaCache polynomials: the ones TeaCache's authors fitted for Wan2.1 14B (ali-vilab/TeaCache,
TeaCache4Wan2.1, the variant without ``use_ret_steps``): text-to-video 14B and image-to-video
480p. They were fitted on the timestep embedding's change, ours measures the first block's
modulated input (timestep embedding through the block's shift/scale table on the normalised
tokens), as for the other families: ``rel_l1_thresh`` absorbs the difference. No MagCache ratios
are published in diffusers 0.42 for Wan: FLUX.1's are the default, ``cache_config`` overrides them.
diffusers registers ``WanTransformerBlock`` for FirstBlockCache / MagCache; TaylorSeer gets Wan's
module names (its defaults miss them).
"""

from __future__ import annotations

from typing import Any

import torch

from omni_backend.pipelines.flux import FluxCacheAdapter

# TeaCache4Wan2.1's rescale polynomials (highest power first)
WAN_T2V_TEA_CACHE = (-5784.54975374, 5449.50911966, -1811.16591783, 256.27178429, -13.02252404)
WAN_I2V_TEA_CACHE = (-3.02331670e02, 2.23948934e02, -5.25463970e01, 5.87348440e00, -2.01973289e-01)


class WanCacheAdapter:
    """The pieces of ``WanTransformer3DModel.forward`` the caches run apart."""

    # the call ``WanT2VStages.transformer_inputs`` builds (no CLIP image input: Wan2.2 A14B has none)
    row_inputs = ("hidden_states", "timestep", "encoder_hidden_states")
    mag_ratios = FluxCacheAdapter.mag_ratios  # none published for Wan in diffusers 0.42
    # diffusers' default patterns (full match of "^blocks.*attn") miss Wan's attn1 / attn2: name them, and
    # the feed-forward, the block's three costly parts
    taylorseer_identifiers = (r"^blocks\.\d+\.(attn1|attn2|ffn)$",)

    def __init__(self, tea_cache_coefficients: tuple[float, ...]):
        self.tea_cache_coefficients = tea_cache_coefficients

    def embed(self, transformer: torch.nn.Module, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        # the first lines of WanTransformer3DModel.forward (per-request timesteps: one per row, never TI2V's
        # per-token ones); the text embedder is left out, the timestep embedding needs only the dtype
        hidden = transformer.patch_embedding(inputs["hidden_states"]).flatten(2).transpose(1, 2).contiguous()
        embedder = transformer.condition_embedder
        timestep = embedder.timesteps_proj(inputs["timestep"])
        time_dtype = next(iter(embedder.time_embedder.parameters())).dtype
        if timestep.dtype != time_dtype:
            timestep = timestep.to(time_dtype)
        return hidden, embedder.time_embedder(timestep).type_as(inputs["encoder_hidden_states"])

    def modulated_input(self, transformer: torch.nn.Module, hidden: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        # WanTransformerBlock.forward up to self-attention: the projected timestep through the block's
        # scale/shift table, on norm1 of the tokens
        embedder = transformer.condition_embedder
        projected = embedder.time_proj(embedder.act_fn(temb)).unflatten(1, (6, -1))
        block = transformer.blocks[0]
        shift, scale = (block.scale_shift_table + projected.float()).chunk(6, dim=1)[:2]
        return (block.norm1(hidden.float()) * (1 + scale) + shift).type_as(hidden)

    def head(
        self, transformer: torch.nn.Module, hidden: torch.Tensor, temb: torch.Tensor, inputs: dict[str, Any]
    ) -> torch.Tensor:
        # WanTransformer3DModel.forward's section 5: output norm, projection, unpatchify to the input's shape
        shift, scale = (transformer.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        # type of the weights: the cached residual was captured in float32 (norm_out's input)
        out = transformer.norm_out(hidden.float()) * (1 + scale) + shift
        out = transformer.proj_out(out.to(transformer.proj_out.weight.dtype))
        batch, _, frames, height, width = inputs["hidden_states"].shape
        p_t, p_h, p_w = transformer.config.patch_size
        out = out.reshape(batch, frames // p_t, height // p_h, width // p_w, p_t, p_h, p_w, -1)
        return out.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)

    def blocks_exit(self, transformer: torch.nn.Module) -> torch.nn.Module:
        return transformer.norm_out

    def probe(self, transformer: torch.nn.Module) -> torch.nn.Module:
        return transformer.blocks[-1].attn1.to_q
