"""Handoff deferral: blocked runs wait in Redis, in line, and the releaser starts the next."""

from __future__ import annotations

import json
from typing import Callable

from conftest import Env, wait_until

from celery_ckeys.config import get_config
from celery_ckeys.introspect import explain, status
from celery_ckeys.store import Store, store_for

HANDOFF = {"ckeys_deferral": "handoff", "ckeys_retry_countdown": 1.0}


def parked(env: Env, tag: str) -> list[str]:
    return list(env.redis.zrange(f"ckeys:{{{tag}}}:p", 0, -1))


def deferral_signals(env: Env) -> list[dict[str, object]]:
    return [e for e in env.events("signal") if e["name"] == "run_deferred"]


def test_handoff_keeps_mutual_exclusion_and_limits(env: Env) -> None:
    env.configure(**HANDOFF)
    env.workers(count=2, concurrency=4)
    app = env.app()
    work = app.tasks["ckt.work"]
    results = [work.apply_async(([f"k{i % 4}", "all"], 0.1), concurrency_key=f"k{i % 4}")
               for i in range(40)]
    paid = {"name": "paid", "limit": 2}
    results += [work.apply_async((["paid:u"], 0.2), concurrency_queue=paid, concurrency_key="u")
                for _ in range(8)]
    results += [app.tasks["ckt.limited3"].apply_async((["lim3"], 0.2)) for _ in range(9)]
    for r in results:
        r.get(timeout=120)
    for i in range(4):
        assert env.max(f"k{i}") == 1
    assert env.max("all") >= 2
    assert env.max("paid:u") == 2
    assert env.max("lim3") == 3
    # runs waited in Redis, not as countdown messages
    assert deferral_signals(env) and all(e.get("countdown") is None for e in deferral_signals(env))


def test_handoff_order_is_first_in_first_out_per_partition(env: Env) -> None:
    env.configure(**HANDOFF)
    env.workers(count=2, concurrency=4)
    work = env.app().tasks["ckt.work"]
    queue = {"name": "fifo", "limit": 1}
    holder = work.apply_async((["fifo"], 1.5), concurrency_queue=queue, concurrency_key="t1")
    tag = env.names.partition("fifo", "t1")
    wait_until(lambda: env.holders(tag) == [holder.id], 30, message="holder")
    line = []
    for i in range(6):
        r = work.apply_async((["fifo"], 0.05), concurrency_queue=queue, concurrency_key="t1")
        line.append(r)
        wait_until(lambda n=i: len(parked(env, tag)) == n + 1, 30, message=f"run {i} to park")
    assert parked(env, tag) == [r.id for r in line]
    for r in line:
        r.get(timeout=60)
    starts = [e["id"] for e in env.events("start")]
    assert starts == [holder.id] + [r.id for r in line]


def test_status_and_explain_show_the_line(env: Env) -> None:
    env.configure(**HANDOFF)
    env.workers(count=1, concurrency=4)
    app = env.app()
    work = app.tasks["ckt.work"]
    holder = work.apply_async((["line"], 3.0), concurrency_key="line")
    wait_until(lambda: env.holders(env.names.key("line")) == [holder.id], 30, message="holder")
    first = work.apply_async((["line"], 0.0), concurrency_key="line")
    wait_until(lambda: parked(env, env.names.key("line")) == [first.id], 30, message="park 1")
    second = work.apply_async((["line"], 0.0), concurrency_key="line")
    wait_until(lambda: len(parked(env, env.names.key("line"))) == 2, 30, message="park 2")
    (slot,) = [s for s in status(app) if s.label == "key line"]
    assert [(p.task_id, p.position) for p in slot.parked] == [(first.id, 1), (second.id, 2)]
    assert slot.deferred_count == 2 and not slot.deferred
    why = explain(app, second.id)
    assert why.state == "parked" and "position 2, 1 ahead of it" in why.detail
    assert holder.id in why.detail
    second.get(timeout=60)


def test_a_releaser_that_dies_between_pop_and_publish_strands_nobody(env: Env) -> None:
    """The head of the line is popped (reserved) but its message never published: the
    sweeper publishes it once the claim window has passed."""
    env.configure(**HANDOFF)
    env.workers(count=1, concurrency=3)
    app = env.app()
    work = app.tasks["ckt.work"]
    holder_store: Store = store_for(get_config(app))
    from celery_ckeys.admission import RunSpec, plan_for

    plan = plan_for(holder_store.config, RunSpec("t", key="crash"))
    assert plan is not None
    # a holder from a "releaser" living in this test process
    token = json.dumps(["doomed", "x", 1, "n", "", "t", 0, []])
    assert holder_store.acquire(plan.slots, "doomed", token).ok
    waiting = work.apply_async((["crash"], 0.0), concurrency_key="crash")
    wait_until(lambda: parked(env, env.names.key("crash")) == [waiting.id], 30, message="park")
    holder_store.on_wakes = None  # the releaser "dies" before it publishes what it woke
    assert holder_store.release(plan.slots, "doomed", token) == 1
    assert parked(env, env.names.key("crash")) == []  # popped, reserved, never published
    out = waiting.get(timeout=60)
    assert out["slots"] == ["key crash"]


def test_a_holder_whose_whole_worker_is_killed_strands_nobody(env: Env) -> None:
    env.configure(ckeys_lock_ttl=3, **HANDOFF)
    doomed = env.workers(count=1, concurrency=2)
    work = env.app().tasks["ckt.work"]
    holder = work.apply_async((["kill"], 60.0), concurrency_key="kill")
    wait_until(lambda: env.holders(env.names.key("kill")) == [holder.id], 30, message="holder")
    env.workers(count=1, concurrency=2)  # the survivor starts after the holder took the key
    line = [work.apply_async((["kill"], 0.0), concurrency_key="kill") for _ in range(3)]
    wait_until(lambda: len(parked(env, env.names.key("kill"))) == 3, 30, message="three parked")
    doomed.stop(kill=True)  # no release, no worker-lost handling: only the lease runs out
    for r in line:
        assert r.get(timeout=60)["slots"] == ["key kill"]


def test_nothing_parked_is_lost_when_redis_restarts_with_aof(own_redis_env: Callable[..., Env]) -> None:
    env = own_redis_env(appendonly=True)
    env.configure(**HANDOFF)
    env.workers(count=1, concurrency=4)
    work = env.app().tasks["ckt.work"]
    holder = work.apply_async((["aof"], 3.0), concurrency_key="aof")
    wait_until(lambda: env.holders(env.names.key("aof")) == [holder.id], 30, message="holder")
    line = [work.apply_async((["aof"], 0.0), concurrency_key="aof") for _ in range(5)]
    wait_until(lambda: len(parked(env, env.names.key("aof"))) == 5, 30, message="five parked")
    env.coordination.restart()
    assert len(parked(env, env.names.key("aof"))) == 5
    for r in [holder, *line]:
        r.get(timeout=90)
    assert env.max("aof") == 1


def test_switching_deferral_modes_live_loses_no_run(env: Env) -> None:
    """Countdown and handoff workers side by side, then the handoff ones stop mid-way."""
    handoff_workers = env.workers(count=1, concurrency=3, **HANDOFF)
    env.workers(count=1, concurrency=3, ckeys_deferral="countdown", ckeys_retry_countdown=0.3)
    work = env.app().tasks["ckt.work"]
    results = [work.apply_async(([f"m{i % 2}"], 0.1), concurrency_key=f"m{i % 2}") for i in range(16)]
    wait_until(lambda: sum(r.ready() for r in results) >= 4, 60, message="some progress")
    handoff_workers.stop()
    results += [work.apply_async(([f"m{i % 2}"], 0.05), concurrency_key=f"m{i % 2}") for i in range(6)]
    for r in results:
        r.get(timeout=120)
    assert env.max("m0") == 1 and env.max("m1") == 1
    assert len({e["id"] for e in env.events("start")}) == len(results)


def test_a_run_with_arguments_json_cannot_carry_falls_back_to_countdown() -> None:
    from celery_ckeys.handoff import message_for

    class Request:
        id = "x"
        retries = 0

    class Task:
        name = "t"
        args: list[object] = [object()]

        def signature_from_request(self, request: object, **options: object) -> dict[str, object]:
            return {"task": "t", "args": self.args, "kwargs": {}, "options": options}

    assert message_for(Task(), Request(), {}) is None
    ok = Task()
    ok.args = [1]
    envelope = json.loads(message_for(ok, Request(), {"ckeys_ticket": ["r", "t"], "a": 1}) or "{}")
    assert envelope["sig"]["args"] == [1]
    # the ticket is the line's to give, when the run is woken: a parked message carries none
    assert envelope["sig"]["options"]["headers"] == {"a": 1}
