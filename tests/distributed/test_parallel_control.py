"""Control ops on a worker group: a profile reaches every rank (one trace each); sleep is refused clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from omni_backend.config import EngineConfig, parse_model_config
from omni_backend.distributed.worker import ParallelRunner
from omni_backend.engine.control import ControlRefusedError
from omni_backend.engine.scheduler import StepScheduler
from omni_backend.pipelines.base import Component
from omni_backend.pipelines.flux import FluxOptions, FluxStages
from omni_backend.request import DiffusionRequest, SamplingParams
from omni_backend.runner.model_runner import RunnerOutput

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def test_profile_writes_one_trace_per_rank_and_sleep_is_refused(tiny_flux, tmp_path):
    parameters = {"family": "flux", "model": str(tiny_flux), "cfg_parallel_size": "2", "profile_dir": str(tmp_path)}
    config = parse_model_config(parameters, FluxOptions)
    stages = FluxStages.load(str(tiny_flux), Component.ALL, torch.float32, torch.device("cpu"), FluxOptions())
    runner = ParallelRunner(stages, config, Component.ALL, RunnerOutput.IMAGE, "cpu", "flux")
    try:
        assert runner.run_control("profile_start", {"max_steps": 10})["profiling"] is True
        status = runner.run_control("status", {})
        assert [r["profiling"] for r in status["ranks"]] == [True, True]
        scheduler = StepScheduler(EngineConfig(), runner.stages.batch_key)
        scheduler.add(DiffusionRequest("a", SamplingParams(32, 32, 2, 3.5, 4.0, 0), "a cat", "blurry"))
        finished = []
        while scheduler.has_work():
            plan = scheduler.schedule()
            result = runner.execute(plan)
            scheduler.update(plan, result)
            finished += result.finished
        assert finished[0].error is None
        traces = runner.run_control("profile_stop", {})["traces"]
        assert sorted(Path(t).name.split("-")[1] for t in traces) == ["rank0", "rank1"]
        for trace in traces:
            assert json.loads(Path(trace).read_text())["traceEvents"]
        for op, args in (("sleep", {"level": 1}), ("wake", {})):
            with pytest.raises(ControlRefusedError, match="parallel group"):
                runner.run_control(op, args)
    finally:
        runner.close()
