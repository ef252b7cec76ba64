"""Through a real tritonserver: ``qwen_image`` with a step cache and a per-request ``cache_threshold``.

A copy of model_repository/ in a tmp dir configures ``qwen_image`` with ``tea_cache``; only that model
loads, so the shared ``server`` fixture stays as it is.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from omni_backend.testing.compare import assert_same_image
from omni_backend.testing.server import TritonServerProcess
from tests.e2e.conftest import REPOSITORY, RawClient, add_parameters
from tests.e2e.metrics import scrape, value

pytestmark = pytest.mark.slow

EXTRA = """  { key: "cache_backend", value: { string_value: "tea_cache" } },
  { key: "cache_config", value: { string_value: "{\\"rel_l1_thresh\\": 5.0}" } },
"""


@pytest.fixture(scope="module")
def qwen_cache_server(tmp_path_factory, model_root: Path, tiny_qwen_image):
    repository = tmp_path_factory.mktemp("repository")
    shutil.copytree(REPOSITORY / "qwen_image", repository / "qwen_image")
    add_parameters(repository, "qwen_image", EXTRA)
    process = TritonServerProcess(repository, env_extra={"OMNI_MODEL_ROOT": str(model_root)})
    process.start(timeout=600)
    yield process
    process.stop()


def request(prompt: str, seed: int, **extra) -> dict:
    return {
        "prompt": prompt,
        "height": np.int32(32),
        "width": np.int32(32),
        "num_inference_steps": np.int32(6),
        "seed": np.int64(seed),
        **extra,
    }


def skipped(server: TritonServerProcess) -> float:
    return value(scrape(server.metrics_url), "omni_cache_skipped_steps_total", model="qwen_image")


def test_cache_threshold_per_request(qwen_cache_server, qwen_image_reference):
    client = RawClient(qwen_cache_server, "grpc")
    try:
        before = skipped(qwen_cache_server)
        loose = client.infer("qwen_image", request("a loose request", 3))  # the configured rel_l1_thresh 5.0
        loose_skips = skipped(qwen_cache_server) - before
        assert loose_skips > 0
        expected = qwen_image_reference("a loose request", 3, height=32, width=32, num_inference_steps=6)
        assert np.abs(loose.astype(int) - expected.astype(int)).max() <= 32  # README's bound for the tiny model
        exact = client.infer("qwen_image", request("a loose request", 3, cache_threshold=np.float32(0)))
        assert skipped(qwen_cache_server) - before == loose_skips, "cache_threshold 0 skipped a step"
        assert_same_image(exact, expected)
        with pytest.raises(InferenceServerException) as info:
            client.infer("qwen_image", request("a cat", 1, cache_threshold=np.float32(-1)))
        assert "cache_threshold" in info.value.message()
        assert_same_image(
            client.infer("qwen_image", request("a loose request", 3, cache_threshold=np.float32(0))), expected
        )
    finally:
        client.close()
