"""SPEC 4.4 to 4.7: limits, shared and trigger-time queues, partitions, the environment limit.

Every scenario runs on 2 worker processes of 4 pool processes each, so that up to 8 runs
could execute at once and only the limits keep them apart.
"""

from __future__ import annotations

import pytest
from celery.exceptions import TimeLimitExceeded
from celery.exceptions import WorkerLostError as CeleryWorkerLost
from conftest import Env, wait_until

from celery_ckeys import ConcurrencyQueue
from celery_ckeys.introspect import explain, status


def test_a_task_limit_is_reached_and_never_exceeded(env: Env) -> None:
    env.workers(count=2, concurrency=4)
    limited3 = env.app().tasks["ckt.limited3"]
    results = [limited3.apply_async((["limited3"], 0.3)) for _ in range(12)]
    outs = [r.get(timeout=120) for r in results]
    assert env.max("limited3") == 3
    assert all(o["slots"] == ["queue ckt.limited3"] for o in outs)


def test_one_queue_is_shared_by_two_tasks(env: Env) -> None:
    env.workers(count=2, concurrency=4)
    app = env.app()
    a, b = app.tasks["ckt.shared_a"], app.tasks["ckt.shared_b"]
    results = [t.apply_async((["shared", f"task:{t.name}"], 0.3)) for t in (a, b) for _ in range(5)]
    for r in results:
        assert r.get(timeout=120)["slots"] == ["queue shared"]
    assert env.max("shared") == 2
    assert env.max("task:ckt.shared_a") >= 1 and env.max("task:ckt.shared_b") >= 1


def test_a_trigger_time_queue_and_limit_override_the_tasks_own(env: Env) -> None:
    """A limit-1 task triggered on {"name": "main-branch", "limit": 3} reaches 3, never 4;
    triggered normally it stays at 1."""
    env.workers(count=2, concurrency=4)
    one = env.app().tasks["ckt.one_at_a_time"]
    main = [one.apply_async((["main-branch"], 0.4), concurrency_queue={"name": "main-branch", "limit": 3})
            for _ in range(9)]
    normal = [one.apply_async((["normal"], 0.2)) for _ in range(4)]
    for r in main + normal:
        r.get(timeout=120)
    assert env.max("main-branch") == 3
    assert env.max("normal") == 1
    # the limit was recorded: a later run that names the queue without a limit keeps 3
    assert env.redis.hget(f"ckeys:{{{env.names.queue('main-branch')}}}:c", "limit") == "3"
    later = [one.apply_async((["later"], 0.4), concurrency_queue="main-branch") for _ in range(6)]
    for r in later:
        r.get(timeout=120)
    assert env.max("later") == 3


def test_a_limit_given_at_trigger_time_needs_no_redis_to_publish(env: Env) -> None:
    app = env.app(ckeys_redis_url="redis://127.0.0.1:1/0")  # nothing listens there
    one = app.tasks["ckt.one_at_a_time"]
    one.apply_async((["x"],), concurrency_queue=ConcurrencyQueue("main-branch", limit=3))
    assert env.broker_length() == 1


def test_per_tenant_partitions(env: Env) -> None:
    """free-users limit 1: each user runs serially while users overlap;
    paid-users limit 2: one user reaches 2 and never 3."""
    env.workers(count=2, concurrency=4)
    work = env.app().tasks["ckt.work"]
    free = ConcurrencyQueue("free-users", limit=1)
    paid = ConcurrencyQueue("paid-users", limit=2)
    results = [work.apply_async(([f"free:{user}", "free:all"], 0.3), concurrency_queue=free,
                                concurrency_key=user)
               for _ in range(3) for user in ("u1", "u2", "u3")]
    results += [work.apply_async((["paid:u9"], 0.3), concurrency_queue=paid, concurrency_key="u9")
                for _ in range(6)]
    outs = [r.get(timeout=120) for r in results]
    for user in ("u1", "u2", "u3"):
        assert env.max(f"free:{user}") == 1
    assert env.max("free:all") >= 2, "different free users never overlapped"
    assert env.max("paid:u9") == 2
    assert outs[0]["slots"] == ["queue free-users [u1]"]


def test_a_total_limit_caps_every_partition_of_a_queue_together(env: Env) -> None:
    """{"name": "pool", "limit": 2, "total_limit": 3}, given at trigger time: each key's
    partition reaches 2 and never 3; all keys and keyless runs together reach 3, never 4;
    the total is recorded, so a later run naming only the queue keeps it."""
    env.workers(count=2, concurrency=4)
    work = env.app().tasks["ckt.work"]
    pool = {"name": "pool", "limit": 2, "total_limit": 3}
    # t1's runs alone first, until two of them overlap: the rest, served in any order, could
    # otherwise keep the total full whenever a second t1 run comes up
    runs = [work.apply_async((["pool:t1", "pool:all"], 1.0), concurrency_queue=pool,
                             concurrency_key="t1") for _ in range(4)]
    wait_until(lambda: env.max("pool:t1") >= 2, 60, message="two t1 runs at once")
    runs += [work.apply_async(([f"pool:{key}", "pool:all"], 0.4), concurrency_queue=pool,
                              concurrency_key=key) for _ in range(3) for key in ("t2", "t3")]
    runs += [work.apply_async((["pool:nokey", "pool:all"], 0.4), concurrency_queue=pool)
             for _ in range(3)]
    outs = [r.get(timeout=120) for r in runs]
    assert env.max("pool:all") == 3
    assert env.max("pool:t1") == 2
    assert max(env.max(f"pool:{key}") for key in ("t2", "t3", "nokey")) <= 2
    assert outs[0]["slots"] == ["queue pool [t1]", "queue pool (total)"]
    assert env.redis.hget(f"ckeys:{{{env.names.queue('pool')}}}:c", "total") == "3"
    later = [work.apply_async((["pool:later"], 0.4), concurrency_queue="pool",
                              concurrency_key=f"u{i}") for i in range(6)]
    for r in later:
        r.get(timeout=120)
    assert env.max("pool:later") == 3


def test_a_key_on_a_queue_without_any_limit_is_a_namespace_wide_mutex(env: Env) -> None:
    env.workers(count=1, concurrency=4)
    work = env.app().tasks["ckt.work"]
    results = [work.apply_async((["unlimited:k"], 0.2), concurrency_queue="no-limit-anywhere",
                                concurrency_key="k") for _ in range(4)]
    # and it excludes the key's runs that have no queue at all
    results.append(work.apply_async((["unlimited:k"], 0.2), concurrency_key="k"))
    outs = [r.get(timeout=60) for r in results]
    assert env.max("unlimited:k") == 1
    # its partition (limit 1) as well, so a limit that comes later still sees it (protocol 6.4)
    assert outs[0]["slots"] == ["queue no-limit-anywhere [k]", "key k"]


def test_environment_limit_with_burst(env: Env) -> None:
    """L=2, burst 2: at most 4 keyed runs in the namespace, at most 2 per queue; 4 is reached."""
    env.configure(ckeys_environment_limit=2, ckeys_burst_factor=2.0)
    env.workers(count=2, concurrency=4)
    app = env.app()
    hold = app.tasks["ckt.hold_until"]
    results = [hold.apply_async(([f"env:{q}", "env:all"], "env"), concurrency_queue=q)
               for _ in range(3) for q in ("q1", "q2", "q3")]
    # held until the burst is full: with runs of a fixed length, whether two runs of one
    # queue ever overlapped was up to the host's load (so, with three queues, is which two)
    wait_until(lambda: env.running("env:all") == 4, 60,
               message="four runs at once, the burst")
    env.open_gate("env")
    for r in results:
        r.get(timeout=120)
    for q in ("q1", "q2", "q3"):
        assert env.max(f"env:{q}") <= 2
    assert env.max("env:all") == 4
    out = app.tasks["ckt.work"].apply_async((["env:q1"], 0.0), concurrency_queue="q1").get(timeout=60)
    assert sorted(out["slots"]) == ["(environment)", "queue q1"]


def test_environment_limit_caps_a_larger_queue_limit_and_task_queues(env: Env) -> None:
    env.configure(ckeys_environment_limit=2, ckeys_burst_factor=1.0)
    env.workers(count=2, concurrency=4)
    app = env.app()
    limited3 = app.tasks["ckt.limited3"]
    results = [limited3.apply_async((["capped"], 0.3)) for _ in range(6)]
    # a keyed run with no queue still counts in its task's implicit queue (limit L)
    results += [app.tasks["ckt.work"].apply_async((["implicit"], 0.3), concurrency_key=f"k{i}")
                for i in range(6)]
    for r in results:
        r.get(timeout=120)
    assert env.max("capped") == 2
    assert env.max("implicit") == 2


def test_admission_is_all_or_nothing(env: Env) -> None:
    """A run blocked by the environment holds nothing on its own queue meanwhile."""
    env.configure(ckeys_environment_limit=1, ckeys_burst_factor=1.0)
    env.workers(count=1, concurrency=4)
    work = env.app().tasks["ckt.work"]
    holder = work.apply_async((["a"], 2.0), concurrency_queue="qa")
    wait_until(lambda: env.holders(env.names.queue("qa")) == [holder.id], 30, message="holder")
    blocked = work.apply_async((["b"], 0.0), concurrency_queue="qb")
    wait_until(lambda: [e for e in env.events("signal")
                        if e["name"] == "run_deferred" and e["task_id"] == blocked.id], 30,
               message="a deferral")
    while not holder.ready():
        assert env.holders(env.names.queue("qb")) == []
    blocked.get(timeout=60)


def test_subtasks_do_not_inherit_the_parents_queue_or_key(env: Env) -> None:
    env.workers(count=1, concurrency=2)
    spawn = env.app().tasks["ckt.spawn"]
    child_id = spawn.apply_async((["p"],), concurrency_queue={"name": "parents", "limit": 1},
                                 concurrency_key="pk").get(timeout=30)
    child = env.app().AsyncResult(child_id).get(timeout=30)
    assert child["slots"] is None
    assert "concurrency_queue" not in (child["headers"] or {})


@pytest.fixture(scope="module")
def limited_world(module_env: Env) -> Env:
    module_env.workers(count=1, concurrency=3)
    return module_env


@pytest.mark.parametrize("how", ["ok", "raise", "retry", "reject", "ignore", "sigkill", "sigterm"])
def test_every_end_path_releases_queue_slots(limited_world: Env, how: str) -> None:
    env = limited_world
    end = env.app().tasks["ckt.end_limited"]
    result = end.apply_async((how, [f"end:{how}"]), concurrency_queue={"name": f"end-{how}", "limit": 2},
                             concurrency_key="tenant")
    if how == "sigkill":
        with pytest.raises(CeleryWorkerLost):
            result.get(timeout=30)
    else:
        wait_until(lambda: any(e.get("id") == result.id for e in env.events("body")), 30,
                   message="the body")
    tag = env.names.partition(f"end-{how}", "tenant")
    wait_until(lambda: env.holders(tag) == [], 10, message="the partition slot to come free")


def test_hard_time_limit_releases_queue_slots(limited_world: Env) -> None:
    env = limited_world
    hard = env.app().tasks["ckt.hard_limit"]
    result = hard.apply_async((["hard"],), concurrency_queue={"name": "hard-q", "limit": 1})
    with pytest.raises(TimeLimitExceeded):
        result.get(timeout=30)
    wait_until(lambda: env.holders(env.names.queue("hard-q")) == [], 10, message="release")


def test_status_lists_limits_holders_and_deferred_runs(env: Env) -> None:
    env.workers(count=1, concurrency=4)
    app = env.app()
    work = app.tasks["ckt.work"]
    holders = [work.apply_async((["st"], 3.0), concurrency_queue={"name": "st", "limit": 2},
                                tags=["team:a"]) for _ in range(2)]
    wait_until(lambda: len(env.holders(env.names.queue("st"))) == 2, 30, message="two holders")
    waiting = work.apply_async((["st"], 0.0), concurrency_queue="st", tags=["team:b"])
    wait_until(lambda: [s for s in status(app) if s.label == "queue st" and s.deferred], 30,
               message="a deferred run in status")
    (slot,) = [s for s in status(app) if s.label == "queue st"]
    assert slot.limit == 2
    assert {h.task_id for h in slot.holders} == {h.id for h in holders}
    assert all(h.task_name == "ckt.work" and h.tags == ["team:a"] and h.held_seconds >= 0
               for h in slot.holders)
    assert slot.deferred_count == 1 and slot.deferred[0].task_id == waiting.id
    assert slot.oldest_wait_seconds is not None
    why = explain(app, waiting.id)
    assert why.state == "deferred" and why.blocked_by == "queue st"
    assert holders[0].id in why.detail or holders[1].id in why.detail
    assert [s.label for s in status(app, tag="team:b")] == ["queue st"]
    assert status(app, tag="team:zzz") == []
    waiting.get(timeout=60)
    wait_until(lambda: not [s for s in status(app) if s.label == "queue st"], 30,
               message="an idle queue to drop out of status")


@pytest.mark.parametrize("bad", [{"name": "", "limit": 1}, {"name": "x" * 257}, {"name": "q", "limit": 0},
                                 {"name": "q", "limit": "2"}, {"limit": 2}, 5, {"name": "q", "extra": 1},
                                 {"name": "q", "limit": 2, "total_limit": 0}])
def test_bad_queues_raise_value_error_before_publishing(env: Env, bad: object) -> None:
    work = env.app().tasks["ckt.work"]
    with pytest.raises(ValueError):
        work.apply_async((["v"],), concurrency_queue=bad)
    assert env.broker_length() == 0


def test_workers_are_tuned_for_keyed_tasks(env: Env) -> None:
    group = env.workers(count=1, concurrency=2)
    app = env.app()
    # (a shared broker's broadcast reaches every test's workers)
    (reply,) = app.control.inspect(timeout=5, destination=group.names).conf().values()
    assert reply["worker_prefetch_multiplier"] == 1
    # what the consumer really asks of the broker: one message per process (`celery worker`
    # reads the multiplier into its command-line option before celeryd_init can change it)
    (stats,) = app.control.inspect(timeout=5, destination=group.names).stats().values()
    assert stats["prefetch_count"] == 2
    if "worker_eta_task_limit" in app.conf:
        assert reply["worker_eta_task_limit"] == 1000
    assert app.tasks["ckt.work"].acks_late is True
    assert app.tasks["ckt.plain"].acks_late is False
