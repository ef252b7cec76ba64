"""``python -m benchmarks.acceleration --smoke``: every feature runs and the table is written."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_acceleration_smoke(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.acceleration", "--smoke", "--out-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    with open(tmp_path / "acceleration.csv", newline="") as f:
        rows = {(r["feature"], r["setting"]): r for r in csv.DictReader(f)}
    features = {feature for feature, _ in rows}
    for expected in ("uncached", "tea_cache", "first_block_cache", "mag_cache", "taylorseer", "offload model"):
        assert expected in features, features
    for (feature, _), row in rows.items():
        assert float(row["latency_s"]) > 0, row
        if feature.startswith("offload"):  # offload never changes the image
            assert row["max_err"] == "0", row
    assert float(rows[("prompt_embed_cache encode", "hit")]["speedup"]) > 1
    assert "| feature | setting |" in (tmp_path / "acceleration.md").read_text()
