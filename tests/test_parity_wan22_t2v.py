"""Wan2.2 T2V (two experts): the runner's videos equal diffusers' WanPipeline frame for frame, alone and batched."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omni_backend.config import RequestLimits
from omni_backend.pipelines.base import Component
from omni_backend.pipelines.wan import WanOptions, WanT2VStages
from omni_backend.request import DiffusionRequest, InvalidRequestError, SamplingParams, parse_sampling_params
from omni_backend.runner.model_runner import RunnerOutput
from omni_backend.testing.compare import assert_same_image
from tests.test_parity import run

pytestmark = pytest.mark.slow

# (prompt, seed, negative_prompt, guidance_scale, guidance_scale_2, steps, frames)
CASES = [
    ("a red circle on a blue background", 1, None, 4.0, 2.0, 4, 5),  # CFG with "" as the negative prompt
    ("a green square, 猫", 2, "blurry", 5.0, None, 3, 5),  # guidance_scale_2 defaults to guidance_scale
    ("a yellow triangle", 3, None, 1.0, None, 2, 5),  # no CFG
]


@pytest.fixture(scope="module")
def stages(tiny_wan22_t2v) -> WanT2VStages:
    return WanT2VStages.load(str(tiny_wan22_t2v), Component.ALL, torch.float32, torch.device("cpu"), WanOptions())


def make(i, prompt, seed, negative, guidance, guidance_2, steps, frames) -> DiffusionRequest:
    params = SamplingParams(32, 48, steps, guidance, 1.0, seed, num_frames=frames, guidance_scale_2=guidance_2)
    return DiffusionRequest(str(i), params, prompt=prompt, negative_prompt=negative)


def reference(render, prompt, seed, negative, guidance, guidance_2, steps, frames) -> np.ndarray:
    return render(
        prompt,
        seed,
        negative_prompt=negative,
        guidance_scale=guidance,
        guidance_scale_2=guidance_2,
        height=32,
        width=48,
        num_frames=frames,
        num_inference_steps=steps,
    )


def test_both_experts_take_part(stages):
    """The 4-step schedule crosses boundary_ratio: both experts run (else the test proves nothing about them)."""
    request = make(0, *CASES[0])
    timesteps = stages.prepare(request, stages.encode([request])[0]).timesteps
    high = [bool(t >= stages.boundary_timestep) for t in timesteps]
    assert True in high and False in high, timesteps


def test_alone_matches_diffusers(stages, wan22_t2v_reference):
    outputs, calls = run(stages, [make(0, *CASES[0])])
    assert calls == CASES[0][5]
    video = outputs["0"].outputs["video"]
    assert video.shape == (5, 32, 48, 3)
    assert_same_image(video, reference(wan22_t2v_reference, *CASES[0]))


def test_batch_matches_diffusers_frame_for_frame(stages, wan22_t2v_reference):
    outputs, calls = run(stages, [make(i, *case) for i, case in enumerate(CASES)])
    assert calls == max(case[5] for case in CASES)
    for i, case in enumerate(CASES):
        video, expected = outputs[str(i)].outputs["video"], reference(wan22_t2v_reference, *case)
        for frame in range(case[6]):
            assert_same_image(video[frame], expected[frame])


def test_stage_split_matches_one_model(tiny_wan22_t2v, stages):
    load = lambda c: WanT2VStages.load(str(tiny_wan22_t2v), c, torch.float32, torch.device("cpu"), WanOptions())  # noqa: E731
    text, transformer, vae = load(Component.TEXT_ENCODER), load(Component.TRANSFORMER), load(Component.VAE)
    assert text.pipe.transformer_2 is None and transformer.pipe.vae is None and vae.pipe.text_encoder is None
    requests = [make(i, *case) for i, case in enumerate(CASES[:2])]
    staged = []
    for r, cond in zip(requests, text.encode(requests), strict=True):
        arrays = {k: v.numpy() for k, v in cond.items()}
        staged.append(
            DiffusionRequest(r.request_id, r.params, conditioning=transformer.conditioning_from_arrays(arrays))
        )
    latents, _ = run(transformer, staged, RunnerOutput.LATENTS)
    whole, _ = run(stages, [make(i, *case) for i, case in enumerate(CASES[:2])])
    for i in range(2):
        array = latents[str(i)].outputs["latents"]
        assert array.shape == (16, 2, 4, 6)
        video = vae.decode([vae.latents_from_array(array, RequestLimits())])[0]
        assert_same_image(video, whole[str(i)].outputs["video"])


def test_num_frames_the_vae_cannot_take_is_refused(stages):
    base = {"height": np.int32(32), "width": np.int32(48)}
    for frames in (6, 0, 10_000):
        with pytest.raises(InvalidRequestError, match="num_frames") as info:
            parse_sampling_params({**base, "num_frames": np.int32(frames)}, stages.defaults, RequestLimits())
        assert info.value.field == "num_frames"
    assert parse_sampling_params({**base, "num_frames": np.int32(9)}, stages.defaults, RequestLimits()).num_frames == 9
    with pytest.raises(InvalidRequestError, match=r"latents: expected shape \[16, latent frames"):
        stages.latents_from_array(np.zeros((16, 4, 6), np.float32), RequestLimits())
