"""``background_decode: true`` through the real tritonserver (it is off on a CPU by default): concurrent
requests of mixed step counts over gRPC and HTTP, and a stream with previews, keep diffusers' images."""

from __future__ import annotations

import shutil

import pytest

from omni_backend.testing.compare import assert_same_image
from omni_backend.testing.server import TritonServerProcess
from omni_client import OmniClient, StepUpdate
from tests.e2e.conftest import REPOSITORY, RawClient
from tests.e2e.metrics import scrape, value
from tests.e2e.test_step_batching import run_in_thread, values

pytestmark = pytest.mark.slow

BACKGROUND = 'parameters [\n  { key: "background_decode", value: { string_value: "true" } },\n'


@pytest.fixture(scope="module")
def background_server(tmp_path_factory, model_root):
    repository = tmp_path_factory.mktemp("background-decode-repo")
    for model in ("flux", "flux_stream"):
        shutil.copytree(REPOSITORY / model, repository / model)
        config = repository / model / "config.pbtxt"
        config.write_text(config.read_text().replace("parameters [\n", BACKGROUND, 1))
    server = TritonServerProcess(repository, env_extra={"OMNI_MODEL_ROOT": str(model_root)})
    server.start(timeout=600)
    yield server
    server.stop()


def test_concurrent_requests_over_both_protocols_keep_parity(background_server, flux_reference):
    jobs = [("grpc", "a red circle", 31, 3), ("http", "a blue square", 32, 9), ("grpc", "a green triangle", 33, 5)]
    clients = [RawClient(background_server, protocol) for protocol, *_ in jobs]
    threads = [
        run_in_thread(client.infer, "flux", values(prompt, seed, steps))
        for client, (_, prompt, seed, steps) in zip(clients, jobs, strict=True)
    ]
    for (thread, _), client in zip(threads, clients, strict=True):
        thread.join(120)
        client.close()
    for (_, box), (_, prompt, seed, steps) in zip(threads, jobs, strict=True):
        assert box[0][0] == "ok", box
        assert_same_image(box[0][1], flux_reference(prompt, seed, height=64, width=64, num_inference_steps=steps))
    metrics = scrape(background_server.metrics_url)
    assert value(metrics, "omni_denoise_steps_total", model="flux") == 17
    assert value(metrics, "omni_running_requests", model="flux") == 0  # decoded requests left the running set


def test_stream_with_previews_keeps_parity(background_server, flux_reference):
    updates: list[StepUpdate] = []
    with OmniClient(background_server.grpc_url, protocol="grpc", model="flux_stream") as client:
        image = client.generate_stream(
            "a red circle", preview_every=2, on_progress=updates.append, output="numpy",
            height=64, width=64, num_inference_steps=5, seed=5,
        )  # fmt: skip
    assert [u.step for u in updates] == list(range(1, 6))
    assert sorted(u.step for u in updates if u.preview is not None) == [2, 4]
    assert_same_image(image, flux_reference("a red circle", 5, height=64, width=64, num_inference_steps=5))
