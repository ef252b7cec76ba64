"""The control channel's Triton side: who may send control ops, and how they are answered.

Control rides inference on the model itself (README "Control"): the optional ``control`` input
carries one JSON op, the answer comes back as the ``control_result`` output (JSON). Access:

- the model's ``enable_control`` must be on (default off), else INVALID_ARG naming it;
- when the launcher binds a non-loopback address it hands the stubs the admin key in
  ``OMNI_CONTROL_KEY`` and makes tritonserver forward the ``admin-key`` header as a request
  parameter (``--{http,grpc}-header-forward-pattern``); a control request must then carry it.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping

import numpy as np
import triton_python_backend_utils as pb_utils

from omni_backend.config import ControlConfig
from omni_backend.engine.control import FIELD, ControlReply
from omni_backend.request import InvalidRequestError

KEY_ENV = "OMNI_CONTROL_KEY"  # set by omni_backend.serve only off loopback
HEADER = "admin-key"
OUTPUT = "control_result"


def control_key() -> str | None:
    """The key control requests must carry (None: on loopback, none is needed)."""
    return os.environ.get(KEY_ENV) or None


def check_access(request: pb_utils.InferenceRequest, config: ControlConfig, key: str | None) -> None:
    if not config.enable_control:
        raise InvalidRequestError("enable_control", "control requests are off for this model (config parameter)")
    if key is None:
        return
    try:
        given = json.loads(request.parameters() or "{}").get(HEADER)
    except (ValueError, AttributeError):
        given = None
    if not isinstance(given, str) or not secrets.compare_digest(given.encode(), key.encode()):
        raise InvalidRequestError(HEADER, "control requests to this server need the right 'admin-key' header")


def check_alone(arrays: Mapping[str, np.ndarray]) -> None:
    """A control request carries nothing else: a generation input next to it is a mistake, not ignored."""
    others = sorted(set(arrays) - {FIELD})
    if others:
        raise InvalidRequestError(others[0], f"cannot be combined with {FIELD} (a control request carries only it)")


def result_outputs(reply: ControlReply) -> dict[str, np.ndarray]:
    return {OUTPUT: np.array([json.dumps(reply.result).encode()], dtype=object)}
