"""LongCat-Image with the family-independent acceleration: prompt-embedding cache, offload, VAE slicing/tiling."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from omni_backend.config import EngineConfig, parse_model_config
from omni_backend.engine.scheduler import StepScheduler
from omni_backend.pipelines.base import Component
from omni_backend.pipelines.longcat_image import LongCatImageOptions
from omni_backend.request import DiffusionRequest, SamplingParams
from omni_backend.runner.model_runner import ModelRunner, RunnerOutput, load_accelerated
from omni_backend.runner.warmup import warm_up_runner, warm_up_text_encoder, warm_up_vae
from omni_backend.testing.compare import assert_same_image
from tests.acceleration.conftest import CountingObserver

pytestmark = pytest.mark.slow

# (prompt, seed, negative_prompt, guidance_scale, steps): without CFG, CFG against "", CFG with a negative prompt
CASES = [("a red circle", 1, None, 1.0, 2), ("a green square", 2, None, 4.5, 3), ("a cat", 3, "blurry", 6.0, 2)]


def load(checkpoint, components: Component = Component.ALL, **parameters: str):
    config = parse_model_config(
        {"family": "longcat_image", "model": str(checkpoint), **parameters}, LongCatImageOptions
    )
    observer = CountingObserver()
    stages, applied = load_accelerated(config, components, torch.device("cpu"), observer)
    return stages, applied, observer


def make(i: int, prompt: str, seed: int, negative: str | None, guidance: float, steps: int) -> DiffusionRequest:
    return DiffusionRequest(
        str(i), SamplingParams(64, 64, steps, guidance, 1.0, seed), prompt=prompt, negative_prompt=negative
    )


def run(stages) -> dict[str, np.ndarray]:
    runner = ModelRunner(stages, RunnerOutput.IMAGE)
    scheduler = StepScheduler(EngineConfig(max_num_seqs=8), stages.batch_key)
    for i, case in enumerate(CASES):
        scheduler.add(make(i, *case))
    images = {}
    while scheduler.has_work():
        plan = scheduler.schedule()
        result = runner.execute(plan)
        scheduler.update(plan, result)
        images.update({o.request_id: o.outputs["image"] for o in result.finished})
    return images


@pytest.fixture(scope="module")
def plain(tiny_longcat_image) -> dict[str, np.ndarray]:
    return run(load(tiny_longcat_image)[0])


def test_prompt_cache_hit_skips_the_encoder_and_gives_the_same_image(tiny_longcat_image, plain):
    stages, _, observer = load(tiny_longcat_image, enable_prompt_embed_cache="true")
    calls = [0]
    stages.pipe.text_encoder.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    first = run(stages)
    encoder_calls = calls[0]
    again = run(stages)
    assert calls[0] == encoder_calls > 0, "a cache hit ran the text encoder"
    assert (observer.hits, observer.misses) == (3, 3)
    for key, image in plain.items():
        assert np.array_equal(first[key], image) and np.array_equal(again[key], image)


def test_prompt_cache_key_holds_what_the_encoder_used(tiny_longcat_image):
    stages, _, observer = load(tiny_longcat_image, Component.TEXT_ENCODER, enable_prompt_embed_cache="true")
    stages.encode([make(0, "a cat", 1, "blurry", 1.0, 2)])  # no CFG: the negative prompt is not encoded
    out = stages.encode([make(1, "a cat", 2, None, 1.0, 2)])[0]
    assert (observer.hits, observer.misses) == (1, 1) and "negative_prompt_embeds" not in out
    with_cfg = stages.encode([make(2, "a cat", 1, None, 4.5, 2)])[0]  # CFG against "": a new entry
    assert observer.misses == 2 and "negative_prompt_embeds" in with_cfg
    empty = stages.encode([make(3, "a cat", 1, "", 3.0, 2)])[0]  # "" is what None means under CFG
    assert observer.hits == 2 and torch.equal(empty["negative_prompt_embeds"], with_cfg["negative_prompt_embeds"])


@pytest.mark.parametrize(
    "parameters",
    [
        {"offload": "model", "vae_slicing": "true"},
        {"offload": "layerwise", "offload_window": "1", "vae_tiling": "true"},
    ],
    ids=["model+slicing", "layerwise+tiling"],
)
def test_offload_and_vae_options_give_the_same_image(tiny_longcat_image, plain, parameters):
    stages, _, observer = load(tiny_longcat_image, **parameters)
    images = run(stages)
    for key, image in plain.items():
        assert_same_image(images[key], image)  # slicing decodes one by one: float sums in another order
    assert observer.offload_bytes > 0


# threshold 0: every step computes; large: skips (random tiny weights: the bound is loose, as for FLUX)
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


@pytest.mark.parametrize("backend", sorted(EXACT))
def test_step_cache_threshold_zero_gives_the_uncached_image_and_large_skips(tiny_longcat_image, plain, backend):
    stages, applied, observer = load(tiny_longcat_image, cache_backend=backend, cache_config=json.dumps(EXACT[backend]))
    images = run(stages)
    for key, image in plain.items():
        assert_same_image(images[key], image)  # diffusers' hooks run one row per call: float rounding only
    assert observer.skipped == 0 and observer.computed > 0 and applied.step_cache.live_keys() == set()
    stages, applied, observer = load(tiny_longcat_image, cache_backend=backend, cache_config=json.dumps(LARGE[backend]))
    images = run(stages)
    rows = sum(case[4] * (2 if case[3] > 1 else 1) for case in CASES)  # CFG: two rows per step
    assert observer.skipped > 0 and observer.skipped + observer.computed == rows
    for key, image in plain.items():
        assert np.abs(images[key].astype(int) - image.astype(int)).max() <= 64, key
    assert applied.step_cache.live_keys() == set()


def test_warm_up_runs_every_stage_alone_and_paired_and_leaves_nothing_behind(tiny_longcat_image, plain):
    stages, _, _ = load(tiny_longcat_image)
    rows: list[int] = []
    stages.pipe.transformer.register_forward_hook(
        lambda _m, _args, kwargs, _out: rows.append(kwargs["hidden_states"].shape[0]), with_kwargs=True
    )
    runner = ModelRunner(stages, RunnerOutput.IMAGE)
    warm_up_runner(runner, stages, [(64, 64), (32, 48)], encode=True)
    assert runner.states == {}
    assert rows == [2, 2, 4, 4] * 2, "per size: 2 steps alone, then 2 paired, both CFG branches in each call"
    images = run(stages)  # and the model serves as a cold one
    for key, image in plain.items():
        assert_same_image(images[key], image)
    warm_up_text_encoder(load(tiny_longcat_image, Component.TEXT_ENCODER)[0], [(64, 64)])
    vae = load(tiny_longcat_image, Component.VAE)[0]
    warm_up_vae(vae, [(64, 64), (32, 48)])
    transformer = load(tiny_longcat_image, Component.TRANSFORMER)[0]
    warm_up_runner(ModelRunner(transformer, RunnerOutput.LATENTS), transformer, [(64, 64)], encode=False)


def test_regional_compile_warms_up_and_never_recompiles(tiny_longcat_image, plain):
    from torch._dynamo.utils import counters

    graphs_before = counters["stats"]["unique_graphs"]
    stages, _, _ = load(tiny_longcat_image, compile="regional", warmup_sizes="64x64")
    warm_up_runner(ModelRunner(stages, RunnerOutput.IMAGE), stages, [(64, 64)], encode=True)  # what initialize runs
    warmed = counters["stats"]["unique_graphs"]
    assert warmed > graphs_before, "nothing was compiled at load"
    images = run(stages)  # CFG and plain rows, 1 to 4 rows a call
    assert counters["stats"]["unique_graphs"] == warmed, "a request of the warmed shape recompiled"
    for key, image in plain.items():
        assert_same_image(images[key], image)
