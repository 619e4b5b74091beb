"""SPEC 4.8: waiting on a child without holding slots, on real workers."""

from __future__ import annotations

from typing import Any

import pytest
from celery.exceptions import TimeoutError as CeleryTimeoutError
from conftest import Env, wait_until

from celery_ckeys import RecursiveWaitDeadlock, WaitStarvation

FAMILY = {"concurrency_queue": {"name": "family", "limit": 1}}


def order(env: Env) -> list[tuple[str, str, Any]]:
    """(event, task id, phase or labels) in the order the probe saw them."""
    return [(e["ev"], e["id"], e.get("phase") or e.get("labels")) for e in env.log()
            if e.get("ev") in ("start", "end", "wait", "resumed")]


def index(events: list[tuple[str, str, Any]], ev: str, task_id: str, phase: Any = None) -> int:
    for i, (e, tid, ph) in enumerate(events):
        if e == ev and tid == task_id and (phase is None or ph == phase):
            return i
    raise AssertionError(f"no {ev} of {task_id} ({phase}) in {events}")


def test_parent_and_child_on_the_same_limit_1_queue_both_complete(env: Env) -> None:
    env.workers(count=2, concurrency=4)
    parent = env.app().tasks["ckt.parent"]
    result = parent.apply_async((["family"], ["family"], FAMILY), **FAMILY)
    out = result.get(timeout=60)
    child_id = out["child"]["id"]
    events = order(env)
    # the child ran while the parent waited, and the parent resumed after it
    assert index(events, "wait", result.id) < index(events, "start", child_id) \
        < index(events, "end", child_id) < index(events, "resumed", result.id)
    assert env.max("family") == 1
    assert out["slots"] == ["queue family"], "the parent did not take its slot back"
    assert out["child"]["slots"] == ["queue family"]


def test_while_a_parent_waits_another_run_of_its_queue_can_start(env: Env) -> None:
    env.workers(count=2, concurrency=4)
    app = env.app()
    parent = app.tasks["ckt.parent"].apply_async((["family"], ["kid"], {}),
                                                 {"child_duration": 2.0}, **FAMILY)
    wait_until(lambda: any(e["ev"] == "wait" and e["id"] == parent.id for e in env.log()), 30,
               message="the parent to wait")
    other = app.tasks["ckt.work"].apply_async((["family"], 0.0), **FAMILY)
    other.get(timeout=30)
    parent.get(timeout=60)
    events = order(env)
    assert index(events, "start", other.id) < index(events, "resumed", parent.id)


def test_one_level_too_deep_raises_and_the_grandchild_is_never_published(env: Env) -> None:
    env.workers(count=2, concurrency=4)
    parent = env.app().tasks["ckt.parent"]
    result = parent.apply_async((["family"], ["grandchild"], FAMILY), {"depth": 2}, **FAMILY)
    with pytest.raises(RecursiveWaitDeadlock, match=r"queue family \(limit 1\).*2 runs"):
        result.get(timeout=60)
    # the middle run (labelled "grandchild" too) ran its first phase; no ckt.child ever started
    assert [e for e in env.events("start") if e["labels"] == ["grandchild"] and "phase" not in e] == []
    waits = [e for e in env.log() if e.get("ev") == "wait"]
    assert len(waits) == 2  # the parent waited; the middle run tried to and was refused
    wait_until(lambda: env.holders(env.names.queue("family")) == [], 10, message="slots freed")


def test_a_limit_2_queue_allows_two_levels(env: Env) -> None:
    env.workers(count=2, concurrency=4)
    fam2 = {"concurrency_queue": {"name": "family2", "limit": 2}}
    parent = env.app().tasks["ckt.parent"]
    out = parent.apply_async((["family2"], ["family2"], fam2), {"depth": 2}, **fam2).get(timeout=60)
    assert out["child"]["child"]["slots"] == ["queue family2"]
    assert env.max("family2") <= 2


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_pool_starvation_raises_instead_of_hanging(env: Env, pool: str) -> None:
    env.workers(count=1, concurrency=1, pool=pool)
    parent = env.app().tasks["ckt.parent"]
    result = parent.apply_async((["p"], ["c"], {}))
    with pytest.raises(WaitStarvation, match="every worker process that could run the child"):
        result.get(timeout=60)


@pytest.mark.parametrize("deferral", ["countdown", "handoff"])
def test_a_resuming_parent_goes_before_runs_already_deferred(env: Env, deferral: str) -> None:
    """The parent's child ends while another run holds the queue and three runs wait (as
    countdown messages, or parked in line): the parent still starts again before them."""
    env.configure(ckeys_deferral=deferral, ckeys_retry_countdown=0.3 if deferral == "countdown" else 1.0)
    env.workers(count=2, concurrency=4)
    app = env.app()
    work = app.tasks["ckt.work"]
    prio = {"concurrency_queue": {"name": "prio", "limit": 1}}
    parent = app.tasks["ckt.parent"].apply_async((["prio"], ["kid"], {}),
                                                 {"child_duration": 1.0}, **prio)
    wait_until(lambda: any(e["ev"] == "wait" and e["id"] == parent.id for e in env.log()), 30,
               message="the parent to wait")
    blocker = work.apply_async((["prio"], 2.5), **prio)
    wait_until(lambda: env.holders(env.names.queue("prio")) == [blocker.id], 30,
               message="another run to take the slot")
    others = [work.apply_async((["prio"], 0.0), **prio) for _ in range(3)]
    wait_until(lambda: {r.id for r in others} <= {e["task_id"] for e in env.events("signal")
                                                 if e["name"] == "run_deferred"}, 30,
               message="the three to be deferred")
    parent.get(timeout=60)
    for r in others:
        r.get(timeout=60)
    events = order(env)
    resumed = index(events, "start", parent.id, "after")
    assert all(resumed < index(events, "start", r.id) for r in others)
    assert env.max("prio") == 1


def test_a_wait_releases_and_retakes_a_key(env: Env) -> None:
    env.workers(count=1, concurrency=4)
    app = env.app()
    parent = app.tasks["ckt.parent"].apply_async((["k"], ["kid"], {}), {"child_duration": 1.0},
                                                 concurrency_key="user:1")
    wait_until(lambda: any(e["ev"] == "wait" and e["id"] == parent.id for e in env.log()), 30,
               message="the parent to wait")
    other = app.tasks["ckt.work"].apply_async((["k"], 0.0), concurrency_key="user:1")
    other.get(timeout=30)
    out = parent.get(timeout=30)
    assert out["slots"] == ["key user:1"]
    assert env.max("k") == 1


def test_a_child_with_the_parents_own_key(env: Env) -> None:
    env.workers(count=1, concurrency=4)
    parent = env.app().tasks["ckt.parent"]
    out = parent.apply_async((["same"], ["same"], {"concurrency_key": "user:7"}),
                             concurrency_key="user:7").get(timeout=60)
    assert out["child"]["slots"] == ["key user:7"] and out["slots"] == ["key user:7"]
    assert env.max("same") == 1
    # and a grandchild with the same key again is a recursive wait deadlock
    deeper = parent.apply_async((["same2"], ["same2"], {"concurrency_key": "user:8"}), {"depth": 2},
                                concurrency_key="user:8")
    with pytest.raises(RecursiveWaitDeadlock, match="key user:8"):
        deeper.get(timeout=60)


def test_the_childs_exception_reaches_the_parent(env: Env) -> None:
    env.workers(count=1, concurrency=4)
    parent = env.app().tasks["ckt.parent"]
    result = parent.apply_async((["e"], ["ce"], {}), {"child_how": "raise"}, **FAMILY)
    with pytest.raises(KeyError, match="child failed"):
        result.get(timeout=60)
    wait_until(lambda: env.holders(env.names.queue("family")) == [], 10, message="slots freed")


def test_a_timeout_reaches_the_parent(env: Env) -> None:
    env.workers(count=1, concurrency=4)
    parent = env.app().tasks["ckt.parent"]
    result = parent.apply_async((["t"], ["ct"], {}), {"child_duration": 5.0, "timeout": 0.5}, **FAMILY)
    with pytest.raises(CeleryTimeoutError):
        result.get(timeout=60)
    wait_until(lambda: env.holders(env.names.queue("family")) == [], 10, message="slots freed")


def test_wait_for_works_in_tasks_that_are_not_bound_or_keyed(env: Env) -> None:
    env.workers(count=1, concurrency=2)
    out = env.app().tasks["ckt.free_waiter"].apply_async((["f"], ["fc"])).get(timeout=60)
    assert out["slots"] is None


def test_the_get_guard_is_lifted_only_for_the_wait(env: Env) -> None:
    env.workers(count=1, concurrency=4)
    out = env.app().tasks["ckt.guard_check"].apply_async((["g"],), concurrency_key="g").get(timeout=60)
    assert out["value"]["slots"] is None
    assert "Never call result.get() within a task" in out["guard"]
