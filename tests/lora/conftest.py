"""Tiny LoRA adapters for the tiny FLUX, and diffusers' FluxPipeline with them loaded (the reference)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from omni_backend.testing.tiny_lora import build_tiny_lora

ADAPTERS = ("style1", "style2", "style.3")  # a '.' in a name: peft module keys can't hold one


@pytest.fixture(scope="session")
def lora_dir(tiny_flux: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("loras")
    for seed, name in enumerate(ADAPTERS, start=1):
        build_tiny_lora(tiny_flux, root / name, seed=seed)
    return root


@pytest.fixture(scope="session")
def lora_reference(tiny_flux: Path, lora_dir: Path):
    """``render(prompt, seed, name, scale, **kwargs)``: FluxPipeline + load_lora_weights + set_adapters."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_flux, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for i, name in enumerate(ADAPTERS):
        pipe.load_lora_weights(lora_dir / name, adapter_name=f"ref{i}")

    def render(prompt: str, seed: int, name: str, scale: float = 1.0, **kwargs) -> np.ndarray:
        pipe.set_adapters([f"ref{ADAPTERS.index(name)}"], [scale])
        generator = torch.Generator("cpu").manual_seed(seed)
        return np.asarray(pipe(prompt, generator=generator, output_type="pil", **kwargs).images[0])

    return render
