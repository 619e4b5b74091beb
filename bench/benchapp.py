"""The app the benchmark workers run; configured from the environment by ``common.World``.

The same no-op body as a plain task, a ``KeyedTask``, and on the peer packages' bases
(celery-once's ``QueueOnce``, celery-singleton's ``Singleton``) when they are installed;
plus a timed body that records when it starts and ends, for latency and makespan.
"""

from __future__ import annotations

import os
import time

import redis
from celery import Celery

from celery_ckeys import ConcurrencyQueue, KeyedTask

BROKER = os.environ.get("BENCH_BROKER", "redis://127.0.0.1:6379/1")
# empty: coordination on the broker's own Redis (the default configuration)
COORD = os.environ.get("BENCH_REDIS") or BROKER
ENV_LIMIT = os.environ.get("BENCH_ENV_LIMIT")

# results go to the broker's server, so a separate coordination server sees only celery_ckeys
app = Celery("bench", broker=BROKER, backend=BROKER, set_as_current=False)
app.conf.update(
    ckeys_redis_url=os.environ.get("BENCH_REDIS") or None,
    ckeys_environment_limit=int(ENV_LIMIT) if ENV_LIMIT else None,
    ckeys_namespace=os.environ.get("BENCH_NS", "bench"),
    ckeys_deferral=os.environ.get("BENCH_DEFERRAL", "countdown"),
    ckeys_retry_countdown=float(os.environ.get("BENCH_COUNTDOWN", "10")),
    broker_connection_retry_on_startup=True,
    result_expires=3600,
    ONCE={"backend": "celery_once.backends.Redis",
          "settings": {"url": COORD, "default_timeout": 3600}},
    singleton_backend_url=COORD,
)

_events = redis.Redis.from_url(COORD)


@app.task(name="bench.plain", shared=False)
def plain(i: int) -> int:
    return i


@app.task(name="bench.keyed", base=KeyedTask, shared=False)
def keyed(i: int) -> int:
    return i


# a queue partitioned per key, with a limit that never binds: the multi-slot admission
BENCH_QUEUE = ConcurrencyQueue("bench", limit=1_000_000)


@app.task(name="bench.queued", base=KeyedTask, shared=False, concurrency_queue=BENCH_QUEUE)
def queued(i: int) -> int:
    return i


@app.task(name="bench.timed", base=KeyedTask, shared=False)
def timed(label: str, seconds: float) -> None:
    start = time.time()
    time.sleep(seconds)
    _events.rpush(f"bench:events:{label}", f"{start} {time.time()}")


try:  # peers, for benchmark (b); only present with the [bench] extra
    import celery_once.backends.redis as once_redis
    from celery_once import QueueOnce

    once_redis.redis = None  # celery-once keeps one client per process: use this World's server

    @app.task(name="bench.once", base=QueueOnce, shared=False, once={"graceful": True})
    def once(i: int) -> int:
        return i
except ImportError:  # pragma: no cover
    once = None

try:
    import celery_singleton.backends as singleton_backends
    from celery_singleton import Singleton

    singleton_backends._backend = None  # cached per process too

    @app.task(name="bench.singleton", base=Singleton, shared=False)
    def singleton(i: int) -> int:
        return i
except ImportError:  # pragma: no cover
    singleton = None
