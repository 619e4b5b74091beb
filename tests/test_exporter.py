"""Issue 14 (part): the exporter's gauges, scraped over HTTP from a real `celery ckeys
exporter` process and parsed by prometheus-client's own parser; the Grafana dashboard's
queries name only metrics that exist."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import TESTS, Env, wait_until

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from celery_ckeys import limits  # noqa: E402
from celery_ckeys.exporter import GAUGES  # noqa: E402

DASHBOARD = TESTS.parent / "docs" / "grafana" / "celery-ckeys.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(url: str) -> dict[str, list[Any]]:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def test_the_exporter_serves_each_slots_gauges(env: Env) -> None:
    env.configure(ckeys_deferral="handoff")
    env.workers(count=1, concurrency=2)
    app = env.app()
    holder = app.tasks["ckt.hold_until"].apply_async((["exp:holder"], "exp"),
                                                      concurrency_queue={"name": "eq", "limit": 1},
                                                      concurrency_key="acme")
    wait_until(lambda: env.events("start"), timeout=60, message="the holder starts")
    waiter = app.tasks["ckt.work"].apply_async((["exp:waiter"],), concurrency_queue="eq",
                                               concurrency_key="acme")
    limits.pause(app, "eq", key="bob")
    port = free_port()
    environ = env.worker_environ({})
    proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "workerapp", "ckeys", "exporter",
                             "--port", str(port)], cwd=TESTS, env={**os.environ, **environ},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}/metrics"

        def parked() -> Any:
            try:
                got = scrape(url)
            except OSError:
                return None
            return got if any(s.value == 1 for s in got["ckeys_slot_parked"]) else None
        got = wait_until(parked, timeout=60, message="the exporter shows the parked run")
        assert set(GAUGES) <= set(got)
        partition = {s.name: s.value for f in got.values() for s in f
                     if s.labels.get("slot") == "queue eq [acme]"}
        assert partition["ckeys_slot_running"] == 1 and partition["ckeys_slot_limit"] == 1
        assert partition["ckeys_slot_parked"] == 1 and partition["ckeys_slot_paused"] == 0
        assert partition["ckeys_slot_oldest_wait_seconds"] >= 0
        labels = next(s.labels for s in got["ckeys_slot_running"]
                      if s.labels.get("slot") == "queue eq [acme]")
        assert labels == {"kind": "partition", "queue": "eq", "key": "acme",
                          "slot": "queue eq [acme]"}
        assert "password" not in json.dumps(got).lower()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        limits.resume(app, "eq", key="bob")
        env.open_gate("exp")
    holder.get(timeout=60)
    waiter.get(timeout=60)


def known_metrics() -> set[str]:
    """Every sample name the exporter and the workers' metrics can serve."""
    from prometheus_client import REGISTRY, generate_latest

    from celery_ckeys import metrics

    metrics.enable()
    names = set(GAUGES)
    for family in text_string_to_metric_families(generate_latest(REGISTRY).decode()):
        if not family.name.startswith("ckeys_"):
            continue
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names.update(f"{family.name}{s}" for s in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names


def test_the_grafana_dashboard_queries_only_metrics_that_exist() -> None:
    dashboard = json.loads(Path(DASHBOARD).read_text())
    known = known_metrics()
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(queries) >= 10
    for expr in queries:
        named = set(re.findall(r"\bckeys_[a-z_]+", expr))
        assert named, f"a panel queries no ckeys metric: {expr}"
        assert named <= known, f"{expr} names {sorted(named - known)}, which nothing serves"
