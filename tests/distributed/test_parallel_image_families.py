"""The image families beside FLUX under every parallel layout give the single-process output (DESIGN section 4).

As ``test_parallel_denoise.py`` does for FLUX: two requests run as one batch, one with CFG (two rows)
and one without, with different step counts so the batch shrinks mid-loop; the final latents equal
the single-process ones (tight) and their images equal the diffusers pipeline's. The "_uneven" layouts
run at 48x48 (9 image tokens: padded and masked). Ranks are spawned CPU processes talking gloo; one
spawn per family and world size runs all its layouts in turn.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from omni_backend.pipelines.base import Component, PipelineStages
from omni_backend.registry import resolve_family
from omni_backend.request import DiffusionRequest, SamplingParams
from omni_backend.testing.compare import assert_same_image
from omni_backend.testing.parallel import LAYOUTS_2, LAYOUTS_4, denoise_loop, run_parallel

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

LAYOUTS = LAYOUTS_2 | LAYOUTS_4
UNEVEN = 48  # 3 x 3 image tokens: not a multiple of 2 or 4 ranks


@dataclass(frozen=True)
class Case:
    prompt: str
    seed: int
    negative_prompt: str | None
    cfg_scale: float  # the family's CFG knob: LongCat's guidance_scale, Qwen's true_cfg_scale
    steps: int
    image: np.ndarray | None = None  # the edit's input image


@dataclass(frozen=True)
class Family:
    cases: tuple[Case, ...]
    # the cases of the ring layouts: ring attention cannot mask padded text (qwen_image_parallel.py),
    # so there every row's text has one length, a multiple of 4
    ring_cases: tuple[Case, ...]
    cfg_knob: str  # the request parameter (and pipeline argument) cfg_scale sets
    height: int = 64
    width: int = 96  # 4 x 6 image tokens: multiples of 2 and 4
    layouts: tuple[str, ...] = tuple(LAYOUTS)

    def case_set(self, layout: str) -> str:
        """Which cases a layout runs: "uneven" (at UNEVEN x UNEVEN), "ring" or "" (``cases``)."""
        if layout.endswith("_uneven"):
            return "uneven"
        return "ring" if self.ring_cases and LAYOUTS[layout].ring_degree > 1 else ""

    def request(self, i: int, case: Case, height: int, width: int) -> DiffusionRequest:
        cfg = {"guidance_scale": 1.0, "true_cfg_scale": 1.0, self.cfg_knob: case.cfg_scale}
        params = SamplingParams(height, width, case.steps, cfg["guidance_scale"], cfg["true_cfg_scale"], case.seed)
        request = DiffusionRequest(str(i), params, prompt=case.prompt, negative_prompt=case.negative_prompt)
        request.input_image = case.image
        return request

    def reference(self, render: Callable[..., np.ndarray], case: Case, height: int, width: int) -> np.ndarray:
        image = {} if case.image is None else {"image": Image.fromarray(case.image)}
        return render(
            case.prompt, case.seed, negative_prompt=case.negative_prompt, height=height, width=width,
            num_inference_steps=case.steps, **{self.cfg_knob: case.cfg_scale}, **image,
        )  # fmt: skip


def _picture(seed: int) -> np.ndarray:
    """A smooth 48x64 input image (a gradient and a disc of a seeded color)."""
    y, x = np.mgrid[0:48, 0:64]
    image = np.stack([x * 4, y * 5, (x + y) % 256], axis=-1)
    image[(y - 24) ** 2 + (x - 21) ** 2 < 144] = np.random.default_rng(seed).integers(0, 256, 3)
    return image.astype(np.uint8)


FAMILIES = {
    # every prompt is padded to 512 tokens by the pipeline: the ring layouts run the same cases
    "longcat_image": Family(
        cases=(
            Case("a green square", 2, "blurry", 4.5, 3),  # classic CFG with renorm: two rows
            Case("a red circle on a blue background", 1, None, 1.0, 2),  # no CFG
        ),
        ring_cases=(),
        cfg_knob="guidance_scale",
    ),
    # text of 7, 7 and 17 tokens: padded to 17 and masked in the call, then padded for the sequence degree
    # (and once the second request is done, 7 and 7: unmasked in the call, padded and masked for the degree)
    "qwen_image": Family(
        cases=(
            Case("a cat", 2, "dark", 4.0, 3),
            Case("blurry, low quality", 1, None, 1.0, 2),
        ),
        ring_cases=(
            Case("a green square", 2, "a yellow triangle", 4.0, 3),  # 8 and 8 tokens
            Case("a blue circle", 1, None, 1.0, 2),  # 8 tokens
        ),
        cfg_knob="true_cfg_scale",
    ),
    # Qwen-Image's transformer and spec over a longer sequence: 24 noisy + 56 x 74 input-image tokens (the
    # image resized to about 1024x1024), the prediction read from the noisy part. The two-rank layouts only,
    # on text of one length (24 tokens, vision tokens included), to keep the CI's time: the four-rank
    # layouts, text masks and uneven lengths run the same code as qwen_image's above.
    "qwen_image_edit": Family(
        cases=(
            Case("make it blue", 2, "blurry", 4.0, 3, _picture(0)),
            Case("make it night", 1, None, 1.0, 2, _picture(1)),
        ),
        ring_cases=(),
        cfg_knob="true_cfg_scale",
        layouts=("cfg2", "ulysses2", "ring2", "tp2", "pp2"),
    ),
}


def _load(family: str, checkpoint: str) -> PipelineStages:
    cls = resolve_family(family)
    return cls.load(checkpoint, Component.ALL, torch.float32, torch.device("cpu"), cls.options_cls())


@dataclass
class Runs:
    stages: PipelineStages
    references: dict[str, list[np.ndarray]]  # layout -> the diffusers pipeline's image of each of its cases
    single: dict[str, list[torch.Tensor]]  # layout -> single-process final latents of each of its cases
    parallel: dict[str, list[torch.Tensor]]  # layout -> final latents of each of its cases


def _runs(family: str, checkpoint: str, render: Callable[..., np.ndarray]) -> Runs:
    spec = FAMILIES[family]
    stages = _load(family, checkpoint)
    sizes = {"": (spec.height, spec.width), "ring": (spec.height, spec.width), "uneven": (UNEVEN, UNEVEN)}
    keys = {name: spec.case_set(name) for name in spec.layouts}
    encoded, singles, references = {}, {}, {}
    for key in sorted(set(keys.values())):
        cases, (height, width) = spec.ring_cases if key == "ring" else spec.cases, sizes[key]
        requests = [spec.request(i, case, height, width) for i, case in enumerate(cases)]
        encoded[key] = list(zip(requests, stages.encode(requests), strict=True))
        singles[key] = denoise_loop(stages, stages.denoise, encoded[key]).latents
        references[key] = [spec.reference(render, case, height, width) for case in cases]
    parallel = {}
    for group in (LAYOUTS_2, LAYOUTS_4):
        names = [name for name in group if name in keys]
        if names:
            results = run_parallel(family, checkpoint, [(group[name], encoded[keys[name]]) for name in names])
            parallel.update({name: result.latents for name, result in zip(names, results, strict=True)})
    return Runs(
        stages,
        {name: references[key] for name, key in keys.items()},
        {name: singles[key] for name, key in keys.items()},
        parallel,
    )


@pytest.fixture(scope="module")
def longcat_runs(tiny_longcat_image, longcat_image_reference) -> Runs:
    return _runs("longcat_image", str(tiny_longcat_image), longcat_image_reference)


@pytest.fixture(scope="module")
def qwen_runs(tiny_qwen_image, qwen_image_reference) -> Runs:
    return _runs("qwen_image", str(tiny_qwen_image), qwen_image_reference)


@pytest.fixture(scope="module")
def qwen_edit_runs(tiny_qwen_image_edit, qwen_image_edit_reference) -> Runs:
    return _runs("qwen_image_edit", str(tiny_qwen_image_edit), qwen_image_edit_reference)


def _check(runs: Runs, layout: str) -> None:
    got = runs.parallel[layout]
    for i, (expected, actual) in enumerate(zip(runs.single[layout], got, strict=True)):
        torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4, msg=f"request {i} under {layout}")
    for image, reference in zip(runs.stages.decode(got), runs.references[layout], strict=True):
        assert_same_image(image, reference)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_longcat_image_layout_matches_single_process(layout, longcat_runs):
    _check(longcat_runs, layout)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_qwen_image_layout_matches_single_process(layout, qwen_runs):
    _check(qwen_runs, layout)


@pytest.mark.parametrize("layout", FAMILIES["qwen_image_edit"].layouts)
def test_qwen_image_edit_layout_matches_single_process(layout, qwen_edit_runs):
    _check(qwen_edit_runs, layout)
