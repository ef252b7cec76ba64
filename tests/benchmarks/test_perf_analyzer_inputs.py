"""perf_analyzer's input files: what ``inputs.py`` writes, and only inputs the served models declare."""

from __future__ import annotations

import json
import re

import pytest

from benchmarks.perf_analyzer.inputs import INPUTS, files, render
from benchmarks.perf_analyzer.run import MODELS, REPOSITORY, input_file

# perf_analyzer's JSON holds strings for BYTES inputs and numbers for the others
_DATATYPES = {"TYPE_STRING": str, "TYPE_INT32": int, "TYPE_INT64": int, "TYPE_FP32": (int, float), "TYPE_UINT8": int}


def declared_inputs(model: str) -> dict[str, tuple[str, list[int]]]:
    """Input name -> (data type, dims) from the model's config.pbtxt."""
    config = (REPOSITORY / model / "config.pbtxt").read_text()
    inputs = re.search(r"^input \[(.*?)^\]", config, re.S | re.M)
    assert inputs, model
    pattern = r'name: "(\w+)", data_type: (\w+), dims: \[ ([-\d, ]+) \]'
    return {name: (dtype, [int(d) for d in dims.split(",")]) for name, dtype, dims in re.findall(pattern, inputs[1])}


def test_committed_files_are_what_inputs_py_writes() -> None:
    written = files()
    assert sorted(written) == sorted(p.name for p in INPUTS.glob("*.json"))
    for name, data in written.items():
        assert (INPUTS / name).read_text() == render(data), f"{name}: rerun python -m benchmarks.perf_analyzer.inputs"


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("smoke", [False, True])
def test_every_model_has_inputs_it_declares(model: str, smoke: bool) -> None:
    declared = declared_inputs(model)
    data = json.loads(input_file(model, smoke).read_text())["data"]
    assert data, model
    for request in data:
        # what the model requires although config.pbtxt marks it optional (see the configs' comments)
        assert {"prompt", "input_image"} & set(declared) <= set(request), (model, sorted(request))
        for name, tensor in request.items():
            assert name in declared, f"{model} does not declare {name}"
            dtype, dims = declared[name]
            assert all(isinstance(v, _DATATYPES[dtype]) for v in tensor["content"]), (model, name)
            assert len(tensor["shape"]) == len(dims), (model, name, tensor["shape"], dims)
            count = 1
            for size in tensor["shape"]:
                count *= size
            assert len(tensor["content"]) == count, (model, name)
