"""Step caches on Wan2.2 text- and image-to-video, one cache per expert: threshold 0 is the uncached
video, a large threshold skips within the documented bound while every row's first step on the
low-noise expert computes, a step batch mixing requests on different experts gives each its video
alone, and releasing a request frees its state in both experts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from omni_backend.request import DiffusionRequest, SamplingParams
from omni_backend.testing.compare import assert_same_image
from tests.acceleration.conftest import run
from tests.acceleration.test_qwen_step_cache import EXACT, LARGE, load, load_cached
from tests.acceleration.test_step_cache import MAX_PIXEL_ERROR, MIN_PSNR_DB, psnr  # README's bound

pytestmark = pytest.mark.slow

IMAGE = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
# (prompt, negative_prompt, guidance_scale, steps): both cross the expert boundary at another step, so
# a step batch holds one row on each expert (the first step always runs on the high-noise expert)
MIXED = [("a cat", None, 1.0, 5), ("a dog", "blurry", 4.0, 3)]  # no timestep in common but 999
ROWS = sum(steps * (2 if cfg > 1 else 1) for _, _, cfg, steps in MIXED)  # CFG: two rows per step


def make(family: str, i: int, prompt: str, negative: str | None, cfg: float, steps: int, seed: int) -> DiffusionRequest:
    params = SamplingParams(32, 32, steps, cfg, 1.0, seed, num_frames=5)
    request = DiffusionRequest(str(i), params, prompt=prompt, negative_prompt=negative)
    if family == "wan22_i2v":
        request.input_image = IMAGE if i % 2 == 0 else IMAGE[::-1].copy()
    return request


def mixed(family: str, offset: int = 0) -> list[DiffusionRequest]:
    return [make(family, i + offset, *case, seed=i) for i, case in enumerate(MIXED)]


# Every backend on text-to-video; image-to-video (the same transformer over more input channels, its own
# TeaCache polynomial) with ours and one of diffusers' hooks, to keep the suite's time modest.
CASES = [("wan22_t2v", backend) for backend in sorted(EXACT)] + [
    ("wan22_i2v", "first_block_cache"),
    ("wan22_i2v", "tea_cache"),
]


@pytest.fixture(scope="module")
def uncached_videos() -> dict[str, dict[str, np.ndarray]]:
    return {}  # family -> the MIXED requests' uncached videos, step-batched (filled by ``family``)


@pytest.fixture
def family(request, uncached_videos) -> tuple[str, object, dict[str, np.ndarray]]:
    """(family, tiny checkpoint, the MIXED requests' uncached videos step-batched)."""
    name = request.node.callspec.params["name"]
    checkpoint = request.getfixturevalue(f"tiny_{name}")
    if name not in uncached_videos:
        stages, _, _ = load(checkpoint, name)
        uncached_videos[name] = run(stages, mixed(name))
    return name, checkpoint, uncached_videos[name]


class ComputedTimesteps:
    """Per expert, the timesteps of the rows its transformer really computed: a call's timesteps when the
    probe (a leaf of the last block) ran in it; TeaCache's transformer calls hold its computing rows only."""

    def __init__(self, stages):
        self.per_expert: list[list[int]] = []
        adapter = stages.step_cache_adapter()
        for transformer in stages.experts():
            seen: list[int] = []
            call: dict[str, list[int]] = {}
            transformer.register_forward_pre_hook(
                lambda _m, _a, kw, call=call: call.__setitem__("t", kw["timestep"].tolist()), with_kwargs=True
            )
            adapter.probe(transformer).register_forward_hook(
                lambda *_, call=call, seen=seen: seen.extend(call.pop("t", []))
            )
            self.per_expert.append(seen)


@pytest.mark.parametrize(("name", "backend"), CASES)
def test_threshold_zero_gives_the_uncached_video(family, name, backend):
    _, checkpoint, uncached = family
    stages, applied, observer = load_cached(checkpoint, name, backend, EXACT[backend])
    videos = run(stages, mixed(name))
    for key, video in uncached.items():
        if backend == "tea_cache":  # one batched call per expert, every row computing: the very same calls
            assert np.array_equal(videos[key], video), key
        else:  # one call per row: float rounding only
            assert_same_image(videos[key], video)
    assert observer.skipped == 0 and observer.computed == ROWS
    assert len(applied.step_cache.caches) == 2, "one cache per expert"
    assert applied.step_cache.live_keys() == set(), "finished requests left cache state behind"


@pytest.mark.parametrize(("name", "backend"), CASES)
def test_large_threshold_skips_within_the_bound_and_restarts_on_the_second_expert(family, name, backend):
    _, checkpoint, uncached = family
    stages, applied, observer = load_cached(checkpoint, name, backend, LARGE[backend])
    computed = ComputedTimesteps(stages)
    videos = run(stages, mixed(name))
    assert observer.skipped > 0 and observer.skipped + observer.computed == ROWS
    assert all(cache.skipped + cache.computed > 0 for cache in applied.step_cache.caches), "an expert unused"
    for key, video in uncached.items():
        error = np.abs(videos[key].astype(int) - video.astype(int)).max()
        assert psnr(videos[key], video) >= MIN_PSNR_DB and error <= MAX_PIXEL_ERROR, (key, error)
    for request in mixed(name):  # each row's first step on the low-noise expert is computed, not reused
        scheduler = type(stages.pipe.scheduler).from_config(stages.pipe.scheduler.config)
        scheduler.set_timesteps(request.params.num_inference_steps)
        timesteps = scheduler.timesteps.tolist()
        first_low = next(t for t in timesteps if t < stages.boundary_timestep)
        rows = 2 if request.params.guidance_scale > 1 else 1
        assert computed.per_expert[1].count(first_low) == rows, (request.request_id, first_low, computed.per_expert)
    assert applied.step_cache.live_keys() == set()
    if backend in ("tea_cache", "mag_cache"):  # ours batches the rows; MagCache's counter joins mid-schedule
        for i, request in enumerate(mixed(name, offset=10)):  # the same request alone: the same video
            alone = run(stages, [request])[request.request_id]
            assert_same_image(alone, videos[str(i)])


@pytest.mark.parametrize("backend", ["tea_cache", "first_block_cache"])
def test_release_frees_both_experts(tiny_wan22_t2v, backend):
    from omni_backend.engine.scheduler import StepPlan
    from omni_backend.runner.model_runner import ModelRunner, RunnerOutput

    stages, applied, _ = load(tiny_wan22_t2v, "wan22_t2v", cache_backend=backend)
    high, low = applied.step_cache.caches
    runner = ModelRunner(stages, RunnerOutput.IMAGE)
    first, second = mixed("wan22_t2v")
    runner.execute(StepPlan(admitted=[second], running_ids=["1"]))  # step 0: t = 999, the high-noise expert
    assert high.live_keys() == {"1/cond", "1/uncond"} and low.live_keys() == set()
    runner.execute(StepPlan(admitted=[first], running_ids=["0", "1"]))  # "1" moves on to the low-noise expert
    assert high.live_keys() == {"0/cond"}, "a row that left the high-noise expert kept its state there"
    assert low.live_keys() == {"1/cond", "1/uncond"}
    runner.abort(["0", "1"])
    assert high.live_keys() == set() and low.live_keys() == set()


@pytest.mark.parametrize("backend", ["first_block_cache", "taylorseer"])
def test_diffusers_hooks_match_diffusers_wan_pipeline(tiny_wan22_t2v, backend):
    """Served with a diffusers cache == diffusers' WanPipeline with the same hooks on each expert (whose
    state, as ours, is the expert's own), for a CFG request crossing the boundary."""
    import torch
    from diffusers import WanPipeline

    from omni_backend.cache.config import parse_cache_config
    from omni_backend.cache.diffusers_cache import _diffusers_config

    stages, _, observer = load_cached(tiny_wan22_t2v, "wan22_t2v", backend, LARGE[backend])
    prompt, negative, cfg, steps = case = ("a dog", "blurry", 4.0, 5)
    served = run(stages, [make("wan22_t2v", 0, *case, seed=7)])["0"]
    assert observer.skipped > 0

    pipe = WanPipeline.from_pretrained(tiny_wan22_t2v, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    settings = parse_cache_config(backend, json.dumps(LARGE[backend]))
    for expert in (pipe.transformer, pipe.transformer_2):
        expert.enable_cache(_diffusers_config(settings, stages.step_cache_adapter()))
    generator = torch.Generator("cpu").manual_seed(7)
    frames = pipe(
        prompt=prompt, negative_prompt=negative, guidance_scale=cfg, height=32, width=32, num_frames=5,
        num_inference_steps=steps, generator=generator, output_type="np",
    ).frames[0]  # fmt: skip
    assert np.array_equal(served, (frames * 255).round().astype(np.uint8))
