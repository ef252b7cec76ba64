"""Step-level batching, streaming, cancellation and metrics, through the real tritonserver."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from omni_backend.testing.compare import assert_same_image
from omni_client import OmniClient, StepUpdate
from tests.e2e.conftest import RawClient
from tests.e2e.metrics import scrape, value

pytestmark = pytest.mark.slow


def values(prompt: str, seed: int, steps: int, size: int = 64) -> dict:
    return {
        "prompt": prompt,
        "height": np.int32(size),
        "width": np.int32(size),
        "num_inference_steps": np.int32(steps),
        "seed": np.int64(seed),
    }


def run_in_thread(fn, *args):
    """Start fn(*args) in a thread; returns (thread, box) where box gets ("ok", result) or ("error", exc)."""
    box: list = []

    def target():
        try:
            box.append(("ok", fn(*args), time.monotonic()))
        except Exception as exc:  # asserted by the caller
            box.append(("error", exc, time.monotonic()))

    thread = threading.Thread(target=target)
    thread.start()
    return thread, box


def wait_for_steps(server, model: str, at_least: float, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while value(scrape(server.metrics_url), "omni_denoise_steps_total", model=model) < at_least:
        assert time.monotonic() < deadline, "the server never started stepping"
        time.sleep(0.02)


def test_join_midway_with_other_step_count_shares_calls_and_keeps_parity(server, flux_reference):
    client = RawClient(server, "grpc")
    before = scrape(server.metrics_url)
    steps_before = value(before, "omni_denoise_steps_total", model="flux")
    calls_before = value(before, "omni_step_batch_size_count", model="flux")
    long_job = values("a long walk", seed=21, steps=120)
    thread, long_box = run_in_thread(client.infer, "flux", long_job)
    wait_for_steps(server, "flux", steps_before + 5)  # the long one is mid-flight
    short_job = values("a short hop", seed=22, steps=5)
    short_image = client.infer("flux", short_job)
    thread.join(120)
    after = scrape(server.metrics_url)
    calls = value(after, "omni_step_batch_size_count", model="flux") - calls_before
    steps = value(after, "omni_denoise_steps_total", model="flux") - steps_before
    assert steps == 125
    assert calls <= 120, f"{calls} transformer calls for 125 request-steps: the short one never joined"
    assert long_box[0][0] == "ok", long_box
    assert_same_image(short_image, flux_reference("a short hop", 22, height=64, width=64, num_inference_steps=5))
    assert_same_image(long_box[0][1], flux_reference("a long walk", 21, height=64, width=64, num_inference_steps=120))
    client.close()


def test_other_key_is_not_blocked_behind_a_long_batch(server):
    client = RawClient(server, "grpc")
    steps_before = value(scrape(server.metrics_url), "omni_denoise_steps_total", model="flux")
    thread, long_box = run_in_thread(client.infer, "flux", values("big", seed=1, steps=150, size=96))
    wait_for_steps(server, "flux", steps_before + 3)
    short = client.infer("flux", values("small", seed=2, steps=4, size=32))
    short_done = time.monotonic()
    assert not long_box, "the long request finished first: the short one waited for it"
    thread.join(180)
    assert long_box[0][0] == "ok" and long_box[0][2] > short_done
    assert short.shape == (32, 32, 3)
    client.close()


def test_cancel_stops_the_work_frees_the_slot_and_spares_the_others(server, flux_reference):
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    raw = RawClient(server, "grpc")
    steps_before = value(scrape(server.metrics_url), "omni_denoise_steps_total", model="flux")
    answers: list = []
    handle = grpc.async_infer(
        "flux", raw.inputs(values("never mind", seed=3, steps=400)), lambda result, error: answers.append(error)
    )
    wait_for_steps(server, "flux", steps_before + 5)
    handle.cancel()
    survivor = raw.infer("flux", values("still here", seed=4, steps=4))
    assert_same_image(survivor, flux_reference("still here", 4, height=64, width=64, num_inference_steps=4))
    time.sleep(0.5)
    series = scrape(server.metrics_url)
    stopped_at = value(series, "omni_denoise_steps_total", model="flux")
    assert value(series, "omni_running_requests", model="flux") == 0
    time.sleep(1.0)
    assert value(scrape(server.metrics_url), "omni_denoise_steps_total", model="flux") == stopped_at, "still computing"
    assert stopped_at - steps_before < 200, "the cancelled request ran on"
    assert len(answers) <= 1 and (not answers or "ancel" in str(answers[0])), answers  # no late image
    grpc.close()
    raw.close()


def test_stream_sends_every_step_then_the_image(server, flux_reference):
    updates: list[StepUpdate] = []
    with OmniClient(server.grpc_url, protocol="grpc", model="flux_stream") as client:
        image = client.generate_stream(
            "a red circle", preview_every=3, on_progress=updates.append, output="numpy",
            height=64, width=64, num_inference_steps=7, seed=5,
        )  # fmt: skip
    assert [u.step for u in updates] == list(range(1, 8)) and {u.total_steps for u in updates} == {7}
    previews = {u.step: u.preview for u in updates if u.preview is not None}
    assert sorted(previews) == [3, 6]
    assert all(np.asarray(p).shape == (64, 64, 3) and np.asarray(p).dtype == np.uint8 for p in previews.values())
    assert_same_image(image, flux_reference("a red circle", 5, height=64, width=64, num_inference_steps=7))


def test_stream_final_flag_comes_last_and_errors_end_the_request(server):
    raw = RawClient(server, "grpc")
    responses: list = []
    done = threading.Event()

    def callback(result, error):
        responses.append((result, error))
        final = result is not None and result.get_response().parameters["triton_final_response"].bool_param
        if error is not None or final:
            done.set()

    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    grpc.start_stream(callback)
    grpc.async_stream_infer("flux_stream", raw.inputs(values("x", seed=1, steps=4)), enable_empty_final_response=True)
    assert done.wait(60)
    steps = [int(r.as_numpy("step")[0][0]) for r, _ in responses]
    assert steps == [1, 2, 3, 4]
    assert responses[-1][0].as_numpy("image") is not None
    assert all(r.as_numpy("image") is None for r, _ in responses[:-1])
    done.clear()
    grpc.async_stream_infer("flux_stream", raw.inputs({**values("x", seed=1, steps=4), "height": np.int32(33)}))
    assert done.wait(60)
    assert isinstance(responses[-1][1], InferenceServerException) and "height" in str(responses[-1][1])
    grpc.stop_stream()
    grpc.close()
    raw.close()


def test_stream_cancel_stops_the_request(server):
    raw = RawClient(server, "grpc")
    steps_before = value(scrape(server.metrics_url), "omni_denoise_steps_total", model="flux_stream")
    seen = threading.Event()
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    grpc.start_stream(lambda result, error: seen.set())
    grpc.async_stream_infer("flux_stream", raw.inputs(values("x", seed=1, steps=400)))
    assert seen.wait(60)
    grpc.stop_stream(cancel_requests=True)
    time.sleep(1.0)
    stopped_at = value(scrape(server.metrics_url), "omni_denoise_steps_total", model="flux_stream")
    time.sleep(1.0)
    assert value(scrape(server.metrics_url), "omni_denoise_steps_total", model="flux_stream") == stopped_at
    assert stopped_at - steps_before < 200
    assert value(scrape(server.metrics_url), "omni_running_requests", model="flux_stream") == 0
    grpc.close()
    raw.close()


def test_metrics_are_exported_per_model(server):
    client = RawClient(server, "http")
    client.infer("flux", values("metrics", seed=1, steps=2, size=32))
    series = scrape(server.metrics_url)
    for name in ("omni_queue_wait_seconds_count", "omni_request_latency_seconds_count", "omni_step_batch_size_count"):
        assert value(series, name, model="flux") >= 1, name
    assert value(series, "omni_denoise_steps_total", model="flux") >= 2
    assert ("omni_running_requests", frozenset({("model", "flux")})) in series
    client.close()
