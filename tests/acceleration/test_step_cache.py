"""Step caches: threshold 0 is the uncached image, a large threshold skips within a documented bound,
decisions and state are per request (and per CFG branch) inside a step batch, and diffusers' own
FluxPipeline with the same cache hooks gives the same image as the served one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from omni_backend.testing.compare import assert_same_image
from tests.acceleration.conftest import MIXED, load, make, run

pytestmark = pytest.mark.slow

# The "large" setting of each backend and the quality bound README "Acceleration" documents for the
# tiny checkpoint (random weights: a trained model changes less between steps and skips more safely).
LARGE = {
    "tea_cache": {"rel_l1_thresh": 5.0},
    "first_block_cache": {"threshold": 5.0},
    "mag_cache": {"threshold": 5.0, "retention_ratio": 0.0},
    "taylorseer": {"cache_interval": 3, "disable_cache_before_step": 1},
}
EXACT = {
    "tea_cache": {"rel_l1_thresh": 0.0},
    "first_block_cache": {"threshold": 0.0},
    "mag_cache": {"threshold": 0.0},
    "taylorseer": {"cache_interval": 1},
}
MIN_PSNR_DB, MAX_PIXEL_ERROR = 25.0, 32


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


@pytest.fixture(scope="module")
def uncached_alone(tiny_flux) -> np.ndarray:
    stages, _, _ = load(tiny_flux)
    return run(stages, [make(0, *MIXED[0])])["0"]


@pytest.mark.parametrize("backend", list(EXACT))
def test_threshold_zero_gives_the_uncached_image(tiny_flux, uncached, uncached_alone, backend):
    stages, applied, observer = load(tiny_flux, cache_backend=backend, cache_config=json.dumps(EXACT[backend]))
    alone = run(stages, [make(0, *MIXED[0])])["0"]
    assert np.array_equal(alone, uncached_alone)
    batched = run(stages, [make(i, *case) for i, case in enumerate(MIXED)])
    for key, image in uncached.items():
        if backend == "tea_cache":  # one batched call, every row computing: the very same call
            assert np.array_equal(batched[key], image)
        else:  # one call per row: batch size 1 instead of 3, float rounding only
            assert_same_image(batched[key], image)
    assert observer.skipped == 0 and observer.computed > 0
    assert applied.step_cache.live_keys() == set(), "finished requests left cache state behind"


@pytest.mark.parametrize("backend", list(LARGE))
def test_large_threshold_skips_within_the_bound(tiny_flux, uncached, backend):
    stages, applied, observer = load(tiny_flux, cache_backend=backend, cache_config=json.dumps(LARGE[backend]))
    images = run(stages, [make(i, *case) for i, case in enumerate(MIXED)])
    assert observer.skipped > 0
    rows = sum(case[4] * (2 if case[3] > 1 else 1) for case in MIXED)  # true CFG: two rows per step
    assert observer.skipped + observer.computed == rows
    for key, image in uncached.items():
        error = np.abs(images[key].astype(int) - image.astype(int)).max()
        assert psnr(images[key], image) >= MIN_PSNR_DB and error <= MAX_PIXEL_ERROR, (key, error)
    assert applied.step_cache.live_keys() == set()
    again = run(stages, [make(i + 10, *case) for i, case in enumerate(MIXED)])
    for i in range(len(MIXED)):  # state reset at each request's start: the same request, the same image
        assert np.array_equal(again[str(i + 10)], images[str(i)])


@pytest.mark.parametrize("backend", ["tea_cache", "first_block_cache", "mag_cache"])
def test_cache_threshold_is_per_request_in_a_step_batch(tiny_flux, uncached_alone, backend):
    stages, applied, observer = load(tiny_flux, cache_backend=backend, cache_config=json.dumps(LARGE[backend]))
    exact = make(0, *MIXED[0], cache_threshold=0.0)
    loose = make(1, "a blue square", 5, None, 1.0, 6)  # the configured large threshold
    images = run(stages, [exact, loose])
    assert_same_image(images["0"], uncached_alone)
    assert observer.skipped > 0, "the request with the large threshold skipped nothing"
    skipped_alone = observer.skipped
    stages2, _, observer2 = load(tiny_flux, cache_backend=backend, cache_config=json.dumps(LARGE[backend]))
    run(stages2, [make(1, "a blue square", 5, None, 1.0, 6)])
    assert observer2.skipped == skipped_alone, "a neighbour in the batch changed this request's decisions"


def test_aborted_request_releases_its_state(tiny_flux):
    stages, applied, _ = load(tiny_flux, cache_backend="tea_cache")
    from omni_backend.engine.scheduler import StepPlan
    from omni_backend.runner.model_runner import ModelRunner, RunnerOutput

    runner = ModelRunner(stages, RunnerOutput.IMAGE)
    request = make(0, *MIXED[1])
    runner.execute(StepPlan(admitted=[request], running_ids=["0"]))
    assert applied.step_cache.live_keys() == {"0/cond", "0/uncond"}  # CFG branches keep separate state
    runner.abort(["0"])
    assert applied.step_cache.live_keys() == set()


@pytest.mark.parametrize("backend", ["first_block_cache", "mag_cache", "taylorseer"])
def test_diffusers_hooks_match_diffusers_flux_pipeline(tiny_flux, backend):
    """Served with a diffusers cache == diffusers' FluxPipeline with the same hooks, for a plain request."""
    from diffusers import FluxPipeline

    from omni_backend.cache.config import parse_cache_config
    from omni_backend.cache.diffusers_cache import _diffusers_config

    stages, applied, observer = load(tiny_flux, cache_backend=backend, cache_config=json.dumps(LARGE[backend]))
    prompt, seed, _, _, steps = MIXED[0]
    served = run(stages, [make(0, *MIXED[0])])["0"]
    assert observer.skipped > 0

    pipe = FluxPipeline.from_pretrained(tiny_flux, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    config = _diffusers_config(parse_cache_config(backend, json.dumps(LARGE[backend])), stages.step_cache_adapter())
    if backend == "mag_cache":  # ours stretches the ratios to each request's step count; so must the reference
        from diffusers.hooks.mag_cache import nearest_interp

        config.mag_ratios, config.num_inference_steps = nearest_interp(config.mag_ratios, steps), steps
    pipe.transformer.enable_cache(config)
    generator = torch.Generator("cpu").manual_seed(seed)
    image = pipe(prompt, generator=generator, height=64, width=64, num_inference_steps=steps).images[0]
    assert np.array_equal(served, np.asarray(image))
