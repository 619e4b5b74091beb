"""The optional Prometheus metrics, recorded by real prefork workers in multiprocess mode."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import Env, wait_until

prometheus_client = pytest.importorskip("prometheus_client")


def samples(directory: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))
    found = {}
    for metric in registry.collect():
        for s in metric.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def value(found: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def test_workers_record_acquisitions_deferrals_waits_and_slots_held(env: Env, tmp_path: Path) -> None:
    directory = tmp_path / "prom"
    directory.mkdir()
    env.workers(count=1, concurrency=3, extra_env={"PROMETHEUS_MULTIPROC_DIR": str(directory)},
                ckeys_metrics=True)
    app = env.app()
    work = app.tasks["ckt.work"]
    holder = work.apply_async((["m"], 1.0), concurrency_key="metrics")
    wait_until(lambda: env.holders(env.names.key("metrics")) == [holder.id], 30, message="holder")
    found = samples(directory)
    assert value(found, "ckeys_slots_held") == 1
    waiter = work.apply_async((["m"], 0.0), concurrency_key="metrics")
    waiter.get(timeout=60)
    holder.get(timeout=60)
    parent = app.tasks["ckt.parent"].apply_async((["p"], ["c"], {}), concurrency_key="parent")
    parent.get(timeout=60)
    found = samples(directory)
    assert value(found, "ckeys_acquisitions_total", task="ckt.work") == 2
    assert value(found, "ckeys_deferrals_total", task="ckt.work", reason="busy") >= 1
    assert value(found, "ckeys_admission_wait_seconds_count", task="ckt.work") == 1
    assert value(found, "ckeys_wait_for_seconds_count", task="ckt.parent", outcome="done") == 1
    assert value(found, "ckeys_releases_total", reason="finished") >= 3
    assert value(found, "ckeys_slots_held") == 0


def test_metrics_without_prometheus_client_is_a_clear_configuration_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins
    import importlib

    import celery_ckeys.metrics as metrics
    from celery_ckeys import ConfigurationError

    real_import = builtins.__import__

    def no_prometheus(name: str, *args: object, **kwargs: object) -> object:
        if name.startswith("prometheus_client"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    fresh = importlib.reload(metrics)
    monkeypatch.setattr(builtins, "__import__", no_prometheus)
    with pytest.raises(ConfigurationError, match=r"celery-ckeys\[metrics\]"):
        fresh.enable()
