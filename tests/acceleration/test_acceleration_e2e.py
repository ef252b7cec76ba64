"""Through a real tritonserver: the prompt-embedding cache (one-model pipeline and text-encoder stage)
and a step cache with a per-request ``cache_threshold`` (one model, stream, ensemble), with their
Prometheus metrics.

A copy of model_repository/ in a tmp dir configures the FLUX models for acceleration, so the shared
``server`` fixture stays as it is.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from omni_backend.testing.compare import assert_same_image
from omni_backend.testing.server import TritonServerProcess
from omni_client import OmniClient
from tests.e2e.conftest import REPOSITORY, RawClient, add_parameters
from tests.e2e.metrics import scrape, value

pytestmark = pytest.mark.slow

FLUX_EXTRA = """  { key: "enable_prompt_embed_cache", value: { string_value: "true" } },
  { key: "cache_backend", value: { string_value: "tea_cache" } },
  { key: "cache_config", value: { string_value: "{\\"rel_l1_thresh\\": 5.0}" } },
"""
ENCODER_EXTRA = """  { key: "enable_prompt_embed_cache", value: { string_value: "true" } },
"""
STEP_CACHE_EXTRA = """  { key: "cache_backend", value: { string_value: "tea_cache" } },
  { key: "cache_config", value: { string_value: "{\\"rel_l1_thresh\\": 5.0}" } },
"""


@pytest.fixture(scope="module")
def accel_server(tmp_path_factory, model_root: Path):
    repository = tmp_path_factory.mktemp("repository")
    for model in ("flux", "flux_stream", "flux_text_encoder", "flux_transformer", "flux_vae", "flux_ensemble"):
        shutil.copytree(REPOSITORY / model, repository / model)
    add_parameters(repository, "flux", FLUX_EXTRA)
    add_parameters(repository, "flux_text_encoder", ENCODER_EXTRA)
    add_parameters(repository, "flux_stream", STEP_CACHE_EXTRA)
    add_parameters(repository, "flux_transformer", STEP_CACHE_EXTRA)
    process = TritonServerProcess(repository, env_extra={"OMNI_MODEL_ROOT": str(model_root)})
    process.start(timeout=600)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(accel_server):
    raw = RawClient(accel_server, "grpc")
    yield raw
    raw.close()


def request(prompt: str, seed: int, steps: int = 6, **extra) -> dict:
    return {
        "prompt": prompt,
        "height": np.int32(64),
        "width": np.int32(64),
        "num_inference_steps": np.int32(steps),
        "seed": np.int64(seed),
        **extra,
    }


def metric(server: TritonServerProcess, name: str, model: str) -> float:
    return value(scrape(server.metrics_url), name, model=model)


def test_prompt_cache_hit_gives_the_same_image_and_skips_the_encoder(accel_server, client, flux_reference):
    values = request("a prompt seen twice", 7, cache_threshold=np.float32(0))
    first = client.infer("flux", values)
    assert (
        metric(accel_server, "omni_prompt_embed_cache_misses_total", "flux"),
        metric(accel_server, "omni_prompt_embed_cache_hits_total", "flux"),
    ) == (1, 0)
    second = client.infer("flux", values)
    assert np.array_equal(first, second)
    assert metric(accel_server, "omni_prompt_embed_cache_hits_total", "flux") == 1
    assert metric(accel_server, "omni_prompt_embed_cache_misses_total", "flux") == 1
    # cache_threshold 0: no step skipped, the image diffusers' FluxPipeline renders
    assert_same_image(first, flux_reference("a prompt seen twice", 7, height=64, width=64, num_inference_steps=6))


def test_cache_threshold_per_request(accel_server, client, flux_reference):
    skipped_before = metric(accel_server, "omni_cache_skipped_steps_total", "flux")
    loose = client.infer("flux", request("a loose request", 3))  # the configured rel_l1_thresh 5.0
    skipped = metric(accel_server, "omni_cache_skipped_steps_total", "flux") - skipped_before
    assert skipped > 0
    expected = flux_reference("a loose request", 3, height=64, width=64, num_inference_steps=6)
    assert np.abs(loose.astype(int) - expected.astype(int)).max() <= 32  # README's bound for the tiny model
    exact = client.infer("flux", request("a loose request", 3, cache_threshold=np.float32(0)))
    assert metric(accel_server, "omni_cache_skipped_steps_total", "flux") - skipped_before == skipped
    assert_same_image(exact, expected)
    with pytest.raises(InferenceServerException) as info:
        client.infer("flux", request("a cat", 1, cache_threshold=np.float32(-1)))
    assert "cache_threshold" in info.value.message()


def test_text_encoder_stage_cache(accel_server, client):
    inputs = client.inputs({"prompt": "an encoded prompt"})
    first = client.client.infer("flux_text_encoder", inputs).as_numpy("prompt_embeds")
    second = client.client.infer("flux_text_encoder", inputs).as_numpy("prompt_embeds")
    assert np.array_equal(first, second) and np.abs(first).sum() > 0
    assert metric(accel_server, "omni_prompt_embed_cache_hits_total", "flux_text_encoder") == 1
    assert metric(accel_server, "omni_prompt_embed_cache_misses_total", "flux_text_encoder") == 1


@pytest.mark.parametrize("model", ["flux_stream", "flux_ensemble"])
def test_cache_threshold_reaches_the_stream_and_the_ensemble(accel_server, flux_reference, model):
    # runs after test_text_encoder_stage_cache, which counts the encoder stage's cache exactly
    counted = "flux_transformer" if model == "flux_ensemble" else model  # where the step cache runs
    prompt = f"a request to {model}"
    expected = flux_reference(prompt, 5, height=64, width=64, num_inference_steps=6)
    with OmniClient(accel_server.grpc_url, model=model) as client:

        def generate(**extra) -> np.ndarray:
            params = {"height": 64, "width": 64, "num_inference_steps": 6, "seed": 5, **extra}
            if model == "flux_stream":
                return client.generate_stream(prompt, output="numpy", **params)
            return client.generate(prompt, output="numpy", **params)

        before = metric(accel_server, "omni_cache_skipped_steps_total", counted)
        assert_same_image(generate(cache_threshold=0.0), expected)  # 0: no step skipped
        assert metric(accel_server, "omni_cache_skipped_steps_total", counted) == before
        loose = generate()  # the configured rel_l1_thresh 5.0
        assert metric(accel_server, "omni_cache_skipped_steps_total", counted) > before
        assert np.abs(loose.astype(int) - expected.astype(int)).max() <= 32  # README's bound for the tiny model
