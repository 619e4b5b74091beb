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

from celery_ckeys import KeyedTask

BROKER = os.environ.get("BENCH_BROKER", "redis://127.0.0.1:6379/1")
COORD = os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/0")

# results go to the broker's server, so the coordination server sees only celery_ckeys
app = Celery("bench", broker=BROKER, backend=BROKER, set_as_current=False)
app.conf.update(
    ckeys_redis_url=COORD,
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


@app.task(name="bench.timed", base=KeyedTask, shared=False)
def timed(label: str, seconds: float) -> None:
    start = time.time()
    time.sleep(seconds)
    _events.rpush(f"bench:events:{label}", f"{start} {time.time()}")


try:  # peers, for benchmark (f); only present with the [bench] extra
    from celery_once import QueueOnce

    @app.task(name="bench.once", base=QueueOnce, shared=False, once={"graceful": True})
    def once(i: int) -> int:
        return i
except ImportError:  # pragma: no cover
    once = None

try:
    from celery_singleton import Singleton

    @app.task(name="bench.singleton", base=Singleton, shared=False)
    def singleton(i: int) -> int:
        return i
except ImportError:  # pragma: no cover
    singleton = None
