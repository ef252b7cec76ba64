"""Warm-up through a real tritonserver: every FLUX model warms its configured sizes inside ``initialize``,
so Triton reports it loaded (and READY) only afterwards; the first requests then match diffusers."""

from __future__ import annotations

import shutil
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


def _model_lines(log: str, model: str) -> list[str]:
    # the model's own logger (omni_backend.triton.<model>) and Triton's "successfully loaded '<model>'"
    return [line for line in log.splitlines() if f"omni_backend.triton.{model}]" in line or f"'{model}'" in line]


@pytest.mark.parametrize("model", sorted(WARMUP_LINES))
def test_each_model_warms_up_before_it_is_loaded(warm_server, model):
    lines = _model_lines(warm_server.log_path.read_text(errors="replace"), model)
    loaded = next(i for i, line in enumerate(lines) if "successfully loaded" in line)
    positions = [next(i for i, line in enumerate(lines) if expected in line) for expected in WARMUP_LINES[model]]
    assert positions == sorted(positions) and positions[-1] < loaded, "\n".join(lines)


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
