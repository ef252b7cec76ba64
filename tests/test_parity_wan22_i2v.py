"""Wan2.2 I2V (two experts, image condition): the runner's videos equal WanImageToVideoPipeline's, alone and batched."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from omni_backend.config import ConfigError, RequestLimits
from omni_backend.pipelines.base import Component
from omni_backend.pipelines.wan import WanOptions
from omni_backend.pipelines.wan_i2v import WanI2VStages
from omni_backend.request import InvalidRequestError
from omni_backend.runner.model_runner import RunnerOutput
from omni_backend.testing.compare import assert_same_image
from tests.test_parity import run
from tests.test_parity_qwen_image_edit import input_image

pytestmark = pytest.mark.slow

LIMITS = RequestLimits()

# (prompt, seed, negative_prompt, guidance_scale, guidance_scale_2, steps, input image): input images of
# different sizes and aspect ratios (each is resized to the output size: one batching key)
CASES = [
    ("a red circle rolls away", 1, None, 4.0, 2.0, 4, input_image(48, 64, 0)),  # CFG, "" as the negative
    ("a green square, 猫", 2, "blurry", 5.0, None, 3, input_image(40, 30, 1)),  # guidance_scale_2 = guidance_scale
    ("a yellow triangle", 3, None, 1.0, None, 2, input_image(32, 48, 2)),  # no CFG
]


def load(checkpoint, components: Component = Component.ALL) -> WanI2VStages:
    return WanI2VStages.load(str(checkpoint), components, torch.float32, torch.device("cpu"), WanOptions())


@pytest.fixture(scope="module")
def stages(tiny_wan22_i2v) -> WanI2VStages:
    return load(tiny_wan22_i2v)


def arrays(prompt, seed, negative, guidance, guidance_2, steps, image, frames=5) -> dict[str, np.ndarray]:
    values = {
        "prompt": np.array(prompt.encode()),
        "seed": np.array(seed, np.int64),
        "guidance_scale": np.array(guidance, np.float32),
        "num_inference_steps": np.array(steps, np.int32),
        "height": np.array(32, np.int32),
        "width": np.array(48, np.int32),
        "num_frames": np.array(frames, np.int32),
        "input_image": image,
    }
    if negative is not None:
        values["negative_prompt"] = np.array(negative.encode())
    if guidance_2 is not None:
        values["guidance_scale_2"] = np.array(guidance_2, np.float32)
    return values


def make(stages: WanI2VStages, i: int, *case):
    return stages.parse_request(str(i), arrays(*case), LIMITS)


def reference(render, prompt, seed, negative, guidance, guidance_2, steps, image) -> np.ndarray:
    return render(
        prompt,
        seed,
        image=Image.fromarray(image),
        negative_prompt=negative,
        guidance_scale=guidance,
        guidance_scale_2=guidance_2,
        height=32,
        width=48,
        num_frames=5,
        num_inference_steps=steps,
    )


def assert_same_video(video: np.ndarray, expected: np.ndarray) -> None:
    assert video.shape == expected.shape == (5, 32, 48, 3)
    for frame in range(len(expected)):
        assert_same_image(video[frame], expected[frame])


def test_tiny_checkpoint_has_the_i2v_a14b_layout(stages):
    pipe = stages.pipe
    assert pipe.image_encoder is None and pipe.config.boundary_ratio == 0.9 and not pipe.config.expand_timesteps
    assert pipe.transformer.config.in_channels == pipe.transformer_2.config.in_channels == 16 + 4 + 16
    assert pipe.transformer.config.image_dim is None  # no CLIP image embeddings: the image conditions via the VAE


def test_both_experts_take_part(stages):
    """The 4-step schedule crosses boundary_ratio 0.9: both experts run (else the test proves nothing about them)."""
    request = make(stages, 0, *CASES[0])
    timesteps = stages.prepare(request, stages.encode([request])[0]).timesteps
    high = [bool(t >= stages.boundary_timestep) for t in timesteps]
    assert True in high and False in high, timesteps


def test_alone_matches_diffusers(stages, wan22_i2v_reference):
    outputs, calls = run(stages, [make(stages, 0, *CASES[0])])
    assert calls == CASES[0][5]
    assert_same_video(outputs["0"].outputs["video"], reference(wan22_i2v_reference, *CASES[0]))


def test_batch_matches_diffusers_frame_for_frame(stages, wan22_i2v_reference):
    requests = [make(stages, i, *case) for i, case in enumerate(CASES)]
    assert len({stages.batch_key(r) for r in requests}) == 1, "input images of any size share a step"
    outputs, calls = run(stages, requests)
    assert calls == max(case[5] for case in CASES)
    for i, case in enumerate(CASES):
        assert_same_video(outputs[str(i)].outputs["video"], reference(wan22_i2v_reference, *case))


def test_input_image_conditions_the_video(stages):
    """Another input image, same prompt and seed: another image condition and another video."""
    prompt, seed, _, _, _, steps, image = CASES[2]
    requests = [
        make(stages, i, prompt, seed, None, 1.0, None, steps, picture) for i, picture in enumerate((image, 255 - image))
    ]
    first, second = stages.encode(requests)
    assert first["image_condition"].shape == (20, 2, 4, 6)  # 4 mask channels + 16 latent channels
    assert not torch.allclose(first["image_condition"], second["image_condition"])
    torch.testing.assert_close(first["prompt_embeds"], second["prompt_embeds"])
    outputs, _ = run(stages, requests)
    assert not np.array_equal(outputs["0"].outputs["video"], outputs["1"].outputs["video"])


def test_stage_split_matches_one_model(tiny_wan22_i2v, stages):
    """Ensemble path in-process: encoder stage (UMT5 + VAE encode) -> transformer stage (latents) -> VAE stage."""
    encoder, transformer, vae = (load(tiny_wan22_i2v, c) for c in Component)
    assert encoder.pipe.vae is not None and encoder.pipe.transformer is None, "the encoder stage VAE-encodes"
    assert transformer.pipe.vae is None and transformer.pipe.text_encoder is None and vae.pipe.transformer is None
    requests = [make(encoder, i, *case) for i, case in enumerate(CASES[:2])]
    staged = []
    for i, conditioning in enumerate(encoder.encode(requests)):
        received = {k: v.numpy() for k, v in conditioning.items()}
        received.update({k: v for k, v in arrays(*CASES[i]).items() if k not in ("prompt", "negative_prompt")})
        staged.append(transformer.parse_conditioned_request(str(i), received, LIMITS))
    latents, _ = run(transformer, staged, RunnerOutput.LATENTS)
    whole, _ = run(stages, [make(stages, i, *case) for i, case in enumerate(CASES[:2])])
    for i in range(2):
        array = latents[str(i)].outputs["latents"]
        assert array.shape == (16, 2, 4, 6)
        video = vae.decode([vae.latents_from_array(array, LIMITS)])[0]
        assert_same_video(video, whole[str(i)].outputs["video"])


def test_bad_input_names_the_field(stages):
    good = arrays(*CASES[0])
    bad = [
        ({"input_image": None}, "input_image: is required"),
        ({"input_image": np.zeros((8, 8, 4), np.uint8)}, r"input_image: expected shape \[H, W, 3\]"),
        ({"input_image": np.zeros((8, 8), np.uint8)}, r"input_image: expected shape \[H, W, 3\]"),
        ({"input_image": np.zeros((8, 8, 3), np.float32)}, "input_image: expected uint8"),
        ({"num_frames": np.array(6, np.int32)}, "num_frames: 6 is not 4k[+]1"),
        ({"height": np.array(36, np.int32)}, "height"),
    ]
    for change, message in bad:
        values = {k: v for k, v in {**good, **change}.items() if v is not None}
        with pytest.raises(InvalidRequestError, match=message):
            stages.parse_request("0", values, LIMITS)


def test_bad_image_condition_from_the_encoder_stage_names_it(stages):
    received = {k: v for k, v in arrays(*CASES[2]).items() if k not in ("prompt", "input_image")}
    received["prompt_embeds"] = np.zeros((8, stages.text_dim), np.float32)
    with pytest.raises(InvalidRequestError, match="image_condition: is required"):
        stages.parse_conditioned_request("0", received, LIMITS)
    bad = [
        (np.zeros((16, 2, 4, 6), np.float32), r"image_condition: expected shape \[20, 'latent frames'"),
        (np.zeros((20, 3, 4, 6), np.float32), r"image_condition: shape \[20, 3, 4, 6\] does not match 5 frames"),
        (np.full((20, 2, 4, 6), np.nan, np.float32), "image_condition: contains NaN"),
    ]
    for condition, message in bad:
        with pytest.raises(InvalidRequestError, match=message):
            stages.parse_conditioned_request("0", {**received, "image_condition": condition}, LIMITS)
    ok = stages.parse_conditioned_request(
        "0", {**received, "image_condition": np.zeros((20, 2, 4, 6), np.float32)}, LIMITS
    )
    assert ok.conditioning["image_condition"].shape == (20, 2, 4, 6)


def test_a_text_to_video_checkpoint_is_refused(tiny_wan22_t2v):
    with pytest.raises(ConfigError, match="not a Wan2.2 image-to-video checkpoint"):
        load(tiny_wan22_t2v, Component.TRANSFORMER)
