"""Prometheus metrics, from celery_ckeys's own signals.

``pip install celery-ckeys[metrics]`` and set ``ckeys_metrics = True``: every worker then
records the metrics below. Under the prefork pool, run the workers with
``PROMETHEUS_MULTIPROC_DIR`` set (prometheus-client's multiprocess mode) and expose them
from one process with a ``MultiProcessCollector``; with threads or solo, the default
registry works and ``prometheus_client.start_http_server`` exposes it.

``ckeys_acquisitions_total{task}``             runs that took their slots
``ckeys_deferrals_total{task,reason}``         runs deferred (``busy`` or ``unavailable``)
``ckeys_releases_total{reason}``               runs that gave their slots back
``ckeys_admission_wait_seconds{task}``         from a run's first deferral to taking its slots
``ckeys_wait_for_seconds{task,outcome}``       time runs spent blocked in ``wait_for``
``ckeys_slots_held``                           slots held right now by this process's runs
"""

from __future__ import annotations

from typing import Any

from .errors import ConfigurationError
from .signals import run_deferred, slots_acquired, slots_released, wait_finished

_enabled = False
_metrics: dict[str, Any] = {}


def enable() -> None:
    """Create the metrics and connect them to the signals (idempotent)."""
    global _enabled
    if _enabled:
        return
    try:
        from prometheus_client import Counter, Gauge, Histogram
    except ImportError:
        raise ConfigurationError(
            "ckeys_metrics needs prometheus-client: pip install 'celery-ckeys[metrics]'",
            setting="ckeys_metrics") from None
    buckets = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)
    _metrics.update(
        acquired=Counter("ckeys_acquisitions_total", "Runs that took their slots", ["task"]),
        deferred=Counter("ckeys_deferrals_total", "Runs deferred because a slot was busy or"
                         " Redis was unavailable", ["task", "reason"]),
        released=Counter("ckeys_releases_total", "Runs that gave their slots back", ["reason"]),
        admission_wait=Histogram("ckeys_admission_wait_seconds", "From a run's first deferral"
                                 " to taking its slots", ["task"], buckets=buckets),
        wait_for=Histogram("ckeys_wait_for_seconds", "Time runs spent blocked in wait_for",
                           ["task", "outcome"], buckets=buckets),
        held=Gauge("ckeys_slots_held", "Slots held by the runs of this process",
                   multiprocess_mode="livesum"),
    )
    slots_acquired.connect(_on_acquired, weak=False, dispatch_uid="celery_ckeys.metrics.acquired")
    run_deferred.connect(_on_deferred, weak=False, dispatch_uid="celery_ckeys.metrics.deferred")
    slots_released.connect(_on_released, weak=False, dispatch_uid="celery_ckeys.metrics.released")
    wait_finished.connect(_on_wait, weak=False, dispatch_uid="celery_ckeys.metrics.wait")
    _enabled = True


def _name(sender: Any) -> str:
    return str(getattr(sender, "name", None) or "unknown")


def _on_acquired(sender: Any = None, slots: Any = (), waited: float = 0.0, **_: Any) -> None:
    _metrics["acquired"].labels(_name(sender)).inc()
    _metrics["held"].inc(len(slots))
    if waited:
        _metrics["admission_wait"].labels(_name(sender)).observe(waited)


def _on_deferred(sender: Any = None, reason: str = "busy", **_: Any) -> None:
    _metrics["deferred"].labels(_name(sender), reason).inc()


def _on_released(sender: Any = None, slots: Any = (), reason: str = "finished", **_: Any) -> None:
    _metrics["released"].labels(reason).inc()
    if reason != "worker-lost":  # those were counted by the process that died
        _metrics["held"].dec(len(slots))


def _on_wait(sender: Any = None, seconds: float = 0.0, outcome: str = "done", **_: Any) -> None:
    _metrics["wait_for"].labels(_name(sender), outcome).observe(seconds)
