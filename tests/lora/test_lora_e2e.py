"""LoRA through a real tritonserver over gRPC and HTTP: ``flux`` and ``flux_ensemble`` with lora_dir set.

A copy of the FLUX models in a tmp repository: ``flux`` holds one adapter slot (max_loras 1, so
alternating adapters evict each other), ``flux_transformer`` (the ensemble's denoiser) pins one.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from omni_backend.testing.compare import assert_same_image
from omni_backend.testing.server import TritonServerProcess
from tests.e2e.conftest import PROTOCOLS, REPOSITORY, RawClient, add_parameters
from tests.e2e.metrics import scrape, value
from tests.lora.conftest import ADAPTERS

pytestmark = pytest.mark.slow

MODELS = ("flux", "flux_ensemble", "flux_text_encoder", "flux_transformer", "flux_vae")
PROMPT, SIZE, STEPS = "a lighthouse at dusk", 64, 3


def configure(repository: Path, model: str, **parameters: str) -> None:
    extra = "".join(f'  {{ key: "{k}", value: {{ string_value: "{v}" }} }},\n' for k, v in parameters.items())
    add_parameters(repository, model, extra)


@pytest.fixture(scope="module")
def lora_server(tmp_path_factory, model_root: Path, lora_dir: Path):
    repository = tmp_path_factory.mktemp("lora-repository")
    for model in MODELS:
        shutil.copytree(REPOSITORY / model, repository / model)
    configure(repository, "flux", lora_dir=str(lora_dir), max_loras="1")
    configure(
        repository,
        "flux_transformer",
        lora_dir=str(lora_dir),
        max_loras="2",
        pinned_loras="style2",
        enable_control="true",  # list_loras
    )
    process = TritonServerProcess(repository, env_extra={"OMNI_MODEL_ROOT": str(model_root)})
    process.start(timeout=600)
    yield process
    process.stop()


@pytest.fixture(params=PROTOCOLS)
def client(request, lora_server):
    raw = RawClient(lora_server, request.param)
    yield raw
    raw.close()


def values(seed: int, lora: tuple[str, float] | None = None) -> dict:
    out = {
        "prompt": PROMPT,
        "height": np.int32(SIZE),
        "width": np.int32(SIZE),
        "num_inference_steps": np.int32(STEPS),
        "seed": np.int64(seed),
    }
    if lora is not None:
        out |= {"lora_name": lora[0], "lora_scale": np.float32(lora[1])}
    return out


def expected(lora_reference, flux_reference, seed: int, lora: tuple[str, float] | None) -> np.ndarray:
    kwargs = {"height": SIZE, "width": SIZE, "num_inference_steps": STEPS}
    return flux_reference(PROMPT, seed, **kwargs) if lora is None else lora_reference(PROMPT, seed, *lora, **kwargs)


def resident(server: TritonServerProcess, model: str) -> float:
    return value(scrape(server.metrics_url), "omni_lora_resident", model=model)


@pytest.mark.parametrize("model", ["flux", "flux_ensemble"])
def test_adapter_image_equals_diffusers_with_the_adapter_loaded(client, model, lora_reference, flux_reference):
    for seed, lora in ((1, ("style1", 1.0)), (2, ("style2", 0.6)), (3, None)):
        image = client.infer(model, values(seed, lora))
        assert_same_image(image, expected(lora_reference, flux_reference, seed, lora))


def test_concurrent_adapter_and_base_requests_each_equal_their_reference(lora_server, lora_reference, flux_reference):
    """Sent at once to the one-slot model: the base request shares nothing with the adapter's."""
    mix = [(10, ("style1", 1.0)), (11, None), (12, ("style2", 1.0)), (13, ("style1", 0.5)), (14, None)]
    raw = RawClient(lora_server, "grpc")
    results, done = {}, threading.Event()

    def callback(i):
        def store(image, error):
            results[i] = (image, error)
            if len(results) == len(mix):
                done.set()

        return store

    for i, (seed, lora) in enumerate(mix):
        raw.infer_async("flux", values(seed, lora), callback(i))
    assert done.wait(600)
    raw.close()
    for i, (seed, lora) in enumerate(mix):
        image, error = results[i]
        assert error is None, error
        assert_same_image(image, expected(lora_reference, flux_reference, seed, lora))
    assert resident(lora_server, "flux") == 1  # max_loras 1: adapters evicted in turn


def test_pinned_adapter_is_resident_from_load(lora_server, client):
    client.infer("flux_ensemble", values(20, ("style1", 1.0)))
    client.infer("flux_ensemble", values(21, ("style.3", 1.0)))
    assert resident(lora_server, "flux_transformer") == 2  # style2 pinned + the last one used


BAD_INPUTS = [
    ({"lora_name": "../tiny-flux"}, "lora_name: '../tiny-flux' is not an adapter name"),
    ({"lora_name": "/etc"}, "lora_name: '/etc' is not an adapter name"),
    ({"lora_name": "style1/../style2"}, "lora_name: 'style1/../style2' is not an adapter name"),
    ({"lora_name": "unknown"}, "lora_name: unknown adapter 'unknown' (available: style.3, style1, style2)"),
    ({"lora_name": ""}, "lora_name: is empty"),
    ({"lora_name": "s" * 200}, "lora_name: 'sss"),
    ({"lora_name": "style1", "lora_scale": np.float32("inf")}, "lora_scale: inf is not a finite number"),
    ({"lora_name": "style1", "lora_scale": np.float32(100)}, "lora_scale: 100.0 is outside the allowed range"),
    ({"lora_scale": np.float32(1)}, "lora_scale: only applies with lora_name"),
]


@pytest.mark.parametrize("model", ["flux", "flux_ensemble"])
def test_bad_lora_inputs_are_invalid_arg_and_the_server_keeps_serving(client, model, lora_reference, flux_reference):
    wrong = []
    for inputs, says in BAD_INPUTS:
        with pytest.raises(InferenceServerException) as info:
            client.infer(model, values(30) | inputs)
        status, message = str(info.value.status()), info.value.message()
        if status not in ("StatusCode.INVALID_ARGUMENT", "400") or says not in message:
            wrong.append((inputs, status, message))
    assert not wrong
    image = client.infer(model, values(31, ("style1", 1.0)))
    assert_same_image(image, expected(lora_reference, flux_reference, 31, ("style1", 1.0)))


def test_list_loras_over_the_control_channel(client):
    raw = client.infer("flux_transformer", {"control": json.dumps({"op": "list_loras"})}, "control_result")
    listing = json.loads(raw[0])
    assert listing["available"] == sorted(ADAPTERS) and listing["max_loras"] == 2
    assert listing["pinned"] == ["style2"] and "style2" in listing["resident"]
