"""Offload, the prompt-embedding cache and warm-up on the families beyond FLUX (Qwen-Image, its edit
variant, Wan2.2 text- and image-to-video with two experts): each gives the unaccelerated output, bit
for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.hooks.group_offloading import _is_group_offload_enabled  # what ModelMixin itself asks

from omni_backend.config import parse_model_config
from omni_backend.pipelines.base import Component
from omni_backend.registry import resolve_family
from omni_backend.request import DiffusionRequest, SamplingParams
from omni_backend.runner.model_runner import ModelRunner, RunnerOutput, load_accelerated
from omni_backend.runner.warmup import warm_up_runner, warm_up_vae
from tests.acceleration.conftest import CountingObserver, run

pytestmark = pytest.mark.slow

IMAGE = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)


def load(checkpoint, family: str, **parameters: str):
    options_cls = resolve_family(family).options_cls
    config = parse_model_config({"family": family, "model": str(checkpoint), **parameters}, options_cls)
    observer = CountingObserver()
    stages, applied = load_accelerated(config, Component.ALL, torch.device("cpu"), observer)
    return stages, applied, observer


def requests(family: str, offset: int = 0) -> list[DiffusionRequest]:
    """A plain and a CFG request (Wan's CFG is guidance_scale > 1, Qwen's true CFG a negative prompt)."""
    if family.startswith("wan22"):
        cases = [
            ("a cat", 1, None, SamplingParams(32, 32, 3, 1.0, 1.0, 1, num_frames=5)),
            ("a dog", 2, "blurry", SamplingParams(32, 32, 4, 4.0, 1.0, 2, num_frames=5)),
        ]
    else:
        cases = [
            ("a red circle", 1, None, SamplingParams(32, 32, 3, 1.0, 1.0, 1)),
            ("a green square", 2, "blurry", SamplingParams(32, 32, 4, 1.0, 4.0, 2)),
        ]
    out = []
    for i, (prompt, _, negative, params) in enumerate(cases):
        request = DiffusionRequest(str(i + offset), params, prompt=prompt, negative_prompt=negative)
        if family in ("qwen_image_edit", "wan22_i2v"):
            request.input_image = IMAGE if i == 0 else IMAGE[::-1].copy()
        out.append(request)
    return out


FAMILIES = ["qwen_image", "qwen_image_edit", "wan22_t2v", "wan22_i2v"]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> tuple[str, object, dict[str, np.ndarray]]:
    """(family, tiny checkpoint, its unaccelerated outputs)."""
    name = request.param
    checkpoint = request.getfixturevalue(f"tiny_{name}")
    stages, _, _ = load(checkpoint, name)
    return name, checkpoint, run(stages, requests(name))


@pytest.mark.parametrize("parameters", [{"offload": "model"}, {"offload": "layerwise", "offload_window": "2"}])
def test_offload_gives_the_same_output(family, parameters):
    name, checkpoint, plain = family
    stages, _, observer = load(checkpoint, name, **parameters)
    for offset in (0, 10):  # twice: the weights went back and forth in between
        outputs = run(stages, requests(name, offset))
        for key, expected in plain.items():
            assert np.array_equal(outputs[str(int(key) + offset)], expected)
    assert observer.offload_bytes > 0
    if parameters["offload"] == "layerwise":  # every expert got its own group-offloading hooks
        transformers = stages.module_groups()["transformer"]
        assert len(transformers) == (2 if name.startswith("wan22") else 1)
        assert all(_is_group_offload_enabled(t) for t in transformers)


def test_prompt_cache_hit_gives_the_same_output(family):
    name, checkpoint, plain = family
    stages, _, observer = load(checkpoint, name, enable_prompt_embed_cache="true")
    first = run(stages, requests(name))
    assert (observer.hits, observer.misses) == (0, 2)
    second = run(stages, requests(name, offset=10))
    assert (observer.hits, observer.misses) == (2, 2)
    for key, expected in plain.items():
        assert np.array_equal(first[key], expected) and np.array_equal(second[str(int(key) + 10)], expected)


@pytest.mark.parametrize("name", ["qwen_image_edit", "wan22_i2v"])
def test_prompt_cache_key_holds_the_input_image(request, name):
    stages, _, _ = load(request.getfixturevalue(f"tiny_{name}"), name, enable_prompt_embed_cache="true")
    a, b = requests(name)
    b.prompt, b.negative_prompt, b.params = a.prompt, a.negative_prompt, a.params
    assert stages.encode_key(a) != stages.encode_key(b), "another input image must not hit the cache"
    b.input_image = a.input_image.copy()
    assert stages.encode_key(a) == stages.encode_key(b)
    if name == "wan22_i2v":  # the condition is the image resized to the output size, over its frames
        b.params = SamplingParams(32, 32, 3, 1.0, 1.0, 1, num_frames=9)
        assert stages.encode_key(a) != stages.encode_key(b)


def test_wan_prompt_cache_key_follows_cfg(tiny_wan22_t2v):
    wan, _, _ = load(tiny_wan22_t2v, "wan22_t2v", enable_prompt_embed_cache="true")
    plain, cfg = requests("wan22_t2v")
    cfg.prompt = plain.prompt
    cfg.negative_prompt = None  # CFG on: WanPipeline encodes "" as the negative prompt
    assert wan.encode_key(cfg) == (plain.prompt, "", wan.options.max_sequence_length)
    assert wan.encode_key(plain)[1] is None  # CFG off: no negative prompt is encoded


@pytest.mark.parametrize("name", ["qwen_image", "qwen_image_edit"])
def test_qwen_families_warm_up(request, name):
    stages, _, _ = load(request.getfixturevalue(f"tiny_{name}"), name)
    calls = []
    stages.pipe.transformer.register_forward_hook(
        lambda _m, args, kwargs, out: calls.append(len(kwargs["img_shapes"])), with_kwargs=True
    )
    runner = ModelRunner(stages, RunnerOutput.IMAGE)
    for encode in (True, False):  # the one-model pipeline (prompts) and the transformer stage (placeholders)
        calls.clear()
        warm_up_runner(runner, stages, [(32, 32)], encode=encode)
        # 2 steps alone, then 2 paired; true CFG on: every request brings its negative row
        assert calls == [2, 2, 4, 4] and runner.states == {}
    decoded = []
    inner = stages.decode
    stages.decode = lambda latents: decoded.append(len(latents)) or inner(latents)
    warm_up_vae(stages, [(32, 32)])
    assert decoded == [1, 2]
