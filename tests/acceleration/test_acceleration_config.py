"""Acceleration parameters are parsed once into typed config; bad ones fail the load naming the key."""

from __future__ import annotations

import numpy as np
import pytest

from omni_backend.cache.config import (
    FirstBlockCacheSettings,
    MagCacheSettings,
    TeaCacheConfig,
    check_cache_threshold,
)
from omni_backend.config import ConfigError, RequestLimits, parse_model_config
from omni_backend.request import InvalidRequestError, SamplingDefaults, parse_sampling_params

BASE = {"family": "flux", "model": "/models/flux"}


def parse(**parameters: str):
    return parse_model_config({**BASE, **parameters})


def test_defaults_are_off():
    config = parse()
    assert config.step_cache is None
    assert (config.acceleration.offload, config.acceleration.compile) == ("none", "none")
    assert not config.acceleration.enable_prompt_embed_cache


def test_cache_config_json_becomes_typed_settings():
    assert parse(cache_backend="tea_cache").step_cache == TeaCacheConfig()
    assert parse(cache_backend="tea_cache", cache_config='{"rel_l1_thresh": 0.6}').step_cache == TeaCacheConfig(0.6)
    fbc = parse(cache_backend="first_block_cache", cache_config='{"threshold": 0}').step_cache
    assert fbc == FirstBlockCacheSettings(threshold=0.0) and isinstance(fbc.threshold, float)
    mag = parse(cache_backend="mag_cache", cache_config='{"mag_ratios": [1, 1.1], "max_skip_steps": 2}').step_cache
    assert mag == MagCacheSettings(max_skip_steps=2, mag_ratios=(1.0, 1.1))


@pytest.mark.parametrize(
    ("parameters", "key"),
    [
        ({"cache_backend": "teacache"}, "cache_backend"),
        ({"cache_backend": "tea_cache", "cache_config": "{rel_l1_thresh: 1}"}, "cache_config"),
        ({"cache_backend": "tea_cache", "cache_config": "[1]"}, "cache_config"),
        ({"cache_backend": "tea_cache", "cache_config": '{"threshold": 1}'}, "cache_config.threshold"),
        ({"cache_backend": "tea_cache", "cache_config": '{"rel_l1_thresh": -1}'}, "cache_config.rel_l1_thresh"),
        ({"cache_backend": "taylorseer", "cache_config": '{"cache_interval": 1.5}'}, "cache_config.cache_interval"),
        ({"cache_backend": "mag_cache", "cache_config": '{"mag_ratios": "x"}'}, "cache_config.mag_ratios"),
        ({"cache_config": '{"threshold": 1}'}, "cache_config"),
        ({"offload": "sequential"}, "offload"),
        ({"offload": "model", "offload_window": "2"}, "offload_window"),
        ({"offload": "layerwise", "offload_window": "0"}, "offload_window"),
        ({"offload": "layerwise", "compile": "regional"}, "compile"),
        ({"compile": "full"}, "compile"),
        ({"offload": "layerwise", "cache_backend": "tea_cache"}, "cache_backend"),
        ({"warmup_sizes": "64,64"}, "warmup_sizes"),
        ({"enable_prompt_embed_cache": "maybe"}, "enable_prompt_embed_cache"),
        ({"prompt_embed_cache_size": "0"}, "prompt_embed_cache_size"),
        ({"vae_tilling": "true"}, "vae_tilling"),
    ],
)
def test_bad_parameters_fail_naming_the_key(parameters, key):
    with pytest.raises(ConfigError) as info:
        parse(**parameters)
    assert str(info.value).startswith(f"{key}:"), str(info.value)


def test_cache_threshold_input_is_validated():
    defaults, limits = SamplingDefaults(64, 64, 4, 3.5), RequestLimits()
    assert parse_sampling_params({}, defaults, limits).cache_threshold is None
    params = parse_sampling_params({"cache_threshold": np.array([0.25], np.float32)}, defaults, limits)
    assert params.cache_threshold == 0.25
    with pytest.raises(InvalidRequestError, match="cache_threshold"):
        parse_sampling_params({"cache_threshold": np.array([-1.0], np.float32)}, defaults, limits)
    check_cache_threshold("tea_cache", 0.25)
    check_cache_threshold("none", None)
    for backend in ("none", "taylorseer"):
        with pytest.raises(InvalidRequestError, match="cache_threshold"):
            check_cache_threshold(backend, 0.25)
