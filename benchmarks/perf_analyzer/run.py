"""perf_analyzer against `flux`, `flux_ensemble` or `flux_stream`, CSV into benchmarks/results/.

    bash benchmarks/perf_analyzer/setup.sh                  # once: installs .bin/pa
    python -m benchmarks.perf_analyzer.run --model flux [--protocol grpc|http] [--concurrency 1:4] [--smoke]
    python -m benchmarks.perf_analyzer.run --model flux_stream --url localhost:8001   # a running server

Without --url a tritonserver is started on free ports (``TritonServerProcess``, explicit model
control, only the model under test and its stages loaded) on the tiny FLUX checkpoint, built into a
temporary folder unless --model-root names one that holds ``flux-shapes``.  Measurement is by count
windows (a diffusion request takes seconds, time windows would hold a handful of them): each window
waits for --request-count completed requests.  `flux_stream` is decoupled: perf_analyzer needs gRPC
with --streaming and measures the latency of the first response (the step-1 progress message).
--smoke: one concurrency level, 256x256 4-step requests, 2-request windows, 3 windows, no stability
requirement; finishes in well under a minute on a CPU.
"""

from __future__ import annotations

import argparse
import csv
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
MODELS = ("flux", "flux_ensemble", "flux_stream")
DEFAULT_PA = HERE / ".bin" / "pa"


def input_file(model: str, smoke: bool) -> Path:
    if smoke:
        return HERE / "inputs" / "smoke.json"
    return HERE / "inputs" / ("flux_stream.json" if model == "flux_stream" else "flux.json")


def pa_command(
    pa: Path | str,
    model: str,
    protocol: str,
    url: str,
    out_csv: Path,
    input_data: Path,
    concurrency: str,
    request_count: int,
    stability: float,
    max_trials: int,
) -> list[str]:
    cmd = [str(pa), "-m", model, "-u", url, "-i", protocol, "-b", "1", "--input-data", str(input_data)]
    if model == "flux_stream":
        cmd.append("--streaming")
    cmd += ["--concurrency-range", concurrency, "--measurement-mode", "count_windows"]
    cmd += ["--measurement-request-count", str(request_count), "-s", f"{stability:g}", "--max-trials", str(max_trials)]
    return cmd + ["-f", str(out_csv)]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="flux")
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    parser.add_argument("--url", help="host:port of a running server (its gRPC or HTTP port, per --protocol)")
    parser.add_argument("--concurrency", default="1:4", help="perf_analyzer --concurrency-range start:end[:step]")
    parser.add_argument("--request-count", type=int, default=8, help="completed requests per count window")
    parser.add_argument("--stability", type=float, default=50.0, help="perf_analyzer -s, percent")
    parser.add_argument("--max-trials", type=int, default=10)
    parser.add_argument("--input-data", type=Path, help="default: inputs/flux.json or inputs/flux_stream.json")
    parser.add_argument("--smoke", action="store_true", help="1 concurrency level, tiny windows, < 60 s")
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/perf_analyzer_<model>_<protocol>.csv")
    parser.add_argument("--pa", default=str(DEFAULT_PA), help="perf_analyzer wrapper (setup.sh writes .bin/pa)")
    parser.add_argument("--model-root", type=Path, help="OMNI_MODEL_ROOT for a started server (holds flux-shapes)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds for the perf_analyzer run")
    args = parser.parse_args(argv)

    if args.model == "flux_stream" and args.protocol != "grpc":
        parser.error("flux_stream is decoupled: perf_analyzer streams it over gRPC only (--protocol grpc)")
    if not Path(args.pa).exists():
        parser.error(f"{args.pa} not found: run `bash benchmarks/perf_analyzer/setup.sh` first")
    out = args.out or ROOT / "benchmarks" / "results" / f"perf_analyzer_{args.model}_{args.protocol}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        concurrency, request_count, stability, max_trials = "1", 2, 100000.0, 3
    else:
        concurrency, request_count, stability, max_trials = (
            args.concurrency, args.request_count, args.stability, args.max_trials)  # fmt: skip
    input_data = args.input_data or input_file(args.model, args.smoke)

    def run(url: str) -> int:
        cmd = pa_command(
            args.pa, args.model, args.protocol, url, out, input_data, concurrency, request_count, stability, max_trials
        )
        print("[perf_analyzer]", shlex.join(cmd), flush=True)
        out.unlink(missing_ok=True)
        code = subprocess.run(cmd, timeout=args.timeout).returncode
        if code != 0 or not out.exists():
            print(f"[perf_analyzer] failed (exit code {code})", file=sys.stderr)
            return code or 1
        for row in sorted(read_csv(out), key=lambda r: int(r["Concurrency"])):
            p50, p99 = int(row["p50 latency"]) / 1e3, int(row["p99 latency"]) / 1e3
            rate = float(row["Inferences/Second"])
            level = row["Concurrency"]
            print(f"[perf_analyzer] concurrency {level}: {rate:.3f} infer/s, p50 {p50:.0f} ms, p99 {p99:.0f} ms")
        print(f"[perf_analyzer] wrote {out}")
        return 0

    if args.url:
        return run(args.url)

    from omni_backend.testing.server import TritonServerProcess

    with tempfile.TemporaryDirectory(prefix="omni-pa-") as tmp:
        model_root = args.model_root
        if model_root is None or not (model_root / "flux-shapes").exists():
            from omni_backend.testing.tiny import build_tiny_flux

            model_root = model_root or Path(tmp)
            build_tiny_flux(model_root / "flux-shapes", seed=0)  # the tiny FLUX under the served name
        server = TritonServerProcess(
            ROOT / "model_repository",
            env_extra={"OMNI_MODEL_ROOT": str(model_root)},
            extra_args=["--model-control-mode=explicit", f"--load-model={args.model}"],
        )
        with server.start(timeout=600):
            print(f"[perf_analyzer] server up: gRPC {server.grpc_url}, HTTP {server.http_url}", flush=True)
            return run(server.grpc_url if args.protocol == "grpc" else server.http_url)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
