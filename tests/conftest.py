"""Shared fixtures: the tiny FLUX checkpoint and the diffusers reference pipeline it is compared with."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from omni_backend.testing.tiny import build_tiny_flux


@pytest.fixture(scope="session")
def model_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model root holding ``tiny-flux``, the name model_repository/ refers to."""
    root = tmp_path_factory.mktemp("models")
    build_tiny_flux(root / "tiny-flux", seed=0)
    return root


@pytest.fixture(scope="session")
def tiny_flux(model_root: Path) -> Path:
    return model_root / "tiny-flux"


@pytest.fixture(scope="session")
def flux_reference(tiny_flux: Path):
    """``render(prompt, seed, **kwargs)`` -> uint8 [H, W, 3] from diffusers' own FluxPipeline."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_flux, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)

    def render(prompt: str, seed: int, **kwargs) -> np.ndarray:
        generator = torch.Generator("cpu").manual_seed(seed)
        image = pipe(prompt, generator=generator, output_type="pil", **kwargs).images[0]
        return np.asarray(image)

    return render
