"""SPEC 4.10: without the coordination Redis runs wait (fail closed); publishing needs only the broker."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import redis
from conftest import Env, wait_until


def test_runs_wait_while_redis_is_down_and_all_complete_when_it_returns(
        own_redis_env: Callable[..., Env]) -> None:
    env = own_redis_env()
    workers = env.workers(count=2, concurrency=2)
    app = env.app()
    work = app.tasks["ckt.work"]
    env.coordination.stop()
    # publishing needs only the broker
    results = [work.apply_async((["out", f"k{i % 3}"], 0.05), concurrency_key=f"k{i % 3}")
               for i in range(9)]
    # runs are deferred, with an error in the log, and none executes unguarded
    wait_until(lambda: workers.log_text().count("is unavailable") >= 9, 30,
               message="deferrals while Redis is down")
    assert all(r.state == "PENDING" for r in results)
    env.coordination.start()
    outs = [r.get(timeout=90) for r in results]
    assert all(o["slots"] == [f"key k{i % 3}"] for i, o in enumerate(outs))
    for i in range(3):
        assert env.max(f"k{i}") == 1
    assert "is unavailable" in workers.log_text()


def test_an_outage_right_after_admission_does_not_fail_the_run(
        own_redis_env: Callable[..., Env], tmp_path: Path) -> None:
    """The chaos run's lost run: admitted, then the coordination Redis went away before the
    body started (here: shut down by a hold observer at that instant). The gate's read of
    the fence for ``slots_acquired`` raised, and the run ended FAILURE without its body."""
    env = own_redis_env(appendonly=True)  # the hold outlives the restart: the release frees it
    flag = tmp_path / "outage-done"
    env.workers(count=1, concurrency=1, ckt_outage_after_hold=str(flag))
    app = env.app()
    result = app.tasks["ckt.chaos"].apply_async((["o1"], 0.0, "ok"), concurrency_key="o1")
    wait_until(flag.exists, 30, message="the outage right after the first hold")
    env.coordination.stop()  # reap the process the observer shut down
    env.coordination.start()
    assert result.get(timeout=60) == "ok"
    journal = redis.Redis.from_url(env.broker, decode_responses=True)
    starts = [e for e in map(json.loads, journal.lrange(f"journal:{env.namespace}", 0, -1))
              if e["ev"] == "start"]
    assert [e["id"] for e in starts] == [result.id]
    # the release that failed while Redis was down is retried, and the key comes free
    wait_until(lambda: env.holders(env.names.key("o1")) == [], 30, message="the key to come free")
