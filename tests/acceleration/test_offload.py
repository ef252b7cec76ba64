"""Offload: each mode gives the uncached image; the placement policy is proved by recording hooks
(which group is on the device while each module runs), with real CUDA memory when a GPU is there."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from tests.acceleration.conftest import MIXED, load, make, run

pytestmark = pytest.mark.slow

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def requests(offset: int = 0):
    return [make(i + offset, *case) for i, case in enumerate(MIXED)]


@pytest.mark.parametrize("parameters", [{"offload": "model"}, {"offload": "layerwise", "offload_window": "2"}])
def test_offload_gives_the_same_image(tiny_flux, uncached, parameters):
    stages, applied, observer = load(tiny_flux, **parameters)
    for offset in (0, 10):  # twice: weights went back and forth in between
        images = run(stages, requests(offset))
        for key, image in uncached.items():
            assert np.array_equal(images[str(int(key) + offset)], image)
    assert observer.offload_bytes > 0


def record_placement(stages, applied, device: torch.device) -> list[tuple[str, str | None, bool]]:
    """A forward pre-hook on every module of every group records (its group, the group the offloader
    has on the device, whether every group's parameters are where the policy says). Under layerwise
    offload the transformer's blocks are placed by their own hooks, so only the others are checked."""
    offloader = applied.offloader
    groups = stages.module_groups()
    checked = {name: modules for name, modules in groups.items() if offloader.groups.get(name) or name != "transformer"}
    events: list[tuple[str, str | None, bool]] = []

    def placed_right() -> bool:
        for name, modules in checked.items():
            want = device if name == offloader.on_device else torch.device("cpu")
            for module in modules:
                if any(p.device.type != want.type for p in module.parameters()):
                    return False
        return True

    hooked = {"text_encoder": groups["text_encoder"], "transformer": groups["transformer"]}
    hooked["vae"] = [stages.pipe.vae.decoder]  # decode() runs the decoder, never vae.forward
    for name, modules in hooked.items():
        for module in modules:
            module.register_forward_pre_hook(lambda *_, n=name: events.append((n, offloader.on_device, placed_right())))
    return events


def test_model_offload_places_one_stage_at_a_time(tiny_flux):
    stages, applied, _ = load(tiny_flux, offload="model")
    events = record_placement(stages, applied, torch.device("cpu"))
    run(stages, requests())
    assert {name for name, _, _ in events} == {"text_encoder", "transformer", "vae"}
    assert all(name == on_device and right for name, on_device, right in events), events
    # step batching: one move per stage switch, not per request (2 requests, 6 + 4 steps, 1 admission)
    switches = sum(1 for a, b in zip(events, events[1:], strict=False) if a[1] != b[1])
    assert switches <= 4, events


def test_layerwise_offload_evicts_text_encoders_while_denoising(tiny_flux):
    stages, applied, _ = load(tiny_flux, offload="layerwise", offload_window="1")
    events = record_placement(stages, applied, torch.device("cpu"))
    run(stages, requests())
    assert {name for name, _, _ in events} == {"text_encoder", "transformer", "vae"}
    assert all(name == on_device for name, on_device, _ in events), events
    assert applied.offloader.groups["transformer"] == []  # its blocks move under the window's hooks


def test_layerwise_window_moves_once_per_step_for_the_batch(tiny_flux, monkeypatch):
    from diffusers.hooks import group_offloading

    stages, applied, _ = load(tiny_flux, offload="layerwise", offload_window="1")
    transformer = stages.pipe.transformer
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    resident: set[int] = set()  # ids of block groups on the device now
    onloads: Counter[int] = Counter()
    most_resident = [0]

    def block_group(group) -> bool:
        return any(m is b for m in group.modules for b in blocks)

    original_on, original_off = group_offloading.ModuleGroup.onload_, group_offloading.ModuleGroup.offload_

    def onload(group):
        if block_group(group):
            resident.add(id(group))
            onloads[id(group)] += 1
        return original_on(group)

    def offload(group):
        resident.discard(id(group))
        return original_off(group)

    monkeypatch.setattr(group_offloading.ModuleGroup, "onload_", onload)
    monkeypatch.setattr(group_offloading.ModuleGroup, "offload_", offload)
    for block in blocks:  # a child runs inside the block's forward, after the hook onloaded its group
        next(block.children()).register_forward_pre_hook(
            lambda *_: most_resident.__setitem__(0, max(most_resident[0], len(resident)))
        )
    calls = [0]
    transformer.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    run(stages, requests())
    assert most_resident[0] == 1, "more blocks than the window were on the device"
    assert calls[0] == max(case[4] for case in MIXED)  # one transformer call per step for both requests
    assert set(onloads.values()) == {calls[0]}, "a block group moved more than once per step"


@GPU
@pytest.mark.parametrize("mode", ["model", "layerwise"])
def test_offload_on_cuda_uses_less_device_memory(tiny_flux, mode):
    resident, _, _ = load(tiny_flux, device="cuda")
    images = run(resident, requests())
    full = torch.cuda.memory_allocated()
    del resident
    torch.cuda.empty_cache()
    baseline = torch.cuda.memory_allocated()
    stages, applied, _ = load(tiny_flux, device="cuda", offload=mode)
    peaks = []
    stages.pipe.transformer.register_forward_hook(lambda *_: peaks.append(torch.cuda.memory_allocated() - baseline))
    offloaded = run(stages, requests())
    assert max(peaks) < full - baseline
    for key, image in images.items():
        assert np.abs(offloaded[key].astype(int) - image.astype(int)).max() <= 1
    events = record_placement(stages, applied, torch.device("cuda"))
    run(stages, requests(10))
    assert all(name == on_device and right for name, on_device, right in events), events
