"""cfg2, ulysses2 and pp2 served by a real tritonserver: each model instance drives a worker group of
two spawned ranks (gloo), and the images equal diffusers' FluxPipeline (and, for Qwen-Image's ulysses2,
QwenImagePipeline's); the ensemble's transformer stage with pp2, called through ``flux_ensemble``, too;
a bad layout fails its load; a rank killed mid-request fails the requests in flight at once, the
launcher reloads that model alone (readiness down, then up) and the next request is served right.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from omni_backend.serving.procs import stubs_of, workers_of
from omni_backend.testing.compare import assert_same_image
from omni_backend.testing.server import ReadinessLog, TritonServerProcess
from tests.e2e.conftest import REPOSITORY, RawClient, wait_until
from tests.e2e.metrics import scrape, value
from tests.e2e.test_step_batching import run_in_thread, wait_for_steps

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

RECOVERY_DEADLINE_S = 240  # generous for a loaded 2-core CI machine; the README gives the measured time

# name -> (the model_repository/ model it varies, the parameters it adds)
VARIANTS = {
    "flux_cfg2": ("flux", {"cfg_parallel_size": "2"}),
    "flux_ulysses2": ("flux", {"ulysses_degree": "2"}),
    "flux_pp2": ("flux", {"pipeline_parallel_size": "2"}),
    "flux_bad_ulysses": ("flux", {"ulysses_degree": "4"}),  # 2 heads in the tiny checkpoint
    "qwen_image_ulysses2": ("qwen_image", {"ulysses_degree": "2"}),
    # the ensemble as it is, but its transformer stage a pp2 worker group
    "flux_ensemble": ("flux_ensemble", {}),
    "flux_text_encoder": ("flux_text_encoder", {}),
    "flux_transformer": ("flux_transformer", {"pipeline_parallel_size": "2"}),
    "flux_vae": ("flux_vae", {}),
}
ENSEMBLE = ("flux_ensemble", "flux_text_encoder", "flux_transformer", "flux_vae")


def _variant(repo: Path, name: str, source: str, parameters: dict[str, str]) -> None:
    shutil.copytree(REPOSITORY / source, repo / name)
    config = (repo / name / "config.pbtxt").read_text().replace(f'name: "{source}"', f'name: "{name}"')
    extra = "".join(f',\n  {{ key: "{k}", value: {{ string_value: "{v}" }} }}' for k, v in parameters.items())
    head, tail = config.rsplit("]", 1)  # the parameters block closes last
    (repo / name / "config.pbtxt").write_text(head.rstrip() + extra + "\n]" + tail)


@pytest.fixture(scope="module")
def parallel_server(tmp_path_factory, model_root, tiny_qwen_image):
    repo = tmp_path_factory.mktemp("parallel_repo")
    for name, (source, parameters) in VARIANTS.items():
        _variant(repo, name, source, parameters)
    # loaded by their tests, one at a time: every group loaded at once makes the start heavier
    later = ("flux_bad_ulysses", "qwen_image_ulysses2", *ENSEMBLE)
    loads = [f"--load-model={name}" for name in VARIANTS if name not in later]
    process = TritonServerProcess(
        repo, env_extra={"OMNI_MODEL_ROOT": str(model_root)},
        extra_args=["--model-control-mode=explicit", *loads],
    )  # fmt: skip
    process.start(timeout=600)
    yield process
    process.stop()


@pytest.mark.parametrize("model", ["flux_cfg2", "flux_ulysses2", "flux_pp2"])
def test_parallel_model_matches_diffusers(parallel_server, flux_reference, model):
    client = RawClient(parallel_server, "grpc")
    try:
        request = {"prompt": "a green square", "negative_prompt": "blurry", "true_cfg_scale": np.float32(3.0),
                   "height": np.int32(64), "width": np.int32(64), "num_inference_steps": np.int32(3),
                   "seed": np.int64(7)}  # fmt: skip
        image = client.infer(model, request)
    finally:
        client.close()
    expected = flux_reference(
        "a green square", 7, negative_prompt="blurry", true_cfg_scale=3.0, height=64, width=64, num_inference_steps=3
    )
    assert_same_image(image, expected)


def test_parallel_qwen_image_matches_diffusers(parallel_server, qwen_image_reference):
    """True CFG with prompts of 7 tokens: padded to 8 and masked for the two ranks."""
    control = grpcclient.InferenceServerClient(parallel_server.grpc_url)
    control.load_model("qwen_image_ulysses2")
    client = RawClient(parallel_server, "http")
    try:
        request = {"prompt": "a cat", "negative_prompt": "dark", "true_cfg_scale": np.float32(4.0),
                   "height": np.int32(64), "width": np.int32(64), "num_inference_steps": np.int32(3),
                   "seed": np.int64(7)}  # fmt: skip
        image = client.infer("qwen_image_ulysses2", request)
    finally:
        client.close()
        control.unload_model("qwen_image_ulysses2")  # its two ranks' processes go
        control.close()
    expected = qwen_image_reference(
        "a cat", 7, negative_prompt="dark", true_cfg_scale=4.0, height=64, width=64, num_inference_steps=3
    )
    assert_same_image(image, expected)


def test_ensemble_with_a_parallel_transformer_stage_matches_diffusers(parallel_server, flux_reference):
    """The transformer stage's two pipeline ranks get the conditioning from the encoder stage and hand
    latents to the VAE stage; one request over gRPC, one over HTTP."""
    control = grpcclient.InferenceServerClient(parallel_server.grpc_url)
    control.load_model("flux_ensemble")  # and the three stages it names
    assert len(_ranks(parallel_server, "flux_transformer")) == 2  # the stage runs as a worker group
    clients = {protocol: RawClient(parallel_server, protocol) for protocol in ("grpc", "http")}
    try:
        images = {}
        for seed, protocol in enumerate(clients, start=7):
            request = {"prompt": "a green square", "negative_prompt": "blurry", "true_cfg_scale": np.float32(3.0),
                       "height": np.int32(64), "width": np.int32(64), "num_inference_steps": np.int32(3),
                       "seed": np.int64(seed)}  # fmt: skip
            images[seed] = clients[protocol].infer("flux_ensemble", request)
    finally:
        for client in clients.values():
            client.close()
        for model in ENSEMBLE:  # the transformer stage's two ranks go
            control.unload_model(model)
        control.close()
    for seed, image in images.items():
        expected = flux_reference(
            "a green square", seed, negative_prompt="blurry", true_cfg_scale=3.0, height=64, width=64,
            num_inference_steps=3,
        )  # fmt: skip
        assert_same_image(image, expected)


def test_bad_layout_fails_the_load_naming_the_parameter(parallel_server):
    client = grpcclient.InferenceServerClient(parallel_server.grpc_url)
    try:
        with pytest.raises(Exception, match="ulysses_degree: 4 does not divide the 2 attention heads"):
            client.load_model("flux_bad_ulysses")
        assert client.is_model_ready("flux_cfg2")  # the server keeps serving
    finally:
        client.close()


def _ranks(server: TritonServerProcess, model: str) -> list[int]:
    """Pids of the worker ranks a model's stub spawned (not multiprocessing's resource tracker)."""
    (stub,) = [s for s in stubs_of(server.server_pid) if s.model == model]
    return workers_of(stub.pid)


def test_killing_a_worker_mid_request_fails_it_fast_and_the_model_is_reloaded(parallel_server, flux_reference):
    """The model fails its requests at once; the launcher (explicit model control) takes it out of service
    and loads it again alone: readiness goes down, comes back, and the next request is served right."""
    model = "flux_cfg2"
    ranks = _ranks(parallel_server, model)
    assert len(ranks) == 2, ranks
    others = {s.model: s.pid for s in stubs_of(parallel_server.server_pid) if s.model != model}
    assert others, "another model must be loaded to show it is left alone"
    grpc, http = RawClient(parallel_server, "grpc"), RawClient(parallel_server, "http")
    request = {"prompt": "a long walk", "negative_prompt": "blurry", "true_cfg_scale": np.float32(3.0),
               "height": np.int32(64), "width": np.int32(64), "num_inference_steps": np.int32(500),
               "seed": np.int64(1)}  # fmt: skip
    before = value(scrape(parallel_server.metrics_url), "omni_denoise_steps_total", model=model)
    in_flight = [run_in_thread(client.infer, model, request) for client in (grpc, http)]
    wait_for_steps(parallel_server, model, before + 3)
    readiness = ReadinessLog(parallel_server, model)
    os.kill(ranks[-1], signal.SIGKILL)
    killed_at = time.monotonic()
    for thread, _ in in_flight:
        thread.join(120)
    for _, box in in_flight:
        kind, error, at = box[0]
        assert kind == "error" and isinstance(error, InferenceServerException), box
        assert "parallel worker rank 1 died" in error.message(), error.message()
        print(f"in-flight error {at - killed_at:.2f} s after the kill")
        assert at - killed_at < 30  # a liveness bound: an answer, not the client's own timeout
    try:
        wait_until(lambda: readiness.up_again_at() is not None, RECOVERY_DEADLINE_S, "readiness down, then up")
    finally:
        readiness.stop()
    down, up = readiness.down_at() - killed_at, readiness.up_again_at() - killed_at
    print(f"not ready {down:.2f} s after the kill, ready again {up:.1f} s after it")
    assert f"parallel worker (pid {ranks[-1]}) of model '{model}' died" in parallel_server.log()
    assert f"model '{model}' reloaded" in parallel_server.log()
    assert "restarting tritonserver" not in parallel_server.log()  # only this model went out of service
    # the earlier tests' unloads stopped ranks too: those were no crashes
    assert parallel_server.log().count("died while the model was ready") == 1
    assert {s.model: s.pid for s in stubs_of(parallel_server.server_pid) if s.model != model} == others
    assert all(parallel_server.model_ready(other) for other in others)
    image = grpc.infer(model, {**request, "num_inference_steps": np.int32(3), "seed": np.int64(7)})
    expected = flux_reference(
        "a long walk", 7, negative_prompt="blurry", true_cfg_scale=3.0, height=64, width=64, num_inference_steps=3
    )
    assert_same_image(image, expected)
    assert not set(ranks) & set(_ranks(parallel_server, model)), "the dead group's ranks are still there"
    assert "parallel worker rank 1" in parallel_server.log() and "died" in parallel_server.log()
    grpc.close()
    http.close()
