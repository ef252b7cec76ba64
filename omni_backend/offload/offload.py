"""CPU offload: fit a pipeline whose weights exceed the device by keeping most of them in host memory.

- ``model``: mutual exclusion per stage. While encoding only the text encoders are on the device,
  while denoising only the transformer, while decoding only the VAE; the rest waits in (pinned)
  host memory. The same policy as diffusers' ``enable_model_cpu_offload``, but switched at our
  stage boundaries (encode / denoise / decode) instead of by forward hooks: the VAE is used
  through ``vae.decode``, which forward hooks never see, and a step batch calls each stage once
  for all its requests, so weights move once per stage switch, not per request.
- ``layerwise``: the transformer runs under diffusers' block-level group offloading
  (``apply_group_offloading``): ``offload_window`` blocks per group on the device, the next group
  prefetched on a side CUDA stream while the current one computes. One transformer call per step
  serves the whole step batch, so the window sweeps the blocks once per step, not per request.
  Text encoders and VAE follow the ``model`` policy.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch

from omni_backend.engine.observer import AccelerationObserver

logger = logging.getLogger(__name__)

HOST = torch.device("cpu")


def _tensors(modules: list[torch.nn.Module]) -> list[torch.Tensor]:
    return [t for m in modules for t in (*m.parameters(), *m.buffers())]


def _nbytes(modules: list[torch.nn.Module]) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(modules))


class ModelOffloader:
    """Keeps exactly one group of modules (a stage's) on the device; the others in host memory.

    Each weight gets one page-locked host copy, made once at load: weights never change under
    offload (LoRA and sleep level 2 are refused with it), so offloading a group only drops its
    device copies, no device-to-host copy, and onloading is one async DMA per tensor. (diffusers'
    group offloading keeps such a copy too; ``module.to`` would copy back and re-pin every switch.)
    """

    def __init__(self, groups: dict[str, list[torch.nn.Module]], device: torch.device, observer: AccelerationObserver):
        self.groups = groups
        self.device = device
        self.observer = observer
        self.on_device: str | None = None  # the group on the device now (the placement tests read it)
        pin = device.type == "cuda"
        self._host: dict[int, torch.Tensor] = {}  # id(parameter or buffer) -> its host copy
        for modules in groups.values():  # a module in two groups (a VAE that encodes and decodes) is copied once
            for tensor in _tensors(modules):
                if id(tensor) not in self._host:
                    host = tensor.data.to(HOST)
                    self._host[id(tensor)] = host.pin_memory() if pin else host
                tensor.data = self._host[id(tensor)]

    def _place(self, name: str, device: torch.device) -> int:
        tensors = _tensors(self.groups[name])
        for tensor in tensors:
            host = self._host[id(tensor)]
            tensor.data = host if device == HOST else host.to(device, non_blocking=True)
        return sum(t.numel() * t.element_size() for t in tensors)

    def activate(self, name: str) -> None:
        """Put group ``name`` on the device and every other group in host memory."""
        if self.on_device == name or name not in self.groups:
            return
        if self.on_device is not None:
            self._place(self.on_device, HOST)  # free: the host copies are already there
        moved = self._place(name, self.device)
        self.on_device = name
        self.observer.on_offload_bytes(moved)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.activate(name)
        yield

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` running with group ``name`` on the device."""

        def during_stage(*args: Any, **kwargs: Any) -> Any:
            with self.stage(name):
                return fn(*args, **kwargs)

        return during_stage


def apply_layerwise_offload(transformer: torch.nn.Module, device: torch.device, window: int) -> None:
    """diffusers' block-level group offloading, prefetching the next group on a side stream on CUDA."""
    from diffusers.hooks import apply_group_offloading

    use_stream = device.type == "cuda"
    apply_group_offloading(
        transformer,
        onload_device=device,
        offload_device=HOST,
        offload_type="block_level",
        num_blocks_per_group=window,
        use_stream=use_stream,  # streams (and so prefetch) exist only on CUDA
        non_blocking=use_stream,
    )
