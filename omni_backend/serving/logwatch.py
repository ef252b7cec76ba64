"""tritonserver's output, read line by line: model load failures and server errors, for the launcher's report."""

from __future__ import annotations

import contextlib
import json
import re
import threading
from collections import deque
from typing import IO

PREFIX = "[omni-serve]"
_NOISE = ("CudaDriverHelper has not been initialized",)
_EXIT_EXPIRED = "Exit timeout expired. Exiting immediately."


_LOG = re.compile(r"^(?:[IWEF]\d{4} [\d:.]+ +\d+ |\S+ [IWEF] \d+ )?[\w./-]+:\d+\] (?P<msg>.*)$")
_FAILED_LOAD = re.compile(r"failed to load '(?P<model>[^']+)' version (?P<version>\S+): (?P<msg>.*)", re.S)
_POLL_FAILED = re.compile(r"Poll failed for model directory '(?P<model>[^']+)': (?P<msg>.*)", re.S)
_PROTOBUF = re.compile(r"^\[libprotobuf ERROR [^\]]*\] (?P<msg>.*)$")


class LogWatcher:
    """Fed tritonserver's output lines; collects model load failures and server errors."""

    def __init__(self) -> None:
        self.failures: dict[str, str] = {}  # model -> "version V: reason" / reason
        self.errors: list[str] = []
        self.exit_expired = False  # "Exit timeout expired. Exiting immediately." was printed
        self.tail: deque[str] = deque(maxlen=20)
        self._protobuf, self._reported = "", 0
        self._table: list[list[str]] | None = None
        self._lock = threading.Lock()

    def feed(self, line: str) -> None:
        with self._lock:
            self.tail.append(line.rstrip("\r\n"))
            self._feed(line.rstrip("\r\n"))

    def _feed(self, line: str) -> None:
        if _EXIT_EXPIRED in line:
            self.exit_expired = True
        if self._table is not None:  # inside the model status table printed when loading is over
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if line.startswith("|"):
                if len(cells) == 3 and (cells[0] or not self._table):
                    self._table.append(cells)
                elif len(cells) == 3:  # continuation line of a multi-line status
                    self._table[-1][2] += "\n" + cells[2]
                return
            if line.startswith("+"):
                return
            for model, version, status in self._table:
                if status != "READY":
                    self.failures.setdefault(model, f"version {version}: {status.strip()}")
            self._table = None
        if re.match(r"\|\s*Model\s*\|\s*Version\s*\|\s*Status\s*\|", line):
            self._table = []
        elif m := _PROTOBUF.match(line):
            self._protobuf = f" ({m['msg']})"
        elif line.startswith("error:"):
            self.errors.append(line)
        elif m := _LOG.match(line):
            msg = m["msg"]  # a JSON string literal in 2.51's default log format
            with contextlib.suppress(ValueError):
                msg = str(json.loads(msg)) if msg.startswith('"') else msg
            if f := _FAILED_LOAD.search(msg):
                self.failures[f["model"]] = f"version {f['version']}: {f['msg'].strip()}"
            elif f := _POLL_FAILED.search(msg):
                self.failures.setdefault(f["model"], f"{f['msg'].strip()}{self._protobuf}")
                self._protobuf = ""
            if line[0] in "EF" and not any(n in msg for n in _NOISE):
                self.errors.append(msg)

    def report(self, only_new: bool = False) -> list[str]:
        """Reason lines: failing models (+ the server's final ``error:``), else errors, else the log tail.

        ``only_new``: just the failed models not reported by an earlier ``only_new`` call."""
        with self._lock:
            out = [f"model '{name}' failed to load, {why}" for name, why in self.failures.items()]
            if only_new:
                out, self._reported = out[self._reported :], len(out)
            else:
                errors = [e for e in self.errors if e.startswith("error:")] if out else self.errors
                out += [f"server: {e}" for e in errors[-5:]]
                out = out or ["last output:", *self.tail]
        return [f"{PREFIX}   {piece}" for line in out for piece in line.splitlines() if piece.strip()]


def pump(src: IO[bytes], dst: IO[str], watcher: LogWatcher) -> None:
    for raw in iter(src.readline, b""):
        line = raw.decode("utf-8", "replace")
        watcher.feed(line)
        try:
            dst.write(line)
            dst.flush()
        except (OSError, ValueError):
            pass  # our output went away: keep draining so the server never blocks on a full pipe
    src.close()
