"""Worker-level settings that keyed tasks depend on.

A worker that prefetches keyed runs it cannot start hoards them: with
``ckeys_tune_worker`` (the default) keyed tasks acknowledge late and the worker
prefetches one message per process, and holds at most ``ckeys_eta_task_limit`` deferred
(ETA) messages in memory where Celery supports ``worker_eta_task_limit`` (5.6+).
Settings you chose yourself are kept; a conflicting one is logged.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery.signals import celeryd_init, worker_ready, worker_shutdown

from .naming import Names

logger = logging.getLogger("celery_ckeys.worker")

CELERY_DEFAULT_PREFETCH = 4


def _tune_enabled(app: Any) -> bool:
    value = app.conf.get("ckeys_tune_worker", True)
    return value is not False


def tune_task_class(cls: Any, app: Any) -> None:
    """Keyed tasks acknowledge late unless the task sets ``acks_late`` itself."""
    if _tune_enabled(app) and not getattr(cls, "_ckeys_explicit_acks_late", False):
        cls.acks_late = True


def _has_keyed_tasks(app: Any) -> bool:
    return any(getattr(task, "_ckeys_keyed", False) for task in app.tasks.values())


@celeryd_init.connect(weak=False, dispatch_uid="celery_ckeys.tune_worker")
def _tune_worker(sender: Any = None, instance: Any = None, conf: Any = None, **_: Any) -> None:
    app = getattr(instance, "app", None)
    if app is None or conf is None or not _has_keyed_tasks(app):
        return
    from .config import get_config
    from .errors import ConfigurationError

    try:
        config = get_config(app)  # every ckeys_* setting is checked before the worker starts
        if config.metrics:
            from .metrics import enable

            enable()
    except ConfigurationError as exc:
        logger.critical("celery_ckeys: %s", exc)
        # SystemExit passes through Celery's signal dispatch; an Exception would be swallowed
        raise SystemExit(f"celery_ckeys: {exc}") from None
    if not _tune_enabled(app):
        return
    multiplier = conf.get("worker_prefetch_multiplier", CELERY_DEFAULT_PREFETCH)
    if multiplier == CELERY_DEFAULT_PREFETCH:
        conf.worker_prefetch_multiplier = 1
        logger.info("celery_ckeys: worker_prefetch_multiplier set to 1 so that a worker does"
                    " not hoard keyed runs it cannot start (ckeys_tune_worker=False keeps"
                    " Celery's default)")
    elif multiplier != 1:
        logger.warning("celery_ckeys: worker_prefetch_multiplier=%s lets a worker hold keyed"
                       " runs it cannot start; 1 is recommended", multiplier)
    if "worker_eta_task_limit" in conf and conf.get("worker_eta_task_limit") is None \
            and config.eta_task_limit is not None:
        conf.worker_eta_task_limit = config.eta_task_limit


# -- the worker registry and the handoff sweeper, in each worker's main process --------
#
# Each worker's main process lists itself in Redis: the broker queues it consumes and how
# many processes (or threads) it runs, refreshed every few seconds with an expiry, so
# that a run blocked in wait_for can tell when every process that could run its child is
# itself blocked. The same thread sweeps the handoff lines every second.

REGISTRY_REFRESH = 5.0
SWEEP_INTERVAL = 1.0
REGISTRY_LIFETIME_MS = 20_000

_registry_threads: dict[str, threading.Event] = {}


def _worker_info(consumer: Any) -> dict[str, Any]:
    queues = [q.name for q in getattr(consumer.task_consumer, "queues", [])] \
        if getattr(consumer, "task_consumer", None) is not None else []
    pool = getattr(consumer, "pool", None)
    concurrency = getattr(pool, "num_processes", None) or getattr(consumer.controller, "concurrency", 1)
    return {"queues": queues, "concurrency": int(concurrency or 1), "pool": type(pool).__name__}


def _register(store: Any, hostname: str, info: dict[str, Any]) -> None:
    import json

    key = Names.redis_key(store.names.workers(), "reg")
    script = ("local t = redis.call('TIME'); local now = t[1] * 1000 + math.floor(t[2] / 1000);"
              " local info = cjson.decode(ARGV[2]); info['expires'] = now + tonumber(ARGV[3]);"
              " redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(info));"
              " redis.call('PEXPIRE', KEYS[1], ARGV[3])")
    store.guarded(lambda c: c.eval(script, 1, key, hostname, json.dumps(info), REGISTRY_LIFETIME_MS))


@worker_ready.connect(weak=False, dispatch_uid="celery_ckeys.worker_registry")
def _start_registry(sender: Any = None, **_: Any) -> None:
    app = getattr(sender, "app", None)
    if app is None or not _has_keyed_tasks(app):
        return
    from .errors import CoordinationUnavailable
    from .gate import store_of

    store = store_of(app)
    hostname = sender.hostname
    stop = threading.Event()
    _registry_threads[hostname] = stop

    def loop() -> None:
        registered = 0.0
        while not stop.is_set():
            try:
                if time.monotonic() - registered >= REGISTRY_REFRESH:
                    _register(store, hostname, _worker_info(sender))
                    registered = time.monotonic()
                sweep(store)
            except CoordinationUnavailable:
                pass
            except Exception:  # pragma: no cover - never kill the worker for this
                logger.exception("celery_ckeys: background sweep failed")
            stop.wait(SWEEP_INTERVAL)

    threading.Thread(target=loop, name="ckeys-registry", daemon=True).start()


def sweep(store: Any) -> None:
    """The handoff's safety net: see ``sweep.lua``. Every worker's main process runs it."""
    for tag, seen_due in store.due_lines():
        store.sweep_line(tag, seen_due)


@worker_shutdown.connect(weak=False, dispatch_uid="celery_ckeys.worker_registry_stop")
def _stop_registry(sender: Any = None, **_: Any) -> None:
    for hostname, stop in list(_registry_threads.items()):
        stop.set()
        _registry_threads.pop(hostname, None)
