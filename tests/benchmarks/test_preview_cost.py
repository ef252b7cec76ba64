"""``benchmarks.preview_cost``: the timing path runs and measures the preview the stream model sends."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.preview_cost import main


@pytest.mark.slow
def test_smoke_times_decode_downscale_and_a_step(tmp_path: Path) -> None:
    out = tmp_path / "preview_cost.json"
    argv = ["--smoke", "--device", "cpu", "--dtype", "float32", "--height", "64", "--width", "320"]
    assert main([*argv, "--frames", "5", "--repeats", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["video"] == [5, 64, 320, 3]
    assert result["preview"] == [5, 51, 256, 3]  # every frame, the long side down to 256
    assert min(result["decode_s"], result["downscale_s"], result["cfg_step_s"]) > 0
