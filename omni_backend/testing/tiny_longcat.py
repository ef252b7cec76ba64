"""Tiny random-weight LongCat-Image checkpoints (``LongCatImagePipeline`` layout).

The architecture is LongCat-Image's: a Qwen2.5-VL text encoder (the one of ``tiny_qwen``), FLUX's
16-channel ``AutoencoderKL`` (8x downsampling, its scaling / shift factors) and the FLUX-like
``LongCatImageTransformer2DModel`` on 2x2-packed latents (3-axis RoPE, no pooled or guidance
embedding), only narrow; plus ``text_processor/`` as meituan-longcat/LongCat-Image ships it (used
only by the pipeline's prompt rewriter, which the family keeps off).
"""

from __future__ import annotations

from pathlib import Path

import torch


def build_tiny_longcat_image(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random LongCat-Image checkpoint that ``LongCatImagePipeline.from_pretrained`` loads."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        LongCatImagePipeline,
        LongCatImageTransformer2DModel,
    )

    from omni_backend.testing.tiny import FLUX_SCHEDULER_CONFIG, save_pipeline, tiny_flux_vae
    from omni_backend.testing.tiny_qwen import TEXT_HIDDEN, qwen2_5_vl_text_encoder, save_vl_processor
    from omni_backend.testing.tokenizers import build_qwen2_tokenizer

    tokenizer = build_qwen2_tokenizer()
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
        text_encoder = qwen2_5_vl_text_encoder(tokenizer, seed)
        torch.manual_seed(seed)
        vae = tiny_flux_vae()  # LongCat-Image's VAE is FLUX.1's
        torch.manual_seed(seed)
        transformer = LongCatImageTransformer2DModel(
            patch_size=1,
            in_channels=64,  # 16 latent channels packed 2x2 (the pipeline draws 16-channel noise)
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=TEXT_HIDDEN,  # = Qwen2.5-VL hidden size
            pooled_projection_dim=TEXT_HIDDEN,
            axes_dims_rope=[4, 6, 6],  # sums to attention_head_dim
        )
    pipe = LongCatImagePipeline(
        # LongCat-Image's scheduler config is FLUX.1's (dynamic shift, the pipeline's calculate_shift defaults)
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_processor=None,
        transformer=transformer,
    )
    out = save_pipeline(pipe, out_dir)
    save_vl_processor(out, "text_processor", tokenizer)
    return out
