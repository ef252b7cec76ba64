"""Every parallel layout gives the single-process output: latents (tight) and images (DESIGN section 4).

Two requests run as one batch: one with true CFG (two rows) and one without, with different step
counts so the batch shrinks mid-loop. Ranks are spawned CPU processes talking gloo; one spawn per
world size runs all its layouts in turn.
"""

from __future__ import annotations

import pytest
import torch

from omni_backend.pipelines.base import Component
from omni_backend.pipelines.flux import FluxOptions, FluxStages
from omni_backend.request import DiffusionRequest, SamplingParams
from omni_backend.testing.compare import assert_same_image
from omni_backend.testing.parallel import LAYOUTS_2, LAYOUTS_4, denoise_loop, run_parallel

# (prompt, seed, negative_prompt, true_cfg_scale, steps)
CASES = [
    ("a green square", 2, "blurry", 3.0, 3),
    ("a red circle on a blue background", 1, None, 1.0, 2),
]
SIZE = 64
UNEVEN = 48  # 3 x 3 = 9 image tokens: not a multiple of 2 or 4 ranks
SIZES = {"ulysses2_uneven": UNEVEN, "cfg2_ulysses2_uneven": UNEVEN}


@pytest.fixture(scope="module")
def flux(tiny_flux) -> FluxStages:
    return FluxStages.load(str(tiny_flux), Component.ALL, torch.float32, torch.device("cpu"), FluxOptions())


def make_cases(flux: FluxStages, size: int):
    requests = [
        DiffusionRequest(str(i), SamplingParams(size, size, steps, 3.5, cfg, seed), prompt=p, negative_prompt=neg)
        for i, (p, seed, neg, cfg, steps) in enumerate(CASES)
    ]
    return list(zip(requests, flux.encode(requests), strict=True))


@pytest.fixture(scope="module")
def cases(flux):
    return {size: make_cases(flux, size) for size in (SIZE, UNEVEN)}


@pytest.fixture(scope="module")
def single(flux, cases):
    return {size: denoise_loop(flux, flux.denoise, sized).latents for size, sized in cases.items()}


@pytest.fixture(scope="module")
def parallel_runs(tiny_flux, cases) -> dict:
    runs = {}
    for layouts in (LAYOUTS_2, LAYOUTS_4):
        jobs = [(layout, cases[SIZES.get(name, SIZE)]) for name, layout in layouts.items()]
        results = run_parallel("flux", str(tiny_flux), jobs)
        runs.update(zip(layouts, results, strict=True))
    return runs


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("layout", [*LAYOUTS_2, *LAYOUTS_4])
def test_layout_matches_single_process(layout, parallel_runs, single, flux, flux_reference):
    size = SIZES.get(layout, SIZE)
    got = parallel_runs[layout].latents
    for i, (expected, actual) in enumerate(zip(single[size], got, strict=True)):
        torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4, msg=f"request {i} under {layout}")
    images = flux.decode(got)
    for (prompt, seed, negative, cfg, steps), image in zip(CASES, images, strict=True):
        reference = flux_reference(
            prompt, seed, negative_prompt=negative, true_cfg_scale=cfg, height=size, width=size,
            num_inference_steps=steps,
        )  # fmt: skip
        assert_same_image(image, reference)
