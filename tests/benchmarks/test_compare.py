"""``python -m benchmarks.compare --smoke``: every system runs and the outputs are written."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXPECTED = {
    ("floor", "inproc"), ("flux", "grpc"), ("flux", "http"), ("flux_ensemble", "grpc"), ("flux_ensemble", "http"),
    ("pytriton", "grpc"), ("mode:none", "grpc"), ("mode:request", "grpc"), ("mode:step", "grpc"),
}  # fmt: skip


@pytest.mark.slow
def test_compare_smoke(tmp_path: Path) -> None:
    pytest.importorskip("pytriton")
    pytest.importorskip("matplotlib")
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.compare", "--smoke", "--out-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    with open(tmp_path / "compare.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(r["system"], r["protocol"]) for r in rows} == EXPECTED
    for row in rows:
        assert float(row["throughput_rps"]) > 0, row
        assert 0 < float(row["p50_s"]) <= float(row["p99_s"]), row
    served = {int(r["concurrency"]) for r in rows if r["system"] != "floor"}
    assert served == {1, 2}
    assert "| system | protocol | concurrency |" in (tmp_path / "compare.md").read_text()
    for name in ("compare_latency.png", "compare_throughput.png"):
        assert (tmp_path / name).stat().st_size > 1000
