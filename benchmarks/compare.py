"""Side by side, same tiny FLUX checkpoint, same machine, one run: the in-process floor, our models, a PyTriton peer.

Systems (rows of the table):
  * ``floor``: the in-process diffusers ``FluxPipeline`` call, sequential (concurrency 1 only);
  * ``flux`` and ``flux_ensemble`` over gRPC and over HTTP (tritonserver via ``TritonServerProcess``);
  * ``pytriton``: the same diffusers ``FluxPipeline`` behind ``pytriton.triton.Triton`` with ``@batch``
    (``benchmarks.pytriton_peer``, a subprocess), gRPC;
  * ``mode:none`` / ``mode:request`` / ``mode:step``: the batching modes of ``benchmarks.step_batching``
    (copies of ``flux`` with ``max_num_seqs`` 1 / ``scheduling: request`` / step-level), gRPC.

Each served system runs, at each ``--concurrency``, a closed loop of that many client threads (one
tritonclient each) sending back to back; after max(concurrency, ``--warmup``) warm-up completions the window spans
``--requests`` completions. Throughput = completions / window; p50/p99 = client-side latency.
``p50 / floor`` = p50 over the floor's p50 (the floor measured sequentially, concurrency 1).

    python -m benchmarks.compare [--smoke] [--size 512] [--steps 8] [--concurrency 1,4,8,16] [--requests 32]

Writes compare.csv, compare.md and (with matplotlib) compare_latency.png, compare_throughput.png to
``--out-dir`` (default benchmarks/results). ``--smoke``: 64x64, 2 steps, concurrency 1,2, 1 warm-up + 3 requests.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from benchmarks.overhead import PROMPT, grpc_inputs
from benchmarks.pytriton_peer import MODEL as PEER_MODEL
from benchmarks.pytriton_peer import READY as PEER_READY
from benchmarks.step_batching import MODES, build_repository
from omni_backend.testing.server import TritonServerProcess, free_ports
from omni_backend.testing.tiny import build_tiny_flux

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("flux", "flux_ensemble", "flux_text_encoder", "flux_transformer", "flux_vae")
# (system, protocol, model): every served row of the table, in order
SERVED: list[tuple[str, str, str]] = [
    ("flux", "grpc", "flux"), ("flux", "http", "flux"),
    ("flux_ensemble", "grpc", "flux_ensemble"), ("flux_ensemble", "http", "flux_ensemble"),
    ("pytriton", "grpc", PEER_MODEL),
    *((f"mode:{m}", "grpc", f"flux_{m}") for m in MODES),
]  # fmt: skip
SYSTEMS: list[tuple[str, str]] = [("floor", "inproc"), *((s, p) for s, p, _ in SERVED)]
FIELDS = ["system", "protocol", "model", "concurrency", "n", "throughput_rps", "p50_s", "p99_s", "p50_vs_floor"]


def http_inputs(size: int, steps: int, seed: int) -> list[httpclient.InferInput]:
    """``benchmarks.overhead.grpc_inputs`` for tritonclient.http (binary tensors)."""
    inputs = []
    for tensor in grpc_inputs(size, steps, seed):
        array = {"prompt": np.array([[PROMPT.encode()]], dtype=object), "seed": np.array([[seed]], np.int64)}.get(
            tensor.name(), np.array([[size if tensor.name() in ("height", "width") else steps]], np.int32)
        )
        http = httpclient.InferInput(tensor.name(), list(array.shape), tensor.datatype())
        http.set_data_from_numpy(array)
        inputs.append(http)
    return inputs


def closed_loop(
    make_call: Callable[[], tuple[Callable[[int], Any], Callable[[], None]]],
    concurrency: int, warmup: int, requests: int, seed: int,
) -> dict[str, float]:  # fmt: skip
    """``concurrency`` threads, each with ``make_call()`` -> (call(seed), close); returns n, throughput, p50, p99."""
    lock, stop, errors = threading.Lock(), threading.Event(), list[BaseException]()
    done: list[tuple[float, float]] = []  # (latency, end)
    total = warmup + requests

    def worker(index: int) -> None:
        call, close = make_call()
        try:
            n = 0
            while not stop.is_set():
                start = time.perf_counter()
                call(seed * 100000 + index * 1000 + n)
                end, n = time.perf_counter(), n + 1
                with lock:
                    done.append((end - start, end))
                    if len(done) >= total:
                        stop.set()
        except BaseException as exc:  # noqa: BLE001 - re-raised by the caller's thread
            errors.append(exc)
            stop.set()
        finally:
            close()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError("a request failed") from errors[0]
    window = done[warmup:total]
    start = done[warmup - 1][1] if warmup else window[0][1] - window[0][0]
    latencies = [latency for latency, _ in window]
    return {
        "n": len(window), "throughput_rps": len(window) / (window[-1][1] - start),
        "p50_s": float(np.percentile(latencies, 50)), "p99_s": float(np.percentile(latencies, 99)),
    }  # fmt: skip


def client_factory(protocol: str, url: str, model: str, size: int, steps: int):  # noqa: ANN201
    """A ``make_call`` for ``closed_loop``: one tritonclient of ``protocol`` per thread."""

    def make_call() -> tuple[Callable[[int], Any], Callable[[], None]]:
        if protocol == "grpc":
            client: Any = grpcclient.InferenceServerClient(url)
            inputs = grpc_inputs
        else:
            client, inputs = httpclient.InferenceServerClient(url, network_timeout=600.0), http_inputs

        def call(seed: int) -> None:
            image = client.infer(model, inputs(size, steps, seed)).as_numpy("image")
            if image is None or image.shape[-3:] != (size, size, 3):
                raise RuntimeError(f"{model}: unexpected image {None if image is None else image.shape}")

        return call, client.close

    return make_call


@contextlib.contextmanager
def pytriton_peer(checkpoint: Path, log_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Start ``benchmarks.pytriton_peer`` in its own process group; yield (its gRPC url, the process)."""
    http, grpc, metrics = free_ports(3)
    cmd = [sys.executable, "-m", "benchmarks.pytriton_peer", "--checkpoint", str(checkpoint),
           f"--http-port={http}", f"--grpc-port={grpc}", f"--metrics-port={metrics}"]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}  # fmt: skip
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        yield f"127.0.0.1:{grpc}", proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        with contextlib.suppress(ProcessLookupError):  # tritonserver and stubs of the peer, if any are left
            os.killpg(proc.pid, signal.SIGKILL)


def wait_ready(log_path: Path, proc: subprocess.Popen[bytes], timeout: float = 300.0) -> None:
    """Wait until the peer printed ``PEER_READY``; raise with its last output if it exits or times out."""
    deadline = time.monotonic() + timeout
    while PEER_READY not in log_path.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
            raise RuntimeError(f"pytriton peer not ready (exit code {proc.poll()}); last output:\n{tail}")
        time.sleep(0.2)


def write_plots(rows: list[dict[str, Any]], out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plots (pip install matplotlib)")
        return
    floor = next(r for r in rows if r["system"] == "floor")
    for key, name, ylabel in (("p50_s", "latency", "p50 latency (s)"), ("throughput_rps", "throughput", "req/s")):
        fig, ax = plt.subplots(figsize=(8, 5))
        for system, protocol in SYSTEMS[1:]:
            points = [r for r in rows if r["system"] == system and r["protocol"] == protocol]
            style = "--" if protocol == "http" else "-"
            ax.plot([r["concurrency"] for r in points], [r[key] for r in points], style, marker="o",
                    label=f"{system} ({protocol})")  # fmt: skip
        ax.axhline(floor[key], color="black", linestyle=":", label="in-process floor (sequential)")
        ax.set(xlabel="client concurrency", ylabel=ylabel, title=f"{name.capitalize()} vs concurrency")
        ax.set_xticks(sorted({r["concurrency"] for r in rows}))
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(out / f"compare_{name}.png", dpi=110)
    plt.close("all")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="64x64, 2 steps, concurrency 1,2, 3 requests")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--concurrency", default="1,4,8,16", help="comma-separated client concurrencies")
    parser.add_argument("--requests", type=int, default=32, help="measured completions per system and concurrency")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up completions: max(concurrency, this)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if args.smoke:
        args.size, args.steps, args.concurrency, args.requests, args.warmup = 64, 2, "1,2", 3, 1
    levels = [int(c) for c in args.concurrency.split(",")]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers on the way out
    began = time.monotonic()

    def report(label: str, result: dict[str, float]) -> None:
        print(f"[{time.monotonic() - began:.0f} s] {label}: {result['throughput_rps']:.3f} req/s, "
              f"p50 {result['p50_s']:.4f} s, p99 {result['p99_s']:.4f} s", flush=True)  # fmt: skip

    from diffusers import FluxPipeline

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        models, repo = Path(tmp) / "models", Path(tmp) / "repo"
        checkpoint = build_tiny_flux(models / "flux-shapes", seed=0)  # the name model_repository/ serves
        for name in STAGES:
            shutil.copytree(ROOT / "model_repository" / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
        build_repository(repo, {})
        loads = ["--model-control-mode=explicit", *(f"--load-model={m}" for m in STAGES),
                 *(f"--load-model=flux_{m}" for m in MODES)]  # fmt: skip
        server = TritonServerProcess(repo, env_extra={"OMNI_MODEL_ROOT": str(models)}, extra_args=loads)
        peer_log = Path(tmp) / "pytriton_peer.log"
        with pytriton_peer(checkpoint, peer_log) as (peer_url, peer), server.start(timeout=600):
            wait_ready(peer_log, peer)
            print(f"servers ready after {time.monotonic() - began:.1f} s")
            pipe = FluxPipeline.from_pretrained(checkpoint, dtype=torch.float32)
            pipe.set_progress_bar_config(disable=True)

            def floor_call() -> tuple[Callable[[int], Any], Callable[[], None]]:
                def call(seed: int) -> None:
                    generator = torch.Generator("cpu").manual_seed(seed)
                    pipe(PROMPT, height=args.size, width=args.size, num_inference_steps=args.steps, generator=generator)

                return call, lambda: None

            result = closed_loop(floor_call, 1, args.warmup, args.requests, args.seed)
            rows.append({"system": "floor", "protocol": "inproc", "model": "diffusers FluxPipeline",
                         "concurrency": 1, **result})  # fmt: skip
            report("floor (in process) x1", result)
            urls = {"grpc": server.grpc_url, "http": server.http_url}
            for system, protocol, model in SERVED:
                url = peer_url if system == "pytriton" else urls[protocol]
                make_call = client_factory(protocol, url, model, args.size, args.steps)
                for level in levels:
                    result = closed_loop(make_call, level, max(level, args.warmup), args.requests, args.seed)
                    rows.append({"system": system, "protocol": protocol, "model": model, "concurrency": level,
                                 **result})  # fmt: skip
                    report(f"{system} ({protocol}) x{level}", result)

    floor_p50 = rows[0]["p50_s"]
    for row in rows:
        row["p50_vs_floor"] = row["p50_s"] / floor_p50
        for key in ("throughput_rps", "p50_s", "p99_s", "p50_vs_floor"):
            row[key] = round(row[key], 4)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with open(args.out_dir / "compare.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    cpu_name = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if "Model name" in line), "?")
    lines = [
        f"Machine: {cpu_name} ({platform.machine()}, {os.cpu_count()} cores), {torch.get_num_threads()} torch "
        f"threads, torch {torch.__version__}; load average at the end {os.getloadavg()[0]:.2f}. Checkpoint: tiny-flux "
        f"fp32; {args.size}x{args.size}, {args.steps} steps; closed loop, warm-up max(concurrency, {args.warmup}) + "
        f"{args.requests} measured requests per point; total wall time {time.monotonic() - began:.0f} s.",
        "",
        "| system | protocol | concurrency | req/s | p50 | p99 | p50 / floor |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['system']} | {r['protocol']} | {r['concurrency']} | {r['throughput_rps']:.3f} | {r['p50_s']:.3f} s | "
        f"{r['p99_s']:.3f} s | {r['p50_vs_floor']:.2f} |"
        for r in rows
    ]
    (args.out_dir / "compare.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    write_plots(rows, args.out_dir)


if __name__ == "__main__":
    main()
