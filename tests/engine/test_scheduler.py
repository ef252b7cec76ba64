"""The step schedulers on hand-built results: no model involved."""

from __future__ import annotations

import pytest

from omni_backend.config import EngineConfig
from omni_backend.engine.scheduler import (
    QueueFullError,
    RateLimiter,
    RequestLevelScheduler,
    StepResult,
    StepScheduler,
)
from omni_backend.request import DiffusionOutput, DiffusionRequest, SamplingParams


def request(request_id: str, size: int = 64, steps: int = 4) -> DiffusionRequest:
    return DiffusionRequest(request_id, SamplingParams(size, size, steps, 3.5, 1.0, 0), prompt="p")


def scheduler(cls=StepScheduler, **config) -> StepScheduler:
    return cls(EngineConfig(**config), lambda r: (r.params.height, r.params.width))


def finish(*ids: str) -> StepResult:
    return StepResult(finished=[DiffusionOutput(i) for i in ids])


def ids(requests) -> list[str]:
    return [r.request_id for r in requests]


def test_same_key_requests_share_steps_and_join_between_steps():
    s = scheduler()
    s.add(request("a"))
    plan = s.schedule()
    assert ids(plan.admitted) == ["a"] and plan.running_ids == ["a"]
    s.update(plan, StepResult())
    s.add(request("b", steps=20))  # another step count: same call all the same
    plan = s.schedule()
    assert ids(plan.admitted) == ["b"] and plan.running_ids == ["a", "b"]
    s.update(plan, finish("a"))
    plan = s.schedule()
    assert plan.admitted == [] and plan.running_ids == ["b"]
    s.update(plan, finish("b"))
    assert not s.has_work() and s.schedule().running_ids == []


def test_max_num_seqs_bounds_running_requests():
    s = scheduler(max_num_seqs=2)
    for i in range(3):
        s.add(request(str(i)))
    plan = s.schedule()
    assert plan.running_ids == ["0", "1"]
    s.update(plan, finish("0"))
    plan = s.schedule()
    assert plan.running_ids == ["1", "2"] and ids(plan.admitted) == ["2"]


def test_keys_take_turns_one_step_each():
    s = scheduler()
    s.add(request("big1", size=128))
    s.add(request("small", size=64))
    s.add(request("big2", size=128))
    turns = []
    for _ in range(4):
        plan = s.schedule()
        turns.append(plan.running_ids)
        s.update(plan, StepResult())
    assert turns == [["big1", "big2"], ["small"], ["big1", "big2"], ["small"]]


def test_admission_is_fifo_across_keys():
    s = scheduler(max_num_seqs=1)
    s.add(request("a", size=64))
    s.add(request("b", size=128))
    s.add(request("c", size=64))  # arrived after b: must not overtake it
    order = []
    while s.has_work():
        plan = s.schedule()
        order.append(plan.running_ids[0])
        s.update(plan, finish(*plan.running_ids))
    assert order == ["a", "b", "c"]


def test_remove_takes_requests_out_of_queue_and_batch():
    s = scheduler(max_num_seqs=2)
    for name in "abc":
        s.add(request(name))
    plan = s.schedule()
    removed = s.remove(["a", "c", "unknown"])
    assert sorted(ids(removed)) == ["a", "c"]
    s.update(plan, StepResult())
    assert s.schedule().running_ids == ["b"]
    assert list(s.waiting) == []


def test_removed_before_first_step_is_not_prepared():
    s = scheduler()
    s.add(request("a"))
    s.add(request("b", size=128))
    s.schedule()  # a steps; b admitted but its key has not had a turn yet
    s.remove(["b"])
    assert s.schedule().admitted == []


def test_queue_bound_and_drain():
    s = scheduler(max_queue_size=2)
    s.add(request("a"))
    s.add(request("b"))
    with pytest.raises(QueueFullError, match="queue is full"):
        s.add(request("c"))
    s.schedule()
    assert sorted(ids(s.drain())) == ["a", "b"]
    assert not s.has_work()


def test_request_level_batches_run_to_completion():
    s = scheduler(RequestLevelScheduler, max_num_seqs=4)
    s.add(request("a", steps=2))
    plan = s.schedule()
    s.add(request("b"))  # arrives while a runs: waits for the whole batch
    s.add(request("c", size=128))
    s.add(request("d"))
    assert plan.running_ids == ["a"]
    s.update(plan, StepResult())
    assert s.schedule().running_ids == ["a"]
    s.update(plan, finish("a"))
    plan = s.schedule()
    assert plan.running_ids == ["b", "d"]  # same key batched, c (other key) waits
    s.update(plan, finish("b", "d"))
    assert s.schedule().running_ids == ["c"]


def test_rate_limit_refuses_requests_beyond_the_configured_rate():
    now = [0.0]
    limiter = RateLimiter(2.0, clock=lambda: now[0])
    assert [limiter.allow() for _ in range(3)] == [True, True, False]  # a burst of max(1, rate)
    now[0] = 0.5
    assert [limiter.allow() for _ in range(2)] == [True, False]  # refills at 2 per second
    s = scheduler(max_request_rate=0.001)
    s.add(request("a"))
    with pytest.raises(QueueFullError, match="rate limit of 0.001 requests/s"):
        s.add(request("b"))
    assert ids(s.waiting) == ["a"]
