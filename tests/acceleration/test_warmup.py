"""Warm-up at load (runner/warmup.py): the configured shapes run through the real runner, alone and as
a pair, leave no state behind, and bad sizes fail the load naming ``warmup_sizes``."""

from __future__ import annotations

import pytest

from omni_backend.config import ConfigError
from omni_backend.pipelines.base import Component
from omni_backend.runner.model_runner import ModelRunner, RunnerOutput
from omni_backend.runner.warmup import warm_up_runner, warm_up_text_encoder, warm_up_vae, warmup_sizes
from omni_backend.testing.compare import assert_same_image
from tests.acceleration.conftest import MIXED, load, make, run

pytestmark = pytest.mark.slow


def _record(stages, verb: str) -> list[int]:
    """Wrap ``stages.<verb>`` to record the batch size of every call."""
    sizes: list[int] = []
    inner = getattr(stages, verb)

    def recorded(batch, *args):
        sizes.append(len(batch))
        return inner(batch, *args)

    setattr(stages, verb, recorded)
    return sizes


@pytest.mark.parametrize(
    ("sizes", "expected"),
    [("", []), ("64x64", [(64, 64)]), ("64x64,32x48", [(64, 64), (32, 48)])],
)
def test_sizes_are_parsed(tiny_flux, sizes, expected):
    stages, _, _ = load(tiny_flux, warmup_sizes=sizes)
    config_sizes = warmup_sizes(_config(tiny_flux, warmup_sizes=sizes), stages)
    assert config_sizes == expected


def test_compile_warms_the_default_size_when_none_is_given(tiny_flux):
    stages, _, _ = load(tiny_flux, Component.VAE)  # compile itself is not needed to read the sizes
    config = _config(tiny_flux, compile="regional")
    assert warmup_sizes(config, stages) == [(stages.defaults.height, stages.defaults.width)]


@pytest.mark.parametrize("sizes", ["60x64", "64x0", "4096x4096"])
def test_sizes_the_model_cannot_serve_fail_the_load(tiny_flux, sizes):
    stages, _, _ = load(tiny_flux, Component.VAE)
    with pytest.raises(ConfigError, match="warmup_sizes"):
        warmup_sizes(_config(tiny_flux, warmup_sizes=sizes), stages)


def test_runner_warm_up_runs_alone_and_paired_and_leaves_nothing_behind(tiny_flux, uncached):
    # a step cache keeps state per request: the warm-up's must be released like any request's
    stages, applied, observer = load(tiny_flux, cache_backend="tea_cache", cache_config='{"rel_l1_thresh": 0.0}')
    encoded, denoised, decoded = _record(stages, "encode"), _record(stages, "denoise"), _record(stages, "decode")
    runner = ModelRunner(stages, RunnerOutput.IMAGE)
    warm_up_runner(runner, stages, [(64, 64), (32, 48)], encode=True)
    assert encoded == [1, 2, 1, 2]  # the text encoders ran: a one-model pipeline warms all of its stages
    assert denoised == [1, 1, 2, 2] * 2  # each size alone, then two requests in ONE transformer call
    assert decoded == [1, 2, 1, 2]
    assert runner.states == {} and applied.step_cache.live_keys() == set()
    # and the model serves exactly as a cold one (threshold 0: the cache never skips)
    images = run(stages, [make(i, *case) for i, case in enumerate(MIXED)])
    for key, image in uncached.items():
        assert_same_image(images[key], image)
    assert observer.computed > 0


def test_transformer_stage_warms_with_placeholder_conditioning(tiny_flux):
    stages, _, _ = load(tiny_flux, Component.TRANSFORMER)
    denoised = _record(stages, "denoise")
    runner = ModelRunner(stages, RunnerOutput.LATENTS)
    warm_up_runner(runner, stages, [(64, 64)], encode=False)
    assert denoised == [1, 1, 2, 2] and runner.states == {}


def test_text_encoder_and_vae_stages_warm_up(tiny_flux):
    encoder, _, _ = load(tiny_flux, Component.TEXT_ENCODER)
    encoded = _record(encoder, "encode")
    warm_up_text_encoder(encoder, [(64, 64)])
    assert encoded == [1, 2]
    vae, _, _ = load(tiny_flux, Component.VAE)
    decoded = _record(vae, "decode")
    warm_up_vae(vae, [(64, 64), (32, 48)])
    assert decoded == [1, 2, 1, 2]


def test_a_failing_warm_up_fails_the_load(tiny_flux):
    stages, _, _ = load(tiny_flux)

    def broken(states):
        raise RuntimeError("no kernel for this shape")

    stages.denoise = broken
    with pytest.raises(RuntimeError, match="warm-up at 64x64 failed: .*no kernel for this shape"):
        warm_up_runner(ModelRunner(stages, RunnerOutput.IMAGE), stages, [(64, 64)], encode=True)


def _config(tiny_flux, **parameters: str):
    from omni_backend.config import parse_model_config
    from omni_backend.pipelines.flux import FluxOptions

    return parse_model_config({"family": "flux", "model": str(tiny_flux), **parameters}, FluxOptions)


@pytest.mark.parametrize("family", ["wan22_t2v", "wan22_i2v"])
def test_video_family_warms_both_experts_and_its_vae(family, request):
    import torch

    from omni_backend.pipelines.wan import WanOptions
    from omni_backend.registry import resolve_family

    checkpoint = request.getfixturevalue(f"tiny_{family}")
    cpu = torch.device("cpu")
    stages = resolve_family(family).load(str(checkpoint), Component.ALL, torch.float32, cpu, WanOptions())
    calls = {"transformer": 0, "transformer_2": 0}
    for name in calls:
        getattr(stages.pipe, name).register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    decoded, encoded = _record(stages, "decode"), _record(stages, "encode")
    runner = ModelRunner(stages, RunnerOutput.IMAGE)
    warm_up_runner(runner, stages, [(32, 32)], encode=True)
    assert calls == {"transformer": 2, "transformer_2": 2}  # 2 steps cross the boundary, alone and paired
    assert runner.states == {} and decoded == [1, 2] and encoded == [1, 2]
    # the transformer stage: placeholder conditioning (the image-to-video one has its image condition)
    warm_up_runner(ModelRunner(stages, RunnerOutput.LATENTS), stages, [(32, 32)], encode=False)
    assert calls == {"transformer": 4, "transformer_2": 4} and encoded == [1, 2]
    warm_up_text_encoder(stages, [(32, 32)])  # the encoder stage (image-to-video: VAE-encodes the image too)
    assert encoded == [1, 2, 1, 2]
    warm_up_vae(stages, [(32, 32)])
    assert decoded == [1, 2, 1, 2]
