"""Run tritonserver, wait for it to be ready, keep it serving, and stop it cleanly.

Crash recovery. Measured on Triton 2.51: when a Python backend stub dies (kill -9, segfault, host OOM
killer), the server logs nothing, ``/v2/health/ready`` and ``/v2/models/M/ready`` stay 200, and every
request in flight on that model hangs forever, over HTTP, gRPC and gRPC streaming alike. Unloading the
model through the repository API flips its readiness and a reload serves again, but does NOT answer
those requests: they keep the old model version alive, and Triton never finalizes it. The only thing
that answers them is the server process going away (their connections close). So on a stub death the
supervisor SIGKILLs the server (its process group: server and stubs), unlinks the shared-memory regions
the dead server leaves, and starts it again with the same arguments; clients in flight get a
connection error within about a second, readiness is down until the models are loaded again. The
same happens when tritonserver itself dies after it was ready. ``max_restarts`` within
``restart_window_s`` bounds a crash loop: then the launcher exits non-zero for the orchestrator.

A stub that goes away while its model is NOT ready is an unload (repository API) or the Python
backend's short-lived auto-complete stub, not a crash: only a model reporting ready with its stub
gone is broken.

A parallel worker rank (a process the stub spawned, procs.workers_of) that dies while its model is
ready is a crash too, though a milder one: the model itself fails the requests in flight within a
fraction of a second (distributed/worker.py) and would start a fresh group on its next step, but
Triton 2.51 gives a Python model no way to report itself unready meanwhile. So the supervisor takes
the model out of service: under ``--model-control-mode=explicit`` it unloads and loads that model
alone through the repository API (readiness is down in between; other models are untouched);
otherwise it restarts the server as for a dead stub. Reloads count against ``max_restarts`` too.

Shutdown (SIGTERM/SIGINT): write the drain file (see drain.py), forward the signal, wait for the
server, then make sure no process of its group is left and no /dev/shm region it created remains.
A second signal more than a second later kills the group at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from omni_backend.serving.drain import request_drain
from omni_backend.serving.logwatch import PREFIX, LogWatcher, pump
from omni_backend.serving.procs import Stub, group_members, stubs_of, unlink_shm, workers_of

POLL_S = 0.5  # how often stubs are checked: a crash is acted on within this (plus one readiness probe)
EXIT_HANG_GRACE_S = 3.0  # after tritonserver's "Exiting immediately", how long it may take to actually exit


def say(msg: str) -> None:
    print(f"{PREFIX} {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class SupervisorPolicy:
    """How the launcher waits, restarts and stops (from its command line)."""

    ready_timeout: float = 0.0  # seconds to wait for readiness at each start; 0: as long as it runs
    exit_grace: float = 20.0  # wait for the server to exit by itself after a load failure
    exit_on_error: bool = True  # tritonserver's --exit-on-error: a failed model load ends the launch
    exit_timeout: float = 30.0  # tritonserver's --exit-timeout-secs: the drain deadline derives from it
    max_restarts: int = 5  # crash recoveries allowed within restart_window_s (0: never restart)
    restart_window_s: float = 600.0
    explicit_model_control: bool = False  # the server runs --model-control-mode=explicit: reload one model
    reload_timeout_s: float = 600.0  # a parallel model's load spawns and loads every rank


def http_get_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return bool(r.status == 200)
    except OSError:
        return False


class Supervisor:
    """``start()`` launches tritonserver (in its own process group) and returns it; ``run`` does the rest."""

    def __init__(
        self,
        start: Callable[[], subprocess.Popen[bytes]],
        probe_url: str,
        policy: SupervisorPolicy,
        drain_file: str,
        announce: Sequence[str] = (),
        admin_headers: Mapping[str, str] | None = None,
    ):
        self.start = start
        self.probe_url = probe_url  # http://HOST:PORT of the server's HTTP endpoint
        self.policy = policy
        self.drain_file = drain_file
        self.announce = announce  # printed on stdout once, when the server is first ready
        self.admin_headers = dict(admin_headers or {})  # the repository API needs the key off loopback
        self.watcher = LogWatcher()
        self.restarts: deque[float] = deque()
        self.shm_regions: set[str] = set()  # every region seen: unlinked if left behind
        self.signals: list[tuple[float, int]] = []
        self.proc: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------------ main loop

    def run(self) -> int:
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        first = True
        while True:
            proc = self._launch()
            failed = self._wait_ready(proc)
            if failed is not None:
                return failed
            if self.signals:
                return self._shutdown(proc)
            if first:
                print("\n".join(self.announce), flush=True)
            first = False
            why = self._supervise(proc)
            if why is None:
                return self._shutdown(proc)
            if not self._may_restart():
                say(f"ERROR: {why}; {len(self.restarts)} restarts within {self.policy.restart_window_s:g} s, giving up")
                self._kill(proc)
                return 1
            say(f"{why}: restarting tritonserver (in-flight requests fail; readiness is down until it is back)")
            self._kill(proc)

    def _launch(self) -> subprocess.Popen[bytes]:
        self.watcher = LogWatcher()
        self.proc = proc = self.start()
        for src, dst in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr)):
            threading.Thread(target=pump, args=(src, dst, self.watcher), daemon=True).start()
        return proc

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.signals.append((time.monotonic(), signum))
        proc = self.proc
        if proc is not None and proc.poll() is None and self.signals[-1][0] - self.signals[0][0] > 1:
            os.killpg(proc.pid, signal.SIGKILL)  # a second signal: no more waiting

    def _may_restart(self) -> bool:
        now = time.monotonic()
        while self.restarts and now - self.restarts[0] > self.policy.restart_window_s:
            self.restarts.popleft()
        if len(self.restarts) >= self.policy.max_restarts:
            return False
        self.restarts.append(now)
        return True

    # ------------------------------------------------------------------ start-up

    def _wait_ready(self, proc: subprocess.Popen[bytes]) -> int | None:
        """None once ready (or a signal arrived); otherwise the launcher's exit code after a failed start."""
        start, warned = time.monotonic(), False
        while not self.signals:
            self.shm_regions.update(s.shm_region for s in stubs_of(proc.pid))
            if proc.poll() is not None:
                return self._fail(proc, "tritonserver exited before becoming ready", 0)
            if self.watcher.failures and self.policy.exit_on_error:
                return self._fail(proc, "a model failed to load", self.policy.exit_grace)
            if new := self.watcher.report(only_new=True):
                warned = True
                say("WARNING: model failed to load (--exit-on-error=false: the server keeps running)")
                print("\n".join(new), file=sys.stderr, flush=True)
            if http_get_ok(f"{self.probe_url}/v2/health/ready"):
                say(f"tritonserver ready after {time.monotonic() - start:.1f} s")
                return None
            if self.policy.ready_timeout and time.monotonic() - start > self.policy.ready_timeout:
                hint = " (failed models keep a --strict-readiness server unready)" if warned else ""
                return self._fail(proc, f"not ready after {self.policy.ready_timeout:g} s{hint}", 0.1)
            time.sleep(0.25)
        return None

    def _fail(self, proc: subprocess.Popen[bytes], why: str, grace: float) -> int:
        """Let the server finish (or stop it), then print why it failed; returns our exit code."""
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.terminate()  # tritonserver stops its stubs itself
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        self._kill(proc)
        time.sleep(0.2)  # let the pump threads pass on the last lines
        say(f"ERROR: {why} (tritonserver exit code {proc.returncode})")
        print("\n".join(self.watcher.report()), file=sys.stderr, flush=True)
        return proc.returncode if proc.returncode and proc.returncode > 0 else 1

    # ------------------------------------------------------------------ supervision

    def _supervise(self, proc: subprocess.Popen[bytes]) -> str | None:
        """Watch until a signal (None) or a fault that needs a restart (its description)."""
        known: dict[int, Stub] = {}
        known_workers: dict[int, Stub] = {}  # worker pid -> the stub that spawned it
        while not self.signals:
            if proc.poll() is not None:
                return f"tritonserver exited unexpectedly (code {proc.returncode})"
            current = {s.pid: s for s in stubs_of(proc.pid)}
            self.shm_regions.update(s.shm_region for s in current.values())
            for pid, stub in known.items():
                if pid not in current and self._model_ready(stub.model):
                    say(f"stub of model '{stub.model}' ({stub.instance}, pid {pid}) died while the model was ready")
                    return f"model '{stub.model}' lost its stub process"
            workers = {w: stub for stub in current.values() for w in workers_of(stub.pid)}
            lost = {s.model: (pid, s) for pid, s in known_workers.items() if pid not in workers and s.pid in current}
            for model, (pid, stub) in lost.items():
                if not self._model_ready(model):
                    continue  # an unload stops the workers
                say(f"parallel worker (pid {pid}) of model '{model}' died while the model was ready")
                if not self.policy.explicit_model_control:
                    return f"model '{model}' lost a parallel worker"
                if not self._may_restart():
                    return f"model '{model}' lost a parallel worker"  # run() gives up: the budget is spent
                if not self._reload(proc, stub):
                    return f"model '{model}' could not be reloaded after losing a parallel worker"
                # the reloaded model has a new stub; any other stub that died meanwhile is still noticed
                current = {pid: s for pid, s in current.items() if s.model != model}
                current |= {s.pid: s for s in stubs_of(proc.pid) if s.model == model}
                workers = {w: s for s in current.values() for w in workers_of(s.pid)}
            known, known_workers = current, workers
            time.sleep(POLL_S)
        return None

    def _reload(self, proc: subprocess.Popen[bytes], stub: Stub) -> bool:
        """Unload, then load ``stub``'s model (explicit model control): True once it is ready again.

        Triton's unload only starts the unload: the load waits until the old stub has finalized (its
        requests answered, its memory freed), or two instances would hold the model at once.
        """
        start = time.monotonic()
        if not self._repository(stub.model, "unload"):
            return False
        while stub.pid in {s.pid for s in stubs_of(proc.pid)}:
            if time.monotonic() - start > self.policy.reload_timeout_s:
                say(f"ERROR: model '{stub.model}' did not unload within {self.policy.reload_timeout_s:g} s")
                return False
            time.sleep(0.1)
        say(f"model '{stub.model}' unloaded after {time.monotonic() - start:.1f} s; loading it again")
        ready = self._repository(stub.model, "load") and self._model_ready(stub.model)
        say(f"model '{stub.model}' reloaded in {time.monotonic() - start:.1f} s (ready: {ready})")
        return ready

    def _repository(self, model: str, action: str) -> bool:
        """POST the repository API's ``load`` or ``unload`` for ``model``; False (and why) if it fails."""
        url = f"{self.probe_url}/v2/repository/models/{model}/{action}"
        request = urllib.request.Request(url, data=b"{}", method="POST", headers=self.admin_headers)
        try:
            with urllib.request.urlopen(request, timeout=self.policy.reload_timeout_s):
                return True
        except OSError as e:
            say(f"ERROR: {action} of model '{model}' failed: {e}")
            return False

    def _model_ready(self, model: str) -> bool:
        return http_get_ok(f"{self.probe_url}/v2/models/{model}/ready")

    # ------------------------------------------------------------------ shutdown

    def _shutdown(self, proc: subprocess.Popen[bytes]) -> int:
        """Drain, forward the signal, wait; 0 once everything is stopped, whatever Triton's exit path did.

        Any open client connection (an idle keep-alive one is enough) makes tritonserver spend its
        whole exit timeout waiting, then exit "immediately" with its models still loaded, and in 2.51
        that exit path can hang. The drain answered the requests by then: the launcher kills the hang
        after EXIT_HANG_GRACE_S and cleans up, and that is a normal stop.
        """
        _, signum = self.signals[0]
        exit_timeout = self.policy.exit_timeout
        margin = min(2.0, exit_timeout / 4)  # time left for the last responses and the models' finalize
        request_drain(self.drain_file, time.time() + exit_timeout - margin)
        if proc.poll() is None:
            proc.send_signal(signum)
        deadline, expired_at = time.monotonic() + exit_timeout + 15, None
        while proc.poll() is None and time.monotonic() < deadline:
            if expired_at is None and self.watcher.exit_expired:
                expired_at = time.monotonic()
            if expired_at is not None and time.monotonic() - expired_at > EXIT_HANG_GRACE_S:
                say("tritonserver is stuck after its exit timeout: stopping it")
                break
            time.sleep(0.1)
        stuck = proc.poll() is None
        self._kill(proc)
        if stuck:
            return 0 if expired_at is not None else 1
        rc = proc.returncode
        return rc if rc >= 0 else 128 - rc

    def _kill(self, proc: subprocess.Popen[bytes]) -> None:
        """Make sure nothing of this server is left: its process group, its /dev/shm regions."""
        deadline = time.monotonic() + 5
        while group_members(proc.pid) and time.monotonic() < deadline and proc.poll() is not None:
            time.sleep(0.1)  # stubs of an exited server notice their parent is gone: give them a moment
        if group_members(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        while group_members(proc.pid) and time.monotonic() < deadline + 5:
            time.sleep(0.1)
        if removed := unlink_shm(self.shm_regions):
            say(f"removed {len(removed)} shared-memory region(s) the server left in /dev/shm")
        self.shm_regions.clear()
