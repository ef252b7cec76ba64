"""Control ops on a worker group: a profile reaches every rank (one trace each); sleep and wake move every
rank's weights and the images after a wake are unchanged; level 2 is refused where ranks hold shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
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


def _generate(runner: ParallelRunner, seed: int) -> list:
    scheduler = StepScheduler(EngineConfig(), runner.stages.batch_key)
    scheduler.add(DiffusionRequest(f"r{seed}", SamplingParams(32, 32, 2, 3.5, 4.0, seed), "a cat", "blurry"))
    finished = []
    while scheduler.has_work():
        plan = scheduler.schedule()
        result = runner.execute(plan)
        scheduler.update(plan, result)
        finished += result.finished
    assert [f.error for f in finished] == [None]
    return finished[0].outputs["image"]


def _runner(tiny_flux, **parameters: str) -> ParallelRunner:
    config = parse_model_config({"family": "flux", "model": str(tiny_flux), **parameters}, FluxOptions)
    stages = FluxStages.load(str(tiny_flux), Component.ALL, torch.float32, torch.device("cpu"), FluxOptions())
    return ParallelRunner(stages, config, Component.ALL, RunnerOutput.IMAGE, "cpu", "flux")


def test_profile_sleep_and_wake_reach_every_rank(tiny_flux, tmp_path):
    runner = _runner(tiny_flux, cfg_parallel_size="2", profile_dir=str(tmp_path))
    try:
        assert runner.run_control("profile_start", {"max_steps": 10})["profiling"] is True
        status = runner.run_control("status", {})
        assert [r["profiling"] for r in status["ranks"]] == [True, True]
        before = _generate(runner, seed=3)
        traces = runner.run_control("profile_stop", {})["traces"]
        assert sorted(Path(t).name.split("-")[1] for t in traces) == ["rank0", "rank1"]
        for trace in traces:
            assert json.loads(Path(trace).read_text())["traceEvents"]
        for level in (1, 2):
            asleep = runner.run_control("sleep", {"level": level})
            assert [(r["state"], r["sleep_level"]) for r in asleep["ranks"]] == [("asleep", level)] * 2
            assert asleep["sleep_level"] == level  # what the engine reads to refuse or wake on requests
            awake = runner.run_control("wake", {})
            assert [r["state"] for r in awake["ranks"]] == ["awake", "awake"]
            np.testing.assert_array_equal(_generate(runner, seed=3), before)  # level 2: every rank reloaded
    finally:
        runner.close()


def test_sleep_level_2_is_refused_where_ranks_hold_shards(tiny_flux):
    runner = _runner(tiny_flux, tensor_parallel_size="2")
    try:
        with pytest.raises(ControlRefusedError, match="tensor_parallel_size") as info:
            runner.run_control("sleep", {"level": 2})
        assert info.value.field == "control.level"
        assert runner.run_control("status", {})["state"] == "awake"
        before = _generate(runner, seed=4)
        assert runner.run_control("sleep", {"level": 1})["sleep_level"] == 1  # each rank moves its own shards
        runner.run_control("wake", {})
        np.testing.assert_array_equal(_generate(runner, seed=4), before)
    finally:
        runner.close()
