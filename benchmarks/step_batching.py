"""Batching modes of the step engine under load: no batching, request-level, step-level.

One tritonserver serves three copies of `flux` (tiny checkpoint, float32) that differ only in engine
parameters: flux_none (max_num_seqs 1), flux_request (scheduling request, max_num_seqs 8: a batch
forms when idle and runs to completion, like Triton's dynamic batcher), flux_step (scheduling step,
max_num_seqs 8: requests join and leave between steps). Measured one after the other, same seeded
closed loop: ``--clients`` threads with their own tritonclient.grpc client send back to back, each
cycling through a seeded shuffle of (short | long steps) x (two ``--sizes``). After ``--warmup``
completions, the window spans ``--requests`` completions while every client keeps sending.
``--rounds`` repeats the three windows in turn (a VM's speed drifts by 20% within a minute: each
round's ratios compare windows seconds apart, and the medians of those are reported). Per
mode: throughput, p50/p99 latency per class, mean of the server's ``omni_step_batch_size``
histogram (/metrics), and the cores OTHER processes used in the window (/proc/stat busy time minus
this process and the server's group; the machine may be shared). Before each mode and before the
in-process probe (one transformer step, one VAE decode) it waits up to ``--quiet-wait`` s for a
quiet machine (others < 0.2 cores).

    python -m benchmarks.step_batching [--sizes 768 1024] [--requests 64] [--clients 8] [--rounds 1]
    python -m benchmarks.step_batching --smoke --out DIR   # seconds: tiny sizes and counts (tests)
    python -m benchmarks.step_batching --checkpoint wide --device cuda --dtype bfloat16 --sizes 512 1024

``--checkpoint wide`` (for a GPU) swaps the tiny transformer for FLUX.1's own block width (24 heads of
128, MLP ratio 4) with ``--wide-layers`` double/single blocks and random weights, so that one step
takes tens of milliseconds on a GPU as it does with the tiny one on two CPU cores.

Writes benchmarks/results/step_batching.{csv,md} and, with matplotlib, two PNG bar charts."""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import tritonclient.grpc as grpcclient

from benchmarks.overhead import grpc_inputs
from omni_backend.testing.server import TritonServerProcess, live_group_members
from omni_backend.testing.tiny import build_tiny_flux

ROOT = Path(__file__).resolve().parents[1]
MODES: dict[str, dict[str, str]] = {  # config.pbtxt parameters of each copy
    "none": {"max_num_seqs": "1"}, "request": {"scheduling": "request", "max_num_seqs": "8"},
    "step": {"scheduling": "step", "max_num_seqs": "8"},
}  # fmt: skip
LABELS = {"none": "(a) no batching", "request": "(b) request-level", "step": "(c) step-level"}
CLASSES = ("short", "long")
TICK = os.sysconf("SC_CLK_TCK")


def with_parameters(config: str, name: str, params: dict[str, str]) -> str:
    """``config`` with ``name:`` replaced and ``params`` added to (or replaced in) its parameters block."""
    config = re.sub(r'^name: ".*"$', f'name: "{name}"', config, count=1, flags=re.M)
    match = re.search(r"^parameters \[\n(.*?)^\]", config, flags=re.M | re.S)
    if match is None:
        raise ValueError("config.pbtxt has no parameters block")
    lines = []
    for line in match[1].splitlines():
        key = re.search(r'key: "([^"]+)"', line)
        if key is None or key[1] not in params:
            lines.append(line.rstrip().rstrip(",") if key else line)
    lines += [f'  {{ key: "{k}", value: {{ string_value: "{v}" }} }}' for k, v in params.items()]
    for i in [i for i, line in enumerate(lines) if "key:" in line][:-1]:  # commas between entries
        lines[i] += ","
    return config[: match.start(1)] + "\n".join(lines) + "\n" + config[match.end(1) :]


def build_repository(repo: Path, engine: dict[str, str]) -> None:
    """One copy of ``flux`` per mode; ``engine`` holds the parameters all copies share (device, dtype)."""
    source = ROOT / "model_repository" / "flux"
    for mode, params in MODES.items():
        target = repo / f"flux_{mode}"
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        config = with_parameters((source / "config.pbtxt").read_text(), f"flux_{mode}", {**engine, **params})
        (target / "config.pbtxt").write_text(config)


def build_checkpoint(kind: str, out: Path, layers: tuple[int, int], device: str, dtype: torch.dtype) -> Path:
    """The tiny FLUX checkpoint; ``wide`` replaces its transformer with one of FLUX.1's block width."""
    checkpoint = build_tiny_flux(out, seed=0)  # the name model_repository/ serves
    if kind == "wide":
        from diffusers import FluxTransformer2DModel

        tiny = FluxTransformer2DModel.load_config(checkpoint / "transformer")
        config = {k: v for k, v in tiny.items() if not k.startswith("_")}
        config.update(num_layers=layers[0], num_single_layers=layers[1], attention_head_dim=128,
                      num_attention_heads=24, axes_dims_rope=(16, 56, 56))  # fmt: skip
        torch.manual_seed(0)
        with torch.device(device):  # random init of billions of weights is slow on a CPU
            model = FluxTransformer2DModel(**config).to(dtype)
        shutil.rmtree(checkpoint / "transformer")
        model.save_pretrained(checkpoint / "transformer")
        del model
    return checkpoint


def cpu_seconds(server_pgid: int | None) -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process + the server's group)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    busy = (sum(fields) - fields[3] - fields[4]) / TICK  # minus idle and iowait
    times = os.times()
    mine = times.user + times.system + times.children_user + times.children_system
    for pid in live_group_members(server_pgid) if server_pgid else []:
        with contextlib.suppress(OSError, ValueError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            rest = stat[stat.rindex(")") + 2 :].split()
            mine += (int(rest[11]) + int(rest[12])) / TICK  # utime, stime
    return busy, mine


def other_load(before: tuple[float, float], after: tuple[float, float], seconds: float) -> float:
    """Cores used by other processes between two ``cpu_seconds`` readings."""
    return max(0.0, (after[0] - before[0]) - (after[1] - before[1])) / seconds


def wait_quiet(server_pgid: int | None, limit_s: float) -> None:
    """Wait (up to ``limit_s``) until other processes use < 0.2 cores over 3 s."""
    deadline = time.monotonic() + limit_s
    while True:
        before = cpu_seconds(server_pgid)
        time.sleep(3)
        load = other_load(before, cpu_seconds(server_pgid), 3)
        if load < 0.2 or time.monotonic() > deadline:
            return
        print(f"  waiting for a quiet machine: other processes use {load:.2f} cores")


def probe_ms(
    checkpoint: Path, sizes: list[int], batches: tuple[int, ...], device: str, dtype: torch.dtype
) -> dict[tuple[int, int], tuple[float, float]]:
    """Per (size, batch): median ms of one transformer call (512 text tokens, as served) and of one VAE
    decode of batch 1."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    model = FluxTransformer2DModel.from_pretrained(checkpoint, subfolder="transformer", torch_dtype=dtype)
    vae = AutoencoderKL.from_pretrained(checkpoint, subfolder="vae", torch_dtype=dtype)
    model, vae, config = model.to(device).eval(), vae.to(device).eval(), model.config

    def median_ms(call: Any) -> float:
        times = []
        with torch.inference_mode():
            for _ in range(7):  # the first 2 are warm-up
                start = time.perf_counter()
                call()
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
        return float(np.median(times[2:])) * 1000

    results = {}
    for size in sizes:
        tokens, text = (size // 16) ** 2, 512
        with torch.device(device):
            latents = torch.randn(1, 16, size // 8, size // 8, dtype=dtype)
            decode_ms = median_ms(lambda z=latents: vae.decode(z))
            for batch in batches:
                kwargs = {
                    "hidden_states": torch.randn(batch, tokens, config.in_channels, dtype=dtype),
                    "encoder_hidden_states": torch.randn(batch, text, config.joint_attention_dim, dtype=dtype),
                    "pooled_projections": torch.randn(batch, config.pooled_projection_dim, dtype=dtype),
                    "timestep": torch.full((batch,), 0.5, dtype=dtype),
                    "guidance": torch.full((batch,), 3.5, dtype=dtype),
                    "img_ids": torch.zeros(tokens, 3), "txt_ids": torch.zeros(text, 3),
                }  # fmt: skip
                results[size, batch] = (median_ms(lambda kw=kwargs: model(**kw)), decode_ms)
    return results


def batch_size_stats(metrics_url: str, model: str) -> tuple[float, float]:
    """(sum, count) of the omni_step_batch_size histogram for ``model``."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    pattern = rf'^omni_step_batch_size_(sum|count)\{{[^}}]*model="{model}"[^}}]*\}} (\S+)'
    values = {kind: float(value) for kind, value in re.findall(pattern, text, re.M)}
    return values.get("sum", 0.0), values.get("count", 0.0)


@dataclass
class ModeRun:
    """One measured window of one mode."""

    mode: str
    seconds: float
    latencies: dict[str, list[float]]  # class -> client latencies
    step_calls: float  # transformer calls (omni_step_batch_size count) and their rows, in the window
    step_rows: float
    other_load: float


def client_plan(args: argparse.Namespace, seed: int, index: int) -> list[tuple[str, int, int]]:
    """What client ``index`` sends, cycled: a seeded shuffle of (class, steps, size), each pair twice."""
    plan = [(cls, getattr(args, f"{cls}_steps"), size) for cls in CLASSES for size in args.sizes] * 2
    random.Random(seed * 1000 + index).shuffle(plan)
    return plan


def run_clients(count: int, client: Callable[[int], None]) -> None:
    """``client(0) .. client(count - 1)`` on threads of their own; returns when all have."""
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def run_mode(server: TritonServerProcess, mode: str, args: argparse.Namespace, round_: int) -> ModeRun:
    """Closed-loop load on ``flux_<mode>`` (round ``round_`` draws its own seeds)."""
    model = f"flux_{mode}"
    lock, stop, errors = threading.Lock(), threading.Event(), list[Exception]()
    done: list[tuple[str, float, float, tuple[float, float]]] = []  # class, latency, end, cpu_seconds
    total = args.warmup + args.requests
    before = batch_size_stats(server.metrics_url, model)
    seed = args.seed + 7919 * round_

    def worker(index: int) -> None:
        plan = client_plan(args, seed, index)
        client = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            n = 0
            while not stop.is_set():
                cls, steps, size = plan[n % len(plan)]
                start = time.perf_counter()
                client.infer(model, grpc_inputs(size, steps, seed * 100000 + index * 1000 + n))
                end, n = time.perf_counter(), n + 1
                with lock:
                    cpu = cpu_seconds(server.server_pid) if len(done) in (args.warmup - 1, total - 1) else (0, 0)
                    done.append((cls, end - start, end, cpu))
                    if len(done) >= total:
                        stop.set()
        except Exception as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
            stop.set()
        finally:
            client.close()

    run_clients(args.clients, worker)
    if errors:
        raise RuntimeError(f"{model}: a request failed") from errors[0]
    after = batch_size_stats(server.metrics_url, model)
    (*_, start, cpu_start), (*_, end, cpu_end) = done[args.warmup - 1], done[total - 1]
    seconds = end - start
    calls, rows = after[1] - before[1], after[0] - before[0]
    print(
        f"{model}: {args.requests / seconds:.3f} req/s over {seconds:.1f} s, mean step batch {rows / max(calls, 1):.2f}"
    )
    latencies = {cls: [d[1] for d in done[args.warmup : total] if d[0] == cls] for cls in CLASSES}
    return ModeRun(mode, seconds, latencies, calls, rows, other_load(cpu_start, cpu_end, seconds))


def summarize(runs: list[ModeRun], requests: int) -> list[dict[str, Any]]:
    """One row per (mode, class): median throughput over the rounds, latency percentiles over all of them."""
    rows = []
    for mode in MODES:
        mine = [r for r in runs if r.mode == mode]
        throughput = float(np.median([requests / r.seconds for r in mine]))
        mean_batch = sum(r.step_rows for r in mine) / max(sum(r.step_calls for r in mine), 1)
        for cls in CLASSES:
            latencies = [x for r in mine for x in r.latencies[cls]]
            rows.append({
                "mode": mode, "class": cls, "n": len(latencies), "throughput_rps": round(throughput, 4),
                "p50_s": round(float(np.percentile(latencies, 50)), 4),
                "p99_s": round(float(np.percentile(latencies, 99)), 4),
                "mean_step_batch": round(mean_batch, 3), "other_load_cores": round(max(r.other_load for r in mine), 3),
            })  # fmt: skip
    return rows


def round_ratios(runs: list[ModeRun]) -> list[tuple[float, float]]:
    """Per round: throughput (c) / (a) and short p50 (c) / (b), each from windows minutes apart at most."""
    ratios = []
    for round_ in range(len(runs) // len(MODES)):
        get = {r.mode: r for r in runs[round_ * len(MODES) : (round_ + 1) * len(MODES)]}
        speedup = get["none"].seconds / get["step"].seconds  # same number of requests in each window
        short = np.percentile(get["step"].latencies["short"], 50) / np.percentile(get["request"].latencies["short"], 50)
        ratios.append((speedup, float(short)))
    return ratios


def write_plots(get: dict[tuple[str, str], dict[str, Any]], out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plots (pip install matplotlib)")
        return
    x = np.arange(len(MODES))
    fig, ax = plt.subplots(figsize=(7, 4))
    for offset, (cls, color) in enumerate(zip(CLASSES, ("tab:blue", "tab:orange"), strict=True)):
        for q, alpha in (("p99_s", 0.35), ("p50_s", 1.0)):
            values = [get[m, cls][q] for m in MODES]
            ax.bar(x + (offset - 0.5) * 0.4, values, 0.38, color=color, alpha=alpha, label=f"{cls} {q[:3]}")
    ax.set_xticks(x, [LABELS[m] for m in MODES])
    ax.set(ylabel="latency (s)", title="Latency per class (p50 solid, p99 light)", ylim=(0, ax.get_ylim()[1] * 1.25))
    ax.legend(ncol=2, fontsize="small", loc="upper left")
    fig.tight_layout()
    fig.savefig(out / "step_batching_latency.png", dpi=120)
    fig, ax = plt.subplots(figsize=(6, 4))
    throughput = [get[m, "short"]["throughput_rps"] for m in MODES]
    ax.bar([LABELS[m] for m in MODES], throughput, color=["tab:gray", "tab:blue", "tab:green"])
    ax.axhline(1.7 * throughput[0], color="tab:red", linestyle="--", label="target for (c): 1.7x (a)")
    ax.set(ylabel="requests / s", title="Throughput", ylim=(0, max(throughput + [1.7 * throughput[0]]) * 1.2))
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(out / "step_batching_throughput.png", dpi=120)
    plt.close("all")


SMOKE = {"sizes": [64, 128], "short_steps": 1, "long_steps": 3, "clients": 2, "warmup": 2, "requests": 6,
         "quiet_wait": 0.0}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs=2, default=[768, 1024])
    defaults = (("short-steps", 4), ("long-steps", 24), ("clients", 8), ("warmup", 8), ("requests", 64), ("rounds", 1))
    for name, default in defaults:
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", choices=("tiny", "wide"), default="tiny")
    parser.add_argument("--wide-layers", default="4,8", help="double,single blocks of --checkpoint wide")
    parser.add_argument("--device", default="cpu", help="the models' device parameter and the probe's device")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument(
        "--background-decode", default="auto", choices=("auto", "true", "false"), help="the models' background_decode"
    )
    parser.add_argument("--quiet-wait", type=float, default=120.0, help="max seconds to wait for a quiet machine")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--server-log", type=Path, help="keep tritonserver's log here (default: a temp file)")
    parser.add_argument("--smoke", action="store_true", help=f"a quick check that it all runs: {SMOKE}")
    args = parser.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the server on the way out

    runs: list[ModeRun] = []
    with tempfile.TemporaryDirectory() as tmp:
        models, repo = Path(tmp) / "models", Path(tmp) / "repo"
        dtype = getattr(torch, args.dtype)
        layers = tuple(int(n) for n in args.wide_layers.split(","))
        checkpoint = build_checkpoint(args.checkpoint, models / "flux-shapes", layers, args.device, dtype)
        wait_quiet(None, args.quiet_wait)
        probe = probe_ms(checkpoint, args.sizes, (1, args.clients), args.device, dtype)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()  # leave the device to the server
        build_repository(
            repo, {"device": args.device, "dtype": args.dtype, "background_decode": args.background_decode}
        )
        loads = ["--model-control-mode=explicit", *(f"--load-model=flux_{m}" for m in MODES)]
        server = TritonServerProcess(
            repo, env_extra={"OMNI_MODEL_ROOT": str(models)}, extra_args=loads, log_path=args.server_log
        )
        with server.start(timeout=600):
            for round_ in range(args.rounds):  # the modes take turns: a slow spell of the machine hits all
                for mode in MODES:
                    wait_quiet(server.server_pid, args.quiet_wait)
                    runs.append(run_mode(server, mode, args, round_))
    rows = summarize(runs, args.requests)
    ratios = round_ratios(runs)

    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "step_batching.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    get = {(r["mode"], r["class"]): r for r in rows}
    speedup = float(np.median([ratio for ratio, _ in ratios]))
    short_ratio = float(np.median([ratio for _, ratio in ratios]))
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    cpu_name = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if "Model name" in line), "?")
    gpu = f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""
    wide = f"FLUX.1's block width, {layers[0]}+{layers[1]} blocks, random weights" if args.checkpoint == "wide" else ""
    lines = [
        f"Machine: {cpu_name} ({platform.machine()}, {os.cpu_count()} cores){gpu}, {torch.get_num_threads()} torch "
        f"threads, torch {torch.__version__}. Checkpoint: tiny-flux{' with a transformer of ' + wide if wide else ''}"
        f", {args.dtype} on {args.device}, background_decode {args.background_decode}. Workload: {args.clients} "
        f"closed-loop gRPC clients; short = "
        f"{args.short_steps} steps, long = {args.long_steps} steps; sizes "
        f"{' and '.join(f'{s}x{s}' for s in args.sizes)}; {args.rounds} round(s) of the three modes in turn, each "
        f"{args.warmup} warm-up + {args.requests} measured requests per mode; seed {args.seed}. req/s: median "
        "over the rounds; latencies: percentiles over all rounds' requests.",
        "In process, batch 1 unless said: " + "; ".join(
            f"{s}x{s} transformer step batch {b}: {t:.1f} ms ({t / b:.1f} ms/request)" + (f", VAE decode {v:.0f} ms"
            if b == 1 else "") for (s, b), (t, v) in probe.items()),
        "",
        "| mode | req/s | short n | short p50 | short p99 | long n | long p50 | long p99 | mean step batch "
        "| other load |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for mode in MODES:
        s, lg = get[mode, "short"], get[mode, "long"]
        lines.append(
            f"| {LABELS[mode]} | {s['throughput_rps']:.3f} | {s['n']} | {s['p50_s']:.2f} s | {s['p99_s']:.2f} s | "
            f"{lg['n']} | {lg['p50_s']:.2f} s | {lg['p99_s']:.2f} s | {s['mean_step_batch']:.2f} | "
            f"{s['other_load_cores']:.2f} cores |"
        )
    per_round = ", ".join(f"{a:.2f}x / {b:.2f}" for a, b in ratios)
    lines.append(
        f"\nMedians over the rounds of each round's ratios ({per_round}): throughput (c) / (a) {speedup:.2f}x "
        f"(target >= 1.7x: {'met' if speedup >= 1.7 else 'NOT met'}); short p50 (c) / (b) {short_ratio:.2f} "
        f"(target <= 0.33: {'met' if short_ratio <= 1 / 3 else 'NOT met'})."
    )
    (args.out / "step_batching.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    write_plots(get, args.out)


if __name__ == "__main__":
    main()
