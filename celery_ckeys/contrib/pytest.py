"""The ``ckeys`` pytest plugin: test keyed tasks against a real Redis, with pytest-celery.

Registered through the ``pytest11`` entry point as ``ckeys`` (``-p no:ckeys`` turns it
off). No fixture is autouse: a suite that asks for none of them sees no change.

- ``ckeys_redis_url`` (session):
  ``redis://127.0.0.1:PORT/0`` of a private redis-server on a free loopback port (the one
  on PATH, else the embedded one), stopped after everything that uses it. With
  ``CKEYS_TEST_REDIS_URL`` set, that server instead: never flushed, only the session's
  namespace is deleted at the end.
- ``ckeys_config`` (session):
  Celery settings that coordinate there (``ckeys_redis_url``, a namespace unique to the
  session, a short ``ckeys_retry_countdown``) and use it as broker and result backend;
  merge it into pytest-celery's ``celery_config``.
- ``ckeys_recorder`` (function):
  Every keyed run that starts during the test, in this process and in ``ckeys_workers``:
  ``peak(key=None, queue=None)``, ``runs(...)``, ``deferrals(...)``.
- ``ckeys_workers`` (function):
  ``ckeys_workers("proj.celery:app", count=2, pool="prefork", concurrency=2, **settings)``
  starts real ``celery worker`` subprocesses, waits until they answer a ping, shows their
  logs when the test fails and stops them at teardown (SIGTERM, then SIGKILL).

Also: ``ckeys_redis`` (session; the ``celery_ckeys.contrib.testing.SessionRedis``
behind the URL) and ``ckeys_redis_server_args`` (session; extra redis-server arguments,
override it to change them).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Generator, Iterator, Optional, Protocol, Sequence

import pytest

from .testing import (
    CeleryWorkers,
    Recorder,
    SessionRedis,
    install_recorder,
    open_session_redis,
    uninstall_recorder,
    wait_until,
)

__all__ = [
    "CeleryWorkers",
    "Recorder",
    "SessionRedis",
    "StartWorkers",
    "attach_worker_logs",
    "wait_until",
]

_WORKER_GROUPS = pytest.StashKey[list[CeleryWorkers]]()


def attach_worker_logs(node: pytest.Item, group: CeleryWorkers) -> None:
    """Show ``group``'s logs in the report of ``node`` if it fails."""
    node.stash.setdefault(_WORKER_GROUPS, []).append(group)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item,
                               call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed and report.when in ("setup", "call"):
        for group in item.stash.get(_WORKER_GROUPS, []):
            report.sections.append((f"celery workers ({group.app})", group.log_text(6000)))


@pytest.fixture(scope="session")
def ckeys_redis_server_args() -> list[str]:
    """Extra arguments for the private redis-server (``["--databases", "64"]``...)."""
    return []


@pytest.fixture(scope="session")
def ckeys_redis(ckeys_redis_server_args: list[str],
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[SessionRedis]:
    """The session's Redis: a private redis-server, or ``$CKEYS_TEST_REDIS_URL``."""
    directory = None
    if not os.environ.get("CKEYS_TEST_REDIS_URL"):
        directory = str(tmp_path_factory.mktemp("ckeys-redis"))
    session = open_session_redis(ckeys_redis_server_args, directory=directory)
    try:
        yield session
    finally:
        session.close()


@pytest.fixture(scope="session")
def ckeys_redis_url(ckeys_redis: SessionRedis) -> str:
    """``redis://127.0.0.1:PORT/N`` of the session's Redis."""
    return ckeys_redis.url


@pytest.fixture(scope="session")
def ckeys_config(ckeys_redis: SessionRedis) -> dict[str, Any]:
    """Celery settings to merge into ``celery_config``."""
    return ckeys_redis.settings()


@pytest.fixture(scope="session")
def _ckeys_recording(ckeys_redis: SessionRedis) -> Iterator[None]:
    """Records this process's keyed runs for the whole session, once a test asked."""
    install_recorder(ckeys_redis.url, ckeys_redis.recorder_key)
    try:
        yield
    finally:
        uninstall_recorder()


@pytest.fixture
def ckeys_recorder(ckeys_redis: SessionRedis, _ckeys_recording: None) -> Iterator[Recorder]:
    """The keyed runs of this test: ``peak()``, ``runs()``, ``deferrals()``."""
    recorder = Recorder(ckeys_redis.url, ckeys_redis.recorder_key)
    try:
        yield recorder
    finally:
        recorder.close()


class StartWorkers(Protocol):
    def __call__(self, app: str, count: int = 1, *, pool: str = "prefork", concurrency: int = 2,
                 queues: Sequence[str] = (), env: Optional[dict[str, str]] = None,
                 cwd: Optional[str] = None, extra_args: Sequence[str] = (),
                 timeout: float = 60.0, **settings: Any) -> CeleryWorkers: ...


@pytest.fixture
def ckeys_workers(ckeys_redis: SessionRedis, ckeys_config: dict[str, Any],
                  request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StartWorkers]:
    """Start real ``celery worker`` subprocesses: ``ckeys_workers(app, count, pool=...,
    concurrency=..., queues=..., **settings)``; ``app`` is what ``celery -A`` takes."""
    started: list[CeleryWorkers] = []

    def start(app: str, count: int = 1, *, pool: str = "prefork", concurrency: int = 2,
              queues: Sequence[str] = (), env: Optional[dict[str, str]] = None,
              cwd: Optional[str] = None, extra_args: Sequence[str] = (),
              timeout: float = 60.0, **settings: Any) -> CeleryWorkers:
        group = CeleryWorkers(
            app, count=count, pool=pool, concurrency=concurrency, queues=queues,
            settings={**ckeys_config, **settings}, env=env, cwd=cwd,
            log_dir=tmp_path / f"workers-{len(started)}", extra_args=extra_args,
            recorder=(ckeys_redis.url, ckeys_redis.recorder_key))
        started.append(group)
        if isinstance(request.node, pytest.Item):
            attach_worker_logs(request.node, group)
        return group.start(timeout)

    try:
        yield start
    finally:
        for group in started:
            group.stop()
