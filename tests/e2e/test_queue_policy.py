"""Queue policy on a dedicated server: one request at a time, a queue timeout, a bounded queue."""

from __future__ import annotations

import shutil
import time

import pytest
from tritonclient.utils import InferenceServerException

from omni_backend.testing.server import TritonServerProcess
from tests.e2e.conftest import REPOSITORY, RawClient
from tests.e2e.metrics import scrape, value
from tests.e2e.test_step_batching import run_in_thread, values, wait_for_steps

pytestmark = pytest.mark.slow

POLICY = """parameters [
  { key: "max_num_seqs", value: { string_value: "1" } },
  { key: "queue_timeout_s", value: { string_value: "0.5" } },
  { key: "max_queue_size", value: { string_value: "2" } },
"""


def steps_done(server) -> float:
    return value(scrape(server.metrics_url), "omni_denoise_steps_total", model="flux")


@pytest.fixture(scope="module")
def serial_server(tmp_path_factory, model_root):
    repository = tmp_path_factory.mktemp("serial-repo")
    shutil.copytree(REPOSITORY / "flux", repository / "flux")
    config = repository / "flux" / "config.pbtxt"
    config.write_text(config.read_text().replace("parameters [\n", POLICY))
    server = TritonServerProcess(repository, env_extra={"OMNI_MODEL_ROOT": str(model_root)})
    server.start(timeout=600)
    yield server
    server.stop()


def test_queue_timeout_is_a_clear_unavailable_error(serial_server):
    client = RawClient(serial_server, "grpc")
    before = steps_done(serial_server)
    thread, long_box = run_in_thread(client.infer, "flux", values("long", seed=1, steps=500, size=128))
    wait_for_steps(serial_server, "flux", before + 2)
    started = time.monotonic()
    with pytest.raises(InferenceServerException) as info:
        client.infer("flux", values("waits", seed=2, steps=2))
    waited = time.monotonic() - started
    assert str(info.value.status()) == "StatusCode.UNAVAILABLE"
    assert "timed out after waiting" in info.value.message() and "queue_timeout_s" in info.value.message()
    assert waited >= 0.5
    thread.join(300)
    assert long_box[0][0] == "ok"
    client.close()


def test_client_timeout_overrides_the_queue_timeout(serial_server):
    client = RawClient(serial_server, "grpc")
    before = steps_done(serial_server)
    thread, long_box = run_in_thread(client.infer, "flux", values("long", seed=1, steps=500, size=128))
    wait_for_steps(serial_server, "flux", before + 2)
    inputs = client.inputs(values("waits", seed=2, steps=2))
    with pytest.raises(InferenceServerException) as info:
        client.client.infer("flux", inputs, timeout=200_000)  # 0.2 s (microseconds) beats 0.5 s
    assert "timed out after waiting 0." in info.value.message()
    thread.join(300)
    client.close()


def test_full_queue_refuses_at_once(serial_server):
    clients = [RawClient(serial_server, "grpc") for _ in range(4)]
    before = steps_done(serial_server)
    threads = [run_in_thread(clients[0].infer, "flux", values("long", seed=1, steps=500, size=128))]
    wait_for_steps(serial_server, "flux", before + 2)
    threads += [run_in_thread(c.infer, "flux", values("queued", seed=2, steps=1)) for c in clients[1:3]]
    time.sleep(0.3)  # both are in the engine's queue now (max_queue_size 2)
    with pytest.raises(InferenceServerException) as info:
        clients[3].infer("flux", values("one too many", seed=3, steps=1))
    assert str(info.value.status()) == "StatusCode.UNAVAILABLE" and "queue is full" in info.value.message()
    for thread, _ in threads:
        thread.join(300)
    for client in clients:
        client.close()
