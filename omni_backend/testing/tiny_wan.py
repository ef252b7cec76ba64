"""Tiny random-weight Wan2.2 A14B checkpoints (``WanPipeline`` / ``WanImageToVideoPipeline`` layout).

The architecture is Wan2.2 A14B's: a UMT5 text encoder, the 3D causal ``AutoencoderKLWan``
(16 latent channels, 4x temporal and 8x spatial downsampling) and TWO ``WanTransformer3DModel``
experts, ``transformer`` for the high-noise steps and ``transformer_2`` below
``boundary_ratio``, with the UniPC flow-matching scheduler, only narrow. The I2V A14B checkpoint
has no CLIP image encoder: its experts take the noisy latents concatenated with the image condition
(4 mask channels + the VAE-encoded first frame), 16 + 4 + 16 = 36 input channels.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Wan-AI/Wan2.2-T2V-A14B-Diffusers' scheduler/scheduler_config.json (UniPC on flow sigmas, shift 3).
WAN_SCHEDULER_CONFIG: dict[str, object] = {
    "num_train_timesteps": 1000,
    "prediction_type": "flow_prediction",
    "use_flow_sigmas": True,
    "flow_shift": 3.0,
    "solver_order": 2,
    "solver_type": "bh2",
    "predict_x0": True,
    "lower_order_final": True,
    "final_sigmas_type": "zero",
    "timestep_spacing": "linspace",
}
T2V_BOUNDARY_RATIO = 0.875  # Wan2.2-T2V-A14B: expert switch at t = 875
I2V_BOUNDARY_RATIO = 0.9  # Wan2.2-I2V-A14B: expert switch at t = 900
TEXT_DIM = 32  # UMT5 d_model = the transformers' text_dim
LATENT_CHANNELS = 16  # the VAE's z_dim
TEMPORAL_FACTOR = 4  # the VAE's temporal compression: the image-to-video mask has this many channels


def _transformer(seed: int, in_channels: int):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=in_channels,
        out_channels=LATENT_CHANNELS,
        text_dim=TEXT_DIM,
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )


def wan_components(seed: int, in_channels: int = LATENT_CHANNELS) -> dict:
    """The modules both Wan2.2 A14B pipelines share, the two experts with different weights.

    ``in_channels``: the experts' input channels (image-to-video also takes the image condition).
    """
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler
    from transformers import UMT5Config, UMT5EncoderModel

    from omni_backend.testing.tokenizers import build_t5_tokenizer

    tokenizer = build_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
        torch.manual_seed(seed)
        text_encoder = UMT5EncoderModel(
            UMT5Config(
                vocab_size=len(tokenizer),
                d_model=TEXT_DIM,
                d_kv=16,
                d_ff=64,
                num_layers=2,
                num_heads=2,
                feed_forward_proj="gated-gelu",
                tie_word_embeddings=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                decoder_start_token_id=tokenizer.pad_token_id,
            )
        ).eval()
        torch.manual_seed(seed)
        vae = AutoencoderKLWan(
            base_dim=8,
            z_dim=LATENT_CHANNELS,
            dim_mult=[1, 2, 2, 2],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],  # 4x in time, 8x in space
        )
        transformer = _transformer(seed, in_channels)
        transformer_2 = _transformer(seed + 1, in_channels)
    return {
        "tokenizer": tokenizer,
        "text_encoder": text_encoder,
        "vae": vae,
        "scheduler": UniPCMultistepScheduler(**WAN_SCHEDULER_CONFIG),
        "transformer": transformer,
        "transformer_2": transformer_2,
    }


def build_tiny_wan22_t2v(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random Wan2.2-T2V-A14B checkpoint that ``WanPipeline.from_pretrained`` loads."""
    from diffusers import WanPipeline

    from omni_backend.testing.tiny import save_pipeline

    pipe = WanPipeline(**wan_components(seed), boundary_ratio=T2V_BOUNDARY_RATIO)
    return save_pipeline(pipe, out_dir)


def build_tiny_wan22_i2v(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random Wan2.2-I2V-A14B checkpoint that ``WanImageToVideoPipeline.from_pretrained`` loads."""
    from diffusers import WanImageToVideoPipeline

    from omni_backend.testing.tiny import save_pipeline

    in_channels = 2 * LATENT_CHANNELS + TEMPORAL_FACTOR
    pipe = WanImageToVideoPipeline(**wan_components(seed, in_channels), boundary_ratio=I2V_BOUNDARY_RATIO)
    return save_pipeline(pipe, out_dir)
