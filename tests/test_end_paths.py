"""SPEC 4.2: a key comes free on every way a run can end, within seconds, not after the lease.

The lease here is the default 300 s, so a key that came free in seconds was released,
not expired. Each test then shows the key is usable by running another run with it.
"""

from __future__ import annotations

import pytest
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from celery.exceptions import WorkerLostError as CeleryWorkerLost
from conftest import Env, wait_until

FREE_WITHIN = 10.0  # seconds; the lease is 300


@pytest.fixture(scope="module")
def world(module_env: Env) -> Env:
    module_env.workers(count=1, concurrency=3)
    return module_env


def body_ran(env: Env, task_id: str) -> bool:
    return any(e.get("id") == task_id for e in env.events("body"))


def assert_key_comes_free(env: Env, key: str) -> None:
    tag = env.names.key(key)
    wait_until(lambda: env.holders(tag) == [], FREE_WITHIN, message=f"key {key} to come free")
    # and the next run with that key executes
    follow = env.app().tasks["ckt.work"].apply_async(([f"after:{key}"], 0.0), concurrency_key=key)
    assert follow.get(timeout=FREE_WITHIN)["slots"] == [f"key {key}"]


def run_end(env: Env, how: str, key: str) -> object:
    return env.app().tasks["ckt.end"].apply_async((how, [key]), concurrency_key=key)


def test_success_releases_the_key(world: Env) -> None:
    assert run_end(world, "ok", "end:ok").get(timeout=30) == "ok"
    assert_key_comes_free(world, "end:ok")


def test_exception_releases_the_key(world: Env) -> None:
    with pytest.raises(RuntimeError):
        run_end(world, "raise", "end:raise").get(timeout=30)
    assert_key_comes_free(world, "end:raise")


def test_self_retry_releases_and_retakes_the_key(world: Env) -> None:
    result = run_end(world, "retry", "end:retry")
    assert result.get(timeout=30) == "retried"
    bodies = [e for e in world.events("body") if e["id"] == result.id]
    assert [b["retries"] for b in bodies] == [0, 1]
    assert_key_comes_free(world, "end:retry")


def test_reject_releases_the_key(world: Env) -> None:
    result = run_end(world, "reject", "end:reject")
    wait_until(lambda: body_ran(world, result.id), 30, message="the body")
    assert_key_comes_free(world, "end:reject")


def test_ignore_releases_the_key(world: Env) -> None:
    result = run_end(world, "ignore", "end:ignore")
    wait_until(lambda: body_ran(world, result.id), 30, message="the body")
    assert_key_comes_free(world, "end:ignore")


def test_soft_time_limit_releases_the_key(world: Env) -> None:
    result = world.app().tasks["ckt.soft_limit"].apply_async((["end:soft"],), concurrency_key="end:soft")
    with pytest.raises(SoftTimeLimitExceeded):
        result.get(timeout=30)
    assert_key_comes_free(world, "end:soft")


def test_hard_time_limit_releases_the_key(world: Env) -> None:
    result = world.app().tasks["ckt.hard_limit"].apply_async((["end:hard"],), concurrency_key="end:hard")
    with pytest.raises(TimeLimitExceeded):
        result.get(timeout=30)
    assert_key_comes_free(world, "end:hard")


def test_revoke_with_terminate_releases_the_key(world: Env) -> None:
    app = world.app()
    result = run_end(world, "sleep", "end:revoke")
    wait_until(lambda: body_ran(world, result.id), 30, message="the body")
    assert world.holders(world.names.key("end:revoke")) == [result.id]
    app.control.revoke(result.id, terminate=True)
    assert_key_comes_free(world, "end:revoke")


def test_sigkill_of_the_pool_process_releases_the_key_from_the_main_process(world: Env) -> None:
    result = run_end(world, "sigkill", "end:sigkill")
    with pytest.raises(CeleryWorkerLost):
        result.get(timeout=30)
    assert_key_comes_free(world, "end:sigkill")
    assert f"of run {result.id} of ckt.end after its pool process ended" in world.groups[0].log_text()


def test_sigterm_of_the_pool_process_releases_the_key(world: Env) -> None:
    result = run_end(world, "sigterm", "end:sigterm")
    wait_until(lambda: body_ran(world, result.id), 30, message="the body")
    assert_key_comes_free(world, "end:sigterm")
