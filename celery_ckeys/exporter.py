"""``celery ckeys exporter``: per-slot gauges for Prometheus, read from Redis alone.

The workers' own metrics (``ckeys_metrics = True``, ``celery_ckeys.metrics``) count what
happens in each process; these gauges say what *is*, per queue, partition, total, key and
the environment, from one process that reads the coordination Redis like ``celery ckeys
status``: no metrics need to run in the workers. ``pip install 'celery-ckeys[metrics]'``.

- ``ckeys_slot_running{kind,queue,key,slot}``: runs holding a unit of the slot
- ``ckeys_slot_limit{...}``: its limit now (0 while paused or throttled)
- ``ckeys_slot_paused{...}``: 1 while paused
- ``ckeys_slot_parked{...}``: runs waiting in its line (handoff)
- ``ckeys_slot_deferred{...}``: runs deferred by the countdown on it
- ``ckeys_slot_waiting{...}``: runs blocked in (or resuming from) wait_for
- ``ckeys_slot_oldest_wait_seconds{...}``: the longest a waiting run has waited

A partition's key is a label: with very many tenants, scrape less often or drop the label
with a relabelling rule. docs/grafana/celery-ckeys.json is a dashboard over these and the
workers' metrics.
"""

from __future__ import annotations

import threading
from typing import Any, Iterator

from .errors import ConfigurationError

#: Every gauge the exporter serves, with its help text (one place: the test of the Grafana
#: dashboard checks each query against these and the workers' metrics).
GAUGES = {
    "ckeys_slot_running": "Runs holding a unit of the slot",
    "ckeys_slot_limit": "The slot's limit now (0 while paused or throttled)",
    "ckeys_slot_paused": "1 while the slot's queue or partition is paused",
    "ckeys_slot_parked": "Runs waiting in the slot's line (handoff)",
    "ckeys_slot_deferred": "Runs deferred on the slot by the countdown",
    "ckeys_slot_waiting": "Runs blocked in, or resuming from, wait_for on the slot",
    "ckeys_slot_oldest_wait_seconds": "The longest any run has waited for the slot",
}
LABELS = ("kind", "queue", "key", "slot")


class SlotCollector:
    """A prometheus-client collector: one ``status`` read of Redis per scrape."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        from .introspect import status

        families = {name: GaugeMetricFamily(name, text, labels=LABELS)
                    for name, text in GAUGES.items()}
        for s in status(self.app):
            labels = [s.kind, s.queue or "", s.key or "", s.label]
            values = {
                "ckeys_slot_running": len(s.holders),
                "ckeys_slot_limit": s.limit,
                "ckeys_slot_paused": int(s.paused),
                "ckeys_slot_parked": len(s.parked),
                "ckeys_slot_deferred": len(s.deferred),
                "ckeys_slot_waiting": len(s.waiting),
                "ckeys_slot_oldest_wait_seconds": s.oldest_wait_seconds or 0.0,
            }
            for name, value in values.items():
                if value is not None:
                    families[name].add_metric(labels, float(value))
        yield from families.values()


def registry(app: Any) -> Any:
    """A registry holding only the slot gauges of ``app``'s namespace."""
    try:
        from prometheus_client import CollectorRegistry
    except ImportError:
        raise ConfigurationError(
            "celery ckeys exporter needs prometheus-client: pip install 'celery-ckeys[metrics]'",
            setting="ckeys_metrics") from None
    found = CollectorRegistry(auto_describe=False)
    found.register(SlotCollector(app))
    return found


def serve_forever(app: Any, port: int, address: str = "127.0.0.1") -> None:
    """Serve the gauges on ``http://address:port/metrics`` with prometheus-client's own HTTP
    server (a daemon thread), until the process is stopped."""
    from prometheus_client import start_http_server

    start_http_server(port, addr=address, registry=registry(app))
    threading.Event().wait()
