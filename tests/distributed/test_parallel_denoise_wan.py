"""Wan2.2 (two experts): every parallel layout gives the single-process video, for text- and image-to-video.

Two requests run as one batch: one with CFG over 4 steps (crossing ``boundary_ratio``, so both
experts run, with different guidance scales) and one without CFG over 2 steps, so a step mixes the
experts and the batch shrinks mid-loop. Latents must match the single process tightly and the
decoded videos diffusers' pipeline (DESIGN section 4). Ranks are spawned CPU processes talking gloo;
one spawn per family runs all its layouts in turn.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from omni_backend.pipelines.base import Component
from omni_backend.pipelines.wan import WanOptions, WanT2VStages
from omni_backend.pipelines.wan_i2v import WanI2VStages
from omni_backend.request import DiffusionRequest, SamplingParams
from omni_backend.testing.compare import assert_same_image
from omni_backend.testing.parallel import LAYOUTS_2, denoise_loop, run_parallel

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

# (prompt, seed, negative_prompt, guidance_scale, guidance_scale_2, steps)
CASES = [
    ("a red circle on a blue background", 1, "blurry", 4.0, 2.0, 4),
    ("a green square", 2, None, 1.0, None, 2),
]
SIZE = (32, 48, 5)  # 2 latent frames of 2 x 3 patches: 12 video tokens
UNEVEN = (48, 48, 1)  # 1 latent frame of 3 x 3 patches: 9 tokens, not a multiple of 2 ranks
LAYOUTS = LAYOUTS_2
SIZES = {"ulysses2_uneven": UNEVEN}
FAMILIES = {"wan22_t2v": WanT2VStages, "wan22_i2v": WanI2VStages}


def _image(height: int, width: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def make_cases(stages: WanT2VStages, size: tuple[int, int, int]):
    height, width, frames = size
    requests = []
    for i, (prompt, seed, negative, guidance, guidance_2, steps) in enumerate(CASES):
        params = SamplingParams(
            height, width, steps, guidance, 1.0, seed, num_frames=frames, guidance_scale_2=guidance_2
        )
        request = DiffusionRequest(str(i), params, prompt=prompt, negative_prompt=negative)
        if isinstance(stages, WanI2VStages):
            request.input_image = _image(height, width)
        requests.append(request)
    return list(zip(requests, stages.encode(requests), strict=True))


def reference(render, stages: WanT2VStages, size: tuple[int, int, int], case: tuple) -> np.ndarray:
    prompt, seed, negative, guidance, guidance_2, steps = case
    height, width, frames = size
    extra = {"image": Image.fromarray(_image(height, width))} if isinstance(stages, WanI2VStages) else {}
    return render(
        prompt, seed, negative_prompt=negative, guidance_scale=guidance, guidance_scale_2=guidance_2,
        height=height, width=width, num_frames=frames, num_inference_steps=steps, **extra,
    )  # fmt: skip


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    """(name, stages, cases by size, single-process latents by size, parallel runs by layout, reference)."""
    name = request.param
    checkpoint = request.getfixturevalue(f"tiny_{name}")
    stages = FAMILIES[name].load(str(checkpoint), Component.ALL, torch.float32, torch.device("cpu"), WanOptions())
    cases = {size: make_cases(stages, size) for size in (SIZE, UNEVEN)}
    single = {size: denoise_loop(stages, stages.denoise, sized).latents for size, sized in cases.items()}
    jobs = [(layout, cases[SIZES.get(layout_name, SIZE)]) for layout_name, layout in LAYOUTS.items()]
    runs = dict(zip(LAYOUTS, run_parallel(name, str(checkpoint), jobs), strict=True))
    return name, stages, single, runs, request.getfixturevalue(f"{name}_reference")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(layout, family):
    name, stages, single, runs, render = family
    size = SIZES.get(layout, SIZE)
    got = runs[layout].latents
    for i, (expected, actual) in enumerate(zip(single[size], got, strict=True)):
        torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4, msg=f"{name} request {i} under {layout}")
    for case, video in zip(CASES, stages.decode(got), strict=True):
        expected = reference(render, stages, size, case)
        for frame in range(size[2]):
            assert_same_image(video[frame], expected[frame])
