"""Worker-level settings that keyed tasks depend on.

A worker that prefetches keyed runs it cannot start hoards them: with
``ckeys_tune_worker`` (the default) keyed tasks acknowledge late and the worker
prefetches one message per process, and holds at most ``ckeys_eta_task_limit`` deferred
(ETA) messages in memory where Celery supports ``worker_eta_task_limit`` (5.6+).
Settings you chose yourself are kept; a conflicting one is logged.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from types import SimpleNamespace
from typing import Any, Callable, Optional

from celery.signals import (
    celeryd_init,
    task_rejected,
    task_revoked,
    task_unknown,
    worker_init,
    worker_ready,
    worker_shutdown,
)

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
        instance.ckeys_tuned_prefetch = True  # for _tune_prefetch, below
        logger.info("celery_ckeys: worker_prefetch_multiplier set to 1 so that a worker does"
                    " not hoard keyed runs it cannot start (ckeys_tune_worker=False keeps"
                    " Celery's default)")
    elif multiplier != 1:
        logger.warning("celery_ckeys: worker_prefetch_multiplier=%s lets a worker hold keyed"
                       " runs it cannot start; 1 is recommended", multiplier)
    if "worker_eta_task_limit" in conf and conf.get("worker_eta_task_limit") is None \
            and config.eta_task_limit is not None:
        conf.worker_eta_task_limit = config.eta_task_limit


# -- the worker's main process: registry, sweeper, and runs Celery drops or loses --------
#
# Each worker's main process lists itself in Redis: the broker queues it consumes and how
# many processes (or threads) it runs, refreshed every few seconds with an expiry, so
# that a run blocked in wait_for can tell when every process that could run its child is
# itself blocked. The same thread sweeps the handoff lines that are due, every second.

REGISTRY_REFRESH = 5.0
SWEEP_INTERVAL = 1.0
REGISTRY_LIFETIME_MS = 20_000

class _Registration:
    """One host name's entry in the registry, and the thread that keeps it fresh. Several
    in-thread test workers of one process share a host name (their runs report the machine's
    name): the entry then lists what they consume and run together."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.members: dict[int, Any] = {}  # id(worker or consumer) -> its consumer
        self.changed = True  # members came or went: register again at once

    def info(self) -> dict[str, Any]:
        parts = [_worker_info(c) for c in list(self.members.values())]
        queues = sorted({q for part in parts for q in part["queues"]})
        return {"queues": queues, "concurrency": sum(part["concurrency"] for part in parts),
                "pool": parts[0]["pool"] if parts else ""}


_registry: dict[str, _Registration] = {}


def _worker_info(consumer: Any) -> dict[str, Any]:
    queues = [q.name for q in getattr(consumer.task_consumer, "queues", [])] \
        if getattr(consumer, "task_consumer", None) is not None else []
    pool = getattr(consumer, "pool", None)
    concurrency = getattr(pool, "num_processes", None) or getattr(consumer.controller, "concurrency", 1)
    return {"queues": queues, "concurrency": int(concurrency or 1), "pool": type(pool).__name__}


@worker_ready.connect(weak=False, dispatch_uid="celery_ckeys.worker_registry")
def _start_registry(sender: Any = None, hostname: Optional[str] = None, member: Any = None,
                    **_: Any) -> None:
    """``hostname``: the name its runs report as ``request.hostname`` (the node name);
    ``member``: what stands for this worker when it stops (default: the consumer)."""
    app = getattr(sender, "app", None)
    if app is None or not _has_keyed_tasks(app):
        return
    from .errors import CoordinationUnavailable
    from .gate import store_of

    store = store_of(app)
    hostname = hostname or sender.hostname
    registration = _registry.get(hostname)
    if registration is not None:
        registration.members[id(member if member is not None else sender)] = sender
        registration.changed = True
        return
    registration = _registry[hostname] = _Registration()
    registration.members[id(member if member is not None else sender)] = sender

    def loop() -> None:
        registered = 0.0
        while not registration.stop.is_set():
            try:
                if registration.changed or time.monotonic() - registered >= REGISTRY_REFRESH:
                    registration.changed = False
                    store.register_worker(hostname, registration.info(), REGISTRY_LIFETIME_MS)
                    registered = time.monotonic()
                sweep(store)
            except CoordinationUnavailable:
                pass
            except Exception:  # pragma: no cover - never kill the worker for this
                logger.exception("celery_ckeys: background sweep failed")
            registration.stop.wait(SWEEP_INTERVAL)

    threading.Thread(target=loop, name="ckeys-registry", daemon=True).start()


def sweep(store: Any) -> None:
    """The handoff's safety net: see ``sweep.lua``. Every worker's main process runs it."""
    from .admission import slot_for_tag

    for tag, seen_due in store.due_lines():
        slot = slot_for_tag(store.config, store.names, tag)
        if slot is not None:
            store.sweep(slot, seen_due)


@worker_shutdown.connect(weak=False, dispatch_uid="celery_ckeys.worker_registry_stop")
def _stop_registry(sender: Any = None, member: Any = None, **_: Any) -> None:
    """The worker ``sender`` stops (only ``member`` of its host name's entry, when given)."""
    hostname = getattr(sender, "hostname", None)
    for name, registration in list(_registry.items()):
        if hostname is not None and name != hostname:
            continue
        if member is not None:
            registration.members.pop(id(member), None)
            if registration.members:
                registration.changed = True
                continue  # another in-thread worker of this process still runs
        registration.stop.set()
        _registry.pop(name, None)


# celery.contrib.testing's in-thread workers (pytest-celery's ``celery_session_worker`` and
# ``start_worker``) never send ``worker_ready``: they announce themselves with signals of
# their own, which this connects to once such a worker is created.

@worker_init.connect(weak=False, dispatch_uid="celery_ckeys.tune_prefetch")
def _tune_prefetch(sender: Any = None, **_: Any) -> None:
    """Make the multiplier _tune_worker chose the worker's own. ``celery worker`` reads the
    setting into its ``--prefetch-multiplier`` option before celeryd_init is sent, and the
    option wins over the setting; the consumer is built after worker_init from this value."""
    if getattr(sender, "ckeys_tuned_prefetch", False) \
            and sender.prefetch_multiplier == CELERY_DEFAULT_PREFETCH:
        sender.prefetch_multiplier = 1


@worker_init.connect(weak=False, dispatch_uid="celery_ckeys.embedded_worker")
def _on_worker_init(sender: Any = None, **_: Any) -> None:
    testing = sys.modules.get("celery.contrib.testing.worker")
    if testing is None or not isinstance(sender, testing.TestWorkController):
        return
    testing.test_worker_started.connect(_on_test_worker_started, weak=False,
                                        dispatch_uid="celery_ckeys.embedded_worker_started")
    testing.test_worker_stopped.connect(_on_test_worker_stopped, weak=False,
                                        dispatch_uid="celery_ckeys.embedded_worker_stopped")


def _run_hostname(app: Any) -> str:
    """The ``request.hostname`` of runs in an in-thread worker: Celery sets it to the node
    name only in workers started by ``celery worker``, else to the machine's name."""
    from celery.app import trace

    localized = getattr(trace, "_localized", None)
    if getattr(app, "use_fast_trace_task", False) and localized and len(localized) == 3:
        return str(localized[2])
    from celery.utils.nodenames import gethostname

    return str(gethostname())


def _on_test_worker_started(sender: Any = None, worker: Any = None, consumer: Any = None,
                            **_: Any) -> None:
    if consumer is not None:
        _start_registry(sender=consumer, hostname=_run_hostname(consumer.app), member=worker)


def _on_test_worker_stopped(sender: Any = None, worker: Any = None, **_: Any) -> None:
    if worker is not None:
        _stop_registry(sender=SimpleNamespace(hostname=_run_hostname(worker.app)), member=worker)


class _Reaper:
    """Calls a function once a process has exited (not merely been told to)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: list[tuple[int, float, Callable[[], None]]] = []
        self._thread: Optional[threading.Thread] = None

    def after_exit(self, pid: int, fn: Callable[[], None], give_up_after: float) -> None:
        with self._lock:
            self._waiting.append((pid, time.monotonic() + give_up_after, fn))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="ckeys-reaper", daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._lock:
                if not self._waiting:
                    self._thread = None
                    return
                waiting = list(self._waiting)
            now = time.monotonic()
            for item in waiting:
                pid, deadline, fn = item
                gone = not _alive(pid)
                if gone or now > deadline:
                    with self._lock:
                        self._waiting.remove(item)
                    if gone:
                        try:
                            fn()
                        except Exception:  # pragma: no cover - never kill the worker for this
                            logger.exception("celery_ckeys: release after process exit failed")
            time.sleep(0.02)


def _alive(pid: int) -> bool:
    """True while ``pid`` still runs code (a zombie, exited but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc: alive until billiard reaps it
    return state not in ("Z", "X")


_reaper = _Reaper()


def after_exit(pid: int, fn: Callable[[], None]) -> None:
    """Run ``fn`` in the worker's main process once pool process ``pid`` has exited. A
    process that outlives the lease is left to it (its units expire by then anyway)."""
    _reaper.after_exit(pid, fn, give_up_after=1800.0)


# Copies that Celery discards without running them give back what they reserved at once.

@task_revoked.connect(weak=False, dispatch_uid="celery_ckeys.revoked")
def _on_revoked(sender: Any = None, request: Any = None, expired: bool = False, **_: Any) -> None:
    if not getattr(sender, "_ckeys_keyed", False) or request is None:
        return
    from . import gate

    headers = gate.headers_of(request)
    if expired and gate.expires_by_us(headers):
        # only this copy was too old: its run waits in Redis and is woken again, unless its
        # stay is gone from there (it claimed, then its host died and its lease ran out)
        gate.copy_expired(sender, request, headers)
        return
    gate.forfeit(sender, request.id, headers, request.args, request.kwargs,
                 "expired" if expired else "revoked")


@task_unknown.connect(weak=False, dispatch_uid="celery_ckeys.unknown")
def _on_unknown(sender: Any = None, message: Any = None, name: Any = None, id: Any = None,
                **_: Any) -> None:
    _forfeit_message(sender, message, "unknown")


@task_rejected.connect(weak=False, dispatch_uid="celery_ckeys.rejected")
def _on_rejected(sender: Any = None, message: Any = None, **_: Any) -> None:
    _forfeit_message(sender, message, "rejected")


def _forfeit_message(consumer: Any, message: Any, why: str) -> None:
    """A message no task of this worker could take: if it is a copy woken from a line, the
    unit reserved for it goes to the next run."""
    from types import SimpleNamespace

    from . import gate
    from .publish import HEADER_TICKET

    app = getattr(consumer, "app", None)
    headers = dict(getattr(message, "headers", None) or {})
    if app is None or HEADER_TICKET not in headers or not _has_keyed_tasks(app):
        return
    name, task_id = headers.get("task"), headers.get("id")
    if not isinstance(name, str) or not isinstance(task_id, str):
        return
    stand_in = SimpleNamespace(name=name, app=app, concurrency_key=None, _ckeys_queue=None)
    gate.forfeit(stand_in, task_id, headers, (), {}, why)
