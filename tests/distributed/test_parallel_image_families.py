"""The image families beside FLUX under every parallel layout give the single-process output (DESIGN section 4).

As ``test_parallel_denoise.py`` does for FLUX: two requests run as one batch, one with CFG (two rows)
and one without, with different step counts so the batch shrinks mid-loop; the final latents equal
the single-process ones (tight) and their images equal the diffusers pipeline's. Ranks are spawned
CPU processes talking gloo; one spawn per family and world size runs all its layouts in turn.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch

from omni_backend.config import ParallelConfig
from omni_backend.pipelines.base import Component, PipelineStages
from omni_backend.registry import resolve_family
from omni_backend.request import DiffusionRequest, SamplingParams
from omni_backend.testing.compare import assert_same_image
from omni_backend.testing.parallel import denoise_loop, run_parallel

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

LAYOUTS_2 = {
    "cfg2": ParallelConfig(cfg_parallel_size=2),
    "ulysses2": ParallelConfig(ulysses_degree=2),
    "ring2": ParallelConfig(ring_degree=2),
    "tp2": ParallelConfig(tensor_parallel_size=2),
    "pp2": ParallelConfig(pipeline_parallel_size=2),
}
LAYOUTS_4 = {
    "ulysses2_ring2": ParallelConfig(ulysses_degree=2, ring_degree=2),
    "cfg2_ulysses2": ParallelConfig(cfg_parallel_size=2, ulysses_degree=2),
}


@dataclass(frozen=True)
class Case:
    prompt: str
    seed: int
    negative_prompt: str | None
    guidance_scale: float  # LongCat's CFG scale; the guidance embedding's elsewhere
    true_cfg_scale: float
    steps: int


@dataclass(frozen=True)
class Family:
    cases: tuple[Case, ...]
    height: int
    width: int

    def request(self, i: int, case: Case) -> DiffusionRequest:
        params = SamplingParams(
            self.height, self.width, case.steps, case.guidance_scale, case.true_cfg_scale, case.seed
        )
        return DiffusionRequest(str(i), params, prompt=case.prompt, negative_prompt=case.negative_prompt)

    def reference_kwargs(self, case: Case) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "negative_prompt": case.negative_prompt, "height": self.height, "width": self.width,
            "num_inference_steps": case.steps, "guidance_scale": case.guidance_scale,
        }  # fmt: skip
        return kwargs


FAMILIES = {
    # 512 text tokens (the pipeline pads every prompt), 4 x 6 image tokens: multiples of 2 and 4
    "longcat_image": Family(
        cases=(
            Case("a green square", 2, "blurry", 4.5, 1.0, 3),  # classic CFG with renorm: two rows
            Case("a red circle on a blue background", 1, None, 1.0, 1.0, 2),  # no CFG
        ),
        height=64,
        width=96,
    ),
}


def _load(family: str, checkpoint: str) -> PipelineStages:
    cls = resolve_family(family)
    return cls.load(checkpoint, Component.ALL, torch.float32, torch.device("cpu"), cls.options_cls())


@dataclass
class Runs:
    stages: PipelineStages
    references: list[np.ndarray]  # the diffusers pipeline's image of each case
    single: list[torch.Tensor]  # single-process final latents of each case
    parallel: dict[str, list[torch.Tensor]]  # layout -> final latents of each case


def _runs(family: str, checkpoint: str, render: Callable[..., np.ndarray]) -> Runs:
    spec = FAMILIES[family]
    stages = _load(family, checkpoint)
    requests = [spec.request(i, case) for i, case in enumerate(spec.cases)]
    cases = list(zip(requests, stages.encode(requests), strict=True))
    single = denoise_loop(stages, stages.denoise, cases).latents
    parallel = {}
    for layouts in (LAYOUTS_2, LAYOUTS_4):
        results = run_parallel(family, checkpoint, [(layout, cases) for layout in layouts.values()])
        parallel.update({name: result.latents for name, result in zip(layouts, results, strict=True)})
    references = [render(c.prompt, c.seed, **spec.reference_kwargs(c)) for c in spec.cases]
    return Runs(stages, references, single, parallel)


@pytest.fixture(scope="module")
def longcat_runs(tiny_longcat_image, longcat_image_reference) -> Runs:
    return _runs("longcat_image", str(tiny_longcat_image), longcat_image_reference)


def _check(runs: Runs, layout: str) -> None:
    got = runs.parallel[layout]
    for i, (expected, actual) in enumerate(zip(runs.single, got, strict=True)):
        torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4, msg=f"request {i} under {layout}")
    for image, reference in zip(runs.stages.decode(got), runs.references, strict=True):
        assert_same_image(image, reference)


@pytest.mark.parametrize("layout", [*LAYOUTS_2, *LAYOUTS_4])
def test_longcat_image_layout_matches_single_process(layout, longcat_runs):
    _check(longcat_runs, layout)
