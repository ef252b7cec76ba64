"""Parallel sizes are parsed with the config and checked against the model at load, naming the parameter."""

from __future__ import annotations

import pytest
import torch

from omni_backend.config import ConfigError, ParallelConfig, parse_model_config
from omni_backend.distributed.pipeline import split_blocks
from omni_backend.distributed.spec import resolve_spec
from omni_backend.distributed.validate import validate_parallel

# the tiny checkpoint's transformer: 2 heads, 1 + 1 blocks
TINY = {"num_attention_heads": 2, "num_layers": 1, "num_single_layers": 1}
CPU = torch.device("cpu")


def test_parallel_sizes_parse_and_multiply():
    config = parse_model_config(
        {"family": "flux", "model": "/m", "cfg_parallel_size": "2", "ulysses_degree": "2", "ring_degree": "3"}
    )
    assert config.parallel == ParallelConfig(cfg_parallel_size=2, ulysses_degree=2, ring_degree=3)
    assert config.parallel.world_size == 12
    assert parse_model_config({"family": "flux", "model": "/m"}).parallel.world_size == 1


@pytest.mark.parametrize("key", ["cfg_parallel_size", "ulysses_degree", "pipeline_parallel_size"])
def test_zero_size_fails_naming_the_key(key):
    with pytest.raises(ConfigError, match=f"^{key}: must be at least 1"):
        parse_model_config({"family": "flux", "model": "/m", key: "0"})


@pytest.mark.parametrize(
    ("parallel", "message"),
    [
        (ParallelConfig(ulysses_degree=4), "ulysses_degree: 4 does not divide the 2 attention heads"),
        (ParallelConfig(tensor_parallel_size=3), "tensor_parallel_size: 3 does not divide the 2 attention heads"),
        (ParallelConfig(pipeline_parallel_size=3), "pipeline_parallel_size: 3 stages for 2 transformer blocks"),
        (ParallelConfig(tensor_parallel_size=2, ring_degree=2), "tensor_parallel_size: cannot be combined"),
        (ParallelConfig(pipeline_parallel_size=2, ulysses_degree=2), "pipeline_parallel_size: combines only"),
    ],
)
def test_bad_layout_fails_naming_the_parameter(parallel, message):
    with pytest.raises(ConfigError, match=f"^{message}"):
        validate_parallel(parallel, resolve_spec("flux"), TINY, CPU)


def test_world_larger_than_the_gpus_fails():
    available = torch.cuda.device_count()
    with pytest.raises(ConfigError, match=rf"^world size {available + 1} .* this machine has {available}"):
        validate_parallel(ParallelConfig(ring_degree=available + 1), resolve_spec("flux"), TINY, torch.device("cuda:0"))


def test_good_layouts_pass():
    for parallel in (ParallelConfig(cfg_parallel_size=2, ulysses_degree=2), ParallelConfig(pipeline_parallel_size=2)):
        validate_parallel(parallel, resolve_spec("flux"), TINY, CPU)


def test_blocks_split_contiguous_and_balanced():
    assert split_blocks(5, 2) == [range(0, 3), range(3, 5)]
    assert split_blocks(2, 2) == [range(0, 1), range(1, 2)]
    assert [len(r) for r in split_blocks(57, 4)] == [15, 14, 14, 14]
