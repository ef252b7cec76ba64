"""perf_analyzer against any served model (one model, ``_stream``, ``_ensemble``), CSV into benchmarks/results/.

    bash benchmarks/perf_analyzer/setup.sh                  # once: installs .bin/pa
    python -m benchmarks.perf_analyzer.run --model flux [--protocol grpc|http] [--concurrency 1:4] [--smoke]
    python -m benchmarks.perf_analyzer.run --model flux_stream --url localhost:8001   # a running server
    python -m benchmarks.perf_analyzer.run --model wan22_i2v_ensemble --smoke

Without --url a tritonserver is started on free ports (``TritonServerProcess``, explicit model
control, only the model under test and its stages loaded) on the family's tiny checkpoint, built
into a temporary folder unless --model-root already holds it under the name the model's config
gives.  Inputs: ``inputs/<family>.json`` (``inputs.py`` writes them).  Measurement is by count
windows (a diffusion request takes seconds, time windows would hold a handful of them): each window
waits for --request-count completed requests.  ``_stream`` models are decoupled: perf_analyzer needs
gRPC with --streaming and measures the latency of the first response (the step-1 progress message).
--smoke: one concurrency level, one small request (``smoke.json`` / ``<family>_smoke.json``),
2-request windows, 3 windows, no stability requirement; well under a minute on a CPU.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
REPOSITORY = ROOT / "model_repository"
_STAGES = ("_text_encoder", "_transformer", "_vae")
# what a client calls: every model of the repository but the ensembles' stages
MODELS = tuple(
    sorted(p.name for p in REPOSITORY.iterdir() if (p / "config.pbtxt").exists() and not p.name.endswith(_STAGES))
)
DEFAULT_PA = HERE / ".bin" / "pa"


def family_of(model: str) -> str:
    return model.removesuffix("_stream").removesuffix("_ensemble")


def checkpoint_of(family: str) -> str:
    """The checkpoint folder name the family's one-model config loads (under OMNI_MODEL_ROOT)."""
    config = (REPOSITORY / family / "config.pbtxt").read_text()
    match = re.search(r'key: "model", value: \{ string_value: "([^"]+)" \}', config)
    assert match, f"{family}: no model parameter in its config.pbtxt"
    return match[1]


def input_file(model: str, smoke: bool) -> Path:
    family = family_of(model)
    if family == "flux":  # FLUX's files keep their first names
        name = "smoke" if smoke else "flux_stream" if model == "flux_stream" else "flux"
    else:
        name = f"{family}_smoke" if smoke else family
    return HERE / "inputs" / f"{name}.json"


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
    if model.endswith("_stream"):
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
    parser.add_argument("--input-data", type=Path, help="default: inputs/<family>.json (flux_stream: its own)")
    parser.add_argument("--smoke", action="store_true", help="1 concurrency level, tiny windows, < 60 s")
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/perf_analyzer_<model>_<protocol>.csv")
    parser.add_argument("--pa", default=str(DEFAULT_PA), help="perf_analyzer wrapper (setup.sh writes .bin/pa)")
    parser.add_argument("--model-root", type=Path, help="OMNI_MODEL_ROOT for a started server (holds the checkpoint)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds for the perf_analyzer run")
    args = parser.parse_args(argv)

    if args.model.endswith("_stream") and args.protocol != "grpc":
        parser.error(f"{args.model} is decoupled: perf_analyzer streams it over gRPC only (--protocol grpc)")
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
        model_root, checkpoint = args.model_root, checkpoint_of(family_of(args.model))
        if model_root is None or not (model_root / checkpoint).exists():
            from omni_backend.testing import tiny

            model_root = model_root or Path(tmp)
            tiny.build(family_of(args.model), model_root / checkpoint)  # the tiny checkpoint under the served name
        server = TritonServerProcess(
            REPOSITORY,
            env_extra={"OMNI_MODEL_ROOT": str(model_root)},
            extra_args=["--model-control-mode=explicit", f"--load-model={args.model}"],
        )
        with server.start(timeout=600):
            print(f"[perf_analyzer] server up: gRPC {server.grpc_url}, HTTP {server.http_url}", flush=True)
            return run(server.grpc_url if args.protocol == "grpc" else server.http_url)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
