"""Control ops on LongCat-Image's stages: sleep (both levels) and wake give the same images again."""

from __future__ import annotations

import pytest
import torch

from omni_backend.config import ControlConfig, EngineConfig, ModelConfig
from omni_backend.distributed.worker import make_runner
from omni_backend.engine.engine import DiffusionEngine, ModelAsleepError
from omni_backend.pipelines.base import Component
from omni_backend.pipelines.longcat_image import LongCatImageOptions
from omni_backend.request import DiffusionRequest, SamplingParams
from omni_backend.runner.model_runner import RunnerOutput, load_stages
from tests.control.test_control_engine import control, generate, images, transformer

pytestmark = pytest.mark.slow


def request(request_id: str, seed: int) -> DiffusionRequest:
    return DiffusionRequest(request_id, SamplingParams(32, 32, 2, 4.5, 1.0, seed), prompt="a red circle")


@pytest.mark.parametrize("level", [1, 2])
def test_sleep_refuses_requests_and_wake_gives_the_same_images(tiny_longcat_image, level):
    config = ModelConfig(
        family="longcat_image",
        model=str(tiny_longcat_image),
        device="cpu",
        control=ControlConfig(),
        options=LongCatImageOptions(),
    )
    stages = load_stages(config, Component.ALL, torch.device("cpu"))
    runner = make_runner(stages, config, Component.ALL, RunnerOutput.IMAGE, torch.device("cpu"), "longcat_image")
    engine = DiffusionEngine(runner, EngineConfig(max_num_seqs=4), control=config.control)
    try:
        before = images(generate(engine, request("a", 1), request("b", 2)))
        reply = control(engine, config, "sleep", level=level)
        assert reply.error is None and reply.result["state"] == "asleep"
        expected_device = "cpu" if level == 1 else "meta"  # level 2 really dropped the weights
        assert {p.device.type for p in transformer(engine).parameters()} == {expected_device}
        with pytest.raises(ModelAsleepError, match="model is asleep"):
            engine.submit(request("c", 3), lambda output: None)
        assert control(engine, config, "wake").result["state"] == "awake"
        after = images(generate(engine, request("a2", 1), request("b2", 2)))
        for a, b in zip(before, after, strict=True):
            assert (a == b).all()
        assert (before[0] != before[1]).any()
    finally:
        engine.stop()
