"""``python -m benchmarks.parallel --smoke``: every mode runs pinned and the table and JSON come out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_parallel_benchmark_smoke(tmp_path: Path) -> None:
    out = tmp_path / "parallel.json"
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.parallel", "--smoke", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    modes = json.loads(out.read_text())["modes"]
    assert set(modes) == {"cfg2", "ulysses2", "ring2", "pp2", "tp2"}
    assert all(row["single_s"] > 0 and row["parallel_s"] > 0 and row["speedup"] > 0 for row in modes.values())
    assert "| cfg2 | 2 |" in run.stdout
