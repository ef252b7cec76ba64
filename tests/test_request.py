from __future__ import annotations

import numpy as np
import pytest

from omni_backend.config import RequestLimits
from omni_backend.request import InvalidRequestError, SamplingDefaults, parse_input_image, parse_prompt_request

DEFAULTS = SamplingDefaults(height=1024, width=1024, num_inference_steps=28, guidance_scale=3.5, size_multiple=16)
LIMITS = RequestLimits()


def parse(**inputs):
    arrays = {"prompt": np.array([b"a cat"], dtype=object)}
    arrays.update({k: v if isinstance(v, np.ndarray) else np.array([v]) for k, v in inputs.items()})
    return parse_prompt_request("r1", arrays, DEFAULTS, LIMITS)


def test_defaults_filled_in():
    request = parse()
    assert request.prompt == "a cat" and request.negative_prompt is None
    p = request.params
    assert (p.height, p.width, p.num_inference_steps, p.guidance_scale, p.true_cfg_scale) == (1024, 1024, 28, 3.5, 1.0)
    assert isinstance(p.seed, int)


def test_values_taken():
    request = parse(
        height=np.array([512], np.int32),
        width=np.array([768], np.int32),
        num_inference_steps=np.array([200], np.int32),
        guidance_scale=np.array([0.0], np.float32),
        true_cfg_scale=np.array([4.0], np.float32),
        seed=np.array([-(2**63)], np.int64),
        negative_prompt=np.array(["blurry ✗".encode()], dtype=object),
    )
    p = request.params
    assert (p.height, p.width, p.num_inference_steps, p.seed) == (512, 768, 200, -(2**63))
    assert request.negative_prompt == "blurry ✗"


@pytest.mark.parametrize(
    ("inputs", "field", "words"),
    [
        ({"height": np.array([-16], np.int32)}, "height", "range"),
        ({"width": np.array([2**31 - 1], np.int32)}, "width", "range"),
        ({"height": np.array([100], np.int32)}, "height", "multiple of 16"),
        ({"height": np.array([4096], np.int32), "width": np.array([4096], np.int32)}, "height", "pixels"),
        ({"num_inference_steps": np.array([0], np.int32)}, "num_inference_steps", "[1, 500]"),
        ({"num_inference_steps": np.array([10**6], np.int32)}, "num_inference_steps", "range"),
        ({"guidance_scale": np.array([np.nan], np.float32)}, "guidance_scale", "finite"),
        ({"true_cfg_scale": np.array([np.inf], np.float32)}, "true_cfg_scale", "finite"),
        ({"guidance_scale": np.array([1e9], np.float32)}, "guidance_scale", "range"),
        ({"height": np.array([1.5], np.float32)}, "height", "integer"),
        ({"prompt": np.array([b"\xff\xfe"], dtype=object)}, "prompt", "UTF-8"),
        ({"prompt": np.array([b"x" * 9000], dtype=object)}, "prompt", "limit"),
        ({"prompt": np.array([b"a\x00b"], dtype=object)}, "prompt", "NUL"),
        ({"negative_prompt": np.array([b"\xc3"], dtype=object)}, "negative_prompt", "UTF-8"),
        ({"seed": np.array([1, 2], np.int64)}, "seed", "exactly one"),
    ],
)
def test_bad_inputs_name_the_field(inputs, field, words):
    with pytest.raises(InvalidRequestError) as info:
        parse(**inputs)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}:") and words in str(info.value)


def test_prompt_required():
    with pytest.raises(InvalidRequestError, match="^prompt: is required"):
        parse_prompt_request("r", {}, DEFAULTS, LIMITS)


def test_random_seed_when_absent_differs():
    assert len({parse().params.seed for _ in range(8)}) > 1


VIDEO = SamplingDefaults(
    height=480, width=832, num_inference_steps=50, guidance_scale=5.0, num_frames=81, frame_step=4,
    takes_guidance_scale_2=True,
)  # fmt: skip


def parse_video(**inputs):
    arrays = {"prompt": np.array([b"a cat"], dtype=object)}
    arrays.update({k: np.array([v]) for k, v in inputs.items()})
    return parse_prompt_request("r1", arrays, VIDEO, LIMITS).params


def test_video_defaults_and_values():
    p = parse_video()
    assert (p.num_frames, p.guidance_scale, p.guidance_scale_2) == (81, 5.0, None)
    p = parse_video(num_frames=np.int32(9), guidance_scale_2=np.float32(3.0))
    assert (p.num_frames, p.guidance_scale_2) == (9, 3.0)
    assert parse().params.num_frames == 1 and parse().params.guidance_scale_2 is None  # image families


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"num_frames": np.int32(6)}, r"num_frames: 6 is not 4k\+1"),
        ({"num_frames": np.int32(0)}, r"num_frames: 0 is outside the allowed range \[1, 257\]"),
        ({"num_frames": np.float32(9)}, "num_frames: expected an integer"),
        ({"num_frames": np.int32(257), "height": np.int32(2048), "width": np.int32(2048)}, "num_frames x height"),
        ({"guidance_scale_2": np.float32("nan")}, "guidance_scale_2: nan is not a finite number"),
    ],
)
def test_bad_video_input_names_the_field(inputs, message):
    with pytest.raises(InvalidRequestError, match=message):
        parse_video(**inputs)


@pytest.mark.parametrize(
    ("image", "limits", "message"),
    [
        (None, LIMITS, "input_image: is required"),
        (np.zeros((4, 4, 3), np.int32), LIMITS, "input_image: expected uint8"),
        (np.zeros((4, 4, 4), np.uint8), LIMITS, r"input_image: expected shape \[H, W, 3\] \(RGB\), got \[4, 4, 4\]"),
        (np.zeros((4, 0, 3), np.uint8), LIMITS, r"input_image: 4x0: each side must be in \[1, 4096\]"),
        (np.zeros((1, 9, 3), np.uint8), RequestLimits(max_side=8), r"input_image: 1x9: each side must be in \[1, 8\]"),
        (np.zeros((5, 5, 3), np.uint8), RequestLimits(max_input_image_pixels=24), "25 pixels exceeds the limit of 24"),
    ],
)
def test_bad_input_image_names_the_field(image, limits, message):
    inputs = {} if image is None else {"input_image": image}
    with pytest.raises(InvalidRequestError, match=message):
        parse_input_image(inputs, limits)


def test_input_image_within_limits_is_taken_as_is():
    image = np.arange(5 * 4 * 3, dtype=np.uint8).reshape(5, 4, 3)
    assert parse_input_image({"input_image": image}, RequestLimits(max_input_image_pixels=20)) is image
