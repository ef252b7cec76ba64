"""Qwen-Image-Edit: served edits equal diffusers' QwenImageEditPipeline, alone, step-batched, split in stages."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from omni_backend.config import RequestLimits
from omni_backend.pipelines.base import Component
from omni_backend.pipelines.qwen_image_edit import QwenImageEditOptions, QwenImageEditStages
from omni_backend.request import InvalidRequestError
from omni_backend.runner.model_runner import RunnerOutput
from omni_backend.testing.compare import assert_same_image
from tests.test_parity import run

pytestmark = pytest.mark.slow

LIMITS = RequestLimits()


def input_image(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth picture (a gradient and a disc), not noise: resizing it means something."""
    y, x = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(seed)
    color = rng.integers(0, 256, 3)
    disc = (y - height / 2) ** 2 + (x - width / 3) ** 2 < (min(height, width) / 4) ** 2
    image = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], axis=-1)
    image[disc] = color
    return image.astype(np.uint8)


# (instruction, seed, negative_prompt, true_cfg_scale, steps, input image): same aspect ratio (one batching key)
CASES = [
    ("make the disc red", 1, None, 1.0, 2, input_image(48, 64, 0)),
    ("turn it into a night scene, 夜", 2, "blurry", 4.0, 3, input_image(96, 128, 1)),
]


@pytest.fixture(scope="module")
def stages(tiny_qwen_image_edit) -> QwenImageEditStages:
    return load(tiny_qwen_image_edit, Component.ALL)


def load(checkpoint, components: Component) -> QwenImageEditStages:
    return QwenImageEditStages.load(
        str(checkpoint), components, torch.float32, torch.device("cpu"), QwenImageEditOptions()
    )


def make(stages, i: int, prompt: str, seed: int, negative: str | None, cfg: float, steps: int, image: np.ndarray):
    arrays = {
        "prompt": np.array(prompt.encode()),
        "seed": np.array(seed, np.int64),
        "true_cfg_scale": np.array(cfg, np.float32),
        "num_inference_steps": np.array(steps, np.int32),
        "height": np.array(64, np.int32),
        "width": np.array(96, np.int32),
        "input_image": image,
    }
    if negative is not None:
        arrays["negative_prompt"] = np.array(negative.encode())
    return stages.parse_request(str(i), arrays, LIMITS)


def reference(render, prompt: str, seed: int, negative: str | None, cfg: float, steps: int, image: np.ndarray):
    return render(
        prompt,
        seed,
        image=Image.fromarray(image),
        negative_prompt=negative,
        true_cfg_scale=cfg,
        height=64,
        width=96,
        num_inference_steps=steps,
    )


def test_alone_matches_diffusers(stages, qwen_image_edit_reference):
    case = CASES[1]  # true CFG: both branches carry the image
    outputs, calls = run(stages, [make(stages, 0, *case)])
    assert calls == case[4]
    assert_same_image(outputs["0"].outputs["image"], reference(qwen_image_edit_reference, *case))


def test_batch_of_two_edits_matches_diffusers_with_one_call_per_step(stages, qwen_image_edit_reference):
    requests = [make(stages, i, *case) for i, case in enumerate(CASES)]
    assert stages.batch_key(requests[0]) == stages.batch_key(requests[1]) == (64, 96, (896, 1184))
    outputs, calls = run(stages, requests)
    assert calls == max(case[4] for case in CASES)
    for i, case in enumerate(CASES):
        assert_same_image(outputs[str(i)].outputs["image"], reference(qwen_image_edit_reference, *case))


def test_input_image_conditions_the_edit(stages):
    """Another input image, same instruction and seed: other VL embeddings, image latents and result.

    (Random tiny weights make the image's effect on the pixels small, but never nil.)
    """
    prompt, seed, _, _, _, image = CASES[0]
    requests = [make(stages, i, prompt, seed, None, 1.0, 2, picture) for i, picture in enumerate((image, 255 - image))]
    first, second = stages.encode(requests)
    for name in ("prompt_embeds", "image_latents"):
        assert not torch.allclose(first[name], second[name]), name
    outputs, _ = run(stages, requests)
    assert not np.array_equal(outputs["0"].outputs["image"], outputs["1"].outputs["image"])


def test_output_size_defaults_to_the_resized_input_image(stages):
    request = stages.parse_request("0", {"prompt": np.array(b"x"), "input_image": input_image(30, 40, 0)}, LIMITS)
    assert (request.params.height, request.params.width) == (896, 1184)  # calculate_dimensions(1024 * 1024, 4 / 3)


def test_stage_split_matches_one_model(tiny_qwen_image_edit, stages):
    """Ensemble path in-process: encoder stage (VL + VAE encode) -> transformer stage (latents) -> VAE stage."""
    encoder, transformer, vae = (load(tiny_qwen_image_edit, c) for c in Component)
    assert encoder.pipe.transformer is None and encoder.pipe.vae is not None, "the encoder stage VAE-encodes"
    assert transformer.pipe.vae is None and transformer.pipe.text_encoder is None and vae.pipe.text_encoder is None
    requests = [make(encoder, i, *case) for i, case in enumerate(CASES)]
    conditioning = encoder.encode(requests)
    assert conditioning[0]["image_latents"].shape == (16, 1, 112, 148)
    staged = []
    for i, cond in enumerate(conditioning):
        arrays = {k: v.numpy() for k, v in cond.items()}
        arrays.update({k: np.array(v) for k, v in (("seed", CASES[i][1]), ("num_inference_steps", CASES[i][4]))})
        arrays.update(true_cfg_scale=np.array(CASES[i][3], np.float32), height=np.array(64), width=np.array(96))
        staged.append(transformer.parse_conditioned_request(str(i), arrays, LIMITS))
    latents, _ = run(transformer, staged, RunnerOutput.LATENTS)
    whole, _ = run(stages, [make(stages, i, *case) for i, case in enumerate(CASES)])
    for i in range(len(CASES)):
        image = vae.decode([vae.latents_from_array(latents[str(i)].outputs["latents"], LIMITS)])[0]
        assert_same_image(image, whole[str(i)].outputs["image"])


def test_bad_input_image_and_conditioning_name_the_field(stages):
    base = {"prompt": np.array(b"x")}
    bad = [
        ({}, "input_image: is required"),
        ({"input_image": np.zeros((8, 8, 3), np.float32)}, "input_image: expected uint8"),
        ({"input_image": np.zeros((8, 8, 4), np.uint8)}, r"input_image: expected shape \[H, W, 3\]"),
        ({"input_image": np.zeros((8, 8), np.uint8)}, r"input_image: expected shape \[H, W, 3\]"),
        ({"input_image": np.zeros((0, 8, 3), np.uint8)}, "input_image: 0x8: each side must be in"),
        ({"input_image": np.zeros((1, 400, 3), np.uint8)}, "input_image: aspect ratio of 1x400 is too extreme"),
    ]
    for extra, message in bad:
        with pytest.raises(InvalidRequestError, match=message):
            stages.parse_request("0", {**base, **extra}, LIMITS)
    small = RequestLimits(max_input_image_pixels=100)
    with pytest.raises(InvalidRequestError, match="input_image: 10x11 = 110 pixels exceeds the limit of 100"):
        stages.parse_request("0", {**base, "input_image": np.zeros((10, 11, 3), np.uint8)}, small)
    embeds = np.zeros((3, stages.joint_attention_dim), np.float32)
    with pytest.raises(InvalidRequestError, match="image_latents: is required"):
        stages.conditioning_from_arrays({"prompt_embeds": embeds})
    with pytest.raises(InvalidRequestError, match="image_latents: latent height and width must be even"):
        stages.conditioning_from_arrays({"prompt_embeds": embeds, "image_latents": np.zeros((16, 1, 7, 8), np.float32)})
    with pytest.raises(InvalidRequestError, match=r"image_latents: expected shape"):
        stages.conditioning_from_arrays({"prompt_embeds": embeds, "image_latents": np.zeros((4, 1, 8, 8), np.float32)})
