"""``omni-client control`` and ``OmniClient.control`` without a server (the e2e run is in tests/e2e)."""

from __future__ import annotations

import pytest

from omni_client.cli import build_parser, main
from omni_client.control import control_inputs
from omni_client.errors import InvalidRequestError


def test_control_arguments_parse() -> None:
    args = build_parser().parse_args(["control", "--model", "flux_transformer", "sleep", "--level", "2"])
    assert (args.model, args.op, args.level) == ("flux_transformer", "sleep", 2)
    args = build_parser().parse_args(["control", "profile-start", "--max-steps", "5"])
    assert (args.model, args.op, args.max_steps) == ("flux", "profile-start", 5)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["control", "sleep", "--level", "3"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["control", "reboot"])


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_control_input_is_one_json_string(protocol: str) -> None:
    [tensor] = control_inputs("sleep", {"level": 2}, protocol)
    assert (tensor.name(), tensor.datatype(), tensor.shape()) == ("control", "BYTES", [1, 1])
    with pytest.raises(InvalidRequestError, match="unknown control op"):
        control_inputs("reboot", {}, protocol)


def test_control_admin_key_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMNI_ADMIN_KEY", "k1")
    assert build_parser().parse_args(["control", "status"]).admin_key == "k1"


def test_control_unreachable_server_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["control", "--url", "127.0.0.1:1", "--timeout", "2", "status"]) == 1
    assert "error" in capsys.readouterr().err
