"""Qwen-Image: the runner's images equal diffusers' QwenImagePipeline, alone and step-batched."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omni_backend.config import RequestLimits
from omni_backend.pipelines.base import Component
from omni_backend.pipelines.qwen_image import QwenImageOptions, QwenImageStages
from omni_backend.request import DiffusionRequest, InvalidRequestError, SamplingParams
from omni_backend.runner.model_runner import RunnerOutput
from omni_backend.testing.compare import assert_same_image
from tests.test_parity import run

pytestmark = pytest.mark.slow

# (prompt, seed, negative_prompt, true_cfg_scale, steps): prompts of different token lengths
CASES = [
    ("a red circle on a blue background", 1, None, 1.0, 3),
    ("a green square, 猫 🐱", 2, "blurry and dark, low quality", 4.0, 4),
]


@pytest.fixture(scope="module")
def stages(tiny_qwen_image) -> QwenImageStages:
    return QwenImageStages.load(
        str(tiny_qwen_image), Component.ALL, torch.float32, torch.device("cpu"), QwenImageOptions()
    )


def make(i: int, prompt: str, seed: int, negative: str | None, cfg: float, steps: int) -> DiffusionRequest:
    return DiffusionRequest(
        str(i), SamplingParams(64, 96, steps, 1.0, cfg, seed), prompt=prompt, negative_prompt=negative
    )


def reference(render, prompt: str, seed: int, negative: str | None, cfg: float, steps: int) -> np.ndarray:
    return render(
        prompt, seed, negative_prompt=negative, true_cfg_scale=cfg, height=64, width=96, num_inference_steps=steps
    )


@pytest.mark.parametrize("case", CASES, ids=["plain", "true_cfg"])
def test_alone_matches_diffusers(stages, qwen_image_reference, case):
    outputs, calls = run(stages, [make(0, *case)])
    assert calls == case[4]
    assert_same_image(outputs["0"].outputs["image"], reference(qwen_image_reference, *case))


def test_batch_matches_diffusers_with_one_call_per_step(stages, qwen_image_reference):
    """Different seeds, steps, text lengths and CFG in one transformer call per step (text padded + masked)."""
    outputs, calls = run(stages, [make(i, *case) for i, case in enumerate(CASES)])
    assert calls == max(case[4] for case in CASES)
    for i, case in enumerate(CASES):
        assert_same_image(outputs[str(i)].outputs["image"], reference(qwen_image_reference, *case))
    a, b = outputs["0"].outputs["image"], outputs["1"].outputs["image"]
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 1, "different prompts and seeds gave the same image"


def test_stage_split_matches_one_model(tiny_qwen_image, stages):
    """Ensemble path in-process: text-encoder stage -> transformer stage (latents) -> VAE stage."""
    load = lambda c: QwenImageStages.load(  # noqa: E731
        str(tiny_qwen_image), c, torch.float32, torch.device("cpu"), QwenImageOptions()
    )
    text, transformer, vae = load(Component.TEXT_ENCODER), load(Component.TRANSFORMER), load(Component.VAE)
    assert text.pipe.transformer is None and transformer.pipe.vae is None and vae.pipe.text_encoder is None
    requests = [make(i, *case) for i, case in enumerate(CASES)]
    conditioning = text.encode(requests)
    assert "negative_prompt_embeds" in conditioning[1] and "negative_prompt_embeds" not in conditioning[0]
    assert conditioning[0]["prompt_embeds"].shape[0] != conditioning[1]["prompt_embeds"].shape[0]
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
        assert array.shape == (16, 1, 8, 12)
        image = vae.decode([vae.latents_from_array(array, RequestLimits())])[0]
        assert_same_image(image, whole[str(i)].outputs["image"])


def test_bad_conditioning_and_latents_name_the_field(stages):
    width = stages.joint_attention_dim
    with pytest.raises(InvalidRequestError, match="prompt_embeds: is required"):
        stages.conditioning_from_arrays({})
    with pytest.raises(InvalidRequestError, match=r"negative_prompt_embeds: expected shape"):
        stages.conditioning_from_arrays(
            {"prompt_embeds": np.zeros((3, width), np.float32), "negative_prompt_embeds": np.zeros((3, 7), np.float32)}
        )
    with pytest.raises(InvalidRequestError, match=r"prompt_embeds: sequence length = 513 is outside \[1, 512\]"):
        stages.conditioning_from_arrays({"prompt_embeds": np.zeros((513, width), np.float32)})
    with pytest.raises(InvalidRequestError, match=r"latents: expected shape \[16, 1, H/8, W/8\]"):
        stages.latents_from_array(np.zeros((16, 8, 8), np.float32), RequestLimits())
