"""``vae_tiling`` / ``vae_slicing`` switch diffusers' VAE memory modes on and keep the image."""

from __future__ import annotations

import numpy as np
import pytest

from tests.acceleration.conftest import MIXED, load, make, run


@pytest.mark.slow
def test_vae_tiling_and_slicing(tiny_flux, uncached):
    stages, _, _ = load(tiny_flux, vae_tiling="true", vae_slicing="true")
    assert stages.pipe.vae.use_tiling and stages.pipe.vae.use_slicing
    images = run(stages, [make(i, *case) for i, case in enumerate(MIXED)])
    for key, image in uncached.items():  # 64x64 is below the tile size: tiling changes nothing here
        assert np.array_equal(images[key], image)
