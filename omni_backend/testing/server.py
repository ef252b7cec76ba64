"""A real tritonserver, started through ``python -m omni_backend.serve``, for tests and benchmarks.

    with TritonServerProcess(repo, env_extra={"OMNI_MODEL_ROOT": str(root)}) as server:
        client = tritonclient.http.InferenceServerClient(server.http_url)

The launcher runs in its own process group with its output in a log file; ``start`` returns once it
printed the endpoints (the server answered ``/v2/health/ready``) and raises with the log's last lines
if it exits or times out.  ``stop`` sends SIGTERM (the launcher forwards it to tritonserver), SIGKILLs
after a grace period, and then makes sure no process of tritonserver's group (the server and its Python
stubs) is left, for every tritonserver the launcher started (it restarts one that crashed; ``server_pid``
is the current one).  Everything still running at interpreter exit is stopped as well.  Unless ``extra_args``
set it, ``--exit-timeout-secs=10`` is passed: tritonserver waits that long for open client connections.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from omni_backend.serving.procs import group_members as live_group_members

_SERVER_PID = re.compile(r"\[omni-serve\] tritonserver pid (\d+)")
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])


def free_ports(n: int = 3) -> tuple[int, ...]:
    """``n`` distinct TCP ports that were free a moment ago."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("0.0.0.0", 0))
        return tuple(s.getsockname()[1] for s in socks)
    finally:
        for s in socks:
            s.close()


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class TritonServerProcess:
    """``python -m omni_backend.serve`` on ``model_repository``; see the module docstring."""

    def __init__(
        self,
        model_repository: str | os.PathLike[str],
        env_extra: Mapping[str, str] | None = None,
        ports: tuple[int, int, int] | None = None,
        extra_args: Sequence[str] = (),
        log_path: str | os.PathLike[str] | None = None,
        launcher_args: Sequence[str] = (),
    ) -> None:
        self.model_repository = Path(model_repository)
        self.env_extra = dict(env_extra or {})
        http, grpc, metrics = ports or free_ports(3)
        self.ports = (http, grpc, metrics)
        self.extra_args = list(extra_args)
        if not any(a.startswith("--exit-timeout-secs") for a in self.extra_args):
            # an idle keep-alive client connection otherwise holds the shutdown for tritonserver's 30 s
            self.extra_args.append("--exit-timeout-secs=10")
        self.launcher_args = list(launcher_args)
        self._own_log = log_path is None
        self.log_path = Path(log_path or tempfile.mkstemp(prefix="tritonserver-", suffix=".log")[1])
        self._proc: subprocess.Popen[bytes] | None = None
        self.server_pids: list[int] = []  # every tritonserver the launcher started (it restarts after crashes)
        self.returncode: int | None = None
        self._log_text = ""

    @property
    def http_url(self) -> str:
        """``127.0.0.1:PORT``, as tritonclient.http wants it."""
        return f"127.0.0.1:{self.ports[0]}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.ports[1]}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports[2]}/metrics"

    @property
    def server_pid(self) -> int | None:
        """The tritonserver running now (the latest the launcher started)."""
        self._find_server_pids()
        return self.server_pids[-1] if self.server_pids else None

    def _find_server_pids(self) -> None:
        self.server_pids = [int(pid) for pid in _SERVER_PID.findall(self.log())]

    @property
    def pid(self) -> int | None:
        """The launcher's pid (also its process group id)."""
        return self._proc.pid if self._proc else None

    def model_ready(self, model: str) -> bool:
        """``/v2/models/<model>/ready`` answers 200 (any failure to answer is "not ready")."""
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/models/{model}/ready", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def log(self) -> str:
        """Everything the launcher and tritonserver printed so far."""
        with contextlib.suppress(OSError):
            self._log_text = self.log_path.read_text(errors="replace")
        return self._log_text

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-n:])

    def command(self, ready_timeout: float) -> list[str]:
        http, grpc, metrics = self.ports
        cmd = [sys.executable, "-m", "omni_backend.serve", "--model-repository", str(self.model_repository)]
        cmd += [f"--http-port={http}", f"--grpc-port={grpc}", f"--metrics-port={metrics}"]
        cmd += [f"--ready-timeout={ready_timeout:g}", *self.launcher_args]
        return cmd + (["--", *self.extra_args] if self.extra_args else [])

    def start(self, timeout: float = 180.0) -> TritonServerProcess:
        if self._proc is not None:
            raise RuntimeError("TritonServerProcess.start() called twice")
        env = {**os.environ, **self.env_extra, "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(
                self.command(timeout), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=env, start_new_session=True,
            )  # fmt: skip
        atexit.register(self.stop)
        ready = f"HTTP  http://127.0.0.1:{self.ports[0]}"
        deadline = time.monotonic() + timeout + 15
        while True:
            if ready in self.log():
                return self
            if self._proc.poll() is not None or time.monotonic() > deadline:
                why = f"exited with code {self._proc.returncode}" if self._proc.poll() is not None else (
                    f"not ready after {timeout:g} s")  # fmt: skip
                self.stop()
                raise RuntimeError(f"tritonserver launcher {why}; last output:\n{self.log_tail()}")
            time.sleep(0.1)

    def stop(self, grace: float = 30.0) -> int | None:
        """Stop launcher, server and stubs; returns the launcher's exit code (None if never started)."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            _killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                _killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.returncode = proc.returncode
        self._find_server_pids()
        for server_pid in self.server_pids:
            for sig, wait in ((0, grace), (signal.SIGKILL, 10.0)):  # server + stubs: only left if the
                if not live_group_members(server_pid):  # launcher was killed
                    break
                if sig:
                    _killpg(server_pid, sig)
                end = time.monotonic() + wait
                while live_group_members(server_pid) and time.monotonic() < end:
                    time.sleep(0.1)
        _killpg(proc.pid, signal.SIGKILL)  # anything else the launcher's group may hold
        self.log()
        if self._own_log:
            self.log_path.unlink(missing_ok=True)
        atexit.unregister(self.stop)
        return self.returncode

    def __enter__(self) -> TritonServerProcess:
        return self if self._proc is not None else self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class ReadinessLog:
    """Polls a model's readiness every 50 ms in a thread, so that a short not-ready window is not missed."""

    def __init__(self, server: TritonServerProcess, model: str):
        self.samples: list[tuple[float, bool]] = []  # (time.monotonic(), ready)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, args=(server, model), daemon=True)
        self._thread.start()

    def _poll(self, server: TritonServerProcess, model: str) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), server.model_ready(model)))
            self._stop.wait(0.05)

    def down_at(self) -> float | None:
        return next((t for t, ready in self.samples if not ready), None)

    def up_again_at(self) -> float | None:
        """When a ready sample first followed a not-ready one."""
        down = self.down_at()
        return None if down is None else next((t for t, ready in self.samples if ready and t > down), None)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
