"""Control ops of a model (sleep / wake / profiling / status) and the ``omni-client control`` command.

A control op travels as an ordinary inference request carrying only the ``control`` input (one
JSON object); the model answers with the ``control_result`` output (JSON). The model must have
``enable_control`` on; off loopback the request needs the server's ``admin-key`` header.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import InvalidRequestError, OmniClientError

if TYPE_CHECKING:
    from .client import OmniClient

OPS = ("status", "sleep", "wake", "profile_start", "profile_stop")
ADMIN_KEY_ENV = "OMNI_ADMIN_KEY"


def control_inputs(op: str, args: dict[str, Any], protocol: str) -> list[Any]:
    """The one ``control`` input of a control request, as tritonclient ``InferInput``s."""
    if op not in OPS:
        raise InvalidRequestError(f"unknown control op {op!r} (known: {', '.join(OPS)})")
    if protocol == "grpc":
        import tritonclient.grpc as triton
    else:
        import tritonclient.http as triton
    data = np.array([[json.dumps({"op": op, **args}).encode()]], dtype=np.object_)
    tensor = triton.InferInput("control", [1, 1], "BYTES")
    tensor.set_data_from_numpy(data)
    return [tensor]


def parse_result(result: Any) -> dict[str, Any]:
    raw = result.as_numpy("control_result")
    if raw is None:
        raise OmniClientError("the model answered without control_result: is it an omni-triton engine model?")
    value = raw.reshape(-1)[0]
    return json.loads(value.decode() if isinstance(value, bytes) else value)


def run_control(client: OmniClient, op: str, model: str | None, admin_key: str | None, **args: Any) -> dict[str, Any]:
    """Sends one control op and returns the model's JSON answer (OmniClientError if refused)."""
    inputs = control_inputs(op, args, client.protocol)
    headers = {"admin-key": admin_key} if admin_key else None
    with client._errors():
        result = client._triton.infer(model or client.model, inputs, headers=headers, **client._kwargs())
    return parse_result(result)


# -------------------------------------------------------------------------------- command line


def add_parser(sub: Any, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``omni-client control --model M status|sleep --level N|wake|profile-start|profile-stop``."""
    ctl = sub.add_parser("control", parents=[common], help="sleep / wake / profile a model (needs enable_control)")
    ctl.add_argument("--model", default="flux", help="model name (default: flux)")
    ctl.add_argument(
        "--admin-key",
        default=os.environ.get(ADMIN_KEY_ENV),
        help=f"'admin-key' header, needed off loopback (default ${ADMIN_KEY_ENV})",
    )
    ops = ctl.add_subparsers(dest="op", required=True, metavar="OP")
    ops.add_parser("status", help="awake/asleep, running and queued requests, device memory, profiler")
    sleep = ops.add_parser("sleep", help="free device memory once the running requests finish")
    sleep.add_argument("--level", type=int, choices=(1, 2), default=1, help="1: weights to host; 2: dropped")
    ops.add_parser("wake", help="weights back on the device (level 2: reloaded from the checkpoint)")
    start = ops.add_parser("profile-start", help="start a torch.profiler trace on every rank")
    start.add_argument("--max-steps", type=int, help="stop by itself after this many steps")
    ops.add_parser("profile-stop", help="stop the trace; prints the trace files")
    return ctl


def cmd_control(args: argparse.Namespace, client: OmniClient) -> int:
    op = args.op.replace("-", "_")
    extra: dict[str, Any] = {}
    if op == "sleep":
        extra["level"] = args.level
    if op == "profile_start" and args.max_steps is not None:
        extra["max_steps"] = args.max_steps
    with client:
        print(json.dumps(run_control(client, op, args.model, args.admin_key, **extra), indent=2))
    return 0
