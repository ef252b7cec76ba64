"""Check a ParallelConfig against the model and the machine at load; messages name the parameter."""

from __future__ import annotations

from typing import Any

import torch

from omni_backend.config import ConfigError, ParallelConfig
from omni_backend.distributed.spec import ParallelSpec


def validate_parallel(
    parallel: ParallelConfig, spec: ParallelSpec, transformer_config: dict[str, Any], device: torch.device
) -> None:
    """Raise ConfigError naming the first parameter that cannot work with this model or machine."""
    sequence = parallel.ulysses_degree * parallel.ring_degree
    if parallel.tensor_parallel_size > 1 and sequence > 1:
        # diffusers' ParallelConfig applies context OR tensor parallelism to one model, not both
        raise ConfigError("tensor_parallel_size: cannot be combined with ulysses_degree or ring_degree")
    if parallel.pipeline_parallel_size > 1 and (sequence > 1 or parallel.tensor_parallel_size > 1):
        raise ConfigError(
            "pipeline_parallel_size: combines only with cfg_parallel_size "
            "(not with ulysses_degree, ring_degree or tensor_parallel_size)"
        )
    heads = spec.num_heads(transformer_config)
    if heads % parallel.ulysses_degree:
        raise ConfigError(f"ulysses_degree: {parallel.ulysses_degree} does not divide the {heads} attention heads")
    if heads % parallel.tensor_parallel_size:
        raise ConfigError(
            f"tensor_parallel_size: {parallel.tensor_parallel_size} does not divide the {heads} attention heads"
        )
    blocks = spec.num_blocks(transformer_config)
    if parallel.pipeline_parallel_size > blocks:
        raise ConfigError(
            f"pipeline_parallel_size: {parallel.pipeline_parallel_size} stages for {blocks} transformer blocks"
        )
    if device.type == "cuda":
        first = device.index or 0
        available = torch.cuda.device_count()
        if first + parallel.world_size > available:
            raise ConfigError(
                f"world size {parallel.world_size} (cfg_parallel_size x ulysses_degree x ring_degree x "
                f"tensor_parallel_size x pipeline_parallel_size) needs GPUs {first}..{first + parallel.world_size - 1}"
                f", this machine has {available}"
            )
