"""What control ops do to a runner: sleep / wake its weights, profile its steps, report status.

Sleep frees device memory without unloading the model from Triton:

- level 1 moves every module of the pipeline to host memory (``module.to("cpu")``); wake moves them
  back. On a CPU device the weights stay where they are, but the model is asleep all the same.
- level 2 drops the weights (``module.to("meta")``: the tensors are freed, the modules, their hooks
  and everything holding them stay); wake loads the checkpoint again exactly as at load and hands
  the fresh parameters and buffers to the same modules, then moves them to the device.

Offload is refused (it already decides where weights live, and its hooks would move them back);
level 2 also refuses compile and step caches, whose state is tied to the module they were applied
to (a fresh load would have to re-apply them: not done yet).
Every handler runs on the engine thread between steps (or on a rank's main loop), so none races a
transformer call.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from typing import Any

import torch

from omni_backend.config import ModelConfig
from omni_backend.engine.control import ControlRefusedError
from omni_backend.lora.registry import LoraRegistry
from omni_backend.pipelines.base import Component, PipelineStages
from omni_backend.registry import resolve_family
from omni_backend.runner.profiler import StepProfiler

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _modules(stages: PipelineStages) -> list[torch.nn.Module]:
    modules = [module for group in stages.module_groups().values() for module in group]
    return list({id(module): module for module in modules}.values())  # a module may serve two stages


def _adopt(target: torch.nn.Module, fresh: torch.nn.Module) -> None:
    """Give ``target`` (weights dropped) the parameters and buffers of ``fresh`` (same architecture)."""
    for name, source in fresh.named_modules():
        sub = target.get_submodule(name)
        sub._parameters.update(source._parameters)  # tied weights stay tied: the same object lands twice
        sub._buffers.update(source._buffers)


def free_cache() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class RunnerControl:
    """Control-op handlers of one process's pipeline stages (``handlers``: op name -> handler)."""

    def __init__(
        self,
        stages: Callable[[], PipelineStages],
        config: ModelConfig,
        components: Component,
        name: str = "model",
        rank: int = 0,
        loras: LoraRegistry | None = None,
    ):
        self._stages = stages  # a getter: the runner may hold the stages under another name
        self.loras = loras
        self.config = config
        self.components = components
        self.rank = rank
        self.sleep_level = 0  # 0: awake
        self.profiler = StepProfiler(config.control.profile_dir, name, rank) if config.control.profile_dir else None
        self.handlers: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "status": lambda args: self.status(),
            "sleep": lambda args: self.sleep(args["level"]),
            "wake": lambda args: self.wake(),
            "profile_start": lambda args: self.profile_start(args["max_steps"]),
            "profile_stop": lambda args: self.profile_stop(),
            "list_loras": lambda args: self.list_loras(),
        }

    def handle(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        return self.handlers[op](args)

    def status(self) -> dict[str, Any]:
        device = self._stages().device
        status: dict[str, Any] = {
            "state": "asleep" if self.sleep_level else "awake",
            "sleep_level": self.sleep_level,
            "profiling": self.profiler is not None and self.profiler.active,
            "device": str(device),
        }
        if device.type == "cuda":
            status["device_memory_allocated"] = torch.cuda.memory_allocated(device)
            status["device_memory_reserved"] = torch.cuda.memory_reserved(device)
        return status

    def list_loras(self) -> dict[str, Any]:
        if self.loras is None:
            raise ControlRefusedError("control", "this model serves no LoRA adapters (lora_dir is not set)")
        return self.loras.describe()

    # ------------------------------------------------------------------ sleep / wake

    def sleep(self, level: int) -> dict[str, Any]:
        if self.sleep_level == level:
            return self.status()
        if self.sleep_level:
            message = f"the model is asleep at level {self.sleep_level}; wake it first"
            raise ControlRefusedError("control.level", message)
        self._check_sleep(level)
        for module in _modules(self._stages()):
            module.to("cpu" if level == 1 else "meta")
        self.sleep_level = level
        free_cache()
        logger.info("asleep (level %d)", level)
        return self.status()

    def _check_sleep(self, level: int) -> None:
        accel = self.config.acceleration
        if accel.offload != "none":
            raise ControlRefusedError("control", f"sleep is not supported with offload: {accel.offload}")
        if level == 2 and self.config.lora.enabled:
            # PEFT wraps the adapted layers: a fresh load's modules no longer line up with them
            raise ControlRefusedError("control.level", "sleep level 2 is not supported with lora_dir")
        if level == 2:
            for key, off in (("compile", "none"), ("cache_backend", "none")):
                if (value := getattr(accel, key)) != off:
                    raise ControlRefusedError("control.level", f"sleep level 2 is not supported with {key}: {value!r}")

    def wake(self) -> dict[str, Any]:
        stages = self._stages()
        if self.sleep_level == 2:
            self._reload(stages)
        for module in _modules(stages):
            module.to(stages.device)
        self.sleep_level = 0
        logger.info("awake")
        return self.status()

    def _reload(self, stages: PipelineStages) -> None:
        """The checkpoint again, loaded as at load (into host memory first), adopted by the same modules."""
        config = self.config
        fresh = resolve_family(config.family).load(
            config.resolve_checkpoint(), self.components, _DTYPES[config.dtype], torch.device("cpu"), config.options
        )
        targets, sources = _modules(stages), _modules(fresh)
        for target, source in zip(targets, sources, strict=True):
            if type(target) is not type(source):
                raise RuntimeError(f"reloaded {type(source).__name__} where {type(target).__name__} was")
            _adopt(target, source)

    # ------------------------------------------------------------------ profiling

    def profile_start(self, max_steps: int) -> dict[str, Any]:
        assert self.profiler is not None  # parse_control refuses profiling ops without profile_dir
        if self.profiler.active:
            raise ControlRefusedError("control", "a profile is already running; stop it with profile_stop")
        self.profiler.start(max_steps)
        return {"profiling": True, "max_steps": max_steps}

    def profile_stop(self) -> dict[str, Any]:
        assert self.profiler is not None
        was_active = self.profiler.active
        traces = self.profiler.stop()
        if not was_active and not traces:
            raise ControlRefusedError("control", "no profile is running (profile_start first)")
        return {"profiling": False, "traces": traces}

    def on_step(self) -> None:
        if self.profiler is not None:
            self.profiler.step()
