"""The worker group behind the runner interface: parity, a killed rank, a fault on one rank alone
(a bad layout: tests/e2e)."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from omni_backend.config import EngineConfig, parse_model_config
from omni_backend.distributed.worker import (
    COLLECTIVE_TIMEOUT_S,
    ParallelRunner,
    RanksDivergedError,
    WorkerDiedError,
)
from omni_backend.engine.scheduler import StepPlan, StepScheduler
from omni_backend.pipelines.base import Component
from omni_backend.pipelines.flux import FluxOptions, FluxStages
from omni_backend.request import DiffusionRequest, SamplingParams
from omni_backend.runner.model_runner import RunnerOutput
from omni_backend.testing import faults
from omni_backend.testing.compare import assert_same_image

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def model_config(tiny_flux, **parallel: int):
    parameters = {"family": "flux", "model": str(tiny_flux), **{k: str(v) for k, v in parallel.items()}}
    return parse_model_config(parameters, FluxOptions)


@pytest.fixture(scope="module")
def runner(tiny_flux):
    stages = FluxStages.load(str(tiny_flux), Component.ALL, torch.float32, torch.device("cpu"), FluxOptions())
    config = model_config(tiny_flux, cfg_parallel_size=2)
    runner = ParallelRunner(stages, config, Component.ALL, RunnerOutput.IMAGE, "cpu")
    yield runner
    runner.close()


def request(i: int, negative: str | None, cfg: float, steps: int) -> DiffusionRequest:
    params = SamplingParams(64, 64, steps, 3.5, cfg, i)
    return DiffusionRequest(str(i), params, prompt=f"prompt {i}", negative_prompt=negative)


def run_to_completion(runner: ParallelRunner, requests: list[DiffusionRequest]) -> dict:
    scheduler = StepScheduler(EngineConfig(), runner.stages.batch_key)
    for r in requests:
        scheduler.add(r)
    outputs = {}
    while scheduler.has_work():
        plan = scheduler.schedule()
        result = runner.execute(plan)
        scheduler.update(plan, result)
        outputs.update({o.request_id: o for o in result.finished})
    return outputs


def expect(flux_reference, r: DiffusionRequest):
    p = r.params
    return flux_reference(
        r.prompt, p.seed, negative_prompt=r.negative_prompt, true_cfg_scale=p.true_cfg_scale, height=p.height,
        width=p.width, num_inference_steps=p.num_inference_steps,
    )  # fmt: skip


def test_cfg2_worker_group_matches_diffusers(runner, flux_reference):
    requests = [request(0, "blurry", 3.0, 3), request(1, None, 1.0, 2)]
    outputs = run_to_completion(runner, requests)
    for r in requests:
        assert outputs[r.request_id].error is None, outputs[r.request_id].error
        assert_same_image(outputs[r.request_id].outputs["image"], expect(flux_reference, r))


def test_killed_rank_fails_the_step_and_the_group_restarts(runner, flux_reference):
    doomed = request(5, "dark", 2.0, 4)
    first = runner.execute(StepPlan(admitted=[doomed], running_ids=["5"]))
    assert first.finished == [] and first.progress[0].step == 1  # mid-request: 1 of 4 steps done
    os.kill(runner._procs[1].pid, signal.SIGKILL)
    with pytest.raises(WorkerDiedError, match="parallel worker rank 1 died"):
        runner.execute(StepPlan(running_ids=["5"]))
    fresh = request(6, "dark", 2.0, 2)  # the next step starts a new group and serves new requests
    outputs = run_to_completion(runner, [fresh])
    assert_same_image(outputs["6"].outputs["image"], expect(flux_reference, fresh))


def test_a_step_failing_on_the_last_pipeline_rank_alone_fails_fast_and_the_group_restarts(
    tiny_flux, flux_reference, monkeypatch
):
    """pp2: the last rank alone runs the scheduler step; when it fails there, rank 0 would wait for the
    latents until the collective timeout. The driver sees the last rank's report and restarts the group."""
    monkeypatch.setenv(faults.ENV, "1")  # the spawned ranks inherit it
    stages = FluxStages.load(str(tiny_flux), Component.ALL, torch.float32, torch.device("cpu"), FluxOptions())
    runner = ParallelRunner(stages, model_config(tiny_flux, pipeline_parallel_size=2), Component.ALL,
                            RunnerOutput.IMAGE, "cpu")  # fmt: skip
    try:
        marked = f"a {faults.LAST_RANK_STEP_MARKER}"
        doomed = DiffusionRequest("7", SamplingParams(64, 64, 4, 3.5, 1.0, 7), prompt=marked)
        start = time.monotonic()
        with pytest.raises(RanksDivergedError, match="rank 1 failed where rank 0 did not .*injected"):
            run_to_completion(runner, [doomed])
        elapsed = time.monotonic() - start
        print(f"failed after {elapsed:.1f} s")
        assert elapsed < COLLECTIVE_TIMEOUT_S / 2  # a liveness bound: not the collective timeout
        assert not runner._procs  # the group was stopped
        fresh = request(8, None, 1.0, 3)  # the next request gets a fresh group, right
        outputs = run_to_completion(runner, [fresh])
        assert outputs["8"].error is None, outputs["8"].error
        assert_same_image(outputs["8"].outputs["image"], expect(flux_reference, fresh))
    finally:
        runner.close()
