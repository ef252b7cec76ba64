"""A tiny random LoRA adapter for a tiny checkpoint (FLUX, LongCat-Image, Qwen-Image, Wan2.2), in diffusers' format.

peft's ``LoraConfig(init_lora_weights=False)`` draws both LoRA matrices at random (the usual init
zeroes ``lora_B``, which would make an adapter that changes nothing), on the attention projections
and MLPs of the tiny transformer; the pipeline's ``save_lora_weights`` writes the weights file with
the adapter's config as metadata, exactly what a training script's ``save_lora_weights`` leaves.
For Wan2.2 ``--expert transformer_2`` writes the low-noise expert's file beside the high-noise one's.

CLI::

    python -m omni_backend.testing.tiny_lora --base TINY_DIR --out ADAPTER_DIR [--seed N] [--expert transformer_2]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from omni_backend.lora.names import TRANSFORMER_2_WEIGHTS_FILE, WEIGHTS_FILE

# the image-stream and text-stream attention projections of a joint-attention (MM-DiT) block
_JOINT_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
# transformer class -> (LoRA target modules, the pipeline class whose save_lora_weights writes the file);
# with FLUX's attention projections alone the tiny adapter moves pixels by ~7 levels on average, with
# its single blocks' MLP and output too by ~18
_FAMILIES = {
    "FluxTransformer2DModel": ((*_JOINT_ATTENTION, "proj_mlp", "proj_out"), "FluxPipeline"),
    # LongCat-Image's transformer has FLUX's module names and its pipeline no LoRA loader: FLUX's writes it
    "LongCatImageTransformer2DModel": ((*_JOINT_ATTENTION, "proj_mlp", "proj_out"), "FluxPipeline"),
    # the attention projections and both streams' MLPs move the tiny Qwen-Image by ~2 levels, with the head by ~10
    "QwenImageTransformer2DModel": (
        (*_JOINT_ATTENTION, "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2", "proj_out"),
        "QwenImagePipeline",
    ),
    # self- and cross-attention (attn1, attn2), the feed-forward of every block and the head
    "WanTransformer3DModel": (
        ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2", "proj_out"),
        "WanPipeline",
    ),
}
_FILES = {"transformer": WEIGHTS_FILE, "transformer_2": TRANSFORMER_2_WEIGHTS_FILE}  # expert -> file


def build_tiny_lora(
    base: str | Path, out_dir: str | Path, seed: int = 0, rank: int = 4, expert: str = "transformer"
) -> Path:
    """Write an adapter for the checkpoint ``base``'s ``expert`` to ``out_dir``; random for ``seed``."""
    import diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    _, class_name = json.loads((Path(base) / "model_index.json").read_text())[expert]
    if class_name not in _FAMILIES:
        raise ValueError(f"no tiny LoRA recipe for {class_name} (known: {', '.join(sorted(_FAMILIES))})")
    targets, saver = _FAMILIES[class_name]
    transformer = getattr(diffusers, class_name).from_pretrained(base, subfolder=expert, dtype=torch.float32)
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,  # scaling alpha / r = 2: a strong adapter, so its image differs clearly from the base
        target_modules=list(targets),
        init_lora_weights=False,
    )
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
        torch.manual_seed(seed)
        transformer.add_adapter(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    getattr(diffusers, saver).save_lora_weights(
        out,
        transformer_lora_layers=get_peft_model_state_dict(transformer),
        transformer_lora_adapter_metadata=config.to_dict(),
        weight_name=_FILES[expert],
    )
    for path in (out, *out.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)  # safetensors writes 0600: a server in a container reads it
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m omni_backend.testing.tiny_lora",
        description="Build a tiny random LoRA adapter for a tiny checkpoint (diffusers LoRA format).",
    )
    parser.add_argument("--base", required=True, type=Path, help="the tiny checkpoint the adapter is for")
    parser.add_argument("--out", required=True, type=Path, help="adapter folder (its name is the lora_name)")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    parser.add_argument(
        "--expert", choices=sorted(_FILES), default="transformer",
        help="Wan2.2: transformer_2 writes the low-noise expert's file (default: transformer)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    out = build_tiny_lora(args.base, args.out, seed=args.seed, expert=args.expert)
    print(f"built tiny LoRA adapter (seed {args.seed}, {args.expert}) in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
