"""Nothing a request sends names a file, module or class; checkpoints with code of their own are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from omni_backend.config import ConfigError, parse_model_config
from omni_backend.pipelines.base import Component
from omni_backend.pipelines.flux import FluxOptions, FluxStages


def test_checkpoint_names_stay_inside_the_model_root(tmp_path, monkeypatch):
    root = tmp_path / "models"
    (root / "ok").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    (root / "link").symlink_to(tmp_path / "secret")  # a link out of the root is a way out too
    monkeypatch.setenv("OMNI_MODEL_ROOT", str(root))
    for bad in ("../secret", "ok/../../secret", "link", "..", "a/../../..", "~/x", "org/../../x"):
        with pytest.raises(ConfigError, match="^model:"):
            parse_model_config({"family": "flux", "model": bad}).resolve_checkpoint()


def test_checkpoint_with_custom_code_is_refused(tiny_flux: Path, tmp_path: Path):
    """diffusers runs a checkpoint's own modules only with trust_remote_code, which nothing here sets."""
    evil = tmp_path / "evil"
    shutil.copytree(tiny_flux, evil)
    index = json.loads((evil / "model_index.json").read_text())
    index["transformer"] = ["evil_module", "EvilTransformer"]
    (evil / "model_index.json").write_text(json.dumps(index))
    marker = tmp_path / "ran"
    (evil / "transformer" / "evil_module.py").write_text(f"open({str(marker)!r}, 'w')\nclass EvilTransformer: ...\n")
    with pytest.raises(ValueError, match="trust_remote_code"):
        FluxStages.load(str(evil), Component.ALL, torch.float32, torch.device("cpu"), FluxOptions())
    assert not marker.exists()


def test_request_inputs_are_data_only():
    """The model's declared inputs are prompts and numbers: none is a path, module or class name."""
    repository = Path(__file__).resolve().parents[1] / "model_repository"
    names = set()
    for config in repository.glob("*/config.pbtxt"):
        names |= {
            line.split('"')[1] for line in config.read_text().splitlines() if "name:" in line and "data_type" in line
        }
    assert names and not {
        n for n in names if any(w in n for w in ("path", "file", "module", "class", "adapter", "model"))
    }
