from __future__ import annotations

import pytest

from omni_backend.config import ConfigError, RequestLimits, parameters_from_model_config, parse_model_config
from omni_backend.pipelines.flux import FluxOptions


def parse(**params: str):
    return parse_model_config({"family": "flux", "model": "tiny-flux", **params}, FluxOptions)


def test_defaults_and_typed_values():
    config = parse(max_pixels="1048576", max_num_seqs="4", max_sequence_length="256", dtype="bfloat16")
    assert config.limits.max_pixels == 1048576
    assert config.limits.max_steps == RequestLimits().max_steps
    assert config.engine.max_num_seqs == 4
    assert config.options == FluxOptions(max_sequence_length=256)
    assert config.dtype == "bfloat16"


def test_defaults_admit_documented_uses():
    limits = RequestLimits()
    assert limits.max_steps >= 200 and limits.max_pixels >= 2048 * 2048 and limits.max_side >= 2048


@pytest.mark.parametrize(
    ("params", "key"),
    [
        ({"max_pixel": "10"}, "max_pixel"),
        ({"max_pixels": "lots"}, "max_pixels"),
        ({"max_steps": "-3"}, "max_steps"),
        ({"max_steps": "0"}, "max_steps"),
        ({"max_num_seqs": "0"}, "max_num_seqs"),
        ({"dtype": "int8"}, "dtype"),
        ({"device": "tpu"}, "device"),
        ({"max_guidance": "nan"}, "max_guidance"),
        ({"background_decode": "yes"}, "background_decode"),
    ],
)
def test_bad_parameters_name_the_key(params, key):
    with pytest.raises(ConfigError, match=rf"^{key}:"):
        parse(**params)


@pytest.mark.parametrize("missing", ["family", "model"])
def test_required_keys(missing):
    params = {"family": "flux", "model": "x"}
    del params[missing]
    with pytest.raises(ConfigError, match=rf"^{missing}: required"):
        parse_model_config(params, FluxOptions)


def test_triton_parameter_format():
    raw = {"parameters": {"family": {"string_value": "flux"}, "model": {"string_value": "m"}}}
    assert parameters_from_model_config(raw) == {"family": "flux", "model": "m"}
    assert parameters_from_model_config({}) == {}


def test_checkpoint_resolution(tmp_path, monkeypatch):
    (tmp_path / "tiny").mkdir()
    monkeypatch.setenv("OMNI_MODEL_ROOT", str(tmp_path))
    assert parse_model_config({"family": "flux", "model": "tiny"}).resolve_checkpoint() == str(tmp_path / "tiny")
    assert parse_model_config({"family": "flux", "model": str(tmp_path)}).resolve_checkpoint() == str(tmp_path)
    hub = parse_model_config({"family": "flux", "model": "black-forest-labs/FLUX.1-dev"})
    assert hub.resolve_checkpoint() == "black-forest-labs/FLUX.1-dev"
    for bad in ("../etc", "nothing-here", "a/../../b"):
        with pytest.raises(ConfigError, match="^model:"):
            parse_model_config({"family": "flux", "model": bad}).resolve_checkpoint()
