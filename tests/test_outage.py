"""SPEC 4.10: without the coordination Redis runs wait (fail closed); publishing needs only the broker."""

from __future__ import annotations

from typing import Callable

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
