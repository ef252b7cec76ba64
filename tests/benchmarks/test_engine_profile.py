"""``python -m benchmarks.engine_profile``: the engine's phases are found in the profile of every thread."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from benchmarks import engine_profile


@pytest.mark.slow
def test_engine_profile_reports_the_engine_threads_phases(tmp_path: Path, capsys) -> None:
    engine_profile.main(
        ["--sizes", "32", "64", "--modes", "request", "step", "--warmup", "2", "--requests", "4",
         "--profile-requests", "4", "--trace", str(tmp_path)]
    )  # fmt: skip
    out = capsys.readouterr().out
    for mode in ("request", "step"):
        section = out.split(f"== {mode}:")[1].split("==")[0]
        calls = {m[1]: int(m[2]) for m in re.finditer(r"^   (\S.*?)\s{2,}\s*(\d+) calls", section, re.M)}
        # the labels sit on the engine thread (and the runner's methods it calls): seen only if every
        # thread is recorded, not just the one that started the profile
        assert calls["engine: one step, all of it"] > 0, section
        # one transformer call a step (a step in flight when the profile starts or stops may be cut)
        assert abs(calls["stages: transformer call"] - calls["engine: one step, all of it"]) <= 1, section
        assert calls["runner: VAE decode"] >= 1, section  # 4 requests finished in the window
        trace = json.loads((tmp_path / f"engine_{mode}.json").read_text())
        assert any(e.get("name") == "stages: transformer call" for e in trace["traceEvents"])
