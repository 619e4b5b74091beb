"""Test rig, on the ``ckeys`` pytest plugin (celery_ckeys.contrib.pytest): its private
redis-server, its ``celery worker`` subprocesses and its ``wait_until``.

* ``redis_server``: the plugin's private redis-server, with enough databases for each test
  to get its own broker.
* ``env``: one test's world: its broker database, ckeys namespace, producer app, probe
  and the workers it starts, all stopped when the test ends.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import kombu.pools
import pytest
import redis

from celery_ckeys.contrib.pytest import CeleryWorkers, SessionRedis, attach_worker_logs, wait_until
from celery_ckeys.embedded import RedisServer
from celery_ckeys.naming import Names

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))

import workerapp  # noqa: E402

__all__ = ["TESTS", "Env", "Workers", "seed_holder", "wait_until"]

_db_numbers = itertools.count(1)
#: a shared broker outlives the session: a queue named as a test of an earlier session
#: (killed, or stopped with messages left) would hand its messages to this one's workers
_SESSION = os.urandom(3).hex()

#: ``CKEYS_TEST_BROKER=amqp://guest@127.0.0.1//`` runs the worker tests on that broker
#: (RabbitMQ, say), each test on a queue of its own; results and coordination stay on the
#: private redis-server. Unset: the broker is a database of that redis-server.
TEST_BROKER = os.environ.get("CKEYS_TEST_BROKER") or None


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


@pytest.fixture(autouse=True)
def _close_new_stores() -> Iterator[None]:
    """Close the stores a test made. Each test has a namespace of its own, so each makes a
    Store that the process-wide registry would keep open, two connections apiece: some
    1,500 clients on the shared redis-server by the end of the suite otherwise."""
    from celery_ckeys import store as store_module

    before = set(store_module._stores)
    yield
    for config in set(store_module._stores) - before:
        store_module._stores.pop(config).close()


@pytest.fixture(scope="session")
def ckeys_redis_server_args() -> list[str]:
    return ["--databases", "4096"]


@pytest.fixture(scope="session")
def redis_server(ckeys_redis: SessionRedis) -> RedisServer:
    if ckeys_redis.server is None:
        pytest.exit("the project's suite needs a private redis-server: unset CKEYS_TEST_REDIS_URL")
    return ckeys_redis.server


class Workers(CeleryWorkers):
    """A group of ``celery worker`` subprocesses serving one test's app (``workerapp``)."""

    def __init__(self, env: Env, count: int, concurrency: int, pool: str,
                 conf: dict[str, Any], extra_args: list[str],
                 extra_env: Optional[dict[str, str]] = None) -> None:
        super().__init__("workerapp", count=count, pool=pool, concurrency=concurrency,
                         env={**env.worker_environ(conf), **(extra_env or {})}, cwd=TESTS,
                         log_dir=env.tmp, extra_args=extra_args, ping_app=env.app(), host="ckt")
        self.env = env
        self.start()

    def stop(self, *, kill: bool = False, timeout: float = 60.0) -> None:
        """Warm shutdown (SIGTERM to the main process: running tasks finish), or SIGKILL all."""
        super().stop(kill=kill, timeout=timeout)


class Env:
    def __init__(self, server: RedisServer, tmp: Path, test_name: str,
                 coordination: Optional[RedisServer] = None, redis_url: Optional[str] = None) -> None:
        self.server = server
        self.tmp = tmp
        self.db = next(_db_numbers)
        slug = re.sub(r"[^A-Za-z0-9]+", "-", test_name)[:40]
        self.namespace = f"t{self.db}-{slug}"
        self.backend = f"{server.url}/{self.db}"
        self.broker = TEST_BROKER or self.backend
        self.coordination = coordination or server
        self._redis_url = redis_url
        # a shared broker: the workers of one test must not take another test's messages
        self.conf: dict[str, Any] = (
            {"task_default_queue": f"{self.namespace}-{_SESSION}"} if TEST_BROKER else {})
        self._apps: list[Any] = []
        self.groups: list[Workers] = []
        #: the test whose report shows the workers' logs when it fails
        self.node: Optional[pytest.Item] = None

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
            "CKT_BROKER": self.broker, "CKT_BACKEND": self.backend, "CKT_REDIS": self.redis_url,
            "CKT_NS": self.namespace, "CKT_CONF": json.dumps({**self.conf, **conf}),
            "CKT_PROBE": self.probe_url,
            "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        }

    def app(self, **conf: Any) -> Any:
        app = workerapp.make_app(self.broker, self.backend, self.redis_url, self.namespace,
                                 {**self.conf, **conf}, probe_url=self.probe_url)
        self._apps.append(app)
        return app

    def workers(self, count: int = 2, concurrency: int = 4, pool: str = "prefork",
                extra_args: Optional[list[str]] = None, extra_env: Optional[dict[str, str]] = None,
                **conf: Any) -> Workers:
        group = Workers(self, count, concurrency, pool, conf, extra_args or [], extra_env)
        self.groups.append(group)
        if self.node is not None:
            attach_worker_logs(self.node, group)
        return group

    # -- observation ------------------------------------------------------------
    @functools.cached_property
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

    def running(self, label: str) -> int:
        """How many runs with ``label`` are in their bodies now."""
        return int(self.redis.hget(f"probe:{self.namespace}:cur", label) or 0)

    def log(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.redis.lrange(f"probe:{self.namespace}:log", 0, -1)]

    def open_gate(self, gate: str) -> None:
        """Let every ``ckt.hold_until`` run waiting on ``gate`` end."""
        self.redis.set(f"probe:{self.namespace}:open:{gate}", 1)

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

    def broker_length(self) -> int:
        """Messages waiting in the broker for this test's workers, on any broker."""
        queue = self.conf.get("task_default_queue", "celery")
        with self.app().connection_for_write() as conn:
            try:
                return int(conn.default_channel.queue_declare(queue, passive=True).message_count)
            except conn.channel_errors:  # no such queue: nothing was ever published to it
                return 0

    def close(self) -> None:
        for group in self.groups:
            group.stop(kill=True)
        if TEST_BROKER and self._apps:  # the broker outlives the test: so would its queue
            with self._apps[0].connection_for_write() as conn:
                conn.default_channel.queue_delete(self.conf["task_default_queue"])
        # app.close() only drops the app's pools: their sockets, and the result backend's,
        # would stay open to the shared redis-server until the process ends
        for app in self._apps:
            if app._pool is not None:
                app._pool.force_close_all()
            backend = getattr(app._local, "backend", None)
            if backend is not None and "client" in backend.__dict__:
                backend.result_consumer.stop()
                backend.client.connection_pool.disconnect()
            app.close()
        if TEST_BROKER:
            # kombu keeps one pool per broker URL for all apps: the one closed above would
            # be handed, closed, to the next test's app
            kombu.pools.reset()
        if "redis" in self.__dict__:
            self.redis.close()


@pytest.fixture
def env(redis_server: RedisServer, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Env]:
    world = Env(redis_server, tmp_path, request.node.name)
    if isinstance(request.node, pytest.Item):
        world.node = request.node
    yield world
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
        if isinstance(request.node, pytest.Item):
            world.node = request.node
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
