"""perf_analyzer 2.44 (benchmarks/perf_analyzer/setup.sh) against a real tritonserver, smoke settings.

setup.sh downloads two wheels and, as root, apt-installs libb64-0d; the test is skipped only when
that step fails for want of network / package access (the reason is shown), never for anything else.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SETUP = ROOT / "benchmarks" / "perf_analyzer" / "setup.sh"
PA = ROOT / "benchmarks" / "perf_analyzer" / ".bin" / "pa"

# what pip / apt print when the package index cannot be reached or the library cannot be installed
_NO_ACCESS = re.compile(
    r"Failed to establish a new connection|Temporary failure in name resolution|Could not resolve|"
    r"Network is unreachable|No matching distribution found|Could not find a version|ProxyError|"
    r"Unable to locate package|needs libb64\.so\.0d|Failed to fetch|ConnectionError|Read timed out|"
    r"pip download .* failed",
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def perf_analyzer() -> Path:
    proc = subprocess.run(
        ["bash", str(SETUP)], capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable}
    )
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        reason = _NO_ACCESS.search(output)
        if reason:
            pytest.skip(f"setup.sh could not install perf_analyzer ({reason[0]}):\n{output[-1500:]}")
        pytest.fail(f"setup.sh failed (exit code {proc.returncode}):\n{output[-3000:]}")
    assert "Perf Analyzer Version 2.44.0" in output, output
    return PA


@pytest.mark.parametrize("model", ["flux", "wan22_i2v_ensemble"])  # the second sends an input image
def test_smoke_run_writes_throughput_csv(perf_analyzer: Path, model_root: Path, tmp_path: Path, model: str) -> None:
    out = tmp_path / f"perf_analyzer_{model}_grpc.csv"
    cmd = [sys.executable, "-m", "benchmarks.perf_analyzer.run", "--model", model, "--protocol", "grpc", "--smoke"]
    cmd += ["--out", str(out), "--model-root", str(model_root), "--pa", str(perf_analyzer)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"exit code {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"

    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1, rows
    row = rows[0]
    assert row["Concurrency"] == "1"
    assert float(row["Inferences/Second"]) > 0
    assert int(row["p50 latency"]) > 0
    assert "[perf_analyzer] concurrency 1:" in proc.stdout
