"""Prometheus metrics, recorded by the gate where each event happens.

``pip install celery-ckeys[metrics]`` and set ``ckeys_metrics = True``: every worker then
records the metrics below. Under the prefork pool, run the workers with
``PROMETHEUS_MULTIPROC_DIR`` set (prometheus-client's multiprocess mode) and expose them
from one process with a ``MultiProcessCollector``; with threads or solo, the default
registry works and ``prometheus_client.start_http_server`` exposes it.

- ``ckeys_acquisitions_total{task}``: runs that took their slots
- ``ckeys_deferrals_total{task,reason}``: runs deferred (``busy``, ``rate``, ``paused``,
  ``unavailable``)
- ``ckeys_releases_total{reason}``: runs that gave their slots back
- ``ckeys_policy_decisions_total{task,decision}``: conflict policies applied (``skipped``,
  ``cancelled``, ``replaced``)
- ``ckeys_admission_wait_seconds{task}``: from a run's first deferral to taking its slots
- ``ckeys_wait_for_seconds{task,outcome}``: time runs spent blocked in ``wait_for``
- ``ckeys_slots_held``: slots held right now by this process's runs

The gate calls these functions directly rather than through celery_ckeys's signals, so
that recording metrics never makes a run fetch what only a signal receiver needs (its
fencing token).
"""

from __future__ import annotations

from typing import Any

from .errors import ConfigurationError

_metrics: dict[str, Any] = {}


def enable() -> None:
    """Create the metrics (idempotent)."""
    if _metrics:
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
        decided=Counter("ckeys_policy_decisions_total", "Conflict policies applied",
                        ["task", "decision"]),
        admission_wait=Histogram("ckeys_admission_wait_seconds", "From a run's first deferral"
                                 " to taking its slots", ["task"], buckets=buckets),
        wait_for=Histogram("ckeys_wait_for_seconds", "Time runs spent blocked in wait_for",
                           ["task", "outcome"], buckets=buckets),
        held=Gauge("ckeys_slots_held", "Slots held by the runs of this process",
                   multiprocess_mode="livesum"),
    )


def _name(task: Any) -> str:
    return str(getattr(task, "name", None) or "unknown")


def acquired(task: Any, slots: int, waited: float) -> None:
    if _metrics:
        _metrics["acquired"].labels(_name(task)).inc()
        _metrics["held"].inc(slots)
        if waited:
            _metrics["admission_wait"].labels(_name(task)).observe(waited)


def deferred(task: Any, reason: str) -> None:
    if _metrics:
        _metrics["deferred"].labels(_name(task), reason).inc()


def decided(task: Any, decision: str) -> None:
    if _metrics:
        _metrics["decided"].labels(_name(task), decision).inc()


def released(slots: int, reason: str) -> None:
    if _metrics:
        _metrics["released"].labels(reason).inc()
        if reason != "worker-lost":  # those were counted by the process that died
            _metrics["held"].dec(slots)


def waited_for(task: Any, seconds: float, outcome: str) -> None:
    if _metrics:
        _metrics["wait_for"].labels(_name(task), outcome).observe(seconds)
