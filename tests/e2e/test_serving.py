"""End to end through a real tritonserver: images over gRPC and HTTP equal diffusers' FluxPipeline."""

from __future__ import annotations

import numpy as np
import pytest

from omni_backend.testing.compare import assert_same_image
from tests.e2e.conftest import infer_concurrently

pytestmark = pytest.mark.slow

MODELS = ("flux", "flux_ensemble")


def params(prompt: str, seed: int, steps: int = 3, **extra) -> dict:
    values = {
        "prompt": prompt,
        "height": np.int32(64),
        "width": np.int32(96),
        "num_inference_steps": np.int32(steps),
        "seed": np.int64(seed),
    }
    values.update(extra)
    return values


def reference(flux_reference, values: dict) -> np.ndarray:
    return flux_reference(
        values["prompt"],
        int(values["seed"]),
        negative_prompt=values.get("negative_prompt"),
        true_cfg_scale=float(values.get("true_cfg_scale", 1.0)),
        guidance_scale=float(values.get("guidance_scale", 3.5)),
        height=int(values["height"]),
        width=int(values["width"]),
        num_inference_steps=int(values["num_inference_steps"]),
    )


@pytest.mark.parametrize("model", MODELS)
def test_image_equals_diffusers(client, model, flux_reference):
    values = params("a red circle on a blue background", seed=11)
    assert_same_image(client.infer(model, values), reference(flux_reference, values))


@pytest.mark.parametrize("model", MODELS)
def test_true_cfg_equals_diffusers(client, model, flux_reference):
    values = params(
        "a green square",
        seed=12,
        negative_prompt="blurry, 模糊",
        true_cfg_scale=np.float32(4.0),
        guidance_scale=np.float32(2.0),
    )
    image = client.infer(model, values)
    assert_same_image(image, reference(flux_reference, values))
    without_cfg = client.infer(model, {k: v for k, v in values.items() if k != "true_cfg_scale"})
    assert np.abs(image.astype(int) - without_cfg.astype(int)).mean() > 1, "true CFG changed nothing"


def test_eight_concurrent_requests_all_answered_correctly(server, flux_reference):
    jobs = [
        (("grpc", "http")[i % 2], MODELS[(i // 2) % 2], params(f"shape number {i}", seed=100 + i, steps=2 + i % 3))
        for i in range(8)
    ]
    for image, (_, _, values) in zip(infer_concurrently(server, jobs), jobs, strict=True):
        assert_same_image(image, reference(flux_reference, values))


def test_same_seed_same_image_different_seed_different(client):
    a = client.infer("flux", params("a cat", seed=5))
    b = client.infer("flux", params("a cat", seed=5))
    c = client.infer("flux", params("a cat", seed=6))
    assert np.array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 1
