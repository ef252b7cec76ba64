"""Injected faults against the real tritonserver: device OOM in a batch, kill -9 of a stub, SIGTERM.

One launcher for the module (``flux`` and ``flux_stream``, test-only OOM injection switched on by the
server's environment); the crash tests make it restart tritonserver, the last test shuts it down.
Bounds here are liveness bounds (an error instead of a hang), far above what the tests take.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from omni_backend.serving.procs import SHM_DIR, stubs_of
from omni_backend.testing import faults
from omni_backend.testing.compare import assert_same_image
from omni_backend.testing.server import TritonServerProcess, live_group_members
from tests.e2e.conftest import REPOSITORY, RawClient, wait_until
from tests.e2e.metrics import scrape, value
from tests.e2e.test_step_batching import run_in_thread, values, wait_for_steps

pytestmark = pytest.mark.slow

CLIENT_TIMEOUT_S = 120  # a client that sees no answer gives up after this: the tests must never get there
RECOVERY_DEADLINE_S = 240  # generous for a loaded 2-core CI machine; the README gives the measured time


@pytest.fixture(scope="module")
def server(model_root: Path):
    process = TritonServerProcess(
        REPOSITORY,
        env_extra={"OMNI_MODEL_ROOT": str(model_root), faults.ENV: "1"},
        extra_args=["--model-control-mode=explicit", "--load-model=flux", "--load-model=flux_stream"],
    )
    process.start(timeout=600)
    yield process
    process.stop()


# ---------------------------------------------------------------- device OOM in one request of a batch


def test_oom_in_one_request_fails_it_alone_and_the_batch_is_retried(server, flux_reference):
    client = RawClient(server, "grpc")
    steps_before = value(scrape(server.metrics_url), "omni_denoise_steps_total", model="flux")
    # a long request of another batching key keeps the engine busy, so the next four queue up
    # and are admitted together: they share one denoising call
    blocker = run_in_thread(client.infer, "flux", values("blocker", seed=5, steps=40, size=96))
    wait_for_steps(server, "flux", steps_before + 2)
    jobs = [values(f"neighbour {i}", seed=30 + i, steps=3) for i in range(3)]
    jobs.insert(1, values(f"doomed {faults.OOM_MARKER}", seed=40, steps=3))
    threads = [run_in_thread(client.infer, "flux", job) for job in jobs]
    for thread, _ in [*threads, blocker]:
        thread.join(CLIENT_TIMEOUT_S)
    outcomes = [box[0] for _, box in threads]
    kind, error, _ = outcomes[1]
    assert kind == "error" and isinstance(error, InferenceServerException)
    assert str(error.status()) == "StatusCode.INTERNAL"
    assert "out of device memory during denoising (also when run alone" in error.message()
    for job, (kind, image, _) in zip([jobs[0], *jobs[2:]], [outcomes[0], *outcomes[2:]], strict=True):
        assert kind == "ok", image
        assert_same_image(image, flux_reference(job["prompt"], int(job["seed"]), height=64, width=64,
                                                num_inference_steps=3))  # fmt: skip
    assert blocker[1][0][0] == "ok"
    # usually all four share the call; a neighbour that arrived a step late may have joined the next one
    retried = r"denoising ran out of device memory for a batch of [234]; retrying each request alone"
    assert re.search(retried, server.log())
    # the model keeps serving
    again = values("after the fault", seed=50, steps=2)
    assert_same_image(client.infer("flux", again), flux_reference("after the fault", 50, height=64, width=64,
                                                                  num_inference_steps=2))  # fmt: skip
    client.close()


# ---------------------------------------------------------------- kill -9 of a stub mid-request


def start_stream(server: TritonServerProcess, steps: int) -> tuple[grpcclient.InferenceServerClient, list]:
    """A flux_stream request; returns the client and its list of (result, error, time) events."""
    events: list = []
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(lambda result, error: events.append((result, error, time.monotonic())))
    inputs = RawClient.__new__(RawClient)
    inputs.module = grpcclient
    client.async_stream_infer("flux_stream", inputs.inputs(values("streamed", seed=3, steps=steps)))
    return client, events


def kill_stub(server: TritonServerProcess, model: str) -> float:
    (stub,) = [s for s in stubs_of(server.server_pid) if s.model == model]
    os.kill(stub.pid, signal.SIGKILL)
    return time.monotonic()


@pytest.mark.parametrize("victim", ["flux", "flux_stream"])
def test_kill_stub_mid_request_errors_fast_and_service_resumes(server, victim, flux_reference):
    http, grpc = RawClient(server, "http"), RawClient(server, "grpc")
    http.client = http.module.InferenceServerClient(server.http_url, network_timeout=CLIENT_TIMEOUT_S)
    old_server_pid = server.server_pid
    before = value(scrape(server.metrics_url), "omni_denoise_steps_total", model="flux")
    in_flight = [run_in_thread(c.infer, "flux", values("long", seed=1, steps=500)) for c in (http, grpc)]
    stream_client, events = start_stream(server, steps=500)
    wait_for_steps(server, "flux", before + 4)
    wait_until(lambda: len(events) >= 2, 60, "streamed progress")
    killed_at = kill_stub(server, victim)

    for thread, _ in in_flight:
        thread.join(CLIENT_TIMEOUT_S)
    wait_until(lambda: any(e is not None for _, e, _ in events), CLIENT_TIMEOUT_S, "a stream error")
    for _, box in in_flight:
        kind, error, at = box[0]
        assert kind == "error", "a request in flight was answered with an image from a dead stub?"
        assert "timed out" not in str(error).lower(), f"the client hung until its own timeout: {error!r}"
        print(f"in-flight {type(error).__name__} {at - killed_at:.2f} s after the kill")
    stream_error_at = next(t for _, e, t in events if e is not None)
    print(f"stream error {stream_error_at - killed_at:.2f} s after the kill")
    stream_client.stop_stream()
    stream_client.close()

    # readiness reported the model down, then serving again without operator action
    wait_until(lambda: server.server_pid != old_server_pid, 30, "a tritonserver restart")
    recovered = wait_until(lambda: server.model_ready(victim) and server.model_ready("flux"), RECOVERY_DEADLINE_S,
                           "recovery")  # fmt: skip
    print(f"{victim} ready again {time.monotonic() - killed_at:.1f} s after the kill ({recovered:.1f} s waited)")
    assert f"stub of model '{victim}'" in server.log() and "restarting tritonserver" in server.log()
    assert not live_group_members(old_server_pid), "processes of the crashed server are left"
    grpc = RawClient(server, "grpc")
    job = values("after the crash", seed=9, steps=2)
    assert_same_image(grpc.infer("flux", job), flux_reference("after the crash", 9, height=64, width=64,
                                                              num_inference_steps=2))  # fmt: skip
    grpc.close()


# ---------------------------------------------------------------- SIGTERM: drain, no orphans, no /dev/shm left


def test_sigterm_answers_in_flight_requests_and_leaves_nothing_behind(server):
    server_pid = server.server_pid
    regions = {s.shm_region for s in stubs_of(server_pid)}
    assert regions and all((SHM_DIR / r).exists() for r in regions)
    grpc = RawClient(server, "grpc")
    http = RawClient(server, "http")
    http.client = http.module.InferenceServerClient(server.http_url, network_timeout=CLIENT_TIMEOUT_S)
    before = value(scrape(server.metrics_url), "omni_denoise_steps_total", model="flux")
    in_flight = [run_in_thread(c.infer, "flux", values("never finishes", seed=2, steps=500)) for c in (http, grpc)]
    stream_client, events = start_stream(server, steps=500)
    wait_for_steps(server, "flux", before + 4)
    wait_until(lambda: len(events) >= 2, 60, "streamed progress")

    assert server.pid is not None and server._proc is not None
    # the launcher only: it drains and stops the server. The HTTP client's keep-alive connection stays
    # open, so tritonserver exits on its exit timeout without finalizing the models: the launcher cleans up
    os.kill(server.pid, signal.SIGTERM)
    rc = server._proc.wait(60)
    for thread, _ in in_flight:
        thread.join(CLIENT_TIMEOUT_S)
    # every client got a real answer: UNAVAILABLE "shut down", not a dropped connection
    for _, box in in_flight:
        kind, error, _ = box[0]
        assert kind == "error" and isinstance(error, InferenceServerException), box
        assert "the server shut down before this request finished" in str(error), error
    stream_errors = [e for _, e, _ in events if e is not None]
    assert stream_errors and "the server shut down before this request finished" in str(stream_errors[0])
    stream_client.stop_stream()
    assert rc == 0, server.log_tail()
    assert not live_group_members(server_pid)
    left = [r for r in regions if (SHM_DIR / r).exists()]
    assert not left, f"/dev/shm regions left behind: {left}"
