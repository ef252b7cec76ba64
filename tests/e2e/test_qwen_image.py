"""Qwen-Image end to end on its own tritonserver: one-model pipeline and ensemble, gRPC and HTTP, equal diffusers."""

from __future__ import annotations

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from omni_backend.testing.compare import assert_same_image
from omni_client import OmniClient, StepUpdate
from tests.e2e.conftest import PROTOCOLS, family_server, image_params, infer_concurrently, protocol_client
from tests.e2e.test_bad_input import status_is_invalid_arg

pytestmark = pytest.mark.slow

MODELS = ("qwen_image", "qwen_image_ensemble")
qwen_server = family_server("qwen_image", "tiny_qwen_image")
client = protocol_client("qwen_server")
params = image_params


def reference(render, values: dict) -> np.ndarray:
    return render(
        values["prompt"],
        int(values["seed"]),
        negative_prompt=values.get("negative_prompt"),
        true_cfg_scale=float(values.get("true_cfg_scale", 4.0)),
        height=int(values["height"]),
        width=int(values["width"]),
        num_inference_steps=int(values["num_inference_steps"]),
    )


@pytest.mark.parametrize("model", MODELS)
def test_image_and_true_cfg_equal_diffusers(client, model, qwen_image_reference):
    plain = params("a red circle on a blue background", seed=11)
    assert_same_image(client.infer(model, plain), reference(qwen_image_reference, plain))
    cfg = params("a green square", seed=12, negative_prompt="blurry, 模糊", true_cfg_scale=np.float32(8.0))
    image = client.infer(model, cfg)
    assert_same_image(image, reference(qwen_image_reference, cfg))
    without = client.infer(model, {**cfg, "true_cfg_scale": np.float32(1.0)})
    assert np.abs(image.astype(int) - without.astype(int)).mean() > 1, "true CFG changed nothing"


def test_concurrent_requests_share_steps_and_equal_diffusers(qwen_server, qwen_image_reference):
    """Four requests at once (both models, both protocols, different prompts, seeds and steps)."""
    jobs = [
        (PROTOCOLS[i % 2], MODELS[i // 2], params(f"shape number {i}" + " tall" * i, seed=100 + i, steps=2 + i % 2))
        for i in range(4)
    ]
    for image, (_, _, values) in zip(infer_concurrently(qwen_server, jobs), jobs, strict=True):
        assert_same_image(image, reference(qwen_image_reference, values))


@pytest.mark.parametrize("model", MODELS)
def test_bad_size_is_invalid_arg_naming_the_field(client, model):
    with pytest.raises(InferenceServerException) as info:
        client.infer(model, params("a cat", seed=1, width=np.int32(72)))  # not a multiple of 16
    assert status_is_invalid_arg(info.value), info.value.message()
    assert "width" in info.value.message() and "16" in info.value.message()


def test_stream_sends_every_step_previews_then_the_image(qwen_server, qwen_image_reference):
    updates: list[StepUpdate] = []
    with OmniClient(qwen_server.grpc_url, protocol="grpc", model="qwen_image_stream") as client:
        image = client.generate_stream(
            "a red circle", preview_every=2, on_progress=updates.append, output="numpy",
            height=64, width=96, num_inference_steps=5, seed=5,
        )  # fmt: skip
    assert [u.step for u in updates] == list(range(1, 6)) and {u.total_steps for u in updates} == {5}
    previews = {u.step: np.asarray(u.preview) for u in updates if u.preview is not None}
    assert sorted(previews) == [2, 4] and all(p.shape == (64, 96, 3) for p in previews.values())
    assert_same_image(image, reference(qwen_image_reference, params("a red circle", seed=5, steps=5)))
