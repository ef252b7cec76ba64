"""A tiny random LoRA adapter for the tiny FLUX checkpoint, in diffusers' LoRA format.

peft's ``LoraConfig(init_lora_weights=False)`` draws both LoRA matrices at random (the usual init
zeroes ``lora_B``, which would make an adapter that changes nothing), on the attention projections
and MLPs of the tiny transformer; ``FluxPipeline.save_lora_weights`` writes ``pytorch_lora_weights.safetensors``
with the adapter's config as metadata, exactly what a training script's ``save_lora_weights`` leaves.

CLI::

    python -m omni_backend.testing.tiny_lora --base TINY_FLUX_DIR --out ADAPTER_DIR [--seed N]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

# the image-stream and text-stream attention projections and the single blocks' MLP / output: with the
# attention projections alone the tiny adapter moves pixels by ~7 levels on average, with these by ~18
TARGET_MODULES = (
    "to_q", "to_k", "to_v", "to_out.0",
    "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "proj_mlp", "proj_out",
)  # fmt: skip


def build_tiny_flux_lora(base: str | Path, out_dir: str | Path, seed: int = 0, rank: int = 4) -> Path:
    """Write an adapter for the FLUX (or LongCat-Image) checkpoint ``base`` to ``out_dir``; random for ``seed``."""
    import diffusers
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    # FLUX's or a FLUX-like transformer (LongCat-Image's has the same module names): the checkpoint's own class
    _, class_name = json.loads((Path(base) / "model_index.json").read_text())["transformer"]
    transformer = getattr(diffusers, class_name).from_pretrained(base, subfolder="transformer", dtype=torch.float32)
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,  # scaling alpha / r = 2: a strong adapter, so its image differs clearly from the base
        target_modules=list(TARGET_MODULES),
        init_lora_weights=False,
    )
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
        torch.manual_seed(seed)
        transformer.add_adapter(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    FluxPipeline.save_lora_weights(
        out,
        transformer_lora_layers=get_peft_model_state_dict(transformer),
        transformer_lora_adapter_metadata=config.to_dict(),
    )
    for path in (out, *out.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)  # safetensors writes 0600: a server in a container reads it
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m omni_backend.testing.tiny_lora",
        description="Build a tiny random LoRA adapter for a tiny FLUX checkpoint (diffusers LoRA format).",
    )
    parser.add_argument("--base", required=True, type=Path, help="the tiny FLUX checkpoint the adapter is for")
    parser.add_argument("--out", required=True, type=Path, help="adapter folder (its name is the lora_name)")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    args = parser.parse_args(argv)
    out = build_tiny_flux_lora(args.base, args.out, seed=args.seed)
    print(f"built tiny FLUX LoRA adapter (seed {args.seed}) in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
