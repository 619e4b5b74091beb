"""SPEC 4.1 and §2: concurrency keys, every way of enqueueing with one, on real workers."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest
from conftest import Env, wait_until

from celery_ckeys.introspect import status


def test_mutual_exclusion_under_load_on_two_workers(env: Env) -> None:
    """48 runs over 4 keys on 2 workers of 4 processes: no two runs of a key overlap,
    and runs of different keys do."""
    env.workers(count=2, concurrency=4)
    work = env.app().tasks["ckt.work"]
    keys = [f"contact:{i}" for i in range(4)]
    results = [work.apply_async(([key, "all"], 0.15), concurrency_key=key)
               for _ in range(12) for key in keys]
    outputs = [r.get(timeout=120) for r in results]
    for key in keys:
        assert env.max(key) == 1, f"two runs with key {key} overlapped"
    assert env.max("all") >= 2, "runs with different keys never overlapped"
    # and both workers' processes took part
    assert len({o["pid"] for o in outputs}) >= 2
    # the log agrees: per key, every start is followed by its own end
    open_runs: dict[str, str] = {}
    for event in env.log():
        if event.get("ev") not in ("start", "end"):
            continue
        key = event["labels"][0]
        if event["ev"] == "start":
            assert key not in open_runs, f"{key} started while {open_runs.get(key)} ran"
            open_runs[key] = event["id"]
        else:
            assert open_runs.pop(key) == event["id"]


@pytest.mark.parametrize("pool", ["threads", "solo"])
def test_keys_hold_under_the_threads_and_solo_pools(env: Env, pool: str) -> None:
    env.workers(count=2, concurrency=3 if pool == "threads" else 1, pool=pool)
    app = env.app()
    # runs of two keys at once: held until both run (with runs of a fixed length, whether
    # they overlapped was up to when each worker began to consume)
    hold = app.tasks["ckt.hold_until"]
    held = [hold.apply_async(([f"o{i}", "all"], "pool"), concurrency_key=f"o{i}") for i in range(2)]
    wait_until(lambda: env.running("all") == 2, 60, message="runs of two keys at once")
    env.open_gate("pool")
    work = app.tasks["ckt.work"]
    results = [work.apply_async((["k"], 0.1), concurrency_key="k") for _ in range(6)]
    for r in held + results:
        r.get(timeout=90)
    assert env.max("k") == 1


@pytest.mark.parametrize("pool", ["prefork", "threads", "solo"])
def test_renewal_keeps_the_key_past_its_lease(env: Env, pool: str) -> None:
    """With a 2 s lease, a 6 s run keeps its key the whole time."""
    env.configure(ckeys_lock_ttl=2)
    env.workers(count=1, concurrency=2 if pool != "solo" else 1, pool=pool)
    if pool == "solo":
        env.workers(count=1, concurrency=1, pool=pool)
    work = env.app().tasks["ckt.work"]
    first = work.apply_async((["renew"], 6.0), concurrency_key="renew")
    tag = env.names.key("renew")
    wait_until(lambda: env.holders(tag) == [first.id], 30, message="the first run to hold the key")
    second = work.apply_async((["renew"], 0.0), concurrency_key="renew")
    assert first.get(timeout=60)
    assert second.get(timeout=60)
    assert env.max("renew") == 1
    starts = [e["id"] for e in env.events("start")]
    ends = [e["id"] for e in env.events("end")]
    assert starts == [first.id, second.id] and ends == [first.id, second.id]


def test_namespaces_never_collide(env: Env) -> None:
    """The same key in two namespaces: both run at once."""
    env.workers(count=1, concurrency=2)
    env.workers(count=1, concurrency=2, ckeys_namespace=env.namespace + "-other")
    app = env.app()
    other = env.app(ckeys_namespace=env.namespace + "-other")
    a = app.tasks["ckt.work"].apply_async((["both"], 1.0), concurrency_key="same")
    b = other.tasks["ckt.work"].apply_async((["both"], 1.0), concurrency_key="same")
    a.get(timeout=30)
    b.get(timeout=30)
    assert env.max("both") == 2


@pytest.mark.parametrize("key", ["a:b:c", "{tag}", "}{", "with space", "ключ-日本", "%41", "*?[x]", "a|k|b"])
def test_keys_with_any_characters_lock_exactly_themselves(module_env: Env, key: str) -> None:
    if not module_env.groups:
        module_env.workers(count=1, concurrency=3)
    work = module_env.app().tasks["ckt.work"]
    results = [work.apply_async(([f"chars:{key}"], 0.1), concurrency_key=key) for _ in range(3)]
    for r in results:
        out = r.get(timeout=60)
        assert out["slots"] == [f"key {key}"]
    assert module_env.max(f"chars:{key}") == 1
    tag = module_env.names.key(key)
    redis_key = "ckeys:{" + tag + "}:h"
    # one hash tag per key: the first {...} of the Redis key is exactly this key's tag
    assert redis_key[redis_key.index("{") + 1:redis_key.index("}")] == tag


def test_subtasks_do_not_inherit_the_parents_key(env: Env) -> None:
    env.workers(count=1, concurrency=2)
    spawn = env.app().tasks["ckt.spawn"]
    child_id = spawn.apply_async((["parent"],), concurrency_key="parent-key",
                                 tags=["t1"]).get(timeout=30)
    child = env.app().AsyncResult(child_id).get(timeout=30)
    assert not (child["headers"] or {}).get("concurrency_key")
    assert not (child["headers"] or {}).get("ckeys_tags")
    assert child["slots"] is None


def test_eager_mode_runs_the_body_without_coordination(env: Env) -> None:
    """task_always_eager: no Redis involved at all, even a dead coordination URL works."""
    app = env.app(task_always_eager=True, ckeys_redis_url="redis://127.0.0.1:1/0")
    out = app.tasks["ckt.work"].apply_async((["eager"],), concurrency_key="e").get()
    assert out["slots"] is None
    assert json.dumps(out)


def test_deferred_runs_keep_id_arguments_headers_routing_and_retries(env: Env) -> None:
    default = env.conf.get("task_default_queue", "celery")  # its own on a shared broker
    special = f"{default}-special"
    env.workers(count=1, concurrency=3, extra_args=["-Q", f"{default},{special}"])
    work = env.app().tasks["ckt.plain_keyed"]  # max_retries=0
    holder = work.apply_async((["d"], 2.0), concurrency_key="d")
    wait_until(lambda: env.holders(env.names.key("d")) == [holder.id], 30, message="holder")
    waiter = work.apply_async((["d"], 0.0), concurrency_key="d", queue=special,
                              headers={"x-custom": "kept"})
    out = waiter.get(timeout=60)
    assert out["id"] == waiter.id
    assert out["retries"] == 0
    assert out["routing_key"] == special
    assert out["headers"]["x-custom"] == "kept"
    # the bookkeeping of its stay in line is gone once it runs: a retry would start afresh
    assert "ckeys_deferrals" not in out["headers"]
    deferred = [e for e in env.events("signal") if e["name"] == "run_deferred"]
    assert len(deferred) >= 3  # 2 s of holding, 0.3 s countdown
    assert all(e["task_id"] == waiter.id for e in deferred)


def test_max_retries_zero_completes_after_many_deferrals(env: Env) -> None:
    env.configure(ckeys_retry_countdown=0.1)
    env.workers(count=1, concurrency=2)
    work = env.app().tasks["ckt.plain_keyed"]
    holder = work.apply_async((["z"], 3.0), concurrency_key="z")
    wait_until(lambda: env.holders(env.names.key("z")) == [holder.id], 30, message="holder")
    waiter = work.apply_async((["z"], 0.0), concurrency_key="z")
    out = waiter.get(timeout=60)
    deferrals = [e for e in env.events("signal")
                 if e["name"] == "run_deferred" and e["task_id"] == waiter.id]
    assert len(deferrals) >= 10
    assert out["retries"] == 0


def test_a_deferred_run_that_runs_leaves_no_deferral_record(env: Env) -> None:
    """Admitted on an idle key after a countdown deferral, the run's record goes with it:
    status does not list a run that ran as deferred."""
    env.configure(ckeys_retry_countdown=0.2)
    env.workers(count=1, concurrency=2)
    app = env.app()
    work = app.tasks["ckt.plain_keyed"]
    holder = work.apply_async((["rec"], 1.0), concurrency_key="rec")
    wait_until(lambda: env.holders(env.names.key("rec")) == [holder.id], 30, message="holder")
    waiter = work.apply_async((["rec"], 0.0), concurrency_key="rec")
    wait_until(lambda: any(r.task_id == waiter.id for s in status(app) for r in s.deferred), 30,
               message="the waiter's deferral record")
    waiter.get(timeout=60)
    assert [r.task_id for s in status(app) for r in s.deferred] == []


def test_one_log_line_per_deferral_names_the_key_and_the_holder(env: Env) -> None:
    group_ = env.workers(count=1, concurrency=2)
    work = env.app().tasks["ckt.work"]
    holder = work.apply_async((["l"], 1.5), concurrency_key="log:key")
    wait_until(lambda: env.holders(env.names.key("log:key")) == [holder.id], 30, message="holder")
    waiter = work.apply_async((["l"], 0.0), concurrency_key="log:key")
    waiter.get(timeout=60)
    lines = [line for line in group_.log_text().splitlines()
             if f"run {waiter.id} of ckt.work deferred" in line]
    deferrals = [e for e in env.events("signal")
                 if e["name"] == "run_deferred" and e["task_id"] == waiter.id]
    assert lines and len(lines) == len(deferrals)
    assert all("key log:key" in line and f"held by {holder.id}" in line for line in lines)


def test_signals_report_acquired_deferred_and_released(env: Env) -> None:
    env.workers(count=1, concurrency=2)
    work = env.app().tasks["ckt.work"]
    holder = work.apply_async((["s"], 1.0), concurrency_key="sig")
    wait_until(lambda: env.holders(env.names.key("sig")) == [holder.id], 30, message="holder")
    waiter = work.apply_async((["s"], 0.0), concurrency_key="sig")
    waiter.get(timeout=60)
    by_name: dict[str, list[dict[str, object]]] = defaultdict(list)
    for e in env.events("signal"):
        by_name[e["name"]].append(e)
    assert {e["task_id"] for e in by_name["slots_acquired"]} == {holder.id, waiter.id}
    assert all(e["slots"] == ["key sig"] for e in by_name["slots_acquired"])
    assert by_name["run_deferred"][0]["holder"] == holder.id
    assert by_name["run_deferred"][0]["blocked_by"] == "key sig"
    assert {e["task_id"] for e in by_name["slots_released"]} == {holder.id, waiter.id}


def test_each_holder_of_a_key_gets_a_larger_fencing_token(env: Env) -> None:
    """self.request.ckeys_fence only ever grows per key, so a downstream store can refuse a
    write from a holder whose lease has run out (a newer holder has a larger token)."""
    env.workers(count=2, concurrency=2)
    work = env.app().tasks["ckt.work"]
    results = [work.apply_async((["fence"], 0.05), concurrency_key="fence") for _ in range(6)]
    outs = [r.get(timeout=60) for r in results]
    by_start = {e["id"]: i for i, e in enumerate(env.events("start"))}
    fences = [o["fence"] for o in sorted(outs, key=lambda o: by_start[o["id"]])]
    assert fences == sorted(fences) and len(set(fences)) == len(fences)
    # and it survives the key's state expiring: the token falls back to server time
    env.redis.delete(f"ckeys:{{{env.names.key('fence')}}}:m")
    later = work.apply_async((["fence"], 0.0), concurrency_key="fence").get(timeout=60)
    assert later["fence"] > fences[-1]
