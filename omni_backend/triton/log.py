"""Route the package's ``logging`` records into Triton's log (``pb_utils.Logger``)."""

from __future__ import annotations

import logging

import triton_python_backend_utils as pb_utils


class TritonLogHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        message = f"[{record.name}] {self.format(record)}"
        if record.levelno >= logging.ERROR:
            pb_utils.Logger.log_error(message)
        elif record.levelno >= logging.WARNING:
            pb_utils.Logger.log_warn(message)
        elif record.levelno >= logging.INFO:
            pb_utils.Logger.log_info(message)
        else:
            pb_utils.Logger.log_verbose(message)


def install(model_name: str) -> logging.Logger:
    """Attach the Triton handler to the package logger once; return the model's logger."""
    root = logging.getLogger("omni_backend")
    if not any(isinstance(h, TritonLogHandler) for h in root.handlers):
        root.addHandler(TritonLogHandler())
        root.setLevel(logging.INFO)
        root.propagate = False
    return logging.getLogger(f"omni_backend.triton.{model_name}")
