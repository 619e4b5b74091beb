"""The app the benchmark workers run: the same no-op body as a plain and as a keyed task."""

from __future__ import annotations

import os

from celery import Celery

from celery_ckeys import KeyedTask

app = Celery("bench", broker=os.environ.get("BENCH_BROKER", "redis://127.0.0.1:6379/1"),
             backend=os.environ.get("BENCH_BROKER", "redis://127.0.0.1:6379/1"),
             set_as_current=False)
app.conf.update(
    ckeys_redis_url=os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/0"),
    ckeys_namespace=os.environ.get("BENCH_NS", "bench"),
    ckeys_deferral=os.environ.get("BENCH_DEFERRAL", "countdown"),
    ckeys_retry_countdown=float(os.environ.get("BENCH_COUNTDOWN", "10")),
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=int(os.environ.get("BENCH_PREFETCH", "4")),
    result_expires=3600,
)


@app.task(name="bench.plain", shared=False)
def plain(i: int) -> int:
    return i


@app.task(name="bench.keyed", base=KeyedTask, shared=False)
def keyed(i: int) -> int:
    return i
