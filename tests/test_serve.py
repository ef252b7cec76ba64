"""The launcher (``python -m omni_backend.serve``) and TritonServerProcess against a real tritonserver.

Uses a tiny self-contained model repository (``add_one``, Python backend) written into tmp_path.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from omni_backend import serve
from omni_backend.serving.procs import pid_alive
from omni_backend.testing.server import TritonServerProcess, free_ports, live_group_members

ADD_ONE_CONFIG = """
name: "{name}"
backend: "python"
max_batch_size: 8
input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] }} ]
output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] }} ]
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
"""

ADD_ONE_MODEL = """
import os
import ssl  # needs the right libpython (LD_LIBRARY_PATH)
import sys

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        probe = os.environ.get("ADD_ONE_PROBE")
        if probe:  # tells the test which interpreter environment the stub runs in
            with open(probe, "w") as f:
                f.write(sys.prefix + "\\n" + np.__file__)
        {init_extra}

    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            out = pb_utils.Tensor("OUTPUT0", (x + 1.0).astype(np.float32))
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
        return responses
"""


def write_model(repo: Path, name: str, *, init_extra: str = "pass", config: str | None = None) -> None:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(config or ADD_ONE_CONFIG.format(name=name))
    (repo / name / "1" / "model.py").write_text(ADD_ONE_MODEL.format(init_extra=init_extra))


@pytest.fixture
def add_one_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    write_model(repo, "add_one")
    return repo


def run_launcher(repo: Path, timeout: float = 90) -> tuple[int, str, float]:
    """Run ``python -m omni_backend.serve`` to completion: (exit code, stdout+stderr, seconds)."""
    http, grpc, metrics = free_ports(3)
    cmd = [sys.executable, "-m", "omni_backend.serve", "--model-repository", str(repo)]
    cmd += [f"--http-port={http}", f"--grpc-port={grpc}", f"--metrics-port={metrics}"]
    start = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stdout + done.stderr, time.monotonic() - start


def launched_server_pid(output: str) -> int:
    m = re.search(r"\[omni-serve\] tritonserver pid (\d+)", output)
    assert m, output[-3000:]
    return int(m[1])


# ---------------------------------------------------------------- fast unit tests (no server)


def test_parse_args_passthrough() -> None:
    opts, rest = serve.parse_args(
        ["--model-repository", "r", "--http-port", "9", "--log-verbose=1", "--", "--exit-on-error=false"]
    )
    assert (opts.http_port, opts.grpc_port, opts.model_repository) == (9, 8001, Path("r"))
    assert rest == ["--log-verbose=1", "--exit-on-error=false"]
    assert serve.flag_value(rest, "--exit-on-error") == "false"
    assert serve.flag_value(["--backend-directory", "/x"], "--backend-directory") == "/x"
    cmd = serve.build_command("ts", "r", (1, 2, 3), "/be", ["--strict-readiness=false"])
    assert cmd == ["ts", "--model-repository=r", "--http-port=1", "--grpc-port=2", "--metrics-port=3",
                   "--backend-directory=/be", "--strict-readiness=false"]  # fmt: skip


def test_server_env_puts_our_python_first() -> None:
    env = serve.server_env({"PATH": "/usr/bin", "LD_LIBRARY_PATH": "/usr/lib"})
    assert env["PATH"].split(os.pathsep) == [os.path.dirname(sys.executable), "/usr/bin"]
    libs = env["LD_LIBRARY_PATH"].split(os.pathsep)
    assert libs[0].endswith("nvidia_pytriton.libs") and Path(libs[0]).is_dir()
    assert libs[1:] == [sysconfig.get_config_var("LIBDIR"), "/usr/lib"]
    assert "LD_LIBRARY_PATH" not in serve.server_env({"PATH": "/bin"}, wheel_libs=False)


def test_assemble_backend_dir_is_idempotent_and_concurrent(tmp_path: Path) -> None:
    target = tmp_path / "be"
    errors: list[BaseException] = []

    def assemble() -> None:
        try:
            for _ in range(20):
                serve.assemble_backend_dir(target)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=assemble) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    names = sorted(p.name for p in (target / "python").iterdir())
    assert names == ["libtriton_python.so", "triton_python_backend_stub", "triton_python_backend_utils.py"]
    stub = (target / "python" / "triton_python_backend_stub").resolve()
    assert stub.parent.name == f"{sys.version_info.major}.{sys.version_info.minor}"


def test_missing_stub_is_a_clear_error(tmp_path: Path) -> None:
    root = tmp_path / "tritonserver"
    (root / "backends" / "python").mkdir(parents=True)
    (root / "python_backend_stubs" / "3.8").mkdir(parents=True)
    (root / "python_backend_stubs" / "3.8" / serve.STUB).write_text("")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    with pytest.raises(serve.LaunchError, match=rf"no Python backend stub for Python {version}.*3\.8"):
        serve.assemble_backend_dir(tmp_path / "be", root=root)


def test_busy_port_is_refused_before_starting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "repo").mkdir()
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        http, grpc = free_ports(2)
        args = ["--model-repository", str(tmp_path / "repo"), f"--http-port={http}", f"--grpc-port={grpc}"]
        rc = serve.main([*args, f"--metrics-port={port}", "--backend-dir", str(tmp_path / "be")])
    assert rc == 2
    assert f"[omni-serve] ERROR: port {port} is already in use" in capsys.readouterr().err


def test_log_watcher_parses_tritonserver_failures() -> None:
    lines = [
        'E1125 14:47:39.019676 3250 server.cc:241] "CudaDriverHelper has not been initialized."',
        "[libprotobuf ERROR /x/text_format.cc:337] Error parsing text-format inference.ModelConfig: "
        "3:19: Expected identifier, got: {",
        'E1125 14:47:39.020967 3250 model_repository_manager.cc:1460] "Poll failed for model directory '
        "'bad_cfg': failed to read text proto from /r/bad_cfg/config.pbtxt\"",
        "E1125 14:47:40.625320 3250 model_lifecycle.cc:642] \"failed to load 'bad_init' version 1: Internal: "
        'RuntimeError: kaboom\\n\\nAt:\\n  /r/bad_init/1/model.py(6): initialize\\n"',
        "I1125 14:47:40.625468 3250 server.cc:674] ",
        "+----------+---------+-----------------------+",
        "| Model    | Version | Status                |",
        "+----------+---------+-----------------------+",
        "| add_one  | 1       | READY                 |",
        "| table_only | 2     | UNAVAILABLE: boom     |",
        "|          |         | second line           |",
        "+----------+---------+-----------------------+",
        "",
        "error: creating server: Internal - failed to load all models",
    ]
    watcher = serve.LogWatcher()
    for line in lines:
        watcher.feed(line + "\n")
    assert watcher.failures == {
        "bad_cfg": "failed to read text proto from /r/bad_cfg/config.pbtxt "
        "(Error parsing text-format inference.ModelConfig: 3:19: Expected identifier, got: {)",
        "bad_init": "version 1: Internal: RuntimeError: kaboom\n\nAt:\n  /r/bad_init/1/model.py(6): initialize",
        "table_only": "version 2: UNAVAILABLE: boom\nsecond line",
    }
    report = "\n".join(watcher.report())
    expected = "[omni-serve]   model 'bad_init' failed to load, version 1: Internal: RuntimeError: kaboom\n"
    assert expected in report
    assert "[omni-serve]   server: error: creating server: Internal - failed to load all models" in report
    assert "CudaDriverHelper" not in report


# ---------------------------------------------------------------- real tritonserver


@pytest.mark.slow
def test_serves_add_one_over_http_and_grpc(add_one_repo: Path, tmp_path: Path) -> None:
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    probe = tmp_path / "probe.txt"
    x = np.array([[1, 2, 3, 4], [-1.5, 0, 10, 1e6]], dtype=np.float32)
    with TritonServerProcess(add_one_repo, env_extra={"ADD_ONE_PROBE": str(probe)}) as server:
        assert server.server_pid is not None and pid_alive(server.server_pid)
        http = httpclient.InferenceServerClient(server.http_url)
        assert http.is_server_ready() and http.is_model_ready("add_one")
        inp = httpclient.InferInput("INPUT0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        got = http.infer("add_one", [inp]).as_numpy("OUTPUT0")
        np.testing.assert_array_equal(got, x + 1)
        http.close()

        grpc = grpcclient.InferenceServerClient(server.grpc_url)
        ginp = grpcclient.InferInput("INPUT0", [1, 4], "FP32")
        ginp.set_data_from_numpy(x[1:] * 2)
        np.testing.assert_array_equal(grpc.infer("add_one", [ginp]).as_numpy("OUTPUT0"), x[1:] * 2 + 1)
        grpc.close()

        import urllib.request

        with urllib.request.urlopen(server.metrics_url, timeout=5) as r:
            metrics = r.read().decode()
        assert re.search(r'nv_inference_request_success\{model="add_one",version="1"\} 2', metrics)
        log = server.log()
        server_pid = server.server_pid
    # the endpoints are announced exactly once, with our ports
    assert log.count(f"HTTP  http://127.0.0.1:{server.ports[0]}") == 1
    assert log.count(f"gRPC  127.0.0.1:{server.ports[1]}") == 1
    assert f"metrics  http://127.0.0.1:{server.ports[2]}/metrics" in log
    # the stub's embedded Python runs in this environment (PATH / LD_LIBRARY_PATH set up by the launcher)
    prefix, numpy_file = probe.read_text().splitlines()
    assert os.path.realpath(prefix) == os.path.realpath(sys.prefix)
    assert os.path.realpath(numpy_file) == os.path.realpath(np.__file__)
    assert server.returncode == 0
    assert not pid_alive(server_pid) and not live_group_members(server_pid)


@pytest.mark.slow
def test_model_raising_in_initialize_fails_fast(add_one_repo: Path) -> None:
    write_model(add_one_repo, "bad_init", init_extra='raise RuntimeError("kaboom-xyzzy: weights missing")')
    rc, output, elapsed = run_launcher(add_one_repo)
    assert rc != 0, output[-3000:]
    assert elapsed < 60
    assert "[omni-serve] ERROR: a model failed to load" in output
    expected = r"\[omni-serve\]   model 'bad_init' failed to load, version 1: .*kaboom-xyzzy: weights missing"
    assert re.search(expected, output), output[-3000:]
    assert "model 'add_one'" not in output.split("[omni-serve] ERROR")[1]  # the healthy model is not blamed
    server_pid = launched_server_pid(output)
    assert not pid_alive(server_pid) and not live_group_members(server_pid)


@pytest.mark.slow
def test_config_syntax_error_fails_fast(add_one_repo: Path) -> None:
    config = ADD_ONE_CONFIG.format(name="bad_cfg").replace("max_batch_size: 8", "max_batch_size: 8 {{ oops")
    write_model(add_one_repo, "bad_cfg", config=config)
    rc, output, elapsed = run_launcher(add_one_repo)
    assert rc != 0, output[-3000:]
    assert elapsed < 60
    reason = output.split("[omni-serve] ERROR")[1]
    assert "model 'bad_cfg' failed to load" in reason, output[-3000:]
    assert "bad_cfg/config.pbtxt" in reason and "Expected identifier" in reason


@pytest.mark.slow
def test_sigterm_to_launcher_stops_server_and_stubs(add_one_repo: Path) -> None:
    server = TritonServerProcess(add_one_repo).start()
    try:
        assert server.pid is not None and server.server_pid is not None
        members = live_group_members(server.server_pid)
        assert server.server_pid in members and len(members) >= 2  # tritonserver + the add_one stub
        os.kill(server.pid, signal.SIGTERM)  # the launcher only, not its group
        assert server._proc is not None
        assert server._proc.wait(45) == 0
        assert "Signal (15) received" in server.log()
        for pid in members:
            assert not Path(f"/proc/{pid}").exists() or not pid_alive(pid), pid
        assert not Path(f"/proc/{server.server_pid}").exists()  # reaped by the launcher
    finally:
        server.stop()


@pytest.mark.slow
def test_stop_cleans_up_after_launcher_is_killed(add_one_repo: Path) -> None:
    server = TritonServerProcess(add_one_repo).start()
    assert server.pid is not None and server.server_pid is not None
    os.kill(server.pid, signal.SIGKILL)  # no chance to forward: the server gets PR_SET_PDEATHSIG
    deadline = time.monotonic() + 30
    while live_group_members(server.server_pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not live_group_members(server.server_pid), "tritonserver outlived its killed launcher"
    server.stop(grace=20)
    assert server.returncode == -signal.SIGKILL
    assert not live_group_members(server.server_pid)


# ---------------------------------------------------------------- addresses, supervision helpers


def test_non_loopback_host_restricts_admin_apis() -> None:
    assert serve.address_args("127.0.0.1", None, []) == [
        "--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1"]  # fmt: skip
    args = serve.address_args("0.0.0.0", "s3cret", [])
    apis = "model-repository,model-config,shared-memory,statistics,trace,logging"
    assert f"--http-restricted-api={apis}:admin-key=s3cret" in args
    assert f"--grpc-restricted-protocol={apis}:admin-key=s3cret" in args
    # control ops ride inference: the header reaches the model, which checks it (README "Control")
    assert "--http-header-forward-pattern=admin-key" in args and "--grpc-header-forward-pattern=admin-key" in args
    assert not any("header-forward" in a for a in serve.address_args("127.0.0.1", "s3cret", []))
    random_key = serve.address_args("10.1.2.3", None, [])
    assert any(a.startswith("--http-restricted-api=") and "admin-key=" in a for a in random_key)
    assert random_key != serve.address_args("10.1.2.3", None, [])  # a fresh key nobody knows
    own = serve.address_args("0.0.0.0", "k", ["--http-restricted-api=inference:x=y", "--grpc-address=::"])
    assert not any(a.startswith(("--http-restricted-api", "--grpc-address")) for a in own)
    assert serve.probe_url("0.0.0.0", 8000) == "http://127.0.0.1:8000"
    assert serve.probe_url("10.1.2.3", 8000) == "http://10.1.2.3:8000"


def test_stub_argv_and_shm_cleanup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from omni_backend.serving import procs

    region = "triton_python_backend_shm_region_x"
    argv = ["/be/python/triton_python_backend_stub", "/repo/flux_stream/1/model.py", region,
            "1048576", "1048576", "42", "/be/python", "336", "flux_stream_0", "DEFAULT", ""]  # fmt: skip
    assert procs.parse_stub(7, argv) == procs.Stub(7, "flux_stream", "flux_stream_0", region)
    assert procs.parse_stub(7, ["/usr/bin/python3", "x"]) is None
    monkeypatch.setattr(procs, "SHM_DIR", tmp_path)
    (tmp_path / "region_a").write_text("")
    (tmp_path / "keep").write_text("")
    assert procs.unlink_shm({"region_a", "gone", "../keep", ""}) == ["region_a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]


def test_log_watcher_sees_the_forced_exit() -> None:
    watcher = serve.LogWatcher()
    watcher.feed('E1126 01:03:36.276146 12429 main.cc:535] "failed to stop server: Internal - Exit timeout expired. '
                 'Exiting immediately."\n')  # fmt: skip
    assert watcher.exit_expired


@pytest.mark.slow
def test_public_address_closes_admin_apis_without_the_key(add_one_repo: Path) -> None:
    import urllib.error
    import urllib.request

    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    launcher_args = ["--host", "0.0.0.0", "--admin-key", "s3cret"]
    with TritonServerProcess(add_one_repo, launcher_args=launcher_args) as server:

        def post(path: str, headers: dict[str, str]) -> int:
            request = urllib.request.Request(f"http://{server.http_url}{path}", b"{}", headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=10) as r:
                    return r.status
            except urllib.error.HTTPError as e:
                return e.code

        assert post("/v2/repository/index", {}) == 403
        assert post("/v2/repository/models/add_one/unload", {"admin-key": "wrong"}) == 403
        assert post("/v2/repository/index", {"admin-key": "s3cret"}) == 200
        with urllib.request.urlopen(f"http://{server.http_url}/v2/models/add_one/ready", timeout=10) as r:
            assert r.status == 200  # health and inference stay public
        grpc = grpcclient.InferenceServerClient(server.grpc_url)
        with pytest.raises(InferenceServerException, match="admin-key"):
            grpc.unload_model("add_one")
        assert grpc.is_model_ready("add_one")
        grpc.close()
        assert "s3cret" not in server.log()  # the key is never logged


@pytest.mark.slow
def test_dead_server_is_restarted_and_a_crash_loop_gives_up(add_one_repo: Path) -> None:
    from omni_backend.serving.procs import SHM_DIR, stubs_of

    server = TritonServerProcess(add_one_repo, launcher_args=["--max-restarts", "1"]).start()
    try:
        first = server.server_pid
        assert first is not None
        regions = {s.shm_region for s in stubs_of(first)}
        os.kill(first, signal.SIGKILL)  # tritonserver itself, as a segfault or the OOM killer would
        deadline = time.monotonic() + 120
        while server.server_pid == first or "ready after" not in server.log().rsplit("tritonserver pid", 1)[1]:
            assert time.monotonic() < deadline, server.log_tail()
            time.sleep(0.2)
        second = server.server_pid
        assert "tritonserver exited unexpectedly (code -9): restarting tritonserver" in server.log()
        assert not live_group_members(first) and not [r for r in regions if (SHM_DIR / r).exists()]
        os.kill(second, signal.SIGKILL)  # a second crash within the window: over --max-restarts
        assert server._proc is not None and server._proc.wait(60) == 1
        assert "restarts within 600 s, giving up" in server.log()
        assert not live_group_members(second)
    finally:
        server.stop()


# a model that spawns one process as a parallel model spawns its ranks (multiprocessing's spawn method)
SPAWN_WORKER = (
    'import multiprocessing, time; self.worker = multiprocessing.get_context("spawn")'
    ".Process(target=time.sleep, args=(3600,), daemon=True); self.worker.start()"
)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", ["explicit", "none"])
def test_a_dead_worker_takes_its_model_out_of_service(tmp_path: Path, mode: str) -> None:
    """explicit model control: that model alone is unloaded and loaded again; otherwise tritonserver restarts."""
    from omni_backend.serving.procs import stubs_of, workers_of
    from omni_backend.testing.server import ReadinessLog

    repo = tmp_path / "repo"
    write_model(repo, "with_worker", init_extra=SPAWN_WORKER)
    write_model(repo, "add_one")
    args = ["--model-control-mode=explicit", "--load-model=with_worker", "--load-model=add_one"]
    with TritonServerProcess(repo, extra_args=args if mode == "explicit" else []) as server:
        first = server.server_pid
        assert first is not None
        stubs = {s.model: s.pid for s in stubs_of(first)}
        (worker,) = workers_of(stubs["with_worker"])
        readiness = ReadinessLog(server, "with_worker")
        os.kill(worker, signal.SIGKILL)
        deadline = time.monotonic() + 120
        try:
            while readiness.up_again_at() is None:
                assert time.monotonic() < deadline, server.log_tail()
                time.sleep(0.1)
        finally:
            readiness.stop()
        assert f"parallel worker (pid {worker}) of model 'with_worker' died while the model was ready" in server.log()
        (new_worker,) = workers_of(next(s.pid for s in stubs_of(server.server_pid) if s.model == "with_worker"))
        assert new_worker != worker
        if mode == "explicit":
            assert server.server_pid == first and "restarting tritonserver" not in server.log()
            assert "model 'with_worker' reloaded" in server.log()
            assert {s.model: s.pid for s in stubs_of(first)}["add_one"] == stubs["add_one"]  # left alone
        else:
            assert server.server_pid != first
            assert "lost a parallel worker: restarting tritonserver" in server.log()
        assert server.model_ready("add_one")
