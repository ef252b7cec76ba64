"""Step caches on Qwen-Image and Qwen-Image-Edit: threshold 0 is the uncached image (alone and in a step
batch mixing a plain and a true-CFG request), a large threshold skips within the documented bound,
thresholds are per request, an aborted request releases its state, and diffusers' own pipelines with
the same cache hooks give the served image."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from omni_backend.cache.base import select_rows
from omni_backend.config import parse_model_config
from omni_backend.pipelines.base import Component
from omni_backend.registry import resolve_family
from omni_backend.request import DiffusionRequest, SamplingParams
from omni_backend.runner.model_runner import load_accelerated
from omni_backend.testing.compare import assert_same_image
from tests.acceleration.conftest import CountingObserver, run
from tests.acceleration.test_step_cache import MAX_PIXEL_ERROR, MIN_PSNR_DB, psnr  # README's bound, as for FLUX

pytestmark = pytest.mark.slow

FAMILIES = ["qwen_image", "qwen_image_edit"]
SIZE = 32
IMAGE = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
# (prompt, seed, negative_prompt, true_cfg_scale, steps): a plain and a true-CFG request of another text length
MIXED = [("a red circle on a blue background", 1, None, 1.0, 6), ("a green square", 2, "blurry", 4.0, 4)]
ROWS = sum(case[4] * (2 if case[3] > 1 else 1) for case in MIXED)  # true CFG: two rows per step
EXACT = {
    "tea_cache": {"rel_l1_thresh": 0.0},
    "first_block_cache": {"threshold": 0.0},
    "mag_cache": {"threshold": 0.0},
    "taylorseer": {"cache_interval": 1},
}
LARGE = {
    "tea_cache": {"rel_l1_thresh": 5.0},
    "first_block_cache": {"threshold": 5.0},
    "mag_cache": {"threshold": 5.0, "retention_ratio": 0.0},
    "taylorseer": {"cache_interval": 3, "disable_cache_before_step": 1},
}


def load(checkpoint, family: str, **parameters: str):
    options_cls = resolve_family(family).options_cls
    config = parse_model_config({"family": family, "model": str(checkpoint), **parameters}, options_cls)
    observer = CountingObserver()
    stages, applied = load_accelerated(config, Component.ALL, torch.device("cpu"), observer)
    return stages, applied, observer


def load_cached(checkpoint, family: str, backend: str, settings: dict):
    return load(checkpoint, family, cache_backend=backend, cache_config=json.dumps(settings))


def make(family: str, i: int, prompt: str, seed: int, negative: str | None, cfg: float, steps: int, **extra):
    params = SamplingParams(SIZE, SIZE, steps, 1.0, cfg, seed, **extra)
    request = DiffusionRequest(str(i), params, prompt=prompt, negative_prompt=negative)
    if family == "qwen_image_edit":  # two input images of one size: one batching key
        request.input_image = IMAGE if i % 2 == 0 else IMAGE[::-1].copy()
    return request


def mixed(family: str, offset: int = 0) -> list[DiffusionRequest]:
    return [make(family, i + offset, *case) for i, case in enumerate(MIXED)]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> tuple[str, object, dict[str, np.ndarray], np.ndarray]:
    """(family, tiny checkpoint, the MIXED requests' uncached images step-batched, request 0's alone)."""
    name = request.param
    checkpoint = request.getfixturevalue(f"tiny_{name}")
    stages, _, _ = load(checkpoint, name)
    return name, checkpoint, run(stages, mixed(name)), run(stages, [make(name, 0, *MIXED[0])])["0"]


@pytest.mark.parametrize("backend", sorted(EXACT))
def test_threshold_zero_gives_the_uncached_image(family, backend):
    name, checkpoint, uncached, uncached_alone = family
    stages, applied, observer = load_cached(checkpoint, name, backend, EXACT[backend])
    assert np.array_equal(run(stages, [make(name, 0, *MIXED[0])])["0"], uncached_alone)
    batched = run(stages, mixed(name))
    for key, image in uncached.items():
        if backend == "tea_cache":  # one batched call, every row computing: the very same call
            assert np.array_equal(batched[key], image), key
        else:  # one call per row (its text still padded to the batch's longest): float rounding only
            assert_same_image(batched[key], image)
    assert observer.skipped == 0 and observer.computed == ROWS + MIXED[0][4]
    assert applied.step_cache.live_keys() == set(), "finished requests left cache state behind"


@pytest.mark.parametrize("backend", sorted(LARGE))
def test_large_threshold_skips_within_the_bound(family, backend):
    name, checkpoint, uncached, _ = family
    stages, applied, observer = load_cached(checkpoint, name, backend, LARGE[backend])
    images = run(stages, mixed(name))
    assert observer.skipped > 0 and observer.skipped + observer.computed == ROWS
    for key, image in uncached.items():
        error = np.abs(images[key].astype(int) - image.astype(int)).max()
        assert psnr(images[key], image) >= MIN_PSNR_DB and error <= MAX_PIXEL_ERROR, (key, error)
    assert any(not np.array_equal(images[k], uncached[k]) for k in uncached), "the skips changed nothing"
    assert applied.step_cache.live_keys() == set()
    again = run(stages, mixed(name, offset=10))
    for i in range(len(MIXED)):  # state reset at each request's start: the same request, the same image
        assert np.array_equal(again[str(i + 10)], images[str(i)])


@pytest.mark.parametrize("backend", ["tea_cache", "first_block_cache", "mag_cache"])
def test_cache_threshold_is_per_request_in_a_step_batch(family, backend):
    name, checkpoint, _, uncached_alone = family
    stages, _, observer = load_cached(checkpoint, name, backend, LARGE[backend])
    exact = make(name, 0, *MIXED[0], cache_threshold=0.0)
    loose = make(name, 1, "a blue square", 5, None, 1.0, 6)  # the configured large threshold
    images = run(stages, [exact, loose])
    assert_same_image(images["0"], uncached_alone)
    assert observer.skipped > 0, "the request with the large threshold skipped nothing"
    alone, _, observer_alone = load_cached(checkpoint, name, backend, LARGE[backend])
    run(alone, [make(name, 1, "a blue square", 5, None, 1.0, 6)])
    assert observer_alone.skipped == observer.skipped, "a neighbour in the batch changed this request's decisions"


def test_aborted_request_releases_its_state(tiny_qwen_image_edit):
    from omni_backend.engine.scheduler import StepPlan
    from omni_backend.runner.model_runner import ModelRunner, RunnerOutput

    stages, applied, _ = load(tiny_qwen_image_edit, "qwen_image_edit", cache_backend="tea_cache")
    runner = ModelRunner(stages, RunnerOutput.IMAGE)
    runner.execute(StepPlan(admitted=[make("qwen_image_edit", 0, *MIXED[1])], running_ids=["0"]))
    assert applied.step_cache.live_keys() == {"0/cond", "0/uncond"}  # CFG branches keep separate state
    runner.abort(["0"])
    assert applied.step_cache.live_keys() == set()


@pytest.mark.parametrize("backend", ["first_block_cache", "mag_cache", "taylorseer"])
def test_diffusers_hooks_match_diffusers_pipeline(family, backend):
    """Served with a diffusers cache == diffusers' QwenImagePipeline / QwenImageEditPipeline with the same hooks."""
    from diffusers import QwenImageEditPipeline, QwenImagePipeline
    from diffusers.hooks.mag_cache import nearest_interp
    from PIL import Image

    from omni_backend.cache.config import parse_cache_config
    from omni_backend.cache.diffusers_cache import _diffusers_config
    from omni_backend.pipelines.qwen_image_edit import load_processor

    name, checkpoint, _, _ = family
    stages, _, observer = load_cached(checkpoint, name, backend, LARGE[backend])
    prompt, seed, _, _, steps = MIXED[0]
    served = run(stages, [make(name, 0, *MIXED[0])])["0"]
    assert observer.skipped > 0

    config = _diffusers_config(parse_cache_config(backend, json.dumps(LARGE[backend])), stages.step_cache_adapter())
    if backend == "mag_cache":  # ours stretches the ratios to each request's step count; so must the reference
        config.mag_ratios, config.num_inference_steps = nearest_interp(config.mag_ratios, steps), steps
    if name == "qwen_image_edit":
        pipe = QwenImageEditPipeline.from_pretrained(
            checkpoint, dtype=torch.float32, processor=load_processor(str(checkpoint))
        )
        extra = {"image": Image.fromarray(IMAGE)}
    else:
        pipe, extra = QwenImagePipeline.from_pretrained(checkpoint, dtype=torch.float32), {}
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer.enable_cache(config)
    generator = torch.Generator("cpu").manual_seed(seed)
    image = pipe(prompt=prompt, generator=generator, height=SIZE, width=SIZE, num_inference_steps=steps, **extra)
    assert np.array_equal(served, np.asarray(image.images[0]))


def test_zero_cond_t_transformer_is_refused():
    from diffusers import QwenImageTransformer2DModel

    from omni_backend.pipelines.qwen_image_cache import QwenImageCacheAdapter

    tiny = {"num_layers": 1, "attention_head_dim": 16, "num_attention_heads": 1, "joint_attention_dim": 16}
    transformer = QwenImageTransformer2DModel(**tiny, axes_dims_rope=(4, 6, 6), zero_cond_t=True)
    with pytest.raises(NotImplementedError, match="zero_cond_t"):
        QwenImageCacheAdapter(transformer)


def test_select_rows_picks_tensors_lists_and_keeps_none():
    inputs = {
        "hidden_states": torch.arange(6).view(3, 2),
        "img_shapes": [[(1, 2, 2)], [(1, 4, 4)], [(1, 2, 2), (1, 3, 3)]],
        "pair": ("a", "b", "c"),
        "mask": None,
        "shared": torch.zeros(4),  # not a row input: passed through whole
    }
    picked = select_rows(inputs, ("hidden_states", "img_shapes", "pair", "mask"), [2, 0])
    assert picked["hidden_states"].tolist() == [[4, 5], [0, 1]]
    assert picked["img_shapes"] == [[(1, 2, 2), (1, 3, 3)], [(1, 2, 2)]]
    assert picked["pair"] == ("c", "a") and picked["mask"] is None and picked["shared"] is inputs["shared"]
    with pytest.raises(TypeError, match="row input"):
        select_rows({"x": 3}, ("x",), [0])
