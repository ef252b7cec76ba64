"""The engine thread on the real tiny FLUX stages: deferred completion, faults, shutdown."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from omni_backend.config import EngineConfig, parse_model_config
from omni_backend.distributed.worker import make_runner
from omni_backend.engine.engine import DiffusionEngine
from omni_backend.engine.observer import EngineObserver
from omni_backend.engine.scheduler import QueueFullError, StepPlan
from omni_backend.pipelines.base import Component
from omni_backend.pipelines.flux import FluxOptions, FluxStages
from omni_backend.request import DiffusionOutput, DiffusionRequest, ErrorKind, SamplingParams
from omni_backend.runner.model_runner import PREVIEW_MAX_SIDE, ModelRunner, RunnerOutput, downscale_preview
from omni_backend.testing.compare import assert_same_image


@pytest.fixture(scope="module")
def stages(tiny_flux) -> FluxStages:
    return FluxStages.load(str(tiny_flux), Component.ALL, torch.float32, torch.device("cpu"), FluxOptions())


def request(request_id: str, seed: int = 0, steps: int = 2) -> DiffusionRequest:
    return DiffusionRequest(request_id, SamplingParams(32, 32, steps, 3.5, 1.0, seed), prompt="a red circle")


class Collector:
    def __init__(self, expected: int):
        self.outputs: dict[str, DiffusionOutput] = {}
        self.expected = expected
        self.done = threading.Event()
        self.lock = threading.Lock()

    def __call__(self, output: DiffusionOutput) -> None:
        with self.lock:
            assert output.request_id not in self.outputs, "answered twice"
            self.outputs[output.request_id] = output
            if len(self.outputs) == self.expected:
                self.done.set()


def test_concurrent_submissions_all_complete(stages):
    engine = DiffusionEngine(ModelRunner(stages, RunnerOutput.IMAGE), EngineConfig(max_num_seqs=4))
    collect = Collector(6)
    threads = [threading.Thread(target=engine.submit, args=(request(str(i), seed=i), collect)) for i in range(6)]
    for t in threads:
        t.start()
    assert collect.done.wait(60)
    engine.stop()
    images = [collect.outputs[str(i)].outputs["image"] for i in range(6)]
    assert all(o.error is None for o in collect.outputs.values())
    assert all(image.shape == (32, 32, 3) for image in images)
    assert (images[0] != images[1]).any(), "different seeds gave the same image"


class FailingOnceRunner(ModelRunner):
    """Injects a bug into the first step (what no real input can trigger on demand)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.failed = False

    def execute(self, plan):
        if not self.failed:
            self.failed = True
            raise RuntimeError("injected fault")
        return super().execute(plan)


def test_a_step_fault_fails_its_requests_and_the_engine_keeps_serving(stages):
    engine = DiffusionEngine(FailingOnceRunner(stages, RunnerOutput.IMAGE), EngineConfig())
    first = Collector(1)
    engine.submit(request("a"), first)
    assert first.done.wait(30)
    assert "injected fault" in first.outputs["a"].error
    second = Collector(1)
    engine.submit(request("b"), second)
    assert second.done.wait(30)
    engine.stop()
    assert second.outputs["b"].error is None and second.outputs["b"].outputs["image"].shape == (32, 32, 3)


def test_stop_answers_every_pending_request(stages):
    engine = DiffusionEngine(ModelRunner(stages, RunnerOutput.IMAGE), EngineConfig(max_num_seqs=1))
    collect = Collector(5)
    for i in range(5):
        engine.submit(request(str(i), steps=50), collect)
    engine.stop()
    assert collect.done.wait(30)
    assert any("unloaded" in (o.error or "") for o in collect.outputs.values())
    with pytest.raises(RuntimeError, match="shutting down"):
        engine.submit(request("late"), collect)


def test_a_full_queue_refuses_new_requests(stages):
    engine = DiffusionEngine(ModelRunner(stages, RunnerOutput.IMAGE), EngineConfig(max_num_seqs=1, max_queue_size=1))
    collect = Collector(2)
    engine.submit(request("a", steps=30), collect)
    refused = 0
    for i in range(3):  # the queue holds one waiting request at most
        try:
            engine.submit(request(f"b{i}", steps=1), collect)
        except QueueFullError:
            refused += 1
    assert refused >= 1
    engine.stop()


def test_cancelled_request_stops_and_others_finish(stages):
    engine = DiffusionEngine(ModelRunner(stages, RunnerOutput.IMAGE), EngineConfig())
    cancel = threading.Event()
    steps_seen: list[int] = []

    def on_progress(update):
        steps_seen.append(update.step)
        if update.step == 3:
            cancel.set()

    collect = Collector(2)
    engine.submit(request("doomed", steps=200), collect, on_progress, cancel.is_set)
    engine.submit(request("fine", seed=1, steps=6), collect)
    assert collect.done.wait(60)
    engine.stop()
    doomed, fine = collect.outputs["doomed"], collect.outputs["fine"]
    assert doomed.error_kind is ErrorKind.CANCELLED and not doomed.outputs
    assert max(steps_seen) <= 4, "the cancelled request kept running"
    assert fine.error is None and fine.outputs["image"].shape == (32, 32, 3)
    assert not engine.runner.states, "the cancelled request's state was not freed"


def test_queue_deadline_fails_waiting_requests_only(stages):
    engine = DiffusionEngine(ModelRunner(stages, RunnerOutput.IMAGE), EngineConfig(max_num_seqs=1))
    collect = Collector(2)
    now = time.monotonic()
    engine.submit(replace(request("running", steps=30), queue_deadline=now + 0.05), collect)
    engine.submit(replace(request("waiting"), queue_deadline=now + 0.05), collect)
    assert collect.done.wait(60)
    engine.stop()
    assert collect.outputs["running"].error is None  # started in time: its deadline no longer applies
    waiting = collect.outputs["waiting"]
    assert waiting.error_kind is ErrorKind.UNAVAILABLE and "timed out" in waiting.error


def test_progress_and_previews(stages, flux_reference):
    engine = DiffusionEngine(ModelRunner(stages, RunnerOutput.IMAGE), EngineConfig())
    updates = []
    collect = Collector(1)
    engine.submit(replace(request("p", seed=4, steps=6), preview_every=2), collect, updates.append)
    assert collect.done.wait(60)
    engine.stop()
    assert [u.step for u in updates] == [1, 2, 3, 4, 5, 6] and {u.total_steps for u in updates} == {6}
    assert [u.step for u in updates if u.preview is not None] == [2, 4]  # the last step sends the image
    assert updates[1].preview.shape == (32, 32, 3) and updates[1].preview.dtype == np.uint8
    final = collect.outputs["p"].outputs["image"]
    # the prediction sharpens towards the final image as steps go by
    err = [np.abs(u.preview.astype(int) - final.astype(int)).mean() for u in updates if u.preview is not None]
    assert err[1] < err[0]


def test_previews_are_downscaled_frame_by_frame():
    """Images and videos alike: at most PREVIEW_MAX_SIDE on the long side, frames kept, small ones untouched."""
    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, (3, 300, 600, 3), dtype=np.uint8)
    small = downscale_preview(video)
    assert small.shape == (3, 128, PREVIEW_MAX_SIDE, 3) and small.dtype == np.uint8
    for frame in range(3):
        assert np.array_equal(small[frame], downscale_preview(video[frame]))  # each frame as an image preview
    assert downscale_preview(video[0]).shape == (128, PREVIEW_MAX_SIDE, 3)
    tiny = video[:, :32, :48]
    assert downscale_preview(tiny) is tiny


class BrokenObserver(EngineObserver):
    def on_step(self, batch_size: int) -> None:
        raise RuntimeError("metrics backend gone")


def test_a_failing_observer_never_costs_a_request(stages):
    engine = DiffusionEngine(ModelRunner(stages, RunnerOutput.IMAGE), EngineConfig(), BrokenObserver())
    collect = Collector(1)
    engine.submit(request("a"), collect)
    assert collect.done.wait(30)
    engine.stop()
    assert collect.outputs["a"].error is None


def test_an_encoding_fault_fails_only_the_joiners(stages):
    class FaultyEncoder(ModelRunner):
        """Injects a text-encoder fault for one prompt (no real input triggers one on demand)."""

        def _admit(self, requests, result):
            if any(r.prompt == "boom" for r in requests):
                original, self.stages.encode = self.stages.encode, None  # calling None raises TypeError
                try:
                    return super()._admit(requests, result)
                finally:
                    self.stages.encode = original
            return super()._admit(requests, result)

    engine = DiffusionEngine(FaultyEncoder(stages, RunnerOutput.IMAGE), EngineConfig())
    collect = Collector(1)
    engine.submit(replace(request("long", steps=40)), collect)
    time.sleep(0.05)
    bad = Collector(1)
    engine.submit(DiffusionRequest("bad", SamplingParams(32, 32, 2, 3.5, 1.0, 0), prompt="boom"), bad)
    assert bad.done.wait(30) and collect.done.wait(60)
    engine.stop()
    assert "encoding failed" in bad.outputs["bad"].error
    assert collect.outputs["long"].error is None
    assert not engine.runner.states


def test_stage_timings_are_measured_and_logged_when_enabled(stages, caplog):
    engine = DiffusionEngine(
        ModelRunner(stages, RunnerOutput.IMAGE), EngineConfig(max_num_seqs=1, log_stage_timings=True)
    )
    collect = Collector(2)
    with caplog.at_level("INFO", logger="omni_backend.engine.engine"):
        engine.submit(request("first", steps=20), collect)
        engine.submit(request("second", steps=3), collect)  # waits for the first: it has a queue time
        assert collect.done.wait(60)
        engine.stop()
    first, second = collect.outputs["first"].timings, collect.outputs["second"].timings
    assert (first.steps, second.steps) == (20, 3)
    assert min(first.encode_s, first.denoise_s, first.decode_s) > 0
    assert second.queue_s > first.queue_s and second.queue_s >= first.denoise_s * 0.5
    assert first.denoise_s > second.denoise_s  # 20 steps cost more than 3
    lines = [r.getMessage() for r in caplog.records if "denoise" in r.getMessage()]
    assert len(lines) == 2 and "(20 steps)" in " ".join(lines)


# ---------------------------------------------------------------- background decoding (runner/decoder.py)


class GatedDecode:
    """Wraps ``stages.decode``: the first decode of ``gated`` images waits for ``gate`` (then raises ``fault``)."""

    def __init__(self, stages: FluxStages, gated: int = 1, fault: str | None = None):
        self.stages, self.original = stages, stages.decode
        self.gated, self.fault = gated, fault
        self.gate, self.entered = threading.Event(), threading.Event()
        self.threads: list[str] = []

    def __call__(self, latents):
        self.threads.append(threading.current_thread().name)
        if len(latents) == self.gated and not self.entered.is_set():
            self.entered.set()
            assert self.gate.wait(30), "the test never opened the gate"
            if self.fault is not None:
                raise RuntimeError(self.fault)
        return self.original(latents)

    def __enter__(self) -> GatedDecode:
        self.stages.decode = self
        return self

    def __exit__(self, *exc) -> None:
        self.stages.decode = self.original


def background_engine(stages: FluxStages, config: EngineConfig | None = None) -> DiffusionEngine:
    return DiffusionEngine(ModelRunner(stages, RunnerOutput.IMAGE, background_decode=True), config or EngineConfig())


def run_to_completion(engine: DiffusionEngine, requests: list[DiffusionRequest]) -> dict[str, np.ndarray]:
    collect = Collector(len(requests))
    for r in requests:
        engine.submit(r, collect)
    assert collect.done.wait(60)
    engine.stop()
    engine.runner.close()
    assert all(o.error is None for o in collect.outputs.values())
    return {i: o.outputs["image"] for i, o in collect.outputs.items()}


def test_images_are_the_same_decoded_in_the_background(stages):
    def requests() -> list[DiffusionRequest]:
        return [request("a", seed=1, steps=2), request("b", seed=2, steps=5), request("c", seed=3, steps=3)]

    inline = run_to_completion(DiffusionEngine(ModelRunner(stages, RunnerOutput.IMAGE), EngineConfig()), requests())
    background = run_to_completion(background_engine(stages), requests())
    for request_id, image in inline.items():
        np.testing.assert_array_equal(background[request_id], image)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_background_decode_runs_on_its_own_stream_with_the_same_images(tiny_flux):
    stages = FluxStages.load(str(tiny_flux), Component.ALL, torch.float32, torch.device("cuda"), FluxOptions())

    def requests() -> list[DiffusionRequest]:  # decodes of the short ones overlap the long one's steps
        return [request("a", seed=1, steps=2), request("b", seed=2, steps=12), request("c", seed=3, steps=4)]

    inline = run_to_completion(DiffusionEngine(ModelRunner(stages, RunnerOutput.IMAGE), EngineConfig()), requests())
    streams, original = [], stages.decode
    stages.decode = lambda latents: (streams.append(torch.cuda.current_stream()), original(latents))[1]
    try:
        background = run_to_completion(background_engine(stages), requests())
    finally:
        stages.decode = original
    assert streams and all(s != torch.cuda.default_stream() for s in streams), "decoded on the default stream"
    for request_id, image in inline.items():
        assert_same_image(background[request_id], image)


def test_a_finished_request_leaves_the_batch_while_it_is_decoded(stages):
    """The short request's decode is held: the long one keeps stepping, and a third takes the free slot."""
    engine = background_engine(stages, EngineConfig(max_num_seqs=2))
    steps: list[int] = []
    collect = Collector(3)
    with GatedDecode(stages) as decode:
        engine.submit(request("short", seed=1, steps=2), collect)
        engine.submit(request("long", seed=2, steps=8), collect, lambda p: steps.append(p.step))
        assert decode.entered.wait(30)
        engine.submit(request("joiner", seed=3, steps=2), collect)  # running: long only, so it joins now
        try:
            waited = 0
            while len(steps) < 8 and waited < 3000:
                time.sleep(0.01)
                waited += 1
            assert steps == list(range(1, 9)), "the long request did not step while the short one was decoded"
            assert "short" not in collect.outputs
        finally:
            decode.gate.set()
        assert collect.done.wait(60)
    engine.stop()
    engine.runner.close()
    assert all(o.error is None for o in collect.outputs.values())
    assert decode.threads[0].startswith("omni-decode"), decode.threads
    assert not engine.runner.states


def test_a_request_cancelled_while_decoding_is_answered_once(stages):
    engine = background_engine(stages)
    cancel = threading.Event()
    collect = Collector(2)  # asserts nobody is answered twice
    with GatedDecode(stages) as decode:
        engine.submit(request("doomed", seed=1, steps=2), collect, None, cancel.is_set)
        engine.submit(request("other", seed=2, steps=30), collect)
        assert decode.entered.wait(30)
        cancel.set()
        for _ in range(3000):  # dropped at the next step boundary, its decode still held
            if "doomed" in collect.outputs:
                break
            time.sleep(0.01)
        decode.gate.set()
        assert collect.done.wait(60)
        engine.runner.wait_decoded()
    engine.stop()
    engine.runner.close()
    assert collect.outputs["doomed"].error_kind is ErrorKind.CANCELLED
    assert collect.outputs["other"].error is None


def test_a_background_decode_fault_fails_its_request_and_the_engine_keeps_serving(stages):
    engine = background_engine(stages)
    collect = Collector(1)
    with GatedDecode(stages, fault="injected VAE fault") as decode:
        decode.gate.set()
        engine.submit(request("bad", steps=2), collect)
        assert collect.done.wait(30)
    assert "decoding failed: injected VAE fault" in collect.outputs["bad"].error
    after = Collector(1)
    engine.submit(request("good", steps=2), after)
    assert after.done.wait(30)
    engine.stop()
    engine.runner.close()
    assert after.outputs["good"].error is None


def test_a_joiner_with_an_input_image_waits_for_the_decode_thread(stages):
    """Edit and image-to-video families run the VAE on their input image while encoding: video VAEs keep
    per-call caches on the module, so that waits for a background decode (text-only joiners do not)."""
    runner = ModelRunner(stages, RunnerOutput.IMAGE, background_decode=True)
    encodes: list[bool] = []  # whether the held decode had been let go when each encode ran

    def encode(requests):
        encodes.append(decode.gate.is_set())
        return FluxStages.encode(stages, requests)

    with GatedDecode(stages) as decode:
        stages.encode = encode
        try:
            runner.execute(StepPlan(admitted=[request("a", steps=1)], running_ids=["a"]))
            assert decode.entered.wait(30)
            runner.execute(StepPlan(admitted=[request("text", steps=2)], running_ids=["text"]))  # not held
            with_image = replace(request("image", steps=1), input_image=np.zeros((32, 32, 3), np.uint8))
            joined = threading.Thread(
                target=runner.execute, args=(StepPlan(admitted=[with_image], running_ids=["image"]),)
            )
            joined.start()
            joined.join(0.3)
            assert joined.is_alive(), "the joiner with an input image did not wait for the decode"
            decode.gate.set()
            joined.join(30)
        finally:
            del stages.encode
    assert encodes == [False, False, True]
    runner.close()


def test_wait_decoded_returns_after_the_held_decode(stages):
    """What control ops wait for; a runner driven directly (warm-up) reads the outputs from the future."""
    runner = ModelRunner(stages, RunnerOutput.IMAGE, background_decode=True)
    with GatedDecode(stages) as decode:
        result = runner.execute(StepPlan(admitted=[request("a", steps=1)], running_ids=["a"]))
        assert not result.finished and [d.request_ids for d in result.decoding] == [["a"]]
        assert decode.entered.wait(30)
        waited = threading.Event()
        waiter = threading.Thread(target=lambda: (runner.wait_decoded(), waited.set()))
        waiter.start()
        assert not waited.wait(0.3), "wait_decoded returned while a decode was held"
        decode.gate.set()
        waiter.join(30)
        assert waited.is_set()
    [output] = result.decoding[0].outputs.result()
    assert output.error is None and output.outputs["image"].shape == (32, 32, 3)
    runner.close()


@pytest.mark.parametrize(
    ("params", "device", "expected"),
    [
        ({}, "cpu", False),  # auto: two threads of kernels would share the CPU's cores
        ({}, "cuda", True),
        ({"background_decode": "true"}, "cpu", True),
        ({"background_decode": "false"}, "cuda", False),
        ({"background_decode": "true", "offload": "model"}, "cpu", False),  # the VAE takes its turn on the device
    ],
)
def test_background_decode_setting(stages, params, device, expected):
    config = parse_model_config({"family": "flux", "model": "tiny-flux", **params}, FluxOptions)
    runner = make_runner(stages, config, Component.ALL, RunnerOutput.IMAGE, torch.device(device))
    assert (runner._decoder is not None) is expected
    transformer_stage = make_runner(stages, config, Component.ALL, RunnerOutput.LATENTS, torch.device(device))
    assert transformer_stage._decoder is None  # latents: nothing to decode
