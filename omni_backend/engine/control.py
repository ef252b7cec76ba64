"""Control ops (sleep / wake / profiling / status): parsing and validation, no torch, no Triton.

A control request is one JSON object, ``{"op": "sleep", "level": 1}``, carried in-band by an
inference request (README "Control"). ``parse_control`` checks the op and its arguments against
the model's ``ControlConfig`` and raises InvalidRequestError naming ``control`` (or the argument,
as ``control.level``); the engine then runs the op on its own thread, between steps
(engine.py), and the runner does the work (runner/control.py).

To add an op: a validator here (``ARGUMENTS``) and a handler in ``RunnerControl.handlers``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from omni_backend.config import ControlConfig
from omni_backend.request import ErrorKind, InvalidRequestError

FIELD = "control"
MAX_CONTROL_BYTES = 4096


class ControlRefusedError(InvalidRequestError):
    """A well-formed op the model cannot do now or with its config (answered INVALID_ARG)."""


@dataclass
class ControlReply:
    """The answer to one control op: a JSON-able result, or an error and its kind."""

    result: dict[str, Any] | None = None
    error: str | None = None
    error_kind: ErrorKind = ErrorKind.INVALID_ARG


@dataclass
class ControlCall:
    """One validated control op, as the engine queues it."""

    op: str
    args: dict[str, Any]
    on_done: Callable[[ControlReply], None]  # called exactly once, on the engine thread


def _no_args(args: dict[str, Any], config: ControlConfig) -> dict[str, Any]:
    return {}


def _int_arg(args: dict[str, Any], name: str, low: int, high: int, default: int | None = None) -> int:
    value = args.get(name, default)
    if value is None:
        raise InvalidRequestError(f"{FIELD}.{name}", "is required")
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidRequestError(f"{FIELD}.{name}", f"{value!r} is not an integer in [{low}, {high}]")
    return value


def _sleep_args(args: dict[str, Any], config: ControlConfig) -> dict[str, Any]:
    return {"level": _int_arg(args, "level", 1, 2, default=1)}


def _needs_profile_dir(config: ControlConfig) -> None:
    if not config.profile_dir:
        raise ControlRefusedError("profile_dir", "profiling is off: set the config parameter profile_dir")


def _profile_start_args(args: dict[str, Any], config: ControlConfig) -> dict[str, Any]:
    _needs_profile_dir(config)
    limit = config.profile_max_steps
    return {"max_steps": _int_arg(args, "max_steps", 1, limit, default=limit)}


def _profile_stop_args(args: dict[str, Any], config: ControlConfig) -> dict[str, Any]:
    _needs_profile_dir(config)
    return {}


# op -> validator of its arguments (returns them with defaults filled in)
ARGUMENTS: dict[str, Callable[[dict[str, Any], ControlConfig], dict[str, Any]]] = {
    "status": _no_args,
    "sleep": _sleep_args,
    "wake": _no_args,
    "profile_start": _profile_start_args,
    "profile_stop": _profile_stop_args,
    "list_loras": _no_args,
}
# ops that wait for the running requests to finish (admitting none meanwhile) before they run
WAITS_FOR_IDLE = frozenset({"sleep"})


def parse_control(raw: bytes | str, config: ControlConfig) -> tuple[str, dict[str, Any]]:
    """``(op, arguments)`` from the ``control`` input's JSON text; InvalidRequestError if bad."""
    if len(raw) > MAX_CONTROL_BYTES:
        raise InvalidRequestError(FIELD, f"longer than {MAX_CONTROL_BYTES} bytes")
    try:
        message = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(FIELD, f"is not a JSON object ({exc})") from None
    if not isinstance(message, dict) or not isinstance(message.get("op"), str):
        raise InvalidRequestError(FIELD, 'expected a JSON object like {"op": "status"}')
    op = message.pop("op")
    if op not in ARGUMENTS:
        raise InvalidRequestError(FIELD, f"unknown op {op!r} (known: {', '.join(ARGUMENTS)})")
    args = ARGUMENTS[op](message, config)
    unknown = sorted(set(message) - set(args))
    if unknown:
        raise InvalidRequestError(f"{FIELD}.{unknown[0]}", f"is not an argument of {op!r}")
    return op, args
