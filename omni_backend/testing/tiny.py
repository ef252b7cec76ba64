"""Tiny random-weight checkpoints of real diffusers architectures, for tests, demos and benchmarks.

Each builder writes a ``save_pretrained`` checkpoint in diffusers layout (``model_index.json`` plus
one folder per component) that ``<Pipeline>.from_pretrained`` loads like the real model. Weights are
random but deterministic for a seed; tokenizers are trained locally, so nothing is downloaded.

CLI (idempotent; builds atomically into ``DIR.tmp-XXXX`` then renames)::

    python -m omni_backend.testing.tiny --family flux --out DIR [--seed N] [--force]

Builders of other families live beside this module (``tiny_qwen.py``, ``tiny_wan.py``, ``tiny_longcat.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

# FLUX.1-dev's scheduler/scheduler_config.json (dynamic shifting by image sequence length).
FLUX_SCHEDULER_CONFIG: dict[str, object] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}


def build_tiny_flux(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random FLUX.1 checkpoint (all ``FluxPipeline`` components) to ``out_dir``.

    Shapes follow FLUX.1-dev scaled down: 16-channel VAE with 8x downsampling and FLUX's
    scaling/shift factors, packed 2x2 latents (transformer ``in_channels=64``), guidance
    embedding, CLIP pooled output -> ``pooled_projection_dim``, T5 ``d_model`` ->
    ``joint_attention_dim``. Loads with ``FluxPipeline.from_pretrained`` and renders 64x64 on CPU.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from omni_backend.testing.tokenizers import build_clip_tokenizer, build_t5_tokenizer

    out = Path(out_dir)
    tokenizer = build_clip_tokenizer()
    tokenizer_2 = build_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=64,
                projection_dim=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=77,
                hidden_act="quick_gelu",
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,  # pooled output is taken at the first eos
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        torch.manual_seed(seed)
        text_encoder_2 = T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer_2),
                d_model=32,
                d_kv=16,
                d_ff=64,
                num_layers=2,
                num_heads=2,
                feed_forward_proj="gated-gelu",  # T5 v1.1, like FLUX's T5-XXL
                tie_word_embeddings=False,  # T5 v1.1: no decoder-output scaling
                pad_token_id=tokenizer_2.pad_token_id,
                eos_token_id=tokenizer_2.eos_token_id,
                decoder_start_token_id=tokenizer_2.pad_token_id,
            )
        )
        torch.manual_seed(seed)
        vae = tiny_flux_vae()
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,  # 16 latent channels packed 2x2
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,  # = T5 d_model
            pooled_projection_dim=32,  # = CLIP hidden_size (FluxPipeline uses pooler_output)
            guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
        )
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG)
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    save_pipeline(pipe, out)
    # Name the T5 tokenizer like FLUX.1-dev's model_index.json; in transformers >= 5 this is an alias
    # of T5Tokenizer, in 4.x it is the tokenizer.json-backed class (the slow one would need spiece.model).
    index_path = out / "model_index.json"
    index = json.loads(index_path.read_text())
    index["tokenizer_2"] = ["transformers", "T5TokenizerFast"]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return out


def tiny_flux_vae():
    """FLUX.1's ``AutoencoderKL`` narrowed: 16 latent channels, 8x downsampling, FLUX's scaling and shift.

    The default size of the families built on it is its ``sample_size`` (64). Seed the RNG first.
    """
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),  # 4 levels -> vae_scale_factor 8
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def save_pipeline(pipe, out_dir: str | Path) -> Path:
    """``save_pretrained`` a diffusers pipeline (safetensors, no progress bars) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with _quiet_progress_bars():
        pipe.save_pretrained(out, safe_serialization=True)
    return out


@contextlib.contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """Hide transformers' "Writing model shards" bars while saving."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _lazy(target: str) -> Callable[[Path, int], Path]:
    """A builder living in another module, imported when called (each family's imports cost seconds)."""

    def builder(out_dir: Path, seed: int) -> Path:
        module_name, name = target.split(":")
        return getattr(importlib.import_module(module_name), name)(out_dir, seed)

    return builder


BUILDERS: dict[str, Callable[[Path, int], Path]] = {
    "flux": build_tiny_flux,
    "qwen_image": _lazy("omni_backend.testing.tiny_qwen:build_tiny_qwen_image"),
    "qwen_image_edit": _lazy("omni_backend.testing.tiny_qwen:build_tiny_qwen_image_edit"),
    "wan22_t2v": _lazy("omni_backend.testing.tiny_wan:build_tiny_wan22_t2v"),
    "wan22_i2v": _lazy("omni_backend.testing.tiny_wan:build_tiny_wan22_i2v"),
    "longcat_image": _lazy("omni_backend.testing.tiny_longcat:build_tiny_longcat_image"),
}


def is_complete(path: str | Path) -> bool:
    """True if ``path`` holds a finished checkpoint (``model_index.json`` is written by the builder)."""
    return (Path(path) / "model_index.json").is_file()


def build(family: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Build the tiny ``family`` checkpoint atomically into ``out_dir`` (replacing what is there).

    The checkpoint is written to a sibling ``<out>.tmp-XXXX`` folder and renamed into place, so an
    interrupted build never leaves a half-written ``out_dir``.
    """
    builder = BUILDERS.get(family)
    if builder is None:
        raise ValueError(f"unknown model family {family!r}; known families: {', '.join(sorted(BUILDERS))}")
    out = Path(out_dir).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    try:
        builder(tmp, seed)
        if not is_complete(tmp):
            raise RuntimeError(f"builder for {family!r} wrote no model_index.json")
        _make_readable(tmp)
        _swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op once renamed
    return out


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is moved aside first and then deleted."""
    old: Path | None = None
    if out.exists() or out.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f"{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
    try:
        os.replace(tmp, out)
    except OSError:
        if not is_complete(out):  # else: lost a race against a concurrent build, keep theirs
            if old is not None and not out.exists():
                os.replace(old / out.name, out)  # put the previous checkpoint back
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _make_readable(root: Path) -> None:
    """Undo mkdtemp's / safetensors' private modes (0700/0600) so e.g. a server in a container can read."""
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; see the module docstring."""
    parser = argparse.ArgumentParser(
        prog="python -m omni_backend.testing.tiny",
        description="Build a tiny random-weight diffusers checkpoint (no downloads).",
    )
    parser.add_argument("--family", required=True, help=f"model family: {', '.join(sorted(BUILDERS))}")
    parser.add_argument("--out", required=True, type=Path, help="output checkpoint directory")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    parser.add_argument("--force", action="store_true", help="rebuild even if DIR holds a checkpoint")
    args = parser.parse_args(argv)
    if args.family not in BUILDERS:
        parser.error(f"unknown model family {args.family!r}; known families: {', '.join(sorted(BUILDERS))}")
    if is_complete(args.out) and not args.force:
        print(f"{args.out} already holds a checkpoint (model_index.json found); use --force to rebuild")
        return 0
    start = time.perf_counter()
    out = build(args.family, args.out, seed=args.seed)
    elapsed = time.perf_counter() - start
    size_mb = _dir_size(out) / 1e6
    print(f"built tiny {args.family} checkpoint (seed {args.seed}) in {out}: {size_mb:.2f} MB, {elapsed:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
