"""Coordination state on a 3-master Redis Cluster and behind Sentinel, on loopback.

The broker stays a plain Redis (Celery's broker does not speak Cluster); only the
coordination state moves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
from conftest import Env, wait_until
from servers import Cluster, Sentinel

from celery_ckeys.embedded import RedisServer
from celery_ckeys.naming import Names


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = Cluster().start()
    yield c
    c.stop()


@pytest.fixture
def cluster_env(redis_server: RedisServer, cluster: Cluster, tmp_path: Path,
                request: pytest.FixtureRequest) -> Iterator[Env]:
    world = Env(redis_server, tmp_path, request.node.name, redis_url=cluster.url)
    world.configure(ckeys_redis_cluster=True)
    yield world
    world.close()


def test_keys_spread_across_masters_with_one_hash_tag_each(cluster_env: Env, cluster: Cluster) -> None:
    env = cluster_env
    env.workers(count=1, concurrency=4)
    work = env.app().tasks["ckt.work"]
    keys = [f"user:{i}" for i in range(30)]
    results = [work.apply_async(([k], 0.0), concurrency_key=k) for k in keys]
    for r in results:
        r.get(timeout=60)
    client = cluster.client()
    # each key's state sits on the master its own tag hashes to: they spread over all three
    nodes = {client.get_node_from_key(Names.redis_key(env.names.key(k), "h")).port for k in keys}
    assert len(nodes) == 3, "keys did not spread across the three masters"


def test_mutual_exclusion_queue_limits_and_partitions_on_a_cluster(cluster_env: Env) -> None:
    env = cluster_env
    env.workers(count=2, concurrency=4)
    app = env.app()
    work = app.tasks["ckt.work"]
    results = [work.apply_async(([f"k{i % 4}", "all"], 0.1), concurrency_key=f"k{i % 4}") for i in range(24)]
    results += [app.tasks["ckt.limited3"].apply_async((["lim3"], 0.2)) for _ in range(9)]
    paid = {"name": "paid", "limit": 2}
    results += [work.apply_async((["paid:u"], 0.2), concurrency_queue=paid, concurrency_key="u")
                for _ in range(6)]
    for r in results:
        r.get(timeout=120)
    for i in range(4):
        assert env.max(f"k{i}") == 1
    assert env.max("all") >= 2
    assert env.max("lim3") == 3
    assert env.max("paid:u") == 2


def test_environment_limit_on_a_cluster(cluster_env: Env) -> None:
    env = cluster_env
    env.configure(ckeys_environment_limit=2, ckeys_burst_factor=2.0)
    env.workers(count=2, concurrency=4)
    hold = env.app().tasks["ckt.hold_until"]
    results = [hold.apply_async(([f"env:{q}", "env:all"], "env"), concurrency_queue=q)
               for _ in range(3) for q in ("q1", "q2", "q3")]
    # they hold until the burst is full (a fixed duration left whether two runs of one queue
    # ever overlapped to the host's load): the namespace takes 2 x 2, no queue more than 2
    wait_until(lambda: env.running("env:all") == 4, 60,
               message="four runs at once, the burst")
    env.open_gate("env")
    for r in results:
        r.get(timeout=120)
    for q in ("q1", "q2", "q3"):
        assert env.max(f"env:{q}") <= 2
    assert env.max("env:all") == 4


def test_waits_and_handoff_on_a_cluster(cluster_env: Env) -> None:
    env = cluster_env
    env.configure(ckeys_deferral="handoff", ckeys_retry_countdown=1.0)
    env.workers(count=2, concurrency=4)
    app = env.app()
    fam = {"concurrency_queue": {"name": "family", "limit": 1}}
    out = app.tasks["ckt.parent"].apply_async((["family"], ["family"], fam), **fam).get(timeout=60)
    assert out["slots"] == ["queue family"] and out["child"]["slots"] == ["queue family"]
    work = app.tasks["ckt.work"]
    for r in [work.apply_async((["h"], 0.05), concurrency_key="h") for _ in range(10)]:
        r.get(timeout=60)
    assert env.max("h") == 1 and env.max("family") == 1


def test_handoff_with_several_slots_per_run_on_a_cluster(cluster_env: Env) -> None:
    """Issue 10, symptom 4: on Cluster with handoff, every woken run whose plan had two or
    more slots (any run, once an environment limit is set) was dropped, its reservation kept."""
    env = cluster_env
    env.configure(ckeys_deferral="handoff", ckeys_retry_countdown=1.0,
                  ckeys_environment_limit=2, ckeys_burst_factor=1.5)
    env.workers(count=2, concurrency=3)
    app = env.app()
    work = app.tasks["ckt.work"]
    results = [work.apply_async(([f"ck{i % 3}", "all"], 0.1), concurrency_key=f"ck{i % 3}")
               for i in range(18)]
    results += [work.apply_async((["part:u"], 0.1), concurrency_queue={"name": "cp", "limit": 1},
                                 concurrency_key="u") for _ in range(6)]
    for r in results:
        r.get(timeout=120)
    assert all(env.max(f"ck{i}") == 1 for i in range(3))
    assert env.max("part:u") == 1 and env.max("all") <= 3
    deferred = [e for e in env.events("signal") if e["name"] == "run_deferred"]
    assert deferred and all(e.get("countdown") is None for e in deferred), "runs did not park"
    assert len({e["id"] for e in env.events("start")}) == len(results)


@pytest.fixture
def sentinel_env(redis_server: RedisServer, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Env]:
    sentinel = Sentinel().start()
    world = Env(redis_server, tmp_path, request.node.name, redis_url=sentinel.url)
    world.configure(ckeys_redis_transport_options={"master_name": "mymaster"})
    yield world
    world.close()
    sentinel.stop()


def test_keys_and_limits_behind_sentinel(sentinel_env: Env) -> None:
    env = sentinel_env
    env.workers(count=1, concurrency=4)
    app = env.app()
    work = app.tasks["ckt.work"]
    results = [work.apply_async((["s"], 0.1), concurrency_key="s") for _ in range(6)]
    results += [app.tasks["ckt.limited3"].apply_async((["s3"], 0.2)) for _ in range(6)]
    for r in results:
        r.get(timeout=60)
    assert env.max("s") == 1 and env.max("s3") == 3
    # the state lives on the master that the sentinel names
    sentinel_master = env.coord()
    assert sentinel_master.connection_pool.service_name == "mymaster"


def test_a_sentinel_url_without_a_master_name_is_a_clear_error() -> None:
    from celery_ckeys import ConfigurationError
    from celery_ckeys.config import from_conf
    from celery_ckeys.store import make_client

    config = from_conf({"ckeys_redis_url": "sentinel://127.0.0.1:26379"}, default_namespace="x")
    with pytest.raises(ConfigurationError, match="master_name"):
        make_client(config)
