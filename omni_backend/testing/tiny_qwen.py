"""Tiny random-weight Qwen-Image checkpoints (``QwenImagePipeline`` / ``QwenImageEditPipeline`` layout).

The architecture is Qwen-Image's: a Qwen2.5-VL text encoder (text + vision towers), the 3D causal
``AutoencoderKLQwenImage`` (16 latent channels, 8x spatial downsampling, Qwen-Image's latent
mean/std) and the MMDiT ``QwenImageTransformer2DModel`` on 2x2-packed latents, only narrow.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Qwen/Qwen-Image's scheduler/scheduler_config.json (exponential time shift by image sequence length).
QWEN_IMAGE_SCHEDULER_CONFIG: dict[str, object] = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 0.9,
    "base_image_seq_len": 256,
    "max_image_seq_len": 8192,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
}
TEXT_HIDDEN = 32  # Qwen2.5-VL hidden size = the transformer's joint_attention_dim


def qwen2_5_vl_text_encoder(tokenizer, seed: int):
    """A narrow Qwen2.5-VL (text + vision towers) with hidden size ``TEXT_HIDDEN``, seeded."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": TEXT_HIDDEN,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,  # grouped-query attention, like the 7B model
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1000000.0},
            "bos_token_id": ids("<|endoftext|>"),
            "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": ids("<|endoftext|>"),
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": TEXT_HIDDEN,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [1],
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def qwen_image_components(seed: int) -> dict:
    """The modules every Qwen-Image pipeline shares (text encoder, tokenizer, VAE, transformer, scheduler)."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    from omni_backend.testing.tokenizers import build_qwen2_tokenizer

    tokenizer = build_qwen2_tokenizer()
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
        text_encoder = qwen2_5_vl_text_encoder(tokenizer, seed)
        torch.manual_seed(seed)
        vae = AutoencoderKLQwenImage(
            base_dim=8,
            z_dim=16,
            dim_mult=[1, 2, 2, 2],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],  # 3 levels -> vae_scale_factor 8
        )
        torch.manual_seed(seed)
        transformer = QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=64,  # 16 latent channels packed 2x2
            out_channels=16,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=TEXT_HIDDEN,
            axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
        )
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER_CONFIG),
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "transformer": transformer,
    }


def build_tiny_qwen_image(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random Qwen-Image checkpoint that ``QwenImagePipeline.from_pretrained`` loads."""
    from diffusers import QwenImagePipeline

    from omni_backend.testing.tiny import save_pipeline

    return save_pipeline(QwenImagePipeline(**qwen_image_components(seed)), out_dir)


# The VL image processor's pixel budget: real Qwen2.5-VL takes up to 1280 28x28 patches; a few keep it fast.
TINY_VISION_MIN_PIXELS = 28 * 28 * 4
TINY_VISION_MAX_PIXELS = 28 * 28 * 16


def build_tiny_qwen_image_edit(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random Qwen-Image-Edit checkpoint (``QwenImageEditPipeline`` layout).

    The same modules as Qwen-Image plus ``processor/`` (Qwen2.5-VL's image processor and the
    tokenizer, as Qwen/Qwen-Image-Edit ships them). The processor is saved by its parts:
    transformers cannot build a ``Qwen2VLProcessor`` without torchvision (its video processor);
    ``omni_backend.pipelines.qwen_image_edit.load_processor`` loads it back.
    """
    from diffusers import QwenImageEditPipeline

    from omni_backend.testing.tiny import save_pipeline

    components = qwen_image_components(seed)
    out = save_pipeline(QwenImageEditPipeline(**components, processor=None), out_dir)
    save_vl_processor(out, "processor", components["tokenizer"])  # as in Qwen/Qwen-Image-Edit
    return out


def save_vl_processor(out: Path, name: str, tokenizer) -> None:
    """Save a Qwen2.5-VL processor as ``out/name`` by its parts and name it in ``model_index.json``.

    transformers cannot build a ``Qwen2VLProcessor`` without torchvision (its video processor), so the
    image processor and the tokenizer are saved one by one, in the layout the processor's own
    ``save_pretrained`` writes.
    """
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    processor_dir = out / name
    Qwen2VLImageProcessorPil(min_pixels=TINY_VISION_MIN_PIXELS, max_pixels=TINY_VISION_MAX_PIXELS).save_pretrained(
        processor_dir
    )
    tokenizer.save_pretrained(processor_dir)
    index_path = out / "model_index.json"
    index = json.loads(index_path.read_text())
    index[name] = ["transformers", "Qwen2VLProcessor"]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
