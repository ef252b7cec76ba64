"""The step scheduler on hand-built results: no model involved."""

from __future__ import annotations

import pytest

from omni_backend.config import EngineConfig
from omni_backend.engine.scheduler import QueueFullError, StepResult, StepScheduler
from omni_backend.request import DiffusionOutput, DiffusionRequest, SamplingParams


def request(request_id: str, size: int = 64, steps: int = 4) -> DiffusionRequest:
    return DiffusionRequest(request_id, SamplingParams(size, size, steps, 3.5, 1.0, 0), prompt="p")


def scheduler(**config) -> StepScheduler:
    return StepScheduler(EngineConfig(**config), lambda r: (r.params.height, r.params.width))


def finish(*ids: str) -> StepResult:
    return StepResult(finished=[DiffusionOutput(i) for i in ids])


def test_same_key_requests_share_steps_and_join_between_steps():
    s = scheduler()
    s.add(request("a"))
    plan = s.schedule()
    assert [r.request_id for r in plan.admitted] == ["a"] and plan.running_ids == ["a"]
    s.update(plan, StepResult())
    s.add(request("b"))
    plan = s.schedule()
    assert [r.request_id for r in plan.admitted] == ["b"] and plan.running_ids == ["a", "b"]
    s.update(plan, finish("a"))
    plan = s.schedule()
    assert plan.admitted == [] and plan.running_ids == ["b"]
    s.update(plan, finish("b"))
    assert not s.has_work()


def test_max_num_seqs_bounds_the_batch():
    s = scheduler(max_num_seqs=2)
    for i in range(3):
        s.add(request(str(i)))
    plan = s.schedule()
    assert plan.running_ids == ["0", "1"]
    s.update(plan, finish("0"))
    assert s.schedule().running_ids == ["1", "2"]


def test_other_key_waits_for_drain_and_is_not_overtaken():
    s = scheduler()
    s.add(request("a", size=64))
    s.add(request("b", size=128))
    s.add(request("c", size=64))  # arrived after b: must not overtake it
    plan = s.schedule()
    assert plan.running_ids == ["a"]
    s.update(plan, finish("a"))
    plan = s.schedule()
    assert plan.running_ids == ["b"]
    s.update(plan, finish("b"))
    assert s.schedule().running_ids == ["c"]


def test_queue_bound_and_drain():
    s = scheduler(max_queue_size=2)
    s.add(request("a"))
    s.add(request("b"))
    with pytest.raises(QueueFullError, match="queue is full"):
        s.add(request("c"))
    s.schedule()
    assert sorted(r.request_id for r in s.drain()) == ["a", "b"]
    assert not s.has_work()
