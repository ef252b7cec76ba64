"""Control ops on the engine thread with the real tiny FLUX stages: sleep / wake, profiling, status."""

from __future__ import annotations

import json
import queue
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from omni_backend.config import AccelerationConfig, ControlConfig, EngineConfig, ModelConfig
from omni_backend.distributed.worker import make_runner
from omni_backend.engine.control import ControlCall, ControlRefusedError, ControlReply, parse_control
from omni_backend.engine.engine import DiffusionEngine, ModelAsleepError
from omni_backend.pipelines.base import Component
from omni_backend.pipelines.flux import FluxOptions
from omni_backend.request import DiffusionOutput, DiffusionRequest, ErrorKind, SamplingParams
from omni_backend.runner.model_runner import RunnerOutput, load_stages


def model_config(tiny_flux: Path, device: str = "cpu", **control) -> ModelConfig:
    return ModelConfig(
        family="flux", model=str(tiny_flux), device=device, control=ControlConfig(**control), options=FluxOptions()
    )


def start_engine(config: ModelConfig, device: str = "cpu") -> DiffusionEngine:
    stages = load_stages(config, Component.ALL, torch.device(device))
    runner = make_runner(stages, config, Component.ALL, RunnerOutput.IMAGE, torch.device(device), "flux")
    return DiffusionEngine(runner, EngineConfig(max_num_seqs=4), control=config.control)


def request(request_id: str, seed: int = 0, steps: int = 2) -> DiffusionRequest:
    return DiffusionRequest(request_id, SamplingParams(32, 32, steps, 3.5, 1.0, seed), prompt="a red circle")


def control(engine: DiffusionEngine, config: ModelConfig, op: str, **args) -> ControlReply:
    name, parsed = parse_control(json.dumps({"op": op, **args}), config.control)
    answers: queue.Queue[ControlReply] = queue.Queue()
    engine.control(ControlCall(name, parsed, answers.put))
    return answers.get(timeout=300)


def generate(engine: DiffusionEngine, *requests: DiffusionRequest) -> list[DiffusionOutput]:
    answers: queue.Queue[DiffusionOutput] = queue.Queue()
    for r in requests:
        engine.submit(r, answers.put)
    outputs = {o.request_id: o for o in (answers.get(timeout=300) for _ in requests)}
    return [outputs[r.request_id] for r in requests]


def images(outputs: list[DiffusionOutput]) -> list[np.ndarray]:
    assert all(o.error is None for o in outputs), [o.error for o in outputs]
    return [o.outputs["image"] for o in outputs]


def transformer(engine: DiffusionEngine) -> torch.nn.Module:
    return engine.runner.stages.pipe.transformer


@pytest.mark.parametrize("level", [1, 2])
def test_sleep_refuses_requests_and_wake_gives_the_same_images(tiny_flux, level):
    config = model_config(tiny_flux)
    engine = start_engine(config)
    try:
        before = images(generate(engine, request("a", seed=1), request("b", seed=2)))
        reply = control(engine, config, "sleep", level=level)
        assert reply.error is None and reply.result["state"] == "asleep" and reply.result["sleep_level"] == level
        expected_device = "cpu" if level == 1 else "meta"  # level 2 really dropped the weights
        assert {p.device.type for p in transformer(engine).parameters()} == {expected_device}
        with pytest.raises(ModelAsleepError, match="model is asleep"):
            engine.submit(request("c"), lambda output: None)
        assert control(engine, config, "status").result["state"] == "asleep"
        woken = control(engine, config, "wake")
        assert woken.error is None and woken.result["state"] == "awake"
        after = images(generate(engine, request("a2", seed=1), request("b2", seed=2)))
        for old, new in zip(before, after, strict=True):
            np.testing.assert_array_equal(old, new)
        assert (before[0] != before[1]).any()
    finally:
        engine.stop()


def test_wake_on_request_wakes_the_model_for_a_request(tiny_flux):
    config = model_config(tiny_flux, wake_on_request=True)
    engine = start_engine(config)
    try:
        [before] = images(generate(engine, request("a", seed=3)))
        assert control(engine, config, "sleep", level=2).result["sleep_level"] == 2
        [after] = images(generate(engine, request("b", seed=3)))
        np.testing.assert_array_equal(before, after)
        assert control(engine, config, "status").result["state"] == "awake"
    finally:
        engine.stop()


def test_sleep_waits_for_running_requests_and_refuses_the_queued(tiny_flux):
    """Sleep asked at the first step of a running request: it finishes; one queued meanwhile is refused."""
    config = model_config(tiny_flux)
    engine = start_engine(config)
    events: list[str] = []
    replies: queue.Queue[ControlReply] = queue.Queue()
    outputs: queue.Queue[DiffusionOutput] = queue.Queue()
    asked = threading.Event()

    def on_progress(progress) -> None:  # on the engine thread, between two steps of "running"
        if asked.is_set():
            return
        asked.set()
        name, args = parse_control('{"op": "sleep", "level": 1}', config.control)
        engine.control(ControlCall(name, args, lambda r: (events.append("asleep"), replies.put(r))))
        engine.submit(request("queued"), lambda o: (events.append(o.request_id), outputs.put(o)))

    try:
        engine.submit(request("running", steps=4), lambda o: (events.append(o.request_id), outputs.put(o)), on_progress)
        reply = replies.get(timeout=300)
        done = {o.request_id: o for o in (outputs.get(timeout=300) for _ in range(2))}
        assert reply.error is None and reply.result["state"] == "asleep"
        assert done["running"].error is None and done["running"].outputs["image"].shape == (32, 32, 3)
        assert done["queued"].error_kind is ErrorKind.UNAVAILABLE and "model is asleep" in done["queued"].error
        assert events.index("running") < events.index("asleep") < events.index("queued")
    finally:
        engine.stop()


def test_profile_writes_a_chrome_trace_and_stops_at_its_step_limit(tiny_flux, tmp_path):
    config = model_config(tiny_flux, profile_dir=str(tmp_path / "traces"), profile_max_steps=50)
    engine = start_engine(config)
    try:
        assert control(engine, config, "profile_start").result == {"profiling": True, "max_steps": 50}
        assert control(engine, config, "status").result["profiling"] is True
        again = control(engine, config, "profile_start")
        assert again.error_kind is ErrorKind.INVALID_ARG and "already running" in again.error
        images(generate(engine, request("a")))
        [trace] = control(engine, config, "profile_stop").result["traces"]
        assert Path(trace).parent == tmp_path / "traces" and Path(trace).name.startswith("flux-rank0-")
        events = json.loads(Path(trace).read_text())["traceEvents"]
        assert any("aten::" in str(e.get("name")) for e in events)  # the steps' torch ops were recorded
        # a forgotten trace stops by itself: max_steps=1, a 2-step request
        assert control(engine, config, "profile_start", max_steps=1).error is None
        images(generate(engine, request("b")))
        assert control(engine, config, "status").result["profiling"] is False
        assert len(control(engine, config, "profile_stop").result["traces"]) == 1
        assert "no profile is running" in control(engine, config, "profile_stop").error
    finally:
        engine.stop()


def test_control_op_validation(tiny_flux):
    off = ControlConfig()
    for raw, field in [
        ("not json", "control"),
        ('["op"]', "control"),
        ('{"op": "reboot"}', "control"),
        ('{"op": "sleep", "level": 3}', "control.level"),
        ('{"op": "sleep", "level": true}', "control.level"),
        ('{"op": "sleep", "level": 1, "when": "now"}', "control.when"),
        ('{"op": "status", "verbose": 1}', "control.verbose"),
        ('{"op": "profile_start"}', "profile_dir"),
        ('{"op": "profile_stop"}', "profile_dir"),
    ]:
        with pytest.raises(ValueError) as info:
            parse_control(raw, off)
        assert info.value.field == field, raw
    on = ControlConfig(profile_dir="/tmp/x", profile_max_steps=10)
    assert parse_control('{"op": "profile_start", "max_steps": 5}', on) == ("profile_start", {"max_steps": 5})
    with pytest.raises(ValueError, match=r"control.max_steps: 11 is not an integer in \[1, 10\]"):
        parse_control('{"op": "profile_start", "max_steps": 11}', on)
    assert parse_control('{"op": "sleep"}', off) == ("sleep", {"level": 1})


def test_sleep_is_refused_where_it_cannot_be_undone_safely(tiny_flux):
    config = model_config(tiny_flux)
    stages = load_stages(config, Component.ALL, torch.device("cpu"))
    for accel, level, field in [
        (AccelerationConfig(offload="model"), 1, "control"),
        (AccelerationConfig(cache_backend="tea_cache"), 2, "control.level"),
    ]:
        runner = make_runner(stages, replace(config, acceleration=accel), Component.ALL, RunnerOutput.IMAGE,
                             torch.device("cpu"))  # fmt: skip
        with pytest.raises(ControlRefusedError) as info:
            runner.run_control("sleep", {"level": level})
        assert info.value.field == field
        assert runner.control.sleep_level == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device memory is measured on CUDA only")
@pytest.mark.parametrize("level", [1, 2])
def test_sleep_frees_device_memory(tiny_flux, level):
    config = model_config(tiny_flux, device="cuda")
    engine = start_engine(config, "cuda")
    try:
        [before] = images(generate(engine, request("a", seed=5)))
        awake = torch.cuda.memory_allocated()
        asleep = control(engine, config, "sleep", level=level).result
        sleeping = torch.cuda.memory_allocated()
        weights = sum(p.numel() * p.element_size() for p in transformer(engine).parameters())
        print(f"level {level}: allocated {awake} -> {sleeping} bytes (transformer weights {weights} bytes)")
        assert awake - sleeping >= weights, (awake, asleep)
        assert asleep["device_memory_allocated"] < awake
        control(engine, config, "wake")
        # the weights are back (level 2: reloaded); other allocations (request tensors) may differ from before
        assert torch.cuda.memory_allocated() - sleeping >= weights
        assert all(p.device.type == "cuda" for p in transformer(engine).parameters())
        [after] = images(generate(engine, request("b", seed=5)))
        np.testing.assert_array_equal(before, after)
    finally:
        engine.stop()
