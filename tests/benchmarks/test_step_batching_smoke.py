"""``python -m benchmarks.step_batching --smoke``: the three modes run and every output is written."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_step_batching_smoke(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.step_batching", "--smoke", "--rounds", "2", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    with open(tmp_path / "step_batching.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(r["mode"], r["class"]) for r in rows} == {
        (m, c) for m in ("none", "request", "step") for c in ("short", "long")
    }
    by_mode = {r["mode"]: r for r in rows}
    assert float(by_mode["none"]["mean_step_batch"]) == 1.0  # max_num_seqs 1 never batches
    for row in rows:
        assert float(row["throughput_rps"]) > 0 and 0 < float(row["p50_s"]) <= float(row["p99_s"]), row
    assert sum(int(r["n"]) for r in rows if r["mode"] == "step") == 2 * 6  # both rounds' windows
    report = (tmp_path / "step_batching.md").read_text()
    assert "| (c) step-level |" in report and report.count("x / ") == 2  # each round's ratios
    for name in ("step_batching_latency.png", "step_batching_throughput.png"):
        assert (tmp_path / name).stat().st_size > 1000
