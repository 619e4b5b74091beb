"""The slot store against a real redis-server, in both admission modes.

``single``: one script call takes every slot (one Redis). ``stepwise``: one call per slot
with compensation, as under Redis Cluster; the same guarantees must hold.
"""

from __future__ import annotations

import itertools
import time
from typing import Iterator

import pytest

from celery_ckeys.admission import RunSpec, plan_for
from celery_ckeys.config import from_conf
from celery_ckeys.embedded import RedisServer
from celery_ckeys.queues import ConcurrencyQueue
from celery_ckeys.store import HOLDERS, Store

_ns = itertools.count()
HOLDER = {"t": "task", "w": "host", "p": 1, "s": 0}


@pytest.fixture(params=["single", "stepwise"])
def store(redis_server: RedisServer, request: pytest.FixtureRequest) -> Iterator[Store]:
    config = from_conf({"ckeys_redis_url": f"{redis_server.url}/0", "ckeys_lock_ttl": 5,
                        "ckeys_environment_limit": None}, default_namespace=f"store-{next(_ns)}")
    st = Store(config)
    st.stepwise = request.param == "stepwise"
    yield st
    st.close()


def with_conf(store: Store, **conf: object) -> Store:
    config = from_conf({"ckeys_redis_url": store.config.redis_url, "ckeys_lock_ttl": 5, **conf},
                       default_namespace=store.config.namespace)
    st = Store(config)
    st.stepwise = store.stepwise
    return st


def plan(store: Store, **run: object):  # type: ignore[no-untyped-def]
    p = plan_for(store.config, store.names, RunSpec(task_name="t", **run))  # type: ignore[arg-type]
    assert p is not None
    return p


def test_a_key_admits_one_owner(store: Store) -> None:
    p = plan(store, key="k")
    first = store.acquire(p.slots, "a", HOLDER, primary=1)
    second = store.acquire(p.slots, "b", HOLDER, primary=1)
    assert first.ok and not second.ok
    assert second.holder == "a" and second.limit == 1 and second.blocked == p.slots[0]
    assert store.release(first.taken, "b") == 0, "a non-owner released the key"
    assert store.release(first.taken, "a") == 1
    assert store.release(first.taken, "a") == 0, "a second release freed something"
    assert store.acquire(p.slots, "b", HOLDER, primary=1).ok


def test_the_same_task_id_is_not_admitted_twice(store: Store) -> None:
    p = plan(store, key="dup")
    assert store.acquire(p.slots, "same", HOLDER, primary=1).ok
    again = store.acquire(p.slots, "same", HOLDER, primary=1)
    assert not again.ok and again.holder == "same"


def test_a_queue_admits_its_limit(store: Store) -> None:
    p = plan(store, queue=ConcurrencyQueue("q", 3))
    results = [store.acquire(p.slots, f"o{i}", HOLDER, primary=1) for i in range(5)]
    assert [r.ok for r in results] == [True, True, True, False, False]


def test_all_or_nothing_when_the_environment_is_full(store: Store) -> None:
    st = with_conf(store, ckeys_environment_limit=1, ckeys_burst_factor=1.0)
    pa = plan(st, queue=ConcurrencyQueue("qa", 5))
    pb = plan(st, queue=ConcurrencyQueue("qb", 5))
    assert st.acquire(pa.slots, "a", HOLDER, primary=1).ok
    blocked = st.acquire(pb.slots, "b", HOLDER, primary=1)
    assert not blocked.ok and blocked.blocked is not None and blocked.blocked.kind == "env"
    holders_b = st.client.zrange(pb.slots[0].key(HOLDERS), 0, -1)
    assert holders_b == [], "the blocked run kept its queue slot"


def test_a_trigger_time_limit_is_recorded_and_used_from_then_on(store: Store) -> None:
    set_3 = plan(store, queue=ConcurrencyQueue("main", 3), queue_from_trigger=True)
    by_name = plan(store, queue=ConcurrencyQueue("main"), queue_from_trigger=True)
    assert store.acquire(set_3.slots, "a", HOLDER, primary=1).ok
    assert store.queue_limit("main") == 3
    assert [store.acquire(by_name.slots, o, HOLDER, primary=1).ok for o in "bcd"] == [True, True, False]


def test_a_declared_limit_applies_until_a_limit_is_recorded(store: Store) -> None:
    declared = plan(store, queue=ConcurrencyQueue("decl", 1), declared_limit=1)
    assert store.acquire(declared.slots, "a", HOLDER, primary=1).ok
    assert not store.acquire(declared.slots, "b", HOLDER, primary=1).ok
    store.set_queue_limit("decl", 2)  # an operator raises it
    assert store.acquire(declared.slots, "b", HOLDER, primary=1).ok


def test_partitions_each_get_the_full_limit(store: Store) -> None:
    for user in ("u1", "u2"):
        p = plan(store, queue=ConcurrencyQueue("paid", 2), key=user)
        assert [store.acquire(p.slots, f"{user}-{i}", HOLDER, primary=1).ok for i in range(3)] == \
            [True, True, False]


def test_a_key_on_an_unlimited_queue_falls_back_to_the_key_mutex(store: Store) -> None:
    on_queue = plan(store, queue=ConcurrencyQueue("free-for-all"), key="k")
    key_only = plan(store, key="k")
    first = store.acquire(on_queue.slots, "a", HOLDER, primary=1)
    assert first.ok and [s.kind for s in first.taken] == ["key"]
    assert not store.acquire(key_only.slots, "b", HOLDER, primary=1).ok


def test_renewal_extends_only_the_owners_lease(store: Store) -> None:
    p = plan(store, key="r")
    taken = store.acquire(p.slots, "a", HOLDER, primary=1).taken
    key = p.slots[0].key(HOLDERS)
    before = store.client.zscore(key, "a")
    time.sleep(0.01)
    assert store.renew(taken, "a") == 1
    assert store.client.zscore(key, "a") > before
    assert store.renew(taken, "b") == 0


def test_an_expired_lease_is_not_renewed_and_frees_the_slot(store: Store) -> None:
    p = plan(store, key="e")
    taken = store.acquire(p.slots, "a", HOLDER, primary=1).taken
    # age the lease to the past, as if the holder had stalled
    store.client.zadd(p.slots[0].key(HOLDERS), {"a": 1})
    assert store.renew(taken, "a") == 0
    assert store.acquire(p.slots, "b", HOLDER, primary=1).ok


def test_release_by_pool_pid_spares_a_redelivered_copy(store: Store) -> None:
    p = plan(store, key="pid")
    store.acquire(p.slots, "t1", {**HOLDER, "w": "w1", "p": 11}, primary=1)
    assert store.release(p.slots, "t1", only="w1\n99") == 0
    assert store.release(p.slots, "t1", only="w2\n11") == 0
    assert store.release(p.slots, "t1", only="w1\n11") == 1


def test_fences_only_grow(store: Store) -> None:
    p = plan(store, key="f")
    fences = []
    for owner in ("a", "b", "c"):
        r = store.acquire(p.slots, owner, HOLDER, primary=1)
        fences.append(r.fence)
        store.release(r.taken, owner)
    assert fences == sorted(fences) and len(set(fences)) == 3
