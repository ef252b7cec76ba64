"""LoRA inputs and config: names that escape lora_dir, bad scales, config combinations (no pipeline run)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from omni_backend.config import ConfigError, LoraConfig, RequestLimits, parse_model_config
from omni_backend.lora.names import TRANSFORMER_2_WEIGHTS_FILE, WEIGHTS_FILE, available_adapters, weights_file
from omni_backend.lora.registry import LoraRegistry, create_lora_registry, validate_lora
from omni_backend.pipelines.base import Component, PipelineStages
from omni_backend.pipelines.flux import FluxOptions, FluxStages
from omni_backend.request import InvalidRequestError, LoraSelection, parse_lora


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A lora_dir with two (fake) adapters, a link escaping it, and an adapter outside it."""
    root = tmp_path / "loras"
    for name in ("style1", "v1.2_x-y"):
        (root / name).mkdir(parents=True)
        (root / name / WEIGHTS_FILE).write_bytes(b"")
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / WEIGHTS_FILE).write_bytes(b"")
    (root / "escape").symlink_to(outside)
    (root / "no_weights").mkdir()
    (root / "pickled").mkdir()
    (root / "pickled" / "pytorch_lora_weights.bin").write_bytes(b"")
    return root


class NoAdapter:
    """The registry never touches the transformer while checking names."""

    def load(self, adapter_id, folder):
        raise AssertionError("load called")

    activate = delete = load


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("../secret", "not an adapter name"),
        ("/etc", "not an adapter name"),
        ("a/b", "not an adapter name"),
        ("..", "not an adapter name"),
        (".hidden", "not an adapter name"),
        ("", "is empty"),
        ("x" * 65, "at most 64"),
        ("style1\n", "not an adapter name"),
        ("escape", "resolves outside lora_dir"),
        ("unknown", "unknown adapter 'unknown' (available: style1, v1.2_x-y)"),
        ("no_weights", "unknown adapter"),
        ("pickled", "unknown adapter"),  # only safetensors: a .bin is a pickle
    ],
)
def test_bad_names_are_invalid_arg_naming_lora_name(folder, name, says):
    registry = LoraRegistry(LoraConfig(str(folder), 2, ""), NoAdapter())
    with pytest.raises(InvalidRequestError, match="^lora_name: ") as info:
        validate_lora(registry, LoraSelection(name))
    assert info.value.field == "lora_name" and says in str(info.value)


def test_good_names_pass_and_are_listed(folder):
    registry = LoraRegistry(LoraConfig(str(folder), 2, ""), NoAdapter())
    for name in ("style1", "v1.2_x-y"):
        registry.check(name)
    assert available_adapters(folder) == ["style1", "v1.2_x-y"]
    assert registry.describe() == {"available": ["style1", "v1.2_x-y"], "resident": [], "pinned": [], "max_loras": 2}


def test_a_model_without_lora_dir_rejects_lora_name():
    validate_lora(None, None)
    with pytest.raises(InvalidRequestError, match="lora_name: this model serves no LoRA adapters"):
        validate_lora(None, LoraSelection("style1"))


def text(value: str) -> np.ndarray:
    return np.array(value.encode(), dtype=object)


@pytest.mark.parametrize(
    ("inputs", "field", "says"),
    [
        ({"lora_name": text("a"), "lora_scale": np.float32("nan")}, "lora_scale", "not a finite number"),
        ({"lora_name": text("a"), "lora_scale": np.float32(8.5)}, "lora_scale", "outside the allowed range [-8.0, 8"),
        ({"lora_name": text("a"), "lora_scale": np.int64(1)}, None, None),
        ({"lora_scale": np.float32(1)}, "lora_scale", "only applies with lora_name"),
        ({"lora_name": np.array(b"\xff", dtype=object)}, "lora_name", "not valid UTF-8"),
        ({"lora_name": np.array([b"a", b"b"], dtype=object)}, "lora_name", "exactly one value"),
    ],
)
def test_lora_inputs_are_validated_naming_the_field(inputs, field, says):
    if field is None:
        assert parse_lora(inputs, RequestLimits()) == LoraSelection("a", 1.0)
        return
    with pytest.raises(InvalidRequestError) as info:
        parse_lora(inputs, RequestLimits())
    assert info.value.field == field and says in str(info.value)


def test_lora_inputs_default():
    assert parse_lora({}, RequestLimits()) is None
    assert parse_lora({"lora_name": text("a")}, RequestLimits()) == LoraSelection("a", 1.0)
    assert parse_lora({"lora_name": text("a"), "lora_scale": np.float32(-2)}, RequestLimits()).scale == -2


def config(**parameters: str):
    return parse_model_config({"family": "flux", "model": "/m", **parameters}, FluxOptions)


def test_config_parses(folder):
    lora = config(lora_dir=str(folder), max_loras="3", pinned_loras="style1, v1.2_x-y").lora
    assert (lora.lora_dir, lora.max_loras, lora.pinned) == (str(folder), 3, ("style1", "v1.2_x-y"))
    assert not config().lora.enabled


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"max_loras": "2"}, "max_loras: only applies with lora_dir"),
        ({"pinned_loras": "style1"}, "pinned_loras: only applies with lora_dir"),
        ({"lora_dir": "relative/loras"}, "lora_dir: 'relative/loras' is not an absolute path of an existing folder"),
        ({"lora_dir": "/no/such/folder"}, "is not an absolute path of an existing folder"),
        ({"lora_dir": "{folder}", "max_loras": "0"}, "max_loras: must be at least 1"),
        ({"lora_dir": "{folder}", "max_loras": "-1"}, "max_loras: '-1' is not a valid non-negative int"),
        ({"lora_dir": "{folder}", "max_loras": "1", "pinned_loras": "style1,v1.2_x-y"}, "2 adapters pinned but"),
        ({"lora_dir": "{folder}", "pinned_loras": "style1,style1"}, "names an adapter twice"),
        ({"lora_dir": "{folder}", "pinned_loras": "../secret"}, "pinned_loras: '../secret' is not an adapter name"),
        ({"lora_dir": "{folder}", "pinned_loras": "nope"}, "pinned_loras: unknown adapter 'nope'"),
        ({"lora_dir": "{folder}", "offload": "model"}, "offload: 'model' cannot be combined with lora_dir"),
        ({"lora_dir": "{folder}", "compile": "regional"}, "compile: 'regional' cannot be combined with lora_dir"),
        ({"lora_dir": "{folder}", "cfg_parallel_size": "2"}, "lora_dir: not supported yet with a parallel group"),
    ],
)
def test_bad_config_fails_the_load_naming_the_key(folder, parameters, message):
    values = {k: v.format(folder=folder) for k, v in parameters.items()}
    with pytest.raises(ConfigError, match=None) as info:
        config(**values)
    assert message in str(info.value)


def test_lora_dir_on_a_stage_without_the_transformer_fails_the_load(tiny_flux, folder):
    cfg = parse_model_config({"family": "flux", "model": str(tiny_flux), "lora_dir": str(folder)}, FluxOptions)
    stages = FluxStages.load(str(tiny_flux), Component.VAE, torch.float32, torch.device("cpu"), FluxOptions())
    with pytest.raises(ConfigError, match="lora_dir: only applies to models that run the transformer"):
        create_lora_registry(cfg, stages, Component.VAE)


def test_a_family_without_lora_support_fails_the_load_naming_it(tiny_flux, folder):
    class NoLoraStages(FluxStages):
        lora_adapter = PipelineStages.lora_adapter  # a family that gives no LoRA hook

    cfg = parse_model_config({"family": "flux", "model": str(tiny_flux), "lora_dir": str(folder)}, FluxOptions)
    stages = NoLoraStages.load(str(tiny_flux), Component.TRANSFORMER, torch.float32, torch.device("cpu"), FluxOptions())
    with pytest.raises(ConfigError, match="lora_dir: the flux family does not support LoRA adapters"):
        create_lora_registry(cfg, stages, Component.TRANSFORMER)


def test_a_second_expert_file_must_lie_in_the_adapter_folder(tmp_path):
    """Wan2.2's low-noise expert file is optional, and, like the main one, may not link out of its folder."""
    adapter, outside = tmp_path / "a", tmp_path / "outside.safetensors"
    adapter.mkdir()
    outside.write_bytes(b"")
    assert weights_file(adapter, TRANSFORMER_2_WEIGHTS_FILE) is None
    (adapter / TRANSFORMER_2_WEIGHTS_FILE).symlink_to(outside)
    with pytest.raises(ValueError, match=f"{TRANSFORMER_2_WEIGHTS_FILE} resolves outside the adapter folder"):
        weights_file(adapter, TRANSFORMER_2_WEIGHTS_FILE)


def test_a_pinned_adapter_that_fails_to_load_fails_the_load(tiny_flux, folder):
    cfg = parse_model_config(
        {"family": "flux", "model": str(tiny_flux), "lora_dir": str(folder), "pinned_loras": "style1"}, FluxOptions
    )
    stages = FluxStages.load(str(tiny_flux), Component.TRANSFORMER, torch.float32, torch.device("cpu"), FluxOptions())
    with pytest.raises(ConfigError, match="pinned_loras: loading failed"):
        create_lora_registry(cfg, stages, Component.TRANSFORMER)  # style1's weights file here is empty


def test_all_slots_pinned_rejects_other_adapters(folder):
    class Loaded(NoAdapter):
        def load(self, adapter_id, folder):
            pass

    registry = LoraRegistry(LoraConfig(str(folder), 1, "style1"), Loaded())
    registry.check("style1")
    with pytest.raises(InvalidRequestError, match="lora_name: 'v1.2_x-y' is not pinned and all max_loras=1 slots"):
        registry.check("v1.2_x-y")
