"""What enqueueing carries to the worker, and the worker registry, on pytest-celery's
in-thread session worker (``celery_session_worker``, threads pool): glue that needs a
worker but not a separate process. The app is pytest-celery's ``celery_session_app`` with
the test tasks of ``workerapp`` registered on it and the ``ckeys`` plugin's settings."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Iterator

import pytest
import workerapp
from celery import Celery, chain, group

from celery_ckeys.config import get_config
from celery_ckeys.contrib.pytest import SessionRedis, wait_until
from celery_ckeys.store import store_for
from celery_ckeys.worker import _run_hostname


@pytest.fixture(scope="session")
def celery_config(ckeys_config: dict[str, Any]) -> dict[str, Any]:
    return {**ckeys_config, "result_expires": 3600}


@pytest.fixture(scope="session")
def celery_worker_pool() -> str:
    return "threads"


@pytest.fixture(scope="session")
def celery_worker_parameters() -> dict[str, Any]:
    return {"concurrency": 4}


@pytest.fixture(scope="session")
def probe(ckeys_redis: SessionRedis) -> workerapp.Probe:
    return workerapp.Probe(ckeys_redis.url, ckeys_redis.namespace)


@pytest.fixture(scope="session")
def celery_session_app(celery_session_app: Celery, probe: workerapp.Probe) -> Celery:
    workerapp.register(celery_session_app, probe)
    return celery_session_app


@pytest.fixture
def app(celery_session_app: Celery, celery_session_worker: Any) -> Iterator[Celery]:
    yield celery_session_app


def peak(probe: workerapp.Probe, label: str) -> int:
    return int(probe.client.hget(f"{probe.prefix}:max", label) or 0)


def test_every_way_of_enqueueing_carries_the_key_in_the_header(app: Celery) -> None:
    work = app.tasks["ckt.work"]
    seen = {
        "apply_async": work.apply_async((["a"],), concurrency_key="k:apply"),
        "set": work.s(["b"]).set(concurrency_key="k:set").apply_async(),
        "send_task_header": app.send_task("ckt.work", (["c"],), headers={"concurrency_key": "k:hdr"}),
        "send_task_option": app.send_task("ckt.work", (["d"],), concurrency_key="k:opt"),
    }
    expected = {"apply_async": "k:apply", "set": "k:set", "send_task_header": "k:hdr",
                "send_task_option": "k:opt"}
    for form, result in seen.items():
        out = result.get(timeout=30)
        assert out["headers"]["concurrency_key"] == expected[form], form
        assert out["slots"] == [f"key {expected[form]}"], form


def test_group_children_keep_their_own_keys_or_take_the_groups(app: Celery,
                                                              probe: workerapp.Probe) -> None:
    work = app.tasks["ckt.work"]
    own = group(work.s([f"g{i}"]).set(concurrency_key=f"g:{i}") for i in range(3)).apply_async()
    assert sorted(o["headers"]["concurrency_key"] for o in own.get(timeout=30)) == ["g:0", "g:1", "g:2"]
    shared = group(work.s([f"h{i}", "h-all"], 0.1) for i in range(3)).apply_async(concurrency_key="g:all")
    outs = shared.get(timeout=60)
    assert {o["headers"]["concurrency_key"] for o in outs} == {"g:all"}
    assert peak(probe, "h-all") == 1  # one key for the whole group: one at a time


def test_chain_links_each_keep_their_own_key(app: Celery) -> None:
    plain = app.tasks["ckt.work"]
    # each link ignores its parent's return value (immutable signatures)
    flow = chain(plain.si(["c1"]).set(concurrency_key="chain:1"),
                 plain.si(["c2"]).set(concurrency_key="chain:2"),
                 plain.si(["c3"]))
    last = flow.apply_async()
    assert not (last.get(timeout=60)["headers"] or {}).get("concurrency_key")  # the third: none
    assert last.parent.get(timeout=5)["headers"]["concurrency_key"] == "chain:2"
    assert last.parent.parent.get(timeout=5)["headers"]["concurrency_key"] == "chain:1"


def test_default_key_from_a_template_over_the_arguments(app: Celery, probe: workerapp.Probe) -> None:
    templated = app.tasks["ckt.templated"]
    results = [templated.apply_async(("cid_1",), {"duration": 0.2}) for _ in range(3)]
    results += [templated.apply_async(("cid_2",), {"duration": 0.2})]
    outs = [r.get(timeout=60) for r in results]
    assert outs[0]["headers"]["concurrency_key"] == "contact:cid_1"
    assert outs[3]["headers"]["concurrency_key"] == "contact:cid_2"
    assert peak(probe, "contact:cid_1") == 1


def test_default_key_from_a_callable(app: Celery) -> None:
    out = app.tasks["ckt.by_callable"].apply_async(("x", "y")).get(timeout=30)
    assert out["headers"]["concurrency_key"] == "pair:x-y"


def test_a_key_given_when_triggered_wins_over_the_default(app: Celery) -> None:
    out = app.tasks["ckt.templated"].apply_async(("cid_9",), concurrency_key="override").get(timeout=30)
    assert out["slots"] == ["key override"]


def test_default_key_is_computed_on_the_worker_for_send_task_by_name(app: Celery) -> None:
    out = app.send_task("ckt.templated", ("cid_7",)).get(timeout=30)
    assert out["slots"] == ["key contact:cid_7"]


def test_two_in_thread_workers_of_one_process_add_up_in_the_registry(app: Celery) -> None:
    """Their runs report one host name; the registry entry (what WaitStarvation counts)
    holds both workers' threads, and only the one that stops leaves it.

    The second worker is announced with the signals Celery's in-thread test worker sends
    (``test_worker_started`` / ``test_worker_stopped``), for a stand-in of 3 threads: two real
    in-thread workers cannot share a process cleanly, since Celery stops one through
    process-global state (``celery.worker.state.should_terminate``) that the other sees too."""
    from celery.contrib.testing.worker import test_worker_started, test_worker_stopped

    store = store_for(get_config(app))
    host = _run_hostname(app)

    def concurrency() -> int:
        workers = store.registry()[1]
        return int(workers.get(host, {}).get("concurrency", 0))

    assert wait_until(lambda: concurrency() == 4, 15, message="the session worker's entry")
    second = SimpleNamespace(app=app)
    consumer = SimpleNamespace(app=app, task_consumer=None, pool=SimpleNamespace(num_processes=3),
                               controller=SimpleNamespace(concurrency=3))
    test_worker_started.send(sender=app, worker=second, consumer=consumer)
    try:
        wait_until(lambda: concurrency() == 7, 15, message="both workers in one entry")
    finally:
        test_worker_stopped.send(sender=app, worker=second)
    wait_until(lambda: concurrency() == 4, 15, message="the session worker's entry alone")


def test_a_runs_release_overlaps_the_result_store_and_its_reply_is_read_after_it(
        app: Celery) -> None:
    """The run's end on its key sends the release before Celery stores the result and reads
    its reply after (one round trip fewer on the run's path): ``slots_released``, sent once
    the reply is in, sees the result stored; the key is free by the time the result is
    visible; no reply is left unread in the worker's threads."""
    from celery.result import AsyncResult

    from celery_ckeys import gate
    from celery_ckeys.signals import slots_released

    seen: dict[str, str] = {}

    def on_released(sender: Any = None, task_id: str = "", **_: Any) -> None:
        seen[task_id] = AsyncResult(task_id, app=app).state

    slots_released.connect(on_released, weak=False)
    try:
        work = app.tasks["ckt.work"]
        results = [work.apply_async(([f"o{i}"],), concurrency_key=f"overlap:{i}") for i in range(4)]
        for r in results:
            r.get(timeout=30)
        store = store_for(get_config(app))
        for i in range(4):
            assert store.holders_of(store.names.key(f"overlap:{i}")) == []
        wait_until(lambda: len(seen) == 4, timeout=10, message="slots_released not sent")
        assert seen == {r.id: "SUCCESS" for r in results}
        assert not gate._releasing
    finally:
        slots_released.disconnect(on_released)


def test_a_delivery_the_gate_ends_ends_with_an_ignore_two_frames_deep(
        app: Celery, monkeypatch: pytest.MonkeyPatch) -> None:
    """Celery builds an ExceptionInfo of every Ignore twice, formats it and pickles it to the
    main process, at a cost per frame of its traceback (over a millisecond on Python 3.11),
    and every parked, deferred or dropped copy ends with one: the gate's is raised from
    ``KeyedTask.__call__``, right under Celery's own frame; so is a body's own ``Ignore``,
    which still stores nothing."""
    import json

    from celery_ckeys.admission import RunSpec, plan_for
    from celery_ckeys.task import KeyedRequest

    seen: dict[str, Any] = {}
    original = KeyedRequest.on_failure

    def spy(self: Any, exc_info: Any, *args: Any, **kwargs: Any) -> Any:
        seen[self.id] = exc_info
        return original(self, exc_info, *args, **kwargs)

    monkeypatch.setattr(KeyedRequest, "on_failure", spy)
    store = store_for(get_config(app))
    plan = plan_for(store.config, RunSpec(task_name="ckt.work", key="shallow"))
    assert plan is not None
    holder = json.dumps(["outside", "host", 1, "n0", "", "ckt.work", 0, []])
    assert store.acquire(plan.slots, "outside", holder).ok
    try:
        skipped = app.tasks["ckt.work"].apply_async((["s"],), concurrency_key="shallow",
                                                   concurrency_policy="skip")
        ignored = app.tasks["ckt.end"].apply_async(("ignore", ["i"]))
        wait_until(lambda: skipped.id in seen and ignored.id in seen, timeout=20,
                   message="the deliveries did not end")
    finally:
        store.release(plan.slots, "outside", holder)
    assert skipped.state == "REVOKED"  # stored by the skip policy itself
    assert ignored.state == "PENDING"
    for result in (skipped, ignored):
        end = seen[result.id]
        assert type(getattr(end.exception, "exc", end.exception)).__name__ == "Ignore"
        assert end.traceback.count('  File "') == 2, end.traceback
        assert "celery_ckeys/task.py" in end.traceback.replace("\\", "/")
