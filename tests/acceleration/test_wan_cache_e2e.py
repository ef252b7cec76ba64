"""Through a real tritonserver over gRPC: ``wan22_t2v`` (one model, and its ensemble's transformer stage)
with a step cache on both experts and a per-request ``cache_threshold``.

A copy of model_repository/ in a tmp dir configures the Wan2.2 text-to-video models with ``tea_cache``,
so the shared ``server`` fixture stays as it is.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from omni_backend.testing.compare import assert_same_image
from omni_backend.testing.server import TritonServerProcess
from tests.acceleration.test_step_cache import MAX_PIXEL_ERROR  # README's bound for the tiny models
from tests.e2e.conftest import REPOSITORY, RawClient, add_parameters
from tests.e2e.metrics import scrape, value

pytestmark = pytest.mark.slow

EXTRA = """  { key: "cache_backend", value: { string_value: "tea_cache" } },
  { key: "cache_config", value: { string_value: "{\\"rel_l1_thresh\\": 5.0}" } },
"""
STAGES = ("wan22_t2v_text_encoder", "wan22_t2v_transformer", "wan22_t2v_vae", "wan22_t2v_ensemble")


@pytest.fixture(scope="module")
def wan_cache_server(tmp_path_factory, model_root: Path, tiny_wan22_t2v):
    repository = tmp_path_factory.mktemp("repository")
    for model in ("wan22_t2v", *STAGES):
        shutil.copytree(REPOSITORY / model, repository / model)
    add_parameters(repository, "wan22_t2v", EXTRA)
    add_parameters(repository, "wan22_t2v_transformer", EXTRA)
    process = TritonServerProcess(repository, env_extra={"OMNI_MODEL_ROOT": str(model_root)})
    process.start(timeout=600)
    yield process
    process.stop()


def request(seed: int, **extra) -> dict:
    return {
        "prompt": "a loose request",
        "height": np.int32(32),
        "width": np.int32(32),
        "num_frames": np.int32(5),
        "num_inference_steps": np.int32(5),
        "guidance_scale": np.float32(4.0),  # CFG: both rows of each step go through the caches
        "seed": np.int64(seed),
        **extra,
    }


@pytest.mark.parametrize("model", ["wan22_t2v", "wan22_t2v_ensemble"])
def test_cache_threshold_per_request(wan_cache_server, wan22_t2v_reference, model):
    counted = "wan22_t2v_transformer" if model == "wan22_t2v_ensemble" else model  # where the step cache runs

    def skipped() -> float:
        return value(scrape(wan_cache_server.metrics_url), "omni_cache_skipped_steps_total", model=counted)

    expected = wan22_t2v_reference(
        "a loose request", 3, guidance_scale=4.0, height=32, width=32, num_frames=5, num_inference_steps=5
    )
    client = RawClient(wan_cache_server, "grpc")
    try:
        before = skipped()
        loose = client.infer(model, request(3), output="video")  # the configured rel_l1_thresh 5.0
        loose_skips = skipped() - before
        assert loose_skips > 0
        assert np.abs(loose.astype(int) - expected.astype(int)).max() <= MAX_PIXEL_ERROR
        exact = client.infer(model, request(3, cache_threshold=np.float32(0)), output="video")
        assert skipped() - before == loose_skips, "cache_threshold 0 skipped a step"
        for frame in range(len(expected)):
            assert_same_image(exact[frame], expected[frame])
        with pytest.raises(InferenceServerException) as info:
            client.infer(model, request(1, cache_threshold=np.float32(-1)), output="video")
        assert "cache_threshold" in info.value.message()
    finally:
        client.close()
