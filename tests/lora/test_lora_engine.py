"""LoRA through the engine on the real tiny FLUX: parity with diffusers, mixed batches, LRU, pinning."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from omni_backend.config import ControlConfig, EngineConfig, LoraConfig, ModelConfig, parse_model_config
from omni_backend.engine.control import ControlRefusedError
from omni_backend.engine.engine import DiffusionEngine
from omni_backend.engine.observer import AccelerationObserver
from omni_backend.lora.registry import LoraRegistry, create_lora_registry
from omni_backend.pipelines.base import Component
from omni_backend.pipelines.flux import FluxOptions, FluxStages
from omni_backend.request import DiffusionOutput, DiffusionRequest, LoraSelection, SamplingParams
from omni_backend.runner.control import RunnerControl
from omni_backend.runner.model_runner import ModelRunner, RunnerOutput, load_accelerated
from omni_backend.testing.compare import assert_same_image
from tests.lora.conftest import ADAPTERS

PROMPT, SIZE, STEPS = "a red circle on a blue background", 64, 3


@pytest.fixture
def stages(tiny_flux) -> FluxStages:
    """Fresh stages per test: adapters loaded by one test must not leak into the next."""
    return FluxStages.load(str(tiny_flux), Component.ALL, torch.float32, torch.device("cpu"), FluxOptions())


def registry(stages: FluxStages, lora_dir: Path, max_loras: int = 4, pinned: str = "") -> LoraRegistry:
    return LoraRegistry(LoraConfig(str(lora_dir), max_loras, pinned), stages.lora_adapter())


def request(request_id: str, seed: int, lora: tuple[str, float] | None = None) -> DiffusionRequest:
    params = SamplingParams(SIZE, SIZE, STEPS, 3.5, 1.0, seed)
    selection = LoraSelection(*lora) if lora is not None else None
    return DiffusionRequest(request_id, params, prompt=PROMPT, lora=selection)


def serve(stages: FluxStages, loras: LoraRegistry, requests: list[DiffusionRequest]) -> tuple[dict, list[int]]:
    """Submit all at once to a real engine; (request id -> output, requests per transformer call)."""
    calls: list[int] = []
    runner = ModelRunner(stages, RunnerOutput.IMAGE, loras=loras)
    inner = stages.denoise
    stages.denoise = lambda states: calls.append(len(states)) or inner(states)  # type: ignore[method-assign]
    engine_ = DiffusionEngine(runner, EngineConfig())
    outputs: dict[str, DiffusionOutput] = {}
    done = threading.Event()

    def collect(output: DiffusionOutput) -> None:
        outputs[output.request_id] = output
        if len(outputs) == len(requests):
            done.set()

    for r in requests:
        engine_.submit(r, collect)
    assert done.wait(300)
    engine_.stop()
    stages.denoise = inner  # type: ignore[method-assign]
    return outputs, calls


def image(output: DiffusionOutput) -> np.ndarray:
    assert output.error is None, output.error
    return output.outputs["image"]


def reference(lora_reference, flux_reference, seed: int, lora: tuple[str, float] | None) -> np.ndarray:
    kwargs = {"height": SIZE, "width": SIZE, "num_inference_steps": STEPS}
    if lora is None:
        return flux_reference(PROMPT, seed, **kwargs)
    return lora_reference(PROMPT, seed, *lora, **kwargs)


def test_the_adapter_changes_the_image(lora_reference, flux_reference):
    """Otherwise parity with an adapter would prove nothing."""
    base = reference(lora_reference, flux_reference, 5, None).astype(int)
    for lora in (("style1", 1.0), ("style2", 1.0), ("style1", 0.5)):
        adapted = reference(lora_reference, flux_reference, 5, lora).astype(int)
        assert np.abs(adapted - base).mean() > 3, f"{lora} barely changes the image"


def test_mixed_batch_equals_separate_references(stages, lora_dir, lora_reference, flux_reference):
    """Base, two adapters and two scales of one adapter, all submitted at once: each equals its reference."""
    mix = [None, ("style1", 1.0), ("style2", 0.7), ("style1", 0.5), None, ("style.3", -1.5)]
    loras = registry(stages, lora_dir)
    outputs, calls = serve(stages, loras, [request(str(i), seed=10 + i, lora=lora) for i, lora in enumerate(mix)])
    for i, lora in enumerate(mix):
        assert_same_image(image(outputs[str(i)]), reference(lora_reference, flux_reference, 10 + i, lora))
    # requests 0 and 4 (base) shared calls; one call never mixes two adapter settings
    assert max(calls) == 2 and sum(calls) == len(mix) * STEPS
    assert sorted(loras.describe()["resident"]) == ["style.3", "style1", "style2"]


def test_base_weights_are_untouched(stages, lora_dir):
    before = {k: v.clone() for k, v in stages.pipe.transformer.state_dict().items()}
    loras = registry(stages, lora_dir)
    serve(stages, loras, [request("a", 1, ("style1", 2.0)), request("b", 1)])
    after = stages.pipe.transformer.state_dict()
    for key, value in before.items():
        # peft wraps a targeted Linear: its weights move to <module>.base_layer
        head, _, leaf = key.rpartition(".")
        base_key = key if key in after else f"{head}.base_layer.{leaf}"
        assert torch.equal(after[base_key], value), key


def test_lru_eviction_and_reload_keep_results_right(stages, lora_dir, lora_reference, flux_reference):
    """max_loras=1: alternating adapters evict each other, reloads give the same images."""
    loras = registry(stages, lora_dir, max_loras=1)
    seen = []
    for i, name in enumerate(["style1", "style2", "style1"]):
        outputs, _ = serve(stages, loras, [request(str(i), seed=20, lora=(name, 1.0))])
        assert_same_image(image(outputs[str(i)]), reference(lora_reference, flux_reference, 20, (name, 1.0)))
        seen.append(loras.describe()["resident"])
    assert seen == [["style1"], ["style2"], ["style1"]]


def test_one_slot_serves_two_adapters_submitted_together(stages, lora_dir, lora_reference, flux_reference):
    """The second adapter waits for the first one's requests to finish instead of evicting it mid-run."""
    loras = registry(stages, lora_dir, max_loras=1)
    mix = [("style1", 1.0), ("style2", 1.0), None, ("style1", 1.0)]
    outputs, _ = serve(stages, loras, [request(str(i), seed=30 + i, lora=lora) for i, lora in enumerate(mix)])
    for i, lora in enumerate(mix):
        assert_same_image(image(outputs[str(i)]), reference(lora_reference, flux_reference, 30 + i, lora))
    # FIFO: style2 waited for request 0, request 3 for request 1, each evicting the other's adapter
    assert loras.describe()["resident"] == ["style1"]


def test_pinned_adapter_is_never_evicted(stages, lora_dir, lora_reference, flux_reference):
    loras = registry(stages, lora_dir, max_loras=2, pinned="style2")
    assert loras.describe()["resident"] == ["style2"]  # loaded at load
    for i, name in enumerate(["style1", "style.3", "style2", "style1"]):
        outputs, _ = serve(stages, loras, [request(str(i), seed=40, lora=(name, 1.0))])
        assert_same_image(image(outputs[str(i)]), reference(lora_reference, flux_reference, 40, (name, 1.0)))
        assert "style2" in loras.describe()["resident"]
    described = loras.describe()
    assert described == {
        "available": ["style.3", "style1", "style2"],
        "resident": ["style2", "style1"],
        "pinned": ["style2"],
        "max_loras": 2,
    }


def test_an_adapter_that_fails_to_load_fails_only_its_request(stages, lora_dir, tmp_path, flux_reference):
    broken = tmp_path / "loras"
    broken.mkdir()
    (broken / "corrupt").mkdir()
    (broken / "corrupt" / "pytorch_lora_weights.safetensors").write_bytes(b"not a safetensors file")
    loras = LoraRegistry(LoraConfig(str(broken), 2, ""), stages.lora_adapter())
    outputs, _ = serve(stages, loras, [request("bad", 1, ("corrupt", 1.0)), request("good", 2)])
    assert "loading LoRA adapter 'corrupt' failed" in outputs["bad"].error
    assert_same_image(image(outputs["good"]), reference(None, flux_reference, 2, None))


def test_a_step_cache_runs_each_request_with_its_adapter(tiny_flux, lora_dir, lora_reference, flux_reference):
    """tea_cache at threshold 0 computes every step: adapter and base requests equal their references."""
    config = parse_model_config(
        {"family": "flux", "model": str(tiny_flux), "cache_backend": "tea_cache", "lora_dir": str(lora_dir)},
        FluxOptions,
    )
    cached, applied = load_accelerated(config, Component.ALL, torch.device("cpu"), AccelerationObserver())
    assert applied.step_cache is not None
    loras = create_lora_registry(config, cached, Component.ALL)
    mix = [("style1", 1.0), None, ("style2", 0.5)]
    requests = [request(str(i), seed=50 + i, lora=lora) for i, lora in enumerate(mix)]
    requests = [replace(r, params=replace(r.params, cache_threshold=0.0)) for r in requests]
    outputs, _ = serve(cached, loras, requests)
    for i, lora in enumerate(mix):
        assert_same_image(image(outputs[str(i)]), reference(lora_reference, flux_reference, 50 + i, lora))


def test_list_loras_control_op(stages, tiny_flux, lora_dir):
    """``list_loras`` answers the registry's listing; a model without lora_dir refuses it, naming it."""
    loras = registry(stages, lora_dir, max_loras=2, pinned="style1")
    lora = LoraConfig(str(lora_dir), 2, "style1")
    control_config = ControlConfig(enable_control=True)
    config = ModelConfig("flux", str(tiny_flux), control=control_config, lora=lora, options=FluxOptions())
    control = RunnerControl(lambda: stages, config, Component.ALL, loras=loras)
    assert control.handle("list_loras", {}) == {
        "available": sorted(ADAPTERS),
        "resident": ["style1"],
        "pinned": ["style1"],
        "max_loras": 2,
    }
    with pytest.raises(ControlRefusedError, match="sleep level 2 is not supported with lora_dir"):
        control.handle("sleep", {"level": 2})  # PEFT-wrapped layers would not line up with a fresh load
    bare = RunnerControl(lambda: stages, ModelConfig("flux", str(tiny_flux), options=FluxOptions()), Component.ALL)
    with pytest.raises(ControlRefusedError, match="lora_dir is not set"):
        bare.handle("list_loras", {})
