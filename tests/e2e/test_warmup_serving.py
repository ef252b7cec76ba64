"""Warm-up through a real tritonserver: every FLUX model warms its configured sizes inside ``initialize``,
so Triton reports it loaded (and READY) only afterwards; the first requests then match diffusers."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from omni_backend.testing.compare import assert_same_image
from omni_backend.testing.server import TritonServerProcess
from tests.e2e.conftest import FLUX_MODELS, REPOSITORY, RawClient, add_parameters
from tests.e2e.test_serving import params, reference

pytestmark = pytest.mark.slow

WARMUP = """  { key: "warmup_sizes", value: { string_value: "64x96,32x32" } },
"""
# what each model's warm-up logs (runner/warmup.py), in order
WARMUP_LINES = {
    "flux": ["warmed up 64x96", "warmed up 32x32"],
    "flux_stream": ["warmed up 64x96", "warmed up 32x32"],
    "flux_transformer": ["warmed up 64x96", "warmed up 32x32"],
    "flux_text_encoder": ["warmed up the text encoders"],
    "flux_vae": ["warmed up the VAE for 64x96", "warmed up the VAE for 32x32"],
}


@pytest.fixture(scope="module")
def warm_server(tmp_path_factory, model_root: Path):
    repository = tmp_path_factory.mktemp("warm-repository")
    for model in FLUX_MODELS:
        shutil.copytree(REPOSITORY / model, repository / model)
        if model in WARMUP_LINES:
            add_parameters(repository, model, WARMUP)
    process = TritonServerProcess(repository, env_extra={"OMNI_MODEL_ROOT": str(model_root)})
    process.start(timeout=600)
    yield process
    process.stop()


def _model_lines(server: TritonServerProcess, model: str, expected: list[str]) -> list[str]:
    """The model's own log lines (logger ``omni_backend.triton.<model>``), once every expected line is there.

    The stub hands its log records to the server asynchronously, so they may be printed after Triton's own
    "successfully loaded" line: only the order among the model's own lines is deterministic."""
    deadline = time.monotonic() + 30
    while True:
        log = server.log_path.read_text(errors="replace")
        lines = [line for line in log.splitlines() if f"omni_backend.triton.{model}]" in line]
        if all(any(e in line for line in lines) for e in expected) or time.monotonic() > deadline:
            return lines
        time.sleep(0.2)


@pytest.mark.parametrize("model", sorted(WARMUP_LINES))
def test_each_model_warms_up_while_it_loads(warm_server, model):
    # "loaded" and the warm-up are both logged by ``initialize``, which returns before Triton marks the model READY
    expected = [f"loaded {model} ", *WARMUP_LINES[model]]
    lines = _model_lines(warm_server, model, expected)
    positions = [next((i for i, line in enumerate(lines) if e in line), -1) for e in expected]
    assert -1 not in positions and positions == sorted(positions), "\n".join(lines)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("model", ["flux", "flux_ensemble"])
def test_warmed_models_serve_what_diffusers_draws(warm_server, flux_reference, model, protocol):
    client = RawClient(warm_server, protocol)
    try:
        values = params("a red circle on a blue background", seed=21)  # 64x96: a warmed size
        image = client.infer(model, values)
        assert isinstance(image, np.ndarray)
        assert_same_image(image, reference(flux_reference, values))
    finally:
        client.close()
