"""Chaos: runs over keys and limited queues while pool processes are SIGKILLed, a worker
restarts and the coordination Redis restarts (AOF on). A checker then proves from a journal
that no key overlapped, no limit was exceeded, every run executed at least once, and no
state was left behind.

CI runs a short version (``--chaos-runs``, default 600); ``make chaos`` runs 10,000 runs
over 1,000 keys and 5 limited queues on 2 workers of 4 processes.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from typing import Any, Callable

import pytest
import redis
from chaos_check import check, executions
from conftest import Env, Workers, wait_until

from celery_ckeys.naming import Names

QUEUE_LIMITS = {f"cq{i}": i for i in range(1, 6)}


class Chaos(threading.Thread):
    """SIGKILLs random pool processes all along; restarts the coordination Redis once 30% of
    the runs are done and a worker once 60% are, so that both happen mid-flight."""

    def __init__(self, env: Env, groups: list[Workers], progress: Callable[[], float],
                 kill_every: float = 0.4) -> None:
        super().__init__(daemon=True)
        self.env = env
        self.groups = groups
        self.progress = progress
        self.kill_every = kill_every
        self.stop_event = threading.Event()
        self.kills: dict[int, list[float]] = {}
        self.actions: list[str] = []
        self.rng = random.Random(1234)

    def run(self) -> None:
        last_kill = time.monotonic()
        redis_done = worker_done = False
        while not self.stop_event.wait(0.05):
            try:
                done = self.progress()
                if not redis_done and done >= 0.3:
                    redis_done = True
                    self.restart_redis()
                elif not worker_done and done >= 0.6:
                    worker_done = True
                    self.restart_worker()
                elif time.monotonic() - last_kill >= self.kill_every:
                    last_kill = time.monotonic()
                    self.kill_pool_process()
            except Exception as exc:  # keep the chaos going; the checker has the last word
                self.actions.append(f"error: {exc!r}")

    def kill_pool_process(self) -> None:
        group = self.rng.choice([g for g in self.groups if g.procs[0].poll() is None])
        pids = group.pool_pids(0)
        if not pids:
            return
        pid = self.rng.choice(pids)
        self.kills.setdefault(pid, []).append(time.time())
        try:
            os.kill(pid, signal.SIGKILL)
            self.actions.append(f"SIGKILL pool process {pid}")
        except ProcessLookupError:
            pass

    def restart_worker(self) -> None:
        group = self.groups[0]
        group.stop()  # warm shutdown: running bodies finish, reserved messages go back
        self.groups[0] = self.env.workers(count=1, concurrency=4)
        self.actions.append("restarted a worker")

    def restart_redis(self) -> None:
        self.env.coordination.stop()
        time.sleep(0.5)
        self.env.coordination.start()
        self.actions.append("restarted the coordination Redis (AOF)")


@pytest.mark.chaos
@pytest.mark.parametrize("deferral", ["handoff"])
def test_chaos(own_redis_env: Callable[..., Env], request: pytest.FixtureRequest, deferral: str) -> None:
    env = own_redis_env(appendonly=True)
    total = int(request.config.getoption("--chaos-runs"))
    keys = max(10, total // 10)
    env.configure(ckeys_deferral=deferral, ckeys_retry_countdown=1.0, ckeys_lock_ttl=10,
                  task_reject_on_worker_lost=True)
    journal = redis.Redis.from_url(env.broker, decode_responses=True)
    groups = [env.workers(count=1, concurrency=4), env.workers(count=1, concurrency=4)]
    app = env.app()
    chaos_task = app.tasks["ckt.chaos"]
    rng = random.Random(99)
    results = []
    for i in range(total):
        duration = rng.choice([0.0, 0.01, 0.03, 0.08])
        if i % 10 < 7:
            key = f"key{rng.randrange(keys)}"
            results.append(chaos_task.apply_async(([key], duration), concurrency_key=key))
        else:
            queue = rng.choice(list(QUEUE_LIMITS))
            results.append(chaos_task.apply_async(
                ([queue], duration), concurrency_queue={"name": queue, "limit": QUEUE_LIMITS[queue]}))
    expected = {r.id for r in results}
    journal_key = f"journal:{env.namespace}"
    finished: set[str] = set()
    read = [0]
    lock = threading.Lock()

    def ended() -> set[str]:
        with lock:
            fresh = journal.lrange(journal_key, read[0], -1)
            read[0] += len(fresh)
            finished.update(e["id"] for e in map(json.loads, fresh) if e["ev"] == "end")
            return set(finished)

    chaos = Chaos(env, groups, progress=lambda: len(ended()) / total)
    chaos.start()
    try:
        def progress_line() -> bool:
            left = expected - ended()
            if os.environ.get("CKT_CHAOS_VERBOSE"):
                print(f"{time.strftime('%H:%M:%S')} {len(left)} left; {chaos.actions[-3:]}", flush=True)
            return not left and bool(chaos.actions.count("restarted a worker"))

        try:
            wait_until(progress_line, 120 + total * 0.05, interval=0.5,
                       message=f"every one of {total} runs to complete")
        except AssertionError:
            print(where_are(env, sorted(expected - ended())[:10]))
            raise
    finally:
        chaos.stop_event.set()
        chaos.join(60)
    events = [json.loads(e) for e in journal.lrange(journal_key, 0, -1)]
    problems = check(events, chaos.kills, QUEUE_LIMITS, expected)
    killed = sum(1 for e in executions(events, chaos.kills) if e.killed)
    print(f"\n{total} runs, {len(events) // 2} executions, {killed} killed mid-body;"
          f" chaos: {len(chaos.actions)} actions: {sorted(set(a.split(' ')[0] for a in chaos.actions))}")
    assert not [a for a in chaos.actions if a.startswith("error")], chaos.actions
    assert "restarted the coordination Redis (AOF)" in chaos.actions
    assert "restarted a worker" in chaos.actions
    assert problems == []
    assert_no_state_left(env)


def where_are(env: Env, task_ids: list[str]) -> str:
    """Where runs that never completed are: in Redis lines, the broker, or nowhere."""
    client = env.redis
    broker = redis.Redis.from_url(env.broker, decode_responses=True)
    names = Names(env.namespace)
    report = []
    for task_id in task_ids:
        places = []
        for key in client.scan_iter(match=names.scan_pattern(), count=1000):
            kind = client.type(key)
            if (kind == "zset" and client.zscore(key, task_id) is not None) or \
                    (kind == "hash" and client.hexists(key, task_id)):
                places.append(key)
        for queue in ("celery",):
            if any(task_id in m for m in broker.lrange(queue, 0, -1)):
                places.append(f"broker queue {queue}")
        if any(task_id in m for m in broker.hvals("unacked")):
            places.append("broker unacked")
        events = [e for e in map(json.loads, broker.lrange(f"journal:{env.namespace}", 0, -1))
                  if e["id"] == task_id]
        report.append(f"{task_id}: {places or 'nowhere'}; journal {events}")
    logs = "\n".join(line for g in env.groups for line in g.log_text().splitlines()
                     if any(t in line for t in task_ids))
    return "\n".join(report) + "\n" + logs[-8000:]


def assert_no_state_left(env: Env) -> None:
    """No holder, waiter, reservation or parked run remains; whatever is left expires."""
    client = env.redis
    names = Names(env.namespace)
    live_roles = {"h", "w", "r", "p", "v", "pm"}

    def leftovers() -> list[str]:
        found = []
        for key in client.scan_iter(match=names.scan_pattern(), count=1000):
            role = key.rsplit(":", 1)[1]
            if role in live_roles and client.exists(key):
                found.append(key)
            elif role not in ("c", "reg") and client.ttl(key) == -1:
                found.append(f"{key} (no expiry)")
        return found

    try:
        wait_until(lambda: not leftovers(), 60, interval=0.5, message="no state to be left behind")
    except AssertionError:
        left = leftovers()
        detail = {k: (client.type(k.split(" ")[0]), client.ttl(k.split(" ")[0])) for k in left[:10]}
        raise AssertionError(f"state left behind: {detail}") from None


def test_the_checker_finds_overlaps_lost_runs_and_excess() -> None:
    def ev(kind: str, task_id: str, pid: int, t: float, label: str = "k") -> dict[str, Any]:
        return {"ev": kind, "id": task_id, "pid": pid, "t": t, "labels": [label]}

    clean = [ev("start", "a", 1, 0.0), ev("end", "a", 1, 1.0), ev("start", "b", 2, 1.0),
             ev("end", "b", 2, 2.0)]
    assert check(clean, {}, {}, ["a", "b"]) == []
    overlap = [ev("start", "a", 1, 0.0), ev("end", "a", 1, 1.0), ev("start", "b", 2, 0.5),
               ev("end", "b", 2, 2.0)]
    assert "2 executions at once (limit 1)" in check(overlap, {}, {}, ["a", "b"])[0]
    # a killed execution ends at the kill; its redelivery completes it
    killed = [ev("start", "a", 1, 0.0), ev("start", "b", 2, 0.6), ev("end", "b", 2, 0.7),
              ev("start", "a", 3, 0.8), ev("end", "a", 3, 0.9)]
    assert check(killed, {1: [0.5]}, {}, ["a", "b"]) == []
    assert "2 executions at once" in check(killed, {1: [0.65]}, {}, ["a", "b"])[0]
    assert "never completed" in check(killed[:3], {1: [0.5]}, {}, ["a", "b"])[0]
    queue = [ev("start", x, i, 0.1 * i, "q") for i, x in enumerate("abc")] + \
        [ev("end", x, i, 1.0, "q") for i, x in enumerate("abc")]
    assert check(queue, {}, {"q": 3}, "abc") == []
    assert "3 executions at once (limit 2)" in check(queue, {}, {"q": 2}, "abc")[0]
