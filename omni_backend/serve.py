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

Fail fast: tritonserver 2.51 exits when a model fails to load (unless ``--exit-on-error=false``); the
launcher then prints ``[omni-serve]   model 'M' ... failed to load: MSG`` (serving/logwatch.py) and exits
non-zero.  Server output is streamed through unchanged.

Once ready, serving/supervisor.py keeps it serving: a dead stub or server means a restart (Triton 2.51
would leave requests hanging), a dead parallel worker a reload of its model (under explicit model
control; else a restart); SIGINT/SIGTERM drain the models (serving/drain.py), stop the server and
leave no process and no /dev/shm region behind.

Addresses: every endpoint binds ``--host`` (default 127.0.0.1). On any other address the admin APIs
(model repository, config, shared memory, statistics, trace, logging) require the ``admin-key`` header
(``--admin-key`` / ``$OMNI_ADMIN_KEY``; by default a random key nobody knows, so they are closed).
The same key guards the models' in-band control ops (README "Control"): tritonserver forwards the
``admin-key`` header to the models as a request parameter and the stubs get the key in
``$OMNI_CONTROL_KEY`` (set only off loopback).
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import importlib.util
import ipaddress
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from subprocess import DEVNULL, PIPE

from omni_backend.serving import drain
from omni_backend.serving.logwatch import PREFIX, LogWatcher
from omni_backend.serving.procs import STUB
from omni_backend.serving.supervisor import Supervisor, SupervisorPolicy, say

__all__ = ["PREFIX", "STUB", "LaunchError", "LogWatcher", "main"]

BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")
ADMIN_APIS = ("model-repository", "model-config", "shared-memory", "statistics", "trace", "logging")
ADMIN_HEADER = "admin-key"
ADMIN_KEY_ENV = "OMNI_ADMIN_KEY"
CONTROL_KEY_ENV = "OMNI_CONTROL_KEY"  # read by omni_backend/triton/control.py


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


try:
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _PRCTL = None


def _preexec_child() -> None:
    os.setpgid(0, 0)  # own group: we forward signals ourselves; the stubs share this group
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: launcher SIGKILLed -> server shuts down too


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
        description="Launch tritonserver on a model repository; fail fast if a model does not load; "
        "restart it if a model's stub process dies; drain and clean up on SIGTERM.",
        epilog="Unknown options and everything after '--' are passed to tritonserver.",
        allow_abbrev=False,
    )
    p.add_argument("--model-repository", required=True, type=Path)
    p.add_argument("--host", default="127.0.0.1", help="address HTTP, gRPC and metrics bind to (default loopback)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    key_help = f"'{ADMIN_HEADER}' header value admin APIs need off loopback (default ${ADMIN_KEY_ENV}, else random)"
    p.add_argument("--admin-key", default=os.environ.get(ADMIN_KEY_ENV), help=key_help)
    p.add_argument("--tritonserver", help="tritonserver binary (default: nvidia-pytriton's, else PATH)")
    p.add_argument("--backend-dir", type=Path, help="where to assemble the Python backend directory")
    p.add_argument("--ready-timeout", type=float, default=0.0, help="seconds; 0 = wait as long as it runs")
    p.add_argument("--exit-grace", type=float, default=20.0, help="wait for exit after a load failure")
    p.add_argument("--max-restarts", type=int, default=5, help="crash recoveries allowed per --restart-window")
    p.add_argument("--restart-window", type=float, default=600.0, help="seconds")
    opts, unknown = p.parse_known_args(head)
    return opts, unknown + tail


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def address_args(host: str, admin_key: str | None, passthrough: Sequence[str]) -> list[str]:
    """Bind every endpoint to ``host``; off loopback, admin APIs need the ``admin-key`` header."""
    kinds = [kind for kind in ("http", "grpc", "metrics") if flag_value(passthrough, f"--{kind}-address") is None]
    args = [f"--{kind}-address={host}" for kind in kinds]
    if is_loopback(host):
        return args
    key = admin_key or secrets.token_urlsafe(24)  # nobody knows it: admin endpoints are simply closed
    apis = ",".join(ADMIN_APIS)
    if flag_value(passthrough, "--http-restricted-api") is None:
        args.append(f"--http-restricted-api={apis}:{ADMIN_HEADER}={key}")
    if flag_value(passthrough, "--grpc-restricted-protocol") is None:
        args.append(f"--grpc-restricted-protocol={apis}:{ADMIN_HEADER}={key}")
    for kind in ("http", "grpc"):  # control ops ride inference: the model checks the key itself
        if flag_value(passthrough, f"--{kind}-header-forward-pattern") is None:
            args.append(f"--{kind}-header-forward-pattern={ADMIN_HEADER}")
    return args


def probe_url(host: str, http_port: int) -> str:
    """Where the launcher itself reaches the HTTP endpoint (health and readiness only)."""
    if host in ("0.0.0.0", "::", "") or is_loopback(host):
        host = "127.0.0.1"
    return f"http://[{host}]:{http_port}" if ":" in host else f"http://{host}:{http_port}"


def _start(opts: argparse.Namespace, passthrough: list[str]) -> subprocess.Popen[bytes]:
    binary = find_tritonserver(opts.tritonserver)
    bundled, backend_dir = is_bundled(binary), None
    if flag_value(passthrough, "--backend-directory") is None and (bundled or opts.backend_dir):
        backend_dir = assemble_backend_dir(opts.backend_dir)
    for port in opts.ports:
        _check_port_free(port)
    repo = opts.model_repository.resolve()
    key = opts.admin_key
    extra = address_args(opts.host, key, passthrough) + passthrough
    cmd = build_command(binary, repo, opts.ports, backend_dir, extra)
    env = server_env(wheel_libs=bundled or backend_dir is not None)
    env[drain.ENV] = opts.drain_file
    env.pop(CONTROL_KEY_ENV, None)
    if key is not None:
        env[CONTROL_KEY_ENV] = key
    proc = subprocess.Popen(cmd, env=env, stdin=DEVNULL, stdout=PIPE, stderr=PIPE, preexec_fn=_preexec_child)
    shown = [re.sub(r"(restricted-\w+=.*:[\w-]+=).*", r"\1***", arg) for arg in cmd]  # never log the key
    say(f"tritonserver pid {proc.pid}: {' '.join(shown)}")
    return proc


def run(argv: Sequence[str]) -> int:
    opts, passthrough = parse_args(argv)
    if not opts.model_repository.is_dir():
        raise LaunchError(f"model repository {opts.model_repository} is not a directory")
    opts.ports = (opts.http_port, opts.grpc_port, opts.metrics_port)
    find_tritonserver(opts.tritonserver)  # fail before anything starts
    exit_timeout = float(flag_value(passthrough, "--exit-timeout-secs") or 30)
    # off loopback: the given key, else a random one only the launcher knows (admin APIs and control closed)
    opts.admin_key = None if is_loopback(opts.host) else opts.admin_key or secrets.token_urlsafe(24)
    policy = SupervisorPolicy(
        ready_timeout=opts.ready_timeout,
        exit_grace=opts.exit_grace,
        exit_on_error=(flag_value(passthrough, "--exit-on-error") or "1").lower() not in ("false", "0", "no"),
        exit_timeout=exit_timeout,
        max_restarts=opts.max_restarts,
        restart_window_s=opts.restart_window,
        explicit_model_control=(flag_value(passthrough, "--model-control-mode") or "none").lower() == "explicit",
    )
    shown = "127.0.0.1" if opts.host in ("0.0.0.0", "::") else opts.host
    http, grpc, metrics = opts.ports
    announce = [f"HTTP  http://{shown}:{http}", f"gRPC  {shown}:{grpc}", f"metrics  http://{shown}:{metrics}/metrics"]
    if not is_loopback(opts.host):
        say(f"binding {opts.host}: admin APIs ({', '.join(ADMIN_APIS)}) need the '{ADMIN_HEADER}' header")
    with tempfile.TemporaryDirectory(prefix="omni-serve-") as tmp:
        opts.drain_file = os.path.join(tmp, "drain.json")
        admin = {ADMIN_HEADER: opts.admin_key} if opts.admin_key else {}  # its own reloads need the key
        supervisor = Supervisor(partial(_start, opts, passthrough), probe_url(opts.host, http), policy,
                                opts.drain_file, announce, admin)  # fmt: skip
        return supervisor.run()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except LaunchError as e:
        say(f"ERROR: {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
