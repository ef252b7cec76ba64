"""The runner's images equal diffusers' FluxPipeline for the same checkpoint, seed and parameters."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omni_backend.config import EngineConfig, RequestLimits
from omni_backend.engine.scheduler import StepScheduler
from omni_backend.pipelines.base import Component
from omni_backend.pipelines.flux import FluxOptions, FluxStages
from omni_backend.request import DiffusionRequest, SamplingParams
from omni_backend.runner.model_runner import ModelRunner, RunnerOutput
from omni_backend.testing.compare import assert_same_image

# (prompt, seed, negative_prompt, true_cfg_scale, steps)
CASES = [
    ("a red circle on a blue background", 1, None, 1.0, 3),
    ("a green square, 猫 🐱", 2, "blurry", 3.0, 4),
    ("a yellow triangle", 3, "dark", 1.0, 5),  # negative prompt without true CFG: ignored, as in diffusers
]


@pytest.fixture(scope="module")
def stages(tiny_flux) -> FluxStages:
    return FluxStages.load(str(tiny_flux), Component.ALL, torch.float32, torch.device("cpu"), FluxOptions())


def run(stages: FluxStages, requests: list[DiffusionRequest], output=RunnerOutput.IMAGE, max_num_seqs=8):
    """Drive scheduler + runner to completion; count transformer calls."""
    runner = ModelRunner(stages, output)
    scheduler = StepScheduler(EngineConfig(max_num_seqs=max_num_seqs), stages.batch_key)
    for r in requests:
        scheduler.add(r)
    outputs, calls = {}, 0
    while scheduler.has_work():
        plan = scheduler.schedule()
        result = runner.execute(plan)
        scheduler.update(plan, result)
        calls += 1
        outputs.update({o.request_id: o for o in result.finished})
    assert not runner.states, "finished requests must leave no state behind"
    return outputs, calls


def make(i: int, prompt: str, seed: int, negative: str | None, cfg: float, steps: int) -> DiffusionRequest:
    return DiffusionRequest(
        str(i), SamplingParams(64, 96, steps, 3.5, cfg, seed), prompt=prompt, negative_prompt=negative
    )


@pytest.mark.parametrize("case", CASES, ids=["plain", "true_cfg", "negative_without_cfg"])
def test_alone_matches_diffusers(stages, flux_reference, case):
    prompt, seed, negative, cfg, steps = case
    outputs, calls = run(stages, [make(0, *case)])
    assert calls == steps
    expected = flux_reference(
        prompt, seed, negative_prompt=negative, true_cfg_scale=cfg, height=64, width=96, num_inference_steps=steps
    )
    assert_same_image(outputs["0"].outputs["image"], expected)


def test_batch_of_three_matches_diffusers_with_one_call_per_step(stages, flux_reference):
    requests = [make(i, *case) for i, case in enumerate(CASES)]
    outputs, calls = run(stages, requests)
    assert calls == max(case[4] for case in CASES)  # every step served all running requests at once
    for i, (prompt, seed, negative, cfg, steps) in enumerate(CASES):
        expected = flux_reference(
            prompt, seed, negative_prompt=negative, true_cfg_scale=cfg, height=64, width=96, num_inference_steps=steps
        )
        assert_same_image(outputs[str(i)].outputs["image"], expected)
    a, b = outputs["0"].outputs["image"], outputs["1"].outputs["image"]
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 1, "different prompts and seeds gave the same image"


def test_each_request_keeps_its_guidance_scale_in_a_shared_call(stages, flux_reference):
    # the guidance embedding's input is made once per request (on the device) and batched per call
    scales = (1.5, 6.0)
    requests = [
        DiffusionRequest(str(i), SamplingParams(64, 64, 3, scale, 1.0, 5), prompt="a blue square")
        for i, scale in enumerate(scales)
    ]
    outputs, calls = run(stages, requests)
    assert calls == 3
    for i, scale in enumerate(scales):
        expected = flux_reference("a blue square", 5, guidance_scale=scale, height=64, width=64, num_inference_steps=3)
        assert_same_image(outputs[str(i)].outputs["image"], expected)
    a, b = outputs["0"].outputs["image"], outputs["1"].outputs["image"]
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 1, "the guidance scale changed nothing"


def test_stage_split_matches_one_model(tiny_flux, stages):
    """Ensemble path in-process: text-encoder stage -> transformer stage (latents) -> VAE stage."""
    load = lambda c: FluxStages.load(str(tiny_flux), c, torch.float32, torch.device("cpu"), FluxOptions())  # noqa: E731
    text, transformer, vae = load(Component.TEXT_ENCODER), load(Component.TRANSFORMER), load(Component.VAE)
    assert text.pipe.transformer is None and transformer.pipe.vae is None and vae.pipe.text_encoder is None
    requests = [make(i, *case) for i, case in enumerate(CASES)]
    conditioning = text.encode(requests)
    assert "negative_prompt_embeds" in conditioning[1] and "negative_prompt_embeds" not in conditioning[2]
    staged = []
    for r, cond in zip(requests, conditioning, strict=True):
        arrays = {k: v.numpy() for k, v in cond.items()}
        staged.append(
            DiffusionRequest(r.request_id, r.params, conditioning=transformer.conditioning_from_arrays(arrays))
        )
    latents, _ = run(transformer, staged, RunnerOutput.LATENTS)
    whole, _ = run(stages, [make(i, *case) for i, case in enumerate(CASES)])
    for i in range(len(CASES)):
        array = latents[str(i)].outputs["latents"]
        assert array.shape == (16, 8, 12)
        image = vae.decode([vae.latents_from_array(array, RequestLimits())])[0]
        assert_same_image(image, whole[str(i)].outputs["image"])


def test_max_num_seqs_one_runs_requests_one_at_a_time(stages):
    requests = [make(i, *case) for i, case in enumerate(CASES)]
    _, calls = run(stages, requests, max_num_seqs=1)
    assert calls == sum(case[4] for case in CASES)


def test_default_size_is_the_checkpoints(stages):
    """Requests without height/width get the size the checkpoint's VAE declares (tiny: 64; FLUX.1: 1024)."""
    assert stages.pipe.vae.config.sample_size == 64
    assert (stages.defaults.height, stages.defaults.width) == (64, 64)
