"""LongCat-Image: the runner's images equal diffusers' LongCatImagePipeline, alone and step-batched."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omni_backend.config import ConfigError, RequestLimits
from omni_backend.pipelines.base import Component
from omni_backend.pipelines.longcat_image import LongCatImageOptions, LongCatImageStages
from omni_backend.request import DiffusionRequest, InvalidRequestError, SamplingParams
from omni_backend.runner.model_runner import RunnerOutput
from omni_backend.testing.compare import assert_same_image
from tests.test_parity import run

pytestmark = pytest.mark.slow

# (prompt, seed, negative_prompt, guidance_scale, steps): quoted text is tokenized character by character
CASES = [
    ("a red circle on a blue background", 1, None, 1.0, 3),  # no CFG
    ("a green square with the word 'cat', 猫 🐱", 2, "blurry and dark, low quality", 6.0, 4),
    ("a yellow triangle", 3, None, 4.5, 2),  # CFG against the empty prompt
]


def load(checkpoint, components=Component.ALL, **options) -> LongCatImageStages:
    return LongCatImageStages.load(
        str(checkpoint), components, torch.float32, torch.device("cpu"), LongCatImageOptions(**options)
    )


@pytest.fixture(scope="module")
def stages(tiny_longcat_image) -> LongCatImageStages:
    return load(tiny_longcat_image)


def make(i: int, prompt: str, seed: int, negative: str | None, guidance: float, steps: int) -> DiffusionRequest:
    return DiffusionRequest(
        str(i), SamplingParams(64, 96, steps, guidance, 1.0, seed), prompt=prompt, negative_prompt=negative
    )


def reference(render, prompt: str, seed: int, negative: str | None, guidance: float, steps: int, **kw) -> np.ndarray:
    return render(
        prompt, seed, negative_prompt=negative, guidance_scale=guidance, height=64, width=96,
        num_inference_steps=steps, **kw,
    )  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=["plain", "cfg_negative", "cfg_empty"])
def test_alone_matches_diffusers(stages, longcat_image_reference, case):
    outputs, calls = run(stages, [make(0, *case)])
    assert calls == case[4]
    assert_same_image(outputs["0"].outputs["image"], reference(longcat_image_reference, *case))


def test_batch_matches_diffusers_with_one_call_per_step(stages, longcat_image_reference):
    """Different seeds, steps, prompts and CFG in one transformer call per step."""
    outputs, calls = run(stages, [make(i, *case) for i, case in enumerate(CASES)])
    assert calls == max(case[4] for case in CASES)
    for i, case in enumerate(CASES):
        assert_same_image(outputs[str(i)].outputs["image"], reference(longcat_image_reference, *case))
    a, b = outputs["0"].outputs["image"], outputs["1"].outputs["image"]
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 1, "different prompts and seeds gave the same image"


def test_cfg_renorm_options_match_diffusers(tiny_longcat_image):
    """Latents, not pixels: with random tiny weights the renorm moves pixels by less than the image tolerance."""
    from diffusers import LongCatImagePipeline

    pipe = LongCatImagePipeline.from_pretrained(tiny_longcat_image, dtype=torch.float32, text_processor=None)
    pipe.set_progress_bar_config(disable=True)
    prompt, seed, negative, guidance, steps = CASES[1]

    def expected(**renorm) -> torch.Tensor:
        packed = pipe(
            prompt, negative_prompt=negative, guidance_scale=guidance, height=64, width=96, num_inference_steps=steps,
            generator=torch.Generator("cpu").manual_seed(seed), output_type="latent", enable_prompt_rewrite=False,
            **renorm,
        ).images  # fmt: skip
        return pipe._unpack_latents(packed, 64, 96, pipe.vae_scale_factor)[0]

    def served(**renorm) -> torch.Tensor:
        outputs, _ = run(load(tiny_longcat_image, **renorm), [make(0, *CASES[1])], RunnerOutput.LATENTS)
        return torch.from_numpy(outputs["0"].outputs["latents"])

    variants = [{}, {"enable_cfg_renorm": False}, {"cfg_renorm_min": 1.0}]  # min 1: no rescale either
    references = [expected(**v) for v in variants]
    for variant, reference_latents in zip(variants, references, strict=True):
        torch.testing.assert_close(served(**variant), reference_latents, atol=1e-4, rtol=1e-4)
    for other in references[1:]:
        assert (other - references[0]).abs().max() > 1e-2, "the renorm options changed nothing: the test could not fail"
    with pytest.raises(ConfigError, match=r"cfg_renorm_min: 1.5 is outside \[0, 1\]"):
        load(tiny_longcat_image, cfg_renorm_min=1.5)


def test_stage_split_matches_one_model(tiny_longcat_image, stages):
    """Ensemble path in-process: text-encoder stage -> transformer stage (latents) -> VAE stage."""
    text, transformer, vae = (
        load(tiny_longcat_image, c) for c in (Component.TEXT_ENCODER, Component.TRANSFORMER, Component.VAE)
    )
    assert text.pipe.transformer is None and transformer.pipe.vae is None and vae.pipe.text_encoder is None
    requests = [make(i, *case) for i, case in enumerate(CASES)]
    conditioning = text.encode(requests)
    assert "negative_prompt_embeds" in conditioning[2] and "negative_prompt_embeds" not in conditioning[0]
    assert {c["prompt_embeds"].shape for c in conditioning} == {(512, stages.joint_attention_dim)}
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


def test_bad_conditioning_and_latents_name_the_field(stages):
    width = stages.joint_attention_dim
    with pytest.raises(InvalidRequestError, match="prompt_embeds: is required"):
        stages.conditioning_from_arrays({})
    with pytest.raises(InvalidRequestError, match=r"prompt_embeds: expected shape \[512, 32\], got \[3, 32\]"):
        stages.conditioning_from_arrays({"prompt_embeds": np.zeros((3, width), np.float32)})
    full = np.zeros((512, width), np.float32)
    with pytest.raises(InvalidRequestError, match=r"negative_prompt_embeds: expected shape"):
        stages.conditioning_from_arrays({"prompt_embeds": full, "negative_prompt_embeds": full[:, :7]})
    arrays = {"prompt_embeds": full, "guidance_scale": np.array([4.5], np.float32)}
    with pytest.raises(InvalidRequestError, match="negative_prompt_embeds: is required when guidance_scale > 1"):
        stages.parse_conditioned_request("r", arrays, RequestLimits())
    with pytest.raises(InvalidRequestError, match=r"latents: expected shape \[16, H/8, W/8\]"):
        stages.latents_from_array(np.zeros((16, 1, 8, 8), np.float32), RequestLimits())
