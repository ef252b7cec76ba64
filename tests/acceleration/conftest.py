"""Helpers for the acceleration tests: load the tiny FLUX with acceleration parameters, run requests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from omni_backend.config import EngineConfig, parse_model_config
from omni_backend.engine.observer import AccelerationObserver
from omni_backend.engine.scheduler import StepScheduler
from omni_backend.pipelines.base import Component
from omni_backend.pipelines.flux import FluxOptions
from omni_backend.request import DiffusionRequest, SamplingParams
from omni_backend.runner.model_runner import ModelRunner, RunnerOutput, load_accelerated

# (prompt, seed, negative_prompt, true_cfg_scale, steps): a plain and a true-CFG request
MIXED = [("a red circle on a blue background", 1, None, 1.0, 6), ("a green square", 2, "blurry", 3.0, 4)]


class CountingObserver(AccelerationObserver):
    """Sums what the features report, as the Triton metrics do."""

    def __init__(self) -> None:
        self.skipped = self.computed = self.hits = self.misses = self.offload_bytes = 0

    def on_cache_steps(self, skipped: int, computed: int) -> None:
        self.skipped += skipped
        self.computed += computed

    def on_prompt_cache(self, hits: int, misses: int) -> None:
        self.hits += hits
        self.misses += misses

    def on_offload_bytes(self, moved: int) -> None:
        self.offload_bytes += moved


def load(tiny_flux: Path, components: Component = Component.ALL, device: str = "cpu", **parameters: str):
    """(stages, applied acceleration, observer) for the tiny FLUX with config.pbtxt ``parameters``."""
    config = parse_model_config({"family": "flux", "model": str(tiny_flux), **parameters}, FluxOptions)
    observer = CountingObserver()
    stages, applied = load_accelerated(config, components, torch.device(device), observer)
    return stages, applied, observer


def make(i: int, prompt: str, seed: int, negative: str | None, cfg: float, steps: int, **extra) -> DiffusionRequest:
    params = SamplingParams(64, 64, steps, 3.5, cfg, seed, **extra)
    return DiffusionRequest(str(i), params, prompt=prompt, negative_prompt=negative)


def run(stages, requests: list[DiffusionRequest], max_num_seqs: int = 8) -> dict:
    """Drive scheduler + runner to completion (step batching); request id -> decoded image or video."""
    runner = ModelRunner(stages, RunnerOutput.IMAGE)
    scheduler = StepScheduler(EngineConfig(max_num_seqs=max_num_seqs), stages.batch_key)
    for request in requests:
        scheduler.add(request)
    images = {}
    while scheduler.has_work():
        plan = scheduler.schedule()
        result = runner.execute(plan)
        scheduler.update(plan, result)
        for output in result.finished:
            assert output.error is None, output.error
            images[output.request_id] = output.outputs[stages.output_name]
    assert not runner.states
    return images


@pytest.fixture(scope="session")
def uncached(tiny_flux) -> dict:
    """The MIXED requests, step-batched, without any acceleration: what every mode is compared with."""
    stages, _, _ = load(tiny_flux)
    return run(stages, [make(i, *case) for i, case in enumerate(MIXED)])
