"""The control channel through a real tritonserver, over gRPC and HTTP (README "Control")."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from omni_backend.testing.server import TritonServerProcess
from tests.e2e.conftest import REPOSITORY, RawClient

pytestmark = pytest.mark.slow

KEY = "s3cret-control"
GOOD = {"prompt": "a blue square", "height": np.int32(32), "width": np.int32(32), "num_inference_steps": np.int32(2)}


class Caller(RawClient):
    """tritonclient over one protocol: control ops and generations, with optional headers."""

    def __init__(self, server: TritonServerProcess, protocol: str, headers: dict[str, str] | None = None):
        super().__init__(server, protocol)
        self.headers = headers

    def infer(self, model: str, values: dict, output: str = "image") -> np.ndarray:
        outputs = [self.module.InferRequestedOutput(output)]
        result = self.client.infer(model, self.inputs(values), outputs=outputs, headers=self.headers)
        return result.as_numpy(output)[0]

    def control(self, model: str, op: str, **args) -> dict:
        raw = self.infer(model, {"control": json.dumps({"op": op, **args})}, "control_result")
        return json.loads(raw[0])

    def image(self, model: str = "flux", seed: int = 0) -> np.ndarray:
        return self.infer(model, {**GOOD, "seed": np.int64(seed)}, "image")


def refusal(call) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as info:
        call()
    return str(info.value.status()), info.value.message()


INVALID = ("StatusCode.INVALID_ARGUMENT", "400")
UNAVAILABLE = ("StatusCode.UNAVAILABLE", "503")


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("model", ["flux", "flux_transformer"])
def test_control_is_refused_when_enable_control_is_off(server, protocol, model):
    """The shipped repository: control is off, and says which config key turns it on."""
    caller = Caller(server, protocol)
    status, message = refusal(lambda: caller.control(model, "status"))
    assert status in INVALID and "enable_control" in message, (status, message)


@pytest.fixture(scope="module")
def control_server(model_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """flux and flux_transformer with enable_control on, bound to 0.0.0.0: control needs the admin key."""
    repo = tmp_path_factory.mktemp("control-repo")
    traces = tmp_path_factory.mktemp("traces")
    extra = {"enable_control": "true", "profile_dir": str(traces), "profile_max_steps": "20"}
    for name in ("flux", "flux_transformer"):
        shutil.copytree(REPOSITORY / name, repo / name)
        config = repo / name / "config.pbtxt"
        lines = "".join(f',\n  {{ key: "{k}", value: {{ string_value: "{v}" }} }}' for k, v in extra.items())
        text = config.read_text().replace('{ string_value: "float32" } }', '{ string_value: "float32" } }' + lines)
        config.write_text(text)
    process = TritonServerProcess(
        repo, env_extra={"OMNI_MODEL_ROOT": str(model_root)}, launcher_args=["--host", "0.0.0.0", "--admin-key", KEY]
    )
    process.start(timeout=600)
    process.traces = traces
    try:
        yield process
    finally:
        process.stop()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_control_off_loopback_needs_the_admin_key(control_server, protocol):
    for headers in (None, {"admin-key": "wrong"}):
        status, message = refusal(lambda h=headers: Caller(control_server, protocol, h).control("flux", "status"))
        assert status in INVALID and "admin-key" in message, (status, message)
    status = Caller(control_server, protocol, {"admin-key": KEY}).control("flux", "status")
    assert status["state"] == "awake" and status["running"] == 0 and status["queued"] == 0
    assert KEY not in control_server.log()


@pytest.mark.parametrize("level", [1, 2])
def test_sleep_wake_round_trip_over_both_protocols(control_server, level):
    grpc = Caller(control_server, "grpc", {"admin-key": KEY})
    http = Caller(control_server, "http", {"admin-key": KEY})
    before = grpc.image(seed=7)
    assert http.control("flux", "sleep", level=level)["state"] == "asleep"
    assert grpc.control("flux", "status")["sleep_level"] == level
    for caller in (grpc, http):
        status, message = refusal(lambda c=caller: c.image(seed=7))
        assert status in UNAVAILABLE and "model is asleep" in message, (status, message)
    assert grpc.control("flux", "wake")["state"] == "awake"
    np.testing.assert_array_equal(http.image(seed=7), before)


def test_control_input_errors_name_the_field(control_server):
    caller = Caller(control_server, "grpc", {"admin-key": KEY})
    cases = [
        ({"control": '{"op": "reboot"}'}, "control"),
        ({"control": '{"op": "sleep", "level": 9}'}, "control.level"),
        ({"control": '{"op": "status"}', "prompt": "a cat"}, "prompt"),
        ({k: v for k, v in GOOD.items() if k != "prompt"}, "prompt"),
    ]
    for values, field in cases:
        output = "control_result" if "control" in values else "image"
        status, message = refusal(lambda v=values, o=output: caller.infer("flux", v, o))
        assert status in INVALID and message.split(":")[0].endswith(field), (values, message)
    status = caller.control("flux_transformer", "status")  # a transformer stage takes control ops too
    assert status["state"] == "awake"
    assert caller.image(seed=1).shape == (32, 32, 3)  # still serving


def test_profile_start_stop_writes_a_trace_file(control_server):
    caller = Caller(control_server, "http", {"admin-key": KEY})
    assert caller.control("flux", "profile_start", max_steps=10)["profiling"] is True
    caller.image(seed=2)
    [trace] = caller.control("flux", "profile_stop")["traces"]
    assert Path(trace).parent == control_server.traces and Path(trace).name.startswith("flux-rank0-")
    assert json.loads(Path(trace).read_text())["traceEvents"]


def test_omni_client_control_command(control_server, capsys):
    from omni_client.cli import main

    url = ["--url", control_server.grpc_url, "--model", "flux"]
    assert main(["control", *url, "--admin-key", KEY, "status"]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "awake"
    assert main(["control", *url, "--admin-key", KEY, "sleep", "--level", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["sleep_level"] == 1
    assert main(["control", *url, "--admin-key", KEY, "wake"]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "awake"
    assert main(["control", *url, "--admin-key", "wrong", "status"]) == 1
    assert "admin-key" in capsys.readouterr().err
