"""Issue 13 on real workers: pause and resume, in both deferral modes."""

from __future__ import annotations

import pytest
from conftest import Env, wait_until

from celery_ckeys import limits
from celery_ckeys.introspect import status


@pytest.mark.parametrize("deferral", ["handoff", "countdown"])
def test_pause_holds_a_queue_and_resume_releases_it(env: Env, deferral: str) -> None:
    """While "pq" is paused its runs wait (parked, or deferred) and none starts, and `status`
    says so; once resumed they all run, never more than the limit at once. Another queue
    runs meanwhile."""
    env.configure(ckeys_deferral=deferral)
    env.workers(count=1, concurrency=4)
    app = env.app()
    work = app.tasks["ckt.work"]
    limits.pause(app, "pq")
    pq = {"name": "pq", "limit": 2}
    held = [work.apply_async((["pq:all"], 0.1), concurrency_queue=pq, concurrency_key="k")
            for _ in range(3)]

    def waiting() -> int:
        return sum(len(s.parked) + len(s.deferred) for s in status(app) if s.queue == "pq")

    wait_until(lambda: waiting() >= 3, timeout=60, message="the paused queue's runs wait")
    other = work.apply_async((["other"], 0.0), concurrency_queue={"name": "other", "limit": 1})
    other.get(timeout=60)
    assert env.max("pq:all") == 0, "a run of a paused queue started"
    paused = [s for s in status(app) if s.queue == "pq" and s.kind == "partition"]
    assert paused and all(s.paused for s in paused)
    assert limits.get_limits(app, "pq")["paused"] == {"queue": True, "keys": []}
    limits.resume(app, "pq")
    for r in held:
        r.get(timeout=60)
    assert env.max("pq:all") == 2
