"""Load-time plumbing shared by every omni-triton Python model: config, logging, pipeline stages."""

from __future__ import annotations

import json
from typing import Any, ClassVar

import torch

from omni_backend.config import ModelConfig, parameters_from_model_config, parse_model_config
from omni_backend.lora.registry import LoraRegistry, create_lora_registry
from omni_backend.pipelines.base import Component, PipelineStages
from omni_backend.registry import resolve_family
from omni_backend.runner.model_runner import load_stages, resolve_device
from omni_backend.testing import faults
from omni_backend.triton import log
from omni_backend.triton.metrics import TritonAccelerationMetrics


class OmniModel:
    """Base of the Triton model classes: ``initialize`` parses the config once and loads the stages."""

    components: ClassVar[Component]  # what this model loads of the pipeline

    config: ModelConfig
    stages: PipelineStages
    loras: LoraRegistry | None  # the model's LoRA adapters (config lora_dir), None without
    device: torch.device  # the instance's device (rank 0's when the model runs a worker group)

    def initialize(self, args: dict[str, Any]) -> None:
        self.model_name = args["model_name"]
        self.log = log.install(self.model_name)
        parameters = parameters_from_model_config(json.loads(args["model_config"]))
        family = parameters.get("family")
        options_cls = resolve_family(family).options_cls if family else None
        self.config = parse_model_config(parameters, options_cls)
        device = resolve_device(self.config.device, args["model_instance_kind"], int(args["model_instance_device_id"]))
        self.device = device
        # with a worker group the ranks hold the weights on the devices; the stub's copy only parses requests
        local = device if self.config.parallel.world_size == 1 else torch.device("cpu")
        # test-only OOM injection, enabled by the server's environment, never by a request
        metrics = TritonAccelerationMetrics(self.model_name)
        self.stages = faults.maybe_inject(load_stages(self.config, self.components, local, metrics))
        self.loras = create_lora_registry(self.config, self.stages, self.components, metrics)
        self.log.info(
            "loaded %s (%s) from %s on %s, %s",
            self.model_name,
            self.config.family,
            self.config.model,
            device,
            self.config.dtype,
        )
