"""OOM retry in the runner and drain in the engine, on the real tiny FLUX stages (no server)."""

from __future__ import annotations

import time

import pytest
import torch

from omni_backend.config import EngineConfig
from omni_backend.engine.engine import DiffusionEngine, ShuttingDownError
from omni_backend.engine.scheduler import StepPlan
from omni_backend.pipelines.base import Component
from omni_backend.pipelines.flux import FluxOptions, FluxStages
from omni_backend.request import DiffusionRequest, ErrorKind, SamplingParams
from omni_backend.runner import oom
from omni_backend.runner.model_runner import ModelRunner, RunnerOutput
from omni_backend.serving.drain import DrainSignal, request_drain
from omni_backend.testing import faults
from tests.engine.test_engine import Collector


@pytest.fixture(scope="module")
def stages(tiny_flux) -> FluxStages:
    return FluxStages.load(str(tiny_flux), Component.ALL, torch.float32, torch.device("cpu"), FluxOptions())


def request(request_id: str, prompt: str = "a red circle", seed: int = 0, steps: int = 2) -> DiffusionRequest:
    return DiffusionRequest(request_id, SamplingParams(32, 32, steps, 3.5, 1.0, seed), prompt=prompt)


def run_to_end(runner: ModelRunner, requests: list[DiffusionRequest]) -> dict:
    """Step every request to completion in shared calls; request id -> output."""
    outputs, plan = {}, StepPlan(admitted=list(requests), running_ids=[r.request_id for r in requests])
    while plan.running_ids:
        result = runner.execute(plan)
        outputs.update({o.request_id: o for o in result.finished})
        plan = StepPlan(running_ids=[i for i in plan.running_ids if i not in outputs])
    return outputs


def test_run_batched_retries_each_item_alone_once_after_an_oom():
    calls: list[list[int]] = []

    def fn(items):
        calls.append(list(items))
        if 3 in items:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [x * 10 for x in items]

    results = oom.run_batched(fn, [1, 3, 5], "denoising")
    assert calls == [[1, 3, 5], [1], [3], [5]]
    assert results[0] == 10 and results[2] == 50
    assert isinstance(results[1], oom.Failed)
    assert results[1].message == (
        "out of device memory during denoising (also when run alone, after its batch ran out of memory): "
        "CUDA out of memory. Tried to allocate 2.00 GiB"
    )
    with pytest.raises(ValueError):  # other faults are not retried: they fail the batch as before
        oom.run_batched(lambda items: (_ for _ in ()).throw(ValueError("bug")), [1, 2], "denoising")
    with pytest.raises(torch.OutOfMemoryError):  # alone already: nothing to split
        oom.run_batched(fn, [3], "denoising")


def test_oom_in_one_request_of_a_batch_fails_only_it(stages, monkeypatch):
    monkeypatch.setenv(faults.ENV, "1")
    injected = faults.maybe_inject(stages)
    assert isinstance(injected, faults.OomInjectingStages)
    batch = [request("a", seed=1), request("b", prompt=f"x {faults.OOM_MARKER}", seed=2), request("c", seed=3)]
    outputs = run_to_end(ModelRunner(injected, RunnerOutput.IMAGE), batch)
    assert "out of device memory during denoising (also when run alone" in outputs["b"].error
    alone = run_to_end(ModelRunner(stages, RunnerOutput.IMAGE), [request("a", seed=1), request("c", seed=3)])
    for request_id in ("a", "c"):  # the neighbours' images are exactly what they get without the fault
        assert outputs[request_id].error is None
        assert (outputs[request_id].outputs["image"] == alone[request_id].outputs["image"]).all()


def test_fault_injection_is_off_without_the_environment(stages, monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    assert faults.maybe_inject(stages) is stages
    outputs = run_to_end(ModelRunner(stages, RunnerOutput.IMAGE), [request("a", prompt=f"{faults.OOM_MARKER}")])
    assert outputs["a"].error is None  # the marker is just text


def test_drain_fails_queued_at_once_and_running_at_the_deadline(stages, tmp_path):
    drain_file = tmp_path / "drain.json"
    engine = DiffusionEngine(
        ModelRunner(stages, RunnerOutput.IMAGE), EngineConfig(max_num_seqs=1), drain=DrainSignal(drain_file)
    )
    collect = Collector(2)
    engine.submit(request("running", steps=10_000), collect)
    engine.submit(request("queued"), collect)
    time.sleep(0.5)
    request_drain(drain_file, time.time() + 1.5)
    assert collect.done.wait(30)
    queued, running = collect.outputs["queued"], collect.outputs["running"]
    assert queued.error_kind is ErrorKind.UNAVAILABLE and "had not started" in queued.error
    assert running.error_kind is ErrorKind.UNAVAILABLE
    assert running.error == "the server shut down before this request finished"
    with pytest.raises(ShuttingDownError):
        engine.submit(request("late"), collect)
    engine.stop()


def test_drain_lets_short_requests_finish(stages, tmp_path):
    drain_file = tmp_path / "drain.json"
    engine = DiffusionEngine(ModelRunner(stages, RunnerOutput.IMAGE), EngineConfig(), drain=DrainSignal(drain_file))
    collect = Collector(1)
    engine.submit(request("short", steps=30), collect)
    time.sleep(0.2)
    request_drain(drain_file, time.time() + 60)
    assert collect.done.wait(60)
    assert collect.outputs["short"].error is None
    engine.stop()
