"""A misconfigured omni-triton model fails the launcher fast, naming the model and the key."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from omni_backend.testing.server import free_ports
from tests.e2e.conftest import REPOSITORY

pytestmark = pytest.mark.slow


def launch(repository: Path, model_root: Path) -> subprocess.CompletedProcess:
    http, grpc, metrics = free_ports(3)
    cmd = [sys.executable, "-m", "omni_backend.serve", "--model-repository", str(repository)]
    cmd += [f"--http-port={http}", f"--grpc-port={grpc}", f"--metrics-port={metrics}"]
    env = {**os.environ, "OMNI_MODEL_ROOT": str(model_root)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)


@pytest.mark.parametrize(
    ("parameter", "named"),
    [
        ('{ key: "max_stepz", value: { string_value: "10" } }', "max_stepz: unknown config parameter"),
        ('{ key: "max_pixels", value: { string_value: "many" } }', "max_pixels: 'many' is not a valid"),
        ('{ key: "family", value: { string_value: "sdxl" } }', "family: unknown pipeline family 'sdxl'"),
    ],
)
def test_bad_parameter_fails_the_load_naming_the_key(tmp_path, model_root, parameter, named):
    repository = tmp_path / "repo"
    shutil.copytree(REPOSITORY / "flux", repository / "flux")
    config = repository / "flux" / "config.pbtxt"
    text = config.read_text()
    if "family" in parameter:
        text = text.replace('string_value: "flux" }', 'string_value: "sdxl" }')
    else:
        text = text.replace("parameters [\n", f"parameters [\n  {parameter},\n")
    config.write_text(text)
    done = launch(repository, model_root)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    reason = output.split("[omni-serve] ERROR")[-1]
    assert "model 'flux' failed to load" in reason, output[-3000:]
    assert named in reason, reason


def test_missing_checkpoint_fails_the_load(tmp_path):
    repository = tmp_path / "repo"
    shutil.copytree(REPOSITORY / "flux", repository / "flux")
    done = launch(repository, tmp_path / "empty-model-root")
    reason = (done.stdout + done.stderr).split("[omni-serve] ERROR")[-1]
    assert done.returncode != 0
    assert "model: 'flux-shapes' is neither an absolute path" in reason, reason
