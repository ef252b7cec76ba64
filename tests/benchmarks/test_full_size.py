"""``benchmarks.full_size``: the full-size configs are the released architectures, and the timing path runs."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.full_size import FAMILIES, parameter_table

ROOT = Path(__file__).resolve().parents[2]


def test_full_size_configs_have_the_released_parameter_counts() -> None:
    rows = parameter_table(sorted(FAMILIES))
    assert {family for family, *_ in rows} == set(FAMILIES)
    for family, component, ours, released in rows:
        # released sizes are rounded ("14B"); an architecture slip (a wrong width or depth) is off by far more
        assert ours == pytest.approx(released, rel=0.03), (family, component, ours, released)


@pytest.mark.slow
def test_smoke_times_every_family(tmp_path: Path) -> None:
    out = tmp_path / "full_size.csv"
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.full_size", "--smoke", "--dtype", "float32", "--repeats", "1",
         "--device", "cpu", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["family"] for r in rows] == sorted(FAMILIES)
    for row in rows:
        assert row["smoke"] == "True" and row["height"] == "64", row
        assert 0 < float(row["min_s"]) <= float(row["median_s"]), row
        assert int(row["params"]) > 0, row


def test_full_size_refuses_a_cpu_run() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.full_size", "--family", "flux", "--device", "cpu"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2 and "needs a GPU" in run.stderr


@pytest.mark.slow
def test_smoke_times_our_stages_on_the_same_weights(tmp_path: Path) -> None:
    out = tmp_path / "full_size.csv"
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.full_size", "--smoke", "--dtype", "float32", "--repeats", "1",
         "--device", "cpu", "--family", "flux", "--family", "wan22_t2v", "--ours", "--batch", "2", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    with open(tmp_path / "full_size_stages.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    modes = [f"ours, offload {mode}" for mode in ("none", "model", "layerwise")]
    assert [(r["family"], r["path"]) for r in rows] == [(f, m) for f in ("flux", "wan22_t2v") for m in modes]
    for row in rows:
        assert row["batch"] == "2", row
        # every offload mode, batched, runs diffusers' own weights to diffusers' image or video alone
        # (float32: DESIGN's 1 level on 99.9% of pixels; a rare pixel on a rounding edge may be 2 apart)
        assert float(row["within_1_level"]) >= 0.999, row
        assert int(row["max_err_vs_diffusers"]) <= 2, row
        assert 0 < float(row["min_s"]) <= float(row["median_s"]), row


def test_ours_refuses_a_family_it_does_not_drive() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.full_size", "--smoke", "--family", "qwen_image", "--ours",
         "--device", "cpu"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2 and "--ours drives flux, wan22_t2v" in run.stderr
