"""``compile: regional``: the repeated blocks compile at load (warm-up), requests of the warmed shape
never recompile, alone or step-batched, and the images match the eager ones within DESIGN's tolerance."""

from __future__ import annotations

import pytest
from torch._dynamo.utils import counters

from omni_backend.runner.model_runner import ModelRunner, RunnerOutput
from omni_backend.runner.warmup import warm_up_runner
from omni_backend.testing.compare import assert_same_image
from tests.acceleration.conftest import MIXED, load, make, run

pytestmark = pytest.mark.slow


def test_regional_compile_warms_up_and_never_recompiles(tiny_flux, uncached):
    graphs_before = counters["stats"]["unique_graphs"]
    stages, _, _ = load(tiny_flux, compile="regional", warmup_sizes="64x64")
    warm_up_runner(ModelRunner(stages, RunnerOutput.IMAGE), stages, [(64, 64)], encode=True)  # what initialize runs
    warmed = counters["stats"]["unique_graphs"]
    assert warmed > graphs_before, "nothing was compiled at load"
    batched = run(stages, [make(i, *case) for i, case in enumerate(MIXED)])  # 3 rows, then 1
    alone = run(stages, [make(5, *MIXED[0])])
    assert counters["stats"]["unique_graphs"] == warmed, "a request of the warmed shape recompiled"
    for key, image in uncached.items():
        assert_same_image(batched[key], image)
    assert_same_image(alone["5"], uncached["0"])
