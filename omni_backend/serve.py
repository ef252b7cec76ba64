"""Launch a real NVIDIA Triton server on a model repository (``python -m omni_backend.serve --help``).

Binary: ``--tritonserver``, else the nvidia-pytriton wheel's, else ``tritonserver`` on PATH (the official
container's brings its own backends: no backend dir is assembled for it unless ``--backend-dir`` is given).

Python backend: the wheel keeps ``libtriton_python.so`` and one stub per Python version apart, so we
assemble ``<dir>/python/`` (symlinks to the .so, ``triton_python_backend_utils.py`` and the stub matching
*this* interpreter; default ``$XDG_CACHE_HOME/omni-triton/backends/py3.X-<hash>``, links replaced
atomically so concurrent launchers can share it) and pass ``--backend-directory <dir>``.

Environment for tritonserver (inherited by the stubs):
  * PATH starts with this interpreter's bin dir: the stub's embedded Python then uses the venv's packages.
  * LD_LIBRARY_PATH starts with the wheel's ``nvidia_pytriton.libs`` (the symlinked backend can't use its
    $ORIGIN rpath) and this interpreter's libpython dir (sysconfig LIBDIR): otherwise the stub can mix the
    system libpython with ours and fail on ``import ssl`` (undefined symbol).

Fail fast: tritonserver 2.51 exits when a model fails to load (unless ``--exit-on-error=false``).  We parse
``failed to load 'M' version V: MSG``, ``Poll failed for model directory 'M': MSG`` (+ the preceding
``[libprotobuf ERROR ...]`` detail), the model status table and ``error: ...``, and on exit before
readiness print ``[omni-serve]   model 'M' ... failed to load: MSG`` and exit non-zero.  Server output is
streamed through unchanged; SIGINT/SIGTERM are forwarded (a second one SIGKILLs the server's group).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from subprocess import DEVNULL, PIPE
from typing import IO

PREFIX = "[omni-serve]"
STUB = "triton_python_backend_stub"
BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")
_NOISE = ("CudaDriverHelper has not been initialized",)


class LaunchError(RuntimeError):
    """The server could not be launched (binary/stub missing, port busy, ...)."""


def pytriton_root() -> Path | None:
    """``site-packages/pytriton/tritonserver`` of the nvidia-pytriton wheel, if installed."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    return root if root.is_dir() else None


def find_tritonserver(explicit: str | os.PathLike[str] | None = None) -> Path:
    if explicit:
        path = Path(explicit)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise LaunchError(f"--tritonserver {path}: not an executable file")
        return path
    root = pytriton_root()
    if root is not None and (root / "bin" / "tritonserver").is_file():
        return root / "bin" / "tritonserver"
    if found := shutil.which("tritonserver"):
        return Path(found)
    raise LaunchError("no tritonserver: install nvidia-pytriton, put it on PATH or pass --tritonserver")


def is_bundled(binary: Path) -> bool:
    root = pytriton_root()
    return root is not None and binary.resolve() == (root / "bin" / "tritonserver").resolve()


def default_backend_dir(root: Path) -> Path:
    """Per interpreter version and wheel location; under $XDG_CACHE_HOME (~/.cache), else the temp dir."""
    key = hashlib.sha1(bytes(root.resolve())).hexdigest()[:10]
    tag = f"py{sys.version_info.major}.{sys.version_info.minor}-{key}"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"))
    if not os.access(cache if cache.exists() else cache.parent, os.W_OK):
        cache = Path(tempfile.gettempdir()) / f"omni-triton-{os.getuid()}"
    return cache / "omni-triton" / "backends" / tag


def _link(src: Path, dst: Path) -> None:
    if dst.is_symlink() and os.readlink(dst) == str(src):
        return
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(src, tmp)
    os.replace(tmp, dst)  # atomic: a concurrent launcher sees the old or the new link, never none


def assemble_backend_dir(target: str | os.PathLike[str] | None = None, root: Path | None = None) -> Path:
    """Create ``<target>/python/`` for the wheel's Python backend and this interpreter; return target."""
    root = root or pytriton_root()
    if root is None:
        raise LaunchError("nvidia-pytriton is not installed: cannot assemble a Python backend directory")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / STUB
    if not stub.is_file():
        have = sorted(p.parent.name for p in (root / "python_backend_stubs").glob(f"*/{STUB}"))
        raise LaunchError(
            f"nvidia-pytriton has no Python backend stub for Python {version} ({stub} missing); "
            f"stubs exist for: {', '.join(have) or 'none'}. Run with one of those interpreters."
        )
    sources = {name: root / "backends" / "python" / name for name in BACKEND_FILES} | {STUB: stub}
    for src in sources.values():
        if not src.is_file():
            raise LaunchError(f"nvidia-pytriton install is incomplete: {src} missing")
    out = Path(target) if target else default_backend_dir(root)
    (out / "python").mkdir(parents=True, exist_ok=True)
    for name, src in sources.items():
        _link(src.resolve(), out / "python" / name)
    return out


def server_env(base: Mapping[str, str] | None = None, *, wheel_libs: bool = True) -> dict[str, str]:
    env = dict(os.environ if base is None else base)

    def prepend(var: str, first: list[str]) -> None:
        rest = [p for p in env.get(var, "").split(os.pathsep) if p and p not in first]
        env[var] = os.pathsep.join(first + rest)

    prepend("PATH", [os.path.dirname(sys.executable)])
    root = pytriton_root()
    if wheel_libs and root is not None:
        libs = [str(root.parent.parent / "nvidia_pytriton.libs")]
        libdir = sysconfig.get_config_var("LIBDIR")
        prepend("LD_LIBRARY_PATH", libs + ([libdir] if libdir else []))
    return env


def build_command(
    binary: str | os.PathLike[str],
    model_repository: str | os.PathLike[str],
    ports: tuple[int, int, int] = (8000, 8001, 8002),
    backend_dir: str | os.PathLike[str] | None = None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """tritonserver argv; ``ports`` = (http, grpc, metrics)."""
    cmd = [str(binary), f"--model-repository={model_repository}"]
    cmd += [f"--{kind}-port={port}" for kind, port in zip(("http", "grpc", "metrics"), ports, strict=True)]
    if backend_dir is not None:
        cmd.append(f"--backend-directory={backend_dir}")
    return cmd + list(extra_args)


def flag_value(args: Sequence[str], flag: str) -> str | None:
    """Last value given for ``flag`` (``--f=v`` or ``--f v``) in a tritonserver argument list."""
    value = None
    for i, arg in enumerate(args):
        if arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
        elif arg == flag:
            value = args[i + 1] if i + 1 < len(args) else ""
    return value


_LOG = re.compile(r"^(?:[IWEF]\d{4} [\d:.]+ +\d+ |\S+ [IWEF] \d+ )?[\w./-]+:\d+\] (?P<msg>.*)$")
_FAILED_LOAD = re.compile(r"failed to load '(?P<model>[^']+)' version (?P<version>\S+): (?P<msg>.*)", re.S)
_POLL_FAILED = re.compile(r"Poll failed for model directory '(?P<model>[^']+)': (?P<msg>.*)", re.S)
_PROTOBUF = re.compile(r"^\[libprotobuf ERROR [^\]]*\] (?P<msg>.*)$")


class LogWatcher:
    """Fed tritonserver's output lines; collects model load failures and server errors."""

    def __init__(self) -> None:
        self.failures: dict[str, str] = {}  # model -> "version V: reason" / reason
        self.errors: list[str] = []
        self.tail: deque[str] = deque(maxlen=20)
        self._protobuf, self._reported = "", 0
        self._table: list[list[str]] | None = None
        self._lock = threading.Lock()

    def feed(self, line: str) -> None:
        with self._lock:
            self.tail.append(line.rstrip("\r\n"))
            self._feed(line.rstrip("\r\n"))

    def _feed(self, line: str) -> None:
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


def _pump(src: IO[bytes], dst: IO[str], watcher: LogWatcher) -> None:
    for raw in iter(src.readline, b""):
        line = raw.decode("utf-8", "replace")
        watcher.feed(line)
        try:
            dst.write(line)
            dst.flush()
        except (OSError, ValueError):
            pass  # our output went away: keep draining so the server never blocks on a full pipe
    src.close()


try:
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _PRCTL = None


def _preexec_child() -> None:
    os.setpgid(0, 0)  # own group: we forward signals ourselves; the stubs share this group
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: launcher SIGKILLed -> server shuts down too


def is_ready(http_port: int, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=timeout) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def _check_port_free(port: int) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError as e:
            raise LaunchError(f"port {port} is already in use ({e.strerror})") from None


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    argv = list(argv)
    tail = argv[argv.index("--") + 1 :] if "--" in argv else []
    head = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(
        prog="python -m omni_backend.serve",
        description="Launch tritonserver on a model repository; fail fast if a model does not load.",
        epilog="Unknown options and everything after '--' are passed to tritonserver.",
        allow_abbrev=False,
    )
    p.add_argument("--model-repository", required=True, type=Path)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--tritonserver", help="tritonserver binary (default: nvidia-pytriton's, else PATH)")
    p.add_argument("--backend-dir", type=Path, help="where to assemble the Python backend directory")
    p.add_argument("--ready-timeout", type=float, default=0.0, help="seconds; 0 = wait as long as it runs")
    p.add_argument("--exit-grace", type=float, default=20.0, help="wait for exit after a load failure")
    opts, unknown = p.parse_known_args(head)
    return opts, unknown + tail


def _say(msg: str) -> None:
    print(f"{PREFIX} {msg}", file=sys.stderr, flush=True)


def _fail(proc: subprocess.Popen[bytes], watcher: LogWatcher, why: str, grace: float) -> int:
    """Let the server finish (or stop it), then print why it failed; returns our exit code."""
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig == signal.SIGTERM and proc.poll() is None:
            proc.terminate()  # tritonserver stops its stubs itself
        elif sig == signal.SIGKILL and proc.poll() is None:
            os.killpg(proc.pid, sig)
        try:
            proc.wait(grace if sig is None else 10)
            break
        except subprocess.TimeoutExpired:
            continue
    time.sleep(0.2)  # let the pump threads pass on the last lines
    _say(f"ERROR: {why} (tritonserver exit code {proc.returncode})")
    print("\n".join(watcher.report()), file=sys.stderr, flush=True)
    return proc.returncode if proc.returncode and proc.returncode > 0 else 1


def _start(opts: argparse.Namespace, passthrough: list[str]) -> subprocess.Popen[bytes]:
    if not opts.model_repository.is_dir():
        raise LaunchError(f"model repository {opts.model_repository} is not a directory")
    binary = find_tritonserver(opts.tritonserver)
    bundled, backend_dir = is_bundled(binary), None
    if flag_value(passthrough, "--backend-directory") is None and (bundled or opts.backend_dir):
        backend_dir = assemble_backend_dir(opts.backend_dir)
    for port in opts.ports:
        _check_port_free(port)
    repo = opts.model_repository.resolve()
    cmd = build_command(binary, repo, opts.ports, backend_dir, passthrough)
    env = server_env(wheel_libs=bundled or backend_dir is not None)
    proc = subprocess.Popen(cmd, env=env, stdin=DEVNULL, stdout=PIPE, stderr=PIPE, preexec_fn=_preexec_child)
    _say(f"tritonserver pid {proc.pid}: {' '.join(cmd)}")
    return proc


def run(argv: Sequence[str]) -> int:
    opts, passthrough = parse_args(argv)
    opts.ports = (opts.http_port, opts.grpc_port, opts.metrics_port)
    proc = _start(opts, passthrough)
    watcher, signals = LogWatcher(), list[float]()
    pipes = ((proc.stdout, sys.stdout, watcher), (proc.stderr, sys.stderr, watcher))
    pumps = [threading.Thread(target=_pump, args=args, daemon=True) for args in pipes]
    for t in pumps:
        t.start()

    def forward(signum: int, _frame: object) -> None:
        signals.append(time.monotonic())
        if proc.poll() is None:  # 1st signal: graceful stop; another one >1 s later: kill server + stubs
            os.killpg(proc.pid, signal.SIGKILL) if signals[-1] - signals[0] > 1 else proc.send_signal(signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    exit_on_error = (flag_value(passthrough, "--exit-on-error") or "1").lower() not in ("false", "0", "no")
    start, warned = time.monotonic(), False
    while not signals:
        if proc.poll() is not None:
            return _fail(proc, watcher, "tritonserver exited before becoming ready", 0)
        if watcher.failures and exit_on_error:
            return _fail(proc, watcher, "a model failed to load", opts.exit_grace)
        if new := watcher.report(only_new=True):
            warned = True
            _say("WARNING: model failed to load (--exit-on-error=false: the server keeps running)")
            print("\n".join(new), file=sys.stderr, flush=True)
        if is_ready(opts.http_port):
            _say(f"tritonserver ready after {time.monotonic() - start:.1f} s")
            http, grpc, metrics = opts.ports
            print(f"HTTP  http://127.0.0.1:{http}\ngRPC  127.0.0.1:{grpc}", flush=True)
            print(f"metrics  http://127.0.0.1:{metrics}/metrics", flush=True)
            break
        if opts.ready_timeout and time.monotonic() - start > opts.ready_timeout:
            hint = " (failed models keep a --strict-readiness server unready)" if warned else ""
            return _fail(proc, watcher, f"not ready after {opts.ready_timeout:g} s{hint}", 0.1)
        time.sleep(0.25)
    rc = proc.wait()
    for t in pumps:
        t.join(5)
    return rc if rc >= 0 else 128 - rc


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except LaunchError as e:
        _say(f"ERROR: {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
