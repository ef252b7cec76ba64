"""LongCat-Image end to end on its own tritonserver: one-model pipeline and ensemble, gRPC and HTTP, equal diffusers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from omni_backend.testing.compare import assert_same_image
from omni_client import OmniClient, StepUpdate
from tests.e2e.conftest import PROTOCOLS, family_server, image_params, infer_concurrently, protocol_client
from tests.e2e.test_bad_input import status_is_invalid_arg

pytestmark = pytest.mark.slow

MODELS = ("longcat_image", "longcat_image_ensemble")
longcat_server = family_server("longcat_image", "tiny_longcat_image")
client = protocol_client("longcat_server")
params = image_params


def reference(render, values: dict) -> np.ndarray:
    return render(
        values["prompt"],
        int(values["seed"]),
        negative_prompt=values.get("negative_prompt"),
        guidance_scale=float(values.get("guidance_scale", 4.5)),  # the family's default, as the pipeline's
        height=int(values["height"]),
        width=int(values["width"]),
        num_inference_steps=int(values["num_inference_steps"]),
    )


@pytest.mark.parametrize("model", MODELS)
def test_image_and_cfg_equal_diffusers(client, model, longcat_image_reference):
    plain = params("a red circle on a blue background", seed=11, guidance_scale=np.float32(1.0))
    without = client.infer(model, plain)
    assert_same_image(without, reference(longcat_image_reference, plain))
    cfg = params("a green square saying 'hi'", seed=11, negative_prompt="blurry, 模糊", guidance_scale=np.float32(8.0))
    image = client.infer(model, cfg)
    assert_same_image(image, reference(longcat_image_reference, cfg))
    default = params("a green square saying 'hi'", seed=11)  # CFG on by default (4.5), against ""
    assert_same_image(client.infer(model, default), reference(longcat_image_reference, default))
    unguided = client.infer(model, {**cfg, "guidance_scale": np.float32(1.0)})
    assert np.abs(image.astype(int) - unguided.astype(int)).mean() > 1, "CFG changed nothing"


def test_concurrent_requests_share_steps_and_equal_diffusers(longcat_server, longcat_image_reference):
    """Four requests at once (both models, both protocols, different prompts, seeds, steps and CFG)."""
    jobs = [
        (
            PROTOCOLS[i % 2],
            MODELS[i // 2],
            params(f"shape number {i}" + " tall" * i, seed=100 + i, steps=2 + i % 2, guidance_scale=np.float32(i)),
        )
        for i in range(4)
    ]
    for image, (_, _, values) in zip(infer_concurrently(longcat_server, jobs), jobs, strict=True):
        assert_same_image(image, reference(longcat_image_reference, values))


BAD_INPUTS = {
    "width_not_multiple": ({"width": np.int32(72)}, "width", "16"),
    "negative_guidance": ({"guidance_scale": np.float32(-1.0)}, "guidance_scale", "0"),
    "true_cfg_scale": ({"true_cfg_scale": np.float32(4.0)}, "true_cfg_scale", ""),  # not a LongCat input
}


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_invalid_arg_naming_the_field(client, model, case):
    extra, field, detail = BAD_INPUTS[case]
    with pytest.raises(InferenceServerException) as info:
        client.infer(model, params("a cat", seed=1, **extra))
    assert status_is_invalid_arg(info.value), info.value.message()
    assert field in info.value.message() and detail in info.value.message()


def test_transformer_stage_checks_its_conditioning(client):
    full = np.zeros((512, 32), np.float32)
    cases = [
        ({"prompt_embeds": full[:7]}, "prompt_embeds: expected shape [512, 32]"),
        ({"prompt_embeds": full, "guidance_scale": np.float32(3.0)}, "negative_prompt_embeds: is required"),
    ]
    for values, message in cases:
        with pytest.raises(InferenceServerException) as info:
            client.infer("longcat_image_transformer", {**values, "height": np.int32(64)}, output="latents")
        assert status_is_invalid_arg(info.value) and message in info.value.message(), info.value.message()
    good = {"prompt_embeds": full, "height": np.int32(64), "guidance_scale": np.float32(1.0)}
    assert client.infer("longcat_image_transformer", good, "latents").shape == (16, 8, 8), "the stage kept serving"


def test_stream_sends_every_step_previews_then_the_image(longcat_server, longcat_image_reference):
    updates: list[StepUpdate] = []
    with OmniClient(longcat_server.grpc_url, protocol="grpc", model="longcat_image_stream") as client:
        image = client.generate_stream(
            "a red circle", preview_every=2, on_progress=updates.append, output="numpy",
            height=64, width=96, num_inference_steps=5, seed=5,
        )  # fmt: skip
    assert [u.step for u in updates] == list(range(1, 6)) and {u.total_steps for u in updates} == {5}
    previews = {u.step: np.asarray(u.preview) for u in updates if u.preview is not None}
    assert sorted(previews) == [2, 4] and all(p.shape == (64, 96, 3) for p in previews.values())
    assert_same_image(image, reference(longcat_image_reference, params("a red circle", seed=5, steps=5)))


@pytest.mark.parametrize("model", ["longcat_image", "longcat_image_transformer"])
def test_control_is_refused_when_enable_control_is_off(client, model):
    with pytest.raises(InferenceServerException) as info:
        client.infer(model, {"control": json.dumps({"op": "status"})}, "control_result")
    assert status_is_invalid_arg(info.value) and "enable_control" in info.value.message(), info.value.message()
