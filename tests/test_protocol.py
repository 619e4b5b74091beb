"""Celery's lifecycle events against the protocol (docs/protocol.md), on real workers.

One test per symptom of issue 10 and per finding of its review: each fails on the
protocol before v2.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any, Callable

import pytest
from celery.worker.request import Request
from conftest import Env, wait_until

from celery_ckeys.config import get_config
from celery_ckeys.naming import Names, memo_role
from celery_ckeys.store import store_for

HANDOFF = {"ckeys_deferral": "handoff", "ckeys_retry_countdown": 1.0}


def parked(env: Env, tag: str) -> list[str]:
    return list(env.redis.zrange(f"ckeys:{{{tag}}}:p", 0, -1))


def starts(env: Env, task_id: str) -> list[dict[str, Any]]:
    return [e for e in env.events("start") if e["id"] == task_id]


def hold_then(env: Env, key: str, seconds: float) -> Any:
    """A run that holds ``key`` for ``seconds``, started and holding when this returns."""
    holder = env.app().tasks["ckt.work"].apply_async(([f"holder:{key}"], seconds),
                                                     concurrency_key=key)
    wait_until(lambda: env.holders(env.names.key(key)) == [holder.id], 30, message="the holder")
    return holder


def park(env: Env, key: str, make: Callable[[], Any]) -> Any:
    before = len(parked(env, env.names.key(key)))
    result = make()
    wait_until(lambda: len(parked(env, env.names.key(key))) == before + 1, 30,
               message=f"{result.id} to park")
    return result


def woken_run(env: Env, key: str, task: str, duration: float = 0.0,
              held_for: float = 0.5) -> Any:
    """A run of ``task`` on ``key`` that parks behind a holder of ``held_for`` seconds, and so
    runs as a copy woken from the line (it carries a ticket)."""
    hold_then(env, key, held_for)
    return park(env, key, lambda: env.app().tasks[task].apply_async(
        ([key], duration), concurrency_key=key))


# -- the symptoms ---------------------------------------------------------------------

@pytest.mark.parametrize("task", ["ckt.end", "ckt.autoretry"])
def test_a_woken_run_that_retries_completes(env: Env, task: str) -> None:
    """Symptom 1: self.retry() (or autoretry_for) after a wake was dropped as a duplicate."""
    env.configure(**HANDOFF)
    env.workers(count=1, concurrency=3)
    app = env.app()
    hold_then(env, "rt", 1.0)
    args = ("retry", ["rt"]) if task == "ckt.end" else (["rt"],)
    run = park(env, "rt", lambda: app.tasks[task].apply_async(args, concurrency_key="rt"))
    out = run.get(timeout=30)
    assert out in ("retried", {"retries": 1})
    assert [e.get("retries") for e in starts(env, run.id) if "retries" in e] in ([], [0, 1])


@pytest.mark.parametrize("how", ["revoked", "expired"])
def test_a_parked_run_that_celery_discards_frees_its_place(env: Env, how: str) -> None:
    """Symptom 2: a revoked or expired parked run kept its woken reservation for ever."""
    env.configure(**HANDOFF)
    env.workers(count=1, concurrency=3)
    app = env.app()
    work = app.tasks["ckt.work"]
    holder = hold_then(env, "rv", 2.0)
    options: dict[str, Any] = {"expires": 1.0} if how == "expired" else {}
    doomed = park(env, "rv", lambda: work.apply_async((["rv"], 0.0), concurrency_key="rv",
                                                      **options))
    if how == "revoked":
        app.control.revoke(doomed.id)
    after = park(env, "rv", lambda: work.apply_async((["rv-after"], 0.0), concurrency_key="rv"))
    holder.get(timeout=30)
    # the next in line runs at once (not after a claim window, and not never)
    after.get(timeout=15)
    wait_until(lambda: doomed.state == "REVOKED", 15, message="the discarded run to be REVOKED")
    assert starts(env, doomed.id) == []
    wait_until(lambda: env.holders(env.names.key("rv")) == [], 15, message="the key to be free")
    assert work.apply_async((["rv-later"], 0.0), concurrency_key="rv").get(timeout=15)


@pytest.mark.parametrize("new_limit", [3, None])
def test_a_limit_changed_while_runs_are_parked_strands_nobody(env: Env, new_limit: Any) -> None:
    """Symptom 3: `limits set Q N` moved the parked runs' slots; they were re-published and
    dropped for ever."""
    env.configure(**HANDOFF)
    env.workers(count=1, concurrency=4)
    app = env.app()
    store = store_for(get_config(app))
    store.set_queue_limit("lc", 1)
    work = app.tasks["ckt.work"]
    first = work.apply_async((["lc"], 1.5), concurrency_queue="lc")
    wait_until(lambda: env.holders(env.names.queue("lc")) == [first.id], 30, message="holder")
    waiting = [work.apply_async((["lc"], 0.3), concurrency_queue="lc") for _ in range(4)]
    wait_until(lambda: len(parked(env, env.names.queue("lc"))) == 4, 30, message="four parked")
    store.set_queue_limit("lc", new_limit)
    for r in [first, *waiting]:
        r.get(timeout=30)
    assert all(len(starts(env, r.id)) == 1 for r in [first, *waiting]), "a run ran twice"
    if new_limit is not None:
        assert env.max("lc") <= new_limit


def test_a_copy_deferred_by_a_countdown_worker_still_runs_once(env: Env) -> None:
    """Finding 1: a woken copy that got a countdown deferral (a countdown worker beside
    handoff ones) kept its woken entry, and the run executed twice."""
    env.workers(count=1, concurrency=2, **HANDOFF)
    env.workers(count=1, concurrency=2, ckeys_deferral="countdown", ckeys_retry_countdown=0.3)
    work = env.app().tasks["ckt.work"]
    results = [work.apply_async(([f"mx{i % 3}"], 0.1), concurrency_key=f"mx{i % 3}")
               for i in range(24)]
    for r in results:
        r.get(timeout=90)
    assert all(len(starts(env, r.id)) == 1 for r in results), "a run executed twice"
    assert all(env.max(f"mx{i}") == 1 for i in range(3))


def test_a_woken_run_whose_process_dies_runs_again(env: Env) -> None:
    """Finding 2: a claim was forgotten while its run still held; the redelivered copy of a
    woken run whose process died was then dropped: lost."""
    env.configure(task_reject_on_worker_lost=True, **HANDOFF)
    env.workers(count=1, concurrency=3)
    run = woken_run(env, "kd", "ckt.kill_once", 0.1, held_for=1.0)
    assert run.get(timeout=60) == "survived"
    assert len(starts(env, run.id)) == 2  # killed once mid-body, then ran to the end


@pytest.mark.parametrize("reject_on_lost", [True, False])
def test_a_woken_run_whose_process_dies_before_its_result_is_stored(env: Env,
                                                                   reject_on_lost: bool) -> None:
    """The body ended and left its memo; the process died before Celery stored the result.
    With task_reject_on_worker_lost the message comes back and must run again (its memo was
    the dead process's): dropped as a duplicate, its result stayed PENDING for ever (seen
    in the chaos run). Without it, Celery stores the WorkerLostError and the run is over."""
    env.configure(task_reject_on_worker_lost=reject_on_lost, **HANDOFF)
    env.workers(count=1, concurrency=3)
    run = woken_run(env, "dr", "ckt.dies_before_its_result")
    if reject_on_lost:
        assert run.get(timeout=60)["id"] == run.id
        assert len(starts(env, run.id)) == 2  # ran to the end, lost its result, ran again
    else:
        wait_until(lambda: run.state == "FAILURE", 60, message="the WorkerLostError stored")
        assert len(starts(env, run.id)) == 1


@pytest.mark.skipif(not hasattr(Request, "_success_was_stored"),
                    reason="this Celery requeues a lost run even when its result is stored")
def test_a_woken_run_whose_process_dies_after_its_result_keeps_its_memo(env: Env) -> None:
    """Review finding: the memo went whenever a lost process's message was to be requeued,
    but Celery acks instead when the result was stored already (the process died in
    task_postrun); a stale copy of the finished stay then ran it again."""
    env.configure(task_reject_on_worker_lost=True, **HANDOFF)
    group = env.workers(count=1, concurrency=3)
    app = env.app()
    run = woken_run(env, "da", "ckt.dies_after_its_result")
    run.get(timeout=60)
    wait_until(lambda: "succeeded before the worker was lost" in worker_logs(group), 60,
               message="Celery to see the process lost after the result")
    home = env.names.key("da")
    memo = env.redis.get(Names.redis_key(home, memo_role(run.id)))
    assert memo and memo.startswith("done:"), "the memo of a stay whose result is stored went"
    # a stale woken copy of the same stay turns up (a wake it lost its claim window on)
    stale = {"concurrency_key": "da", "ckeys_ticket": [memo[len("done:"):], home, 0, None]}
    app.send_task("ckt.dies_after_its_result", (["da"], 0.0), task_id=run.id, headers=stale)
    wait_until(lambda: worker_logs(group).count(f"dies_after_its_result[{run.id}] received") == 2,
               60, message="the stale copy delivered")
    wait_until(lambda: f"dies_after_its_result[{run.id}] ignored" in worker_logs(group)
               or len(starts(env, run.id)) > 1, 60, message="the stale copy handled")
    assert len(starts(env, run.id)) == 1, "a stay whose result was stored ran again"


def worker_logs(group: Any) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted(group.log_dir.glob("*.log")))


def test_a_parent_keeps_its_priority_when_redis_forgets_its_scripts(env: Env) -> None:
    """Finding 4: the NOSCRIPT fallback could run step-out's release before its wait entry,
    and the parent lost its place ahead of runs that had not started."""
    env.workers(count=2, concurrency=4)
    app = env.app()
    family = {"concurrency_queue": {"name": "nsf", "limit": 1}}
    parent = app.tasks["ckt.parent"].apply_async((["nsf"], ["kid"], {}), {"child_duration": 1.5},
                                                 **family)
    wait_until(lambda: any(e["ev"] == "wait" and e["id"] == parent.id for e in env.log()), 30,
               message="the parent to wait")
    env.coord().script_flush()
    others = [app.tasks["ckt.work"].apply_async((["nsf"], 0.5), **family) for _ in range(2)]
    parent.get(timeout=60)
    for r in others:
        r.get(timeout=60)
    resumed = next(i for i, e in enumerate(env.log()) if e.get("ev") == "resumed")
    late = [i for i, e in enumerate(env.log()) if e.get("ev") == "start"
            and e["id"] in {r.id for r in others} and e["id"] != parent.id]
    # runs that got in while the parent waited may exist; none starts once the child ended
    # and before the parent resumed
    child_end = max(i for i, e in enumerate(env.log()) if e.get("ev") == "end"
                    and e.get("labels") == ["kid"])
    assert not [i for i in late if child_end < i < resumed]


def test_a_hard_time_limit_frees_the_key_only_once_the_body_is_dead(env: Env) -> None:
    """Finding 5: the main process freed the slots before billiard killed the process, and
    the next body started while the old one still ran."""
    env.workers(count=1, concurrency=2)
    app = env.app()
    doomed = app.tasks["ckt.hard_limit_beating"].apply_async((["hl"],), concurrency_key="hl")
    wait_until(lambda: env.events("alive"), 30, message="the doomed body to run")
    follower = app.tasks["ckt.work"].apply_async((["hl-next"], 0.0), concurrency_key="hl")
    follower.get(timeout=30)
    from celery.exceptions import TimeLimitExceeded
    with pytest.raises(TimeLimitExceeded):
        doomed.get(timeout=10)
    last_beat = max(e["t"] for e in env.events("alive") if e["id"] == doomed.id)
    started = starts(env, follower.id)[0]
    assert started["t"] > last_beat, "the next run started while the killed body still ran"


def test_a_stale_copy_never_renews_or_releases_a_newer_copys_key(env: Env) -> None:
    """Finding 6: renew and release by task id let a stale copy whose lease lapsed renew and
    then release the lease of a newer copy of the same task id."""
    env.configure(ckeys_lock_ttl=2)
    workers = env.workers(count=1, concurrency=3)
    work = env.app().tasks["ckt.work"]
    first = work.apply_async((["st"], 10.0), concurrency_key="st")
    wait_until(lambda: starts(env, first.id), 30, message="the first copy to start")
    pid = starts(env, first.id)[0]["pid"]
    os.kill(pid, signal.SIGSTOP)  # it stalls past its lease
    try:
        wait_until(lambda: env.holders(env.names.key("st")) == [], 15, message="the lease to lapse")
        # a newer copy of the same task id (a redelivery) takes the key and runs 3 s
        work.apply_async((["st"], 3.0), concurrency_key="st", task_id=first.id)
        wait_until(lambda: len(starts(env, first.id)) == 2, 30, message="the newer copy to run")
    finally:
        os.kill(pid, signal.SIGCONT)
    third = work.apply_async((["st-third"], 0.0), concurrency_key="st")
    third.get(timeout=30)
    first.get(timeout=30)  # the stale copy ran on to its end
    newer_end = max(e["t"] for e in env.log() if e.get("ev") == "end" and e["id"] == first.id)
    assert starts(env, third.id)[0]["t"] >= newer_end, \
        "the stale copy released the newer copy's key"
    assert "lost 1 of its 1 slot(s)" in workers.log_text()


def test_a_child_that_retries_does_not_block_its_own_retry(env: Env) -> None:
    """Finding 7: a waited-on child that raised Retry marked its parent ready anyway, and
    the parent's reservation then blocked the child's retry for a whole lease (300 s)."""
    env.workers(count=2, concurrency=4)
    family = {"concurrency_queue": {"name": "cr", "limit": 1}}
    out = env.app().tasks["ckt.parent"].apply_async(
        (["cr"], ["cr"], family), {"child_how": "retry", "child_duration": 0.1},
        **family).get(timeout=30)
    assert out["child"]["slots"] == ["queue cr"]


def test_a_limit_that_comes_and_goes_never_runs_two_of_one_key(env: Env) -> None:
    """Finding 8: with the limit flipping between none and 1, runs of one key split between
    the key mutex and the partition, and two ran at once."""
    env.workers(count=2, concurrency=3)
    app = env.app()
    store = store_for(get_config(app))
    stop = threading.Event()

    def flip() -> None:
        limit: Any = None
        while not stop.wait(0.03):
            limit = None if limit else 1
            store.set_queue_limit("flip", limit)
    flipper = threading.Thread(target=flip, daemon=True)
    flipper.start()
    try:
        results = [app.tasks["ckt.work"].apply_async((["flip:k"], 0.05), concurrency_queue="flip",
                                                     concurrency_key="k") for _ in range(24)]
        for r in results:
            r.get(timeout=90)
    finally:
        stop.set()
        flipper.join()
    assert env.max("flip:k") == 1


def test_a_forked_child_never_releases_its_parents_key(env: Env) -> None:
    """Finding 9: a task body that forks, and whose child leaves through an exception,
    released the parent's slots from the child."""
    env.workers(count=1, concurrency=3)
    app = env.app()
    forker = app.tasks["ckt.forker"].apply_async((["fk"], 1.5), concurrency_key="fk")
    wait_until(lambda: [e for e in env.log() if e.get("ev") == "forked"], 30,
               message="the forked child to have left")
    assert env.holders(env.names.key("fk")) == [forker.id]
    follower = app.tasks["ckt.work"].apply_async((["fk-next"], 0.0), concurrency_key="fk")
    follower.get(timeout=30)
    assert forker.get(timeout=30) == "parent done"
    forker_end = max(e["t"] for e in env.log() if e.get("ev") == "end" and e["id"] == forker.id)
    assert starts(env, follower.id)[0]["t"] >= forker_end


# -- the second review (2026-12-01) -------------------------------------------------

@pytest.mark.parametrize("pool", ["threads"])
def test_a_second_copy_in_the_same_process_never_frees_the_running_copys_key(env: Env, pool: str) -> None:
    """With the threads (or gevent, eventlet) pool, a second copy of a run that executes in
    the same process (a redelivery, a re-woken copy) was deferred, and its gate's finally then
    released the units of the copy still running: the next run of the key ran beside it."""
    env.workers(count=1, concurrency=4, pool=pool)
    work = env.app().tasks["ckt.work"]
    first = work.apply_async((["dup-k"], 1.5), concurrency_key="dup-k")
    wait_until(lambda: env.holders(env.names.key("dup-k")) == [first.id], 30, message="the first copy")
    work.apply_async((["dup-k"], 1.5), concurrency_key="dup-k", task_id=first.id)  # a second copy
    wait_until(lambda: env.events("signal") and any(
        e.get("name") == "run_deferred" and e.get("task_id") == first.id for e in env.events("signal")),
        30, message="the second copy to be deferred")
    other = work.apply_async((["dup-k"], 0.0), concurrency_key="dup-k")
    other.get(timeout=60)
    assert env.max("dup-k") == 1


def test_a_woken_run_that_retries_later_than_its_copy_life_still_runs(env: Env) -> None:
    """F2: what a woken copy publishes (a retry, a park at a later slot) inherited the
    copy's own expiry (ckeys_handoff_copy_ttl after the wake) as the run's: Celery then
    discarded the retry as expired, and the run, which had no expires, never ran again."""
    env.configure(**HANDOFF, ckeys_handoff_copy_ttl=10)
    env.workers(count=1, concurrency=3)
    app = env.app()
    hold_then(env, "late", 1.0)
    run = park(env, "late", lambda: app.tasks["ckt.retry_later"].apply_async(
        (["late"], 11.0), concurrency_key="late"))
    assert run.get(timeout=60) == {"retries": 1}


def test_a_woken_run_that_rejects_with_requeue_runs_again(env: Env) -> None:
    """F3: Reject(requeue=True) from a woken copy's body left the memo of its stay, so the
    requeued message, the same copy, was dropped as a duplicate and never ran again."""
    env.configure(**HANDOFF)
    env.workers(count=1, concurrency=3)
    app = env.app()
    hold_then(env, "rq", 1.0)
    run = park(env, "rq", lambda: app.tasks["ckt.end"].apply_async(
        ("requeue_once", ["rq"]), concurrency_key="rq"))
    assert run.get(timeout=60) == "requeued"
    assert len([e for e in env.events("body") if e["id"] == run.id]) == 2
