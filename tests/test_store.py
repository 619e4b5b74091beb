"""The store against a real redis-server: one script call per step (Store), and the same
steps one slot at a time (ClusterStore, as under Redis Cluster); the same guarantees hold.
The protocol's interleavings are the model test's (test_model.py); these are its rules,
one at a time, named."""

from __future__ import annotations

import itertools
import json
import os
import re
import threading
import time
import uuid
from typing import Any, Iterator

import pytest

from celery_ckeys.admission import RunSpec, plan_for, slot_for_tag
from celery_ckeys.cluster import ClusterStore
from celery_ckeys.config import from_conf
from celery_ckeys.embedded import RedisServer
from celery_ckeys.introspect import collect
from celery_ckeys.naming import UNITS, Names
from celery_ckeys.queues import ConcurrencyQueue
from celery_ckeys.slots import Place
from celery_ckeys.store import Store, Wake, token_prefix

_ns = itertools.count()


@pytest.fixture(params=["single", "stepwise"])
def store(redis_server: RedisServer, request: pytest.FixtureRequest) -> Iterator[Store]:
    st = make(redis_server.url, request.param)
    yield st
    st.close()


def make(url: str, kind: str, namespace: str = "", **conf: Any) -> Store:
    config = from_conf({"ckeys_redis_url": f"{url}/0", "ckeys_lock_ttl": 5, **conf},
                       default_namespace=namespace or f"store-{next(_ns)}")
    return (ClusterStore if kind == "stepwise" else Store)(config)


def with_conf(store: Store, **conf: Any) -> Store:
    return make(store.config.redis_url.rsplit("/", 1)[0],
                "stepwise" if isinstance(store, ClusterStore) else "single",
                store.config.namespace, **conf)


def slots(store: Store, **run: Any) -> Any:
    plan = plan_for(store.config, RunSpec(task_name="t", **run))
    assert plan is not None
    return plan.slots


def token(who: str, host: str = "host", pid: int = 1, ticket: str = "") -> str:
    return json.dumps([who, host, pid, uuid.uuid4().hex[:8], ticket, "t", 0, []],
                      separators=(",", ":"))


def take(store: Store, s: Any, who: str, **kw: Any) -> tuple[bool, str]:
    tok = token(who, ticket=kw.get("ticket", ""))
    return store.acquire(s, who, tok, **kw).ok, tok


def sweep_until_woken(store: Store, tag: str, woken: list[Wake], message: str) -> None:
    """Sweep slot ``tag`` until the store has published a wake (into ``woken``)."""
    from celery_ckeys.contrib.testing import wait_until

    sweeper = slot_for_tag(store.config, store.names, tag)
    assert sweeper is not None

    def swept() -> bool:
        store.sweep(sweeper)
        return bool(woken)
    wait_until(swept, timeout=5, message=message)


def test_a_key_admits_one_owner_and_only_the_owner_releases(store: Store) -> None:
    s = slots(store, key="k")
    ok, a = take(store, s, "a")
    blocked = store.acquire(s, "b", token("b"))
    assert ok and blocked.status == "blocked"
    assert blocked.holder == "a" and blocked.limit == 1 and blocked.blocked == s[0]
    assert store.release(s, "a", token("a")) == 0, "another token of the same run released it"
    assert store.release(s, "b", token("b")) == 0, "a non-owner released the key"
    assert store.release(s, "a", a) == 1
    assert store.release(s, "a", a) == 0, "a second release freed something"
    assert take(store, s, "b")[0]


@pytest.mark.parametrize("plan", [{"key": "k"}, {"queue": ConcurrencyQueue("AQ", limit=2,
                                                                        rate="5/m"),
                                     "key": "k"}])
def test_an_acquire_sent_again_with_its_own_token_is_admitted(store: Store,
                                                             plan: dict[str, Any]) -> None:
    """A reply lost on a broken connection: the store (redis-py) sends the same call again,
    which finds the unit the first one took. Its very token proves it is the same attempt:
    admitted, not blocked behind itself until the lease runs out (and not a second start
    for a rate)."""
    s = slots(store, **plan)
    mine = token("a")
    first = store.acquire(s, "a", mine)
    assert first.ok
    again = store.acquire(s, "a", mine)
    assert again.status == "admitted" and again.taken == first.taken, again
    assert store.acquire(s, "a", token("a")).status == "blocked"  # another copy: busy
    for slot in s:
        log = Names.redis_key(slot.tag, "s")
        assert store.client.zcard(log) <= 1, "the same start was logged twice"
    assert store.release(s, "a", mine) == len(first.taken)


def test_a_second_copy_of_a_running_run_waits_and_never_parks(store: Store) -> None:
    s = slots(store, key="k")
    assert take(store, s, "a")[0]
    again = store.acquire(s, "a", token("a"), message="?")
    # busy: a copy of a run that executes right now goes back to the broker, not in line
    assert again.status == "blocked" and not again.parked


def test_a_queue_admits_its_limit(store: Store) -> None:
    s = slots(store, queue=ConcurrencyQueue("q", 2))
    assert [take(store, s, o)[0] for o in "abc"] == [True, True, False]


def test_all_or_nothing_when_the_environment_is_full(store: Store) -> None:
    env = with_conf(store, ckeys_environment_limit=1, ckeys_burst_factor=1.0)
    assert take(env, slots(env, key="x"), "a")[0]
    # another task (its own implicit queue has room): only the environment is full
    other = plan_for(env.config, RunSpec(task_name="u", key="y"))
    assert other is not None
    result = env.acquire(other.slots, "b", token("b"))
    assert result.status == "blocked" and result.blocked is not None
    assert result.blocked.kind == "env"
    assert env.holders_of(env.names.key("y")) == [], "a slot stayed taken by a refused run"


def test_a_runs_end_on_full_slots_leaves_nothing_and_spares_a_co_holder(store: Store) -> None:
    """The lite release (give.lua): the last unit of a slot goes with its units and info
    keys in one DEL; a slot another run still holds keeps that run's unit and info."""
    env = with_conf(store, ckeys_environment_limit=10)
    queue = ConcurrencyQueue("gq", 5)
    s1, s2 = slots(env, queue=queue, key="k1"), slots(env, queue=queue, key="k2")
    t1, t2 = token("a"), token("b")
    first, second = env.acquire(s1, "a", t1), env.acquire(s2, "b", t2)
    assert first.ok and second.ok
    env_slot = next(x for x in first.taken if x.kind == "env")
    assert env.release(first.taken, "a", t1) == len(first.taken)
    assert env.holders_of(env_slot.tag) == ["b"]
    assert env.client.hget(env_slot.key("i"), "b") == t2.encode()
    left = list(env.client.scan_iter(match=f"ckeys:{{{env.names.ns}|*"))
    assert not any(b"k1" in k for k in left), left
    assert env.release(second.taken, "b", t2) == len(second.taken)
    assert list(env.client.scan_iter(match=f"ckeys:{{{env.names.ns}|*")) == []


def test_a_release_sent_before_its_reply_is_read_frees_once_and_crosses_no_reply(
        store: Store) -> None:
    """``release_later`` (the run's end, its reply read after Celery stores the result): the
    store's other commands meanwhile get their own replies, not the pending one; the reply,
    read later, counts what was freed; a slot somebody waits on is freed the long way and
    wakes them; after a Redis script flush the release still frees (NOSCRIPT, once more)."""
    woken: list[Wake] = []
    store.on_wakes = woken.extend
    s = slots(store, key="later")
    units = s[0].key("h")
    a = token("a")
    assert store.acquire(s, "a", a).ok
    finish = store.release_later(s, "a", a)
    other = slots(store, key="other")
    assert store.acquire(other, "b", token("b")).ok  # its own reply, not the pending one
    assert finish() == 1
    assert not store.client.exists(units)
    assert store.holders_of(other[0].tag) == ["b"]

    c = token("c")
    assert store.acquire(s, "c", c).ok
    assert store.acquire(s, "d", token("d"), new_ticket="td", message="m").parked
    finish = store.release_later(s, "c", c)
    assert finish() == 1
    assert [w.ticket for w in woken] == ["td"], "the waiting run was not woken"

    e = token("e")
    assert store.acquire(slots(store, key="flush"), "e", e).ok
    store.client.script_flush()
    assert store.release_later(slots(store, key="flush"), "e", e)() == 1
    assert store.holders_of(slots(store, key="flush")[0].tag) == []


def test_a_processs_first_release_is_done_before_it_returns(redis_server: RedisServer) -> None:
    """The first release a process sends may meet a Redis without the script (a fresh one,
    or restarted): its NOSCRIPT, seen only when the reply is read after the result store,
    would leave the key held that long. The first is synchronous; the next ones are sent."""
    st = make(redis_server.url, "single", namespace="first-release")
    st.client.script_flush()
    s = slots(st, key="first")
    a, b = token("a"), token("b")
    assert st.acquire(s, "a", a).ok  # a bare SET: no script yet
    finish = st.release_later(s, "a", a)
    assert not st.client.exists(s[0].key(UNITS)), "freed only when the reply is read"
    assert finish() == 1
    assert st.acquire(s, "b", b).ok
    assert st.release_later(s, "b", b)() == 1
    st.close()


def test_a_key_a_run_was_deferred_on_is_freed_by_the_release_sent_not_by_a_later_one(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run deferred by countdown on a held key leaves nobody waiting, but its look made the
    slot full (a sorted set). The release the run's end sends frees it by itself: nothing is
    left for the reply's reading, which comes after Celery stored the result, when a client
    that has the result may enqueue the key's next run (review finding: unlock.lua answered
    -1 and left the release to release.lua, sent only once the reply was read)."""
    s = slots(store, key="deferred-on")
    a = token("a")
    assert store.acquire(s, "a", a).ok
    assert not store.acquire(s, "b", token("b")).ok  # countdown: deferred, nobody in line
    assert store.client.type(s[0].key(UNITS)) == b"zset"
    called: list[str] = []
    call = store.call
    monkeypatch.setattr(store, "call", lambda name, *rest: called.append(name) or call(name, *rest))
    finish = store.release_later(s, "a", a)
    assert finish() == 1
    assert "release" not in called, called
    assert not store.client.exists(s[0].key(UNITS), s[0].key("i"))
    assert store.acquire(s, "c", token("c")).ok



def test_the_end_of_a_run_whose_lease_ran_out_leaves_the_next_holders_lease_alone(
        store: Store) -> None:
    """A run whose lease ran out while it ran ends after another run took the key: the other
    run's hold stays, with the expiry its own renewals gave it (review finding: unlock.lua
    put it back with a whole new lease, an expiry renewed by someone who does not own it)."""
    s = slots(store, key="lapsed")
    units = s[0].key(UNITS)
    a = token("a")
    assert store.acquire(s, "a", a).ok
    store.client.delete(units)  # a's lease ran out
    d = token("d")
    assert store.acquire(s, "d", d).ok
    store.client.pexpire(units, 1500)  # d's last renewal was a while ago
    assert store.release(s, "a", a) == 0
    assert store.client.get(units) == d.encode()
    assert 0 < store.client.pttl(units) <= 1500


def test_a_runs_end_on_a_full_slot_where_a_unit_ran_out_is_left_to_the_full_release(
        store: Store) -> None:
    """A unit that ran out where no script saw it is pruned by the run's end, not left
    beside it (review finding: unlock.lua freed only the run's own unit, and a lapsed
    reservation's pending start kept counting against the slot's rate)."""
    s = slots(store, key="ghost")
    units, info = s[0].key(UNITS), s[0].key("i")
    a = token("a")
    assert store.acquire(s, "a", a).ok
    assert not store.acquire(s, "b", token("b")).ok  # a sorted set now; nobody waits
    store.client.zadd(units, {"ghost": 1})  # a reservation that ran out long ago
    store.client.hset(info, "ghost", "@wt")
    assert store.release(s, "a", a) == 1
    assert not store.client.exists(units, info)


def test_a_pending_start_whose_reservation_ran_out_does_not_hold_up_the_rate(
        store: Store) -> None:
    """A woken run's start counts against the rate (pending) only while its reservation
    lives: one whose unit went without a script pruning it (an idle slot's units key expired
    with it) lets the next run start, and the log expires again (review finding: it stayed
    pending, without an expiry, and the rate admitted nobody ever again)."""
    s = slots(store, queue=ConcurrencyQueue("RP", limit=2, rate="1/s"))
    log = s[0].key("s")
    store.client.zadd(log, {"ghost": 1e13 + store.now_ms()})
    store.client.persist(log)
    ok, _ = take(store, s, "d")
    assert ok
    assert store.client.zscore(log, "ghost") is None
    assert store.client.pttl(log) > 0


class _Task:
    name = "t"


def test_a_second_release_sent_in_one_thread_reads_the_first_ones_reply_first(
        store: Store) -> None:
    """Two runs' ends in one thread before a task_postrun (a pool whose greenlets share a
    thread id, a body re-entering the gate): the first pending reply is read when the second
    release is sent, not dropped, so the run parked behind the first is woken."""

    from celery_ckeys import gate
    from celery_ckeys.heartbeat import Holding

    woken: list[Wake] = []
    store.on_wakes = woken.extend
    sx, sy = slots(store, key="ox"), slots(store, key="oy")
    ax, ay = token("ax"), token("ay")
    assert store.acquire(sx, "ax", ax).ok and store.acquire(sy, "ay", ay).ok
    assert store.acquire(sx, "bx", token("bx"), new_ticket="tb", message="m").parked
    task = _Task()  # a signal's sender: hashable
    for who, tok, s in (("ax", ax, sx), ("ay", ay, sy)):
        holding = Holding(store=store, owner=who, token=tok, task_name="t", slots=tuple(s))
        gate.release(task, holding, reason="finished", later=True)
    gate.finish_release()
    assert not gate._releasing
    assert store.holders_of(sy[0].tag) == []
    assert [w.ticket for w in woken] == ["tb"], "the first run's release was dropped"


def test_a_release_that_cannot_be_sent_tries_once_then_goes_to_the_background(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis unreachable at a run's end: one synchronous attempt (release_later's own, after
    the send failed), then the background retry; the gate does not try a second time."""

    from celery_ckeys import gate
    from celery_ckeys.heartbeat import Holding, heartbeat

    down = Store(from_conf({"ckeys_redis_url": "redis://127.0.0.1:1/0"}, default_namespace="od"))
    s = plan_for(down.config, RunSpec(task_name="t", key="x")).slots
    attempts: list[str] = []
    release = Store.release
    monkeypatch.setattr(Store, "release",
                        lambda self, *a, **k: attempts.append("now") or release(self, *a, **k))
    monkeypatch.setattr(heartbeat, "release", lambda holding, on_done: attempts.append("background"))
    holding = Holding(store=down, owner="a", token=token("a"), task_name="t", slots=tuple(s))
    gate.release(_Task(), holding, reason="finished", later=True)
    assert attempts == ["now", "background"]
    assert not gate._releasing
    down.close()


def test_a_redelivered_run_admitted_clears_the_deferral_record_its_first_copy_left(
        store: Store) -> None:
    """A run deferred by countdown whose retry was never published (the publish failed, so
    the gate rejected the message with requeue) comes back as the original message, with no
    deferral header: taken by take.lua without a word, it stayed listed as deferred while
    it ran (review finding). The broker marks the message redelivered; that is enough."""
    from types import SimpleNamespace

    from celery_ckeys.gate import deferred_before

    env = with_conf(store, ckeys_environment_limit=10)
    plan = plan_for(env.config, RunSpec(task_name="t", queue=ConcurrencyQueue("dr", 1), key="k"))
    assert plan is not None
    a, t = token("a"), token("t")
    assert env.acquire(plan.slots, "a", a).ok
    assert env.acquire(plan.slots, "t", t, primary=plan.primary).status == "blocked"
    record = plan.slots[plan.primary - 1].key("f")
    assert env.client.hexists(record, "t")
    env.release(plan.slots, "a", a)
    redelivered = SimpleNamespace(delivery_info={"redelivered": True})
    assert deferred_before(redelivered, {})
    assert not deferred_before(SimpleNamespace(delivery_info={}), {})
    assert env.acquire(plan.slots, "t", t, deferred=deferred_before(redelivered, {})).ok
    assert not env.client.hexists(record, "t")


def test_a_trigger_time_limit_is_recorded_and_used_from_then_on(store: Store) -> None:
    assert take(store, slots(store, queue=ConcurrencyQueue("tq", 1), queue_from_trigger=True), "a")[0]
    assert store.queue_limit("tq") == 1
    assert not take(store, slots(store, queue=ConcurrencyQueue("tq")), "b")[0]


def test_a_declared_limit_applies_until_a_limit_is_recorded(store: Store) -> None:
    s = slots(store, queue=ConcurrencyQueue("dq", 1))
    assert take(store, s, "a")[0] and not take(store, s, "b")[0]
    store.set_queue_limit("dq", 2)
    assert take(store, s, "b")[0]


def test_partitions_each_get_the_full_limit(store: Store) -> None:
    for key in ("u1", "u2"):
        s = slots(store, queue=ConcurrencyQueue("pq", 2), key=key)
        assert [take(store, s, f"{key}-{o}")[0] for o in "abc"] == [True, True, False]


def test_a_keys_own_limit_applies_to_its_partition_alone_and_to_the_sweeper(
        store: Store) -> None:
    """A limit recorded for one key goes before its queue's, at the next admission, for
    that key's partition only; refills (a release, the sweeper) use it too, so lowering it
    never lets a woken run past it, and raising it wakes the line."""
    woken: list[Wake] = []
    store.on_wakes = woken.extend
    queue = ConcurrencyQueue("kq", 1)
    acme, other = slots(store, queue=queue, key="acme"), slots(store, queue=queue, key="other")
    store.set_key_limit("kq", "acme", 2)
    assert store.key_limits("kq") == {"acme": 2}
    (ok_a, a), (ok_b, b) = take(store, acme, "a"), take(store, acme, "b")
    assert ok_a and ok_b, "the key's own limit of 2 did not apply"
    assert [take(store, other, o)[0] for o in "xy"] == [True, False], "another key got it too"
    assert store.acquire(acme, "c", token("c"), new_ticket="tc", message="m").parked
    store.set_key_limit("kq", "acme", None)  # back to the queue's 1
    assert store.release(acme, "a", a) == 1
    assert woken == [], "a release refilled past the key's limit"
    store.set_key_limit("kq", "acme", 3)
    sweeper_view = slot_for_tag(store.config, store.names, acme[0].tag)
    assert sweeper_view is not None
    store.sweep(sweeper_view)
    assert [w.ticket for w in woken] == ["tc"], "the sweeper did not use the key's limit"
    assert store.release(acme, "b", b) == 1


def test_a_total_limit_caps_partitions_and_keyless_runs_all_or_nothing(store: Store) -> None:
    """total 3 over partitions of limit 2 and the queue's keyless runs: the fourth run of any
    kind is refused, and a refused run keeps no unit of its partition; a total recorded later
    (the CLI) applies at the next admission, and clearing it lifts the cap."""
    queue = ConcurrencyQueue("tq2", limit=2, total_limit=3)
    a, b, free = (slots(store, queue=queue, key=k) for k in ("a", "b", "c"))
    assert [take(store, a, f"a{i}")[0] for i in range(3)] == [True, True, False]
    assert take(store, b, "b0")[0]
    result = store.acquire(free, "c0", token("c0"))
    assert result.status == "blocked" and result.blocked is not None
    assert result.blocked.kind == "total" and result.limit == 3
    assert store.holders_of(free[0].tag) == [], "a refused run kept its partition's unit"
    keyless = slots(store, queue=queue)
    assert not take(store, keyless, "n0")[0]
    shown = {s.label: s for s in collect(store, declared={"tq2": queue})}
    total_view = shown["queue tq2 (total)"]
    assert total_view.limit == 3 and len(total_view.holders) == 3, "status hides the total"
    # the CLI on a machine without the task modules: what the slots remember
    remembered = {s.label: s.limit for s in collect(store)}
    assert remembered["queue tq2 (total)"] == 3 and remembered["queue tq2 [a]"] == 2
    store.set_queue_limit("tq2", 4, field="total")
    assert take(store, keyless, "n0")[0] and not take(store, free, "c0")[0]
    store.set_queue_limit("tq2", None, field="total")  # the declared 3 again
    assert not take(store, free, "c0")[0]
    unlimited = slots(store, queue=ConcurrencyQueue("tq2", limit=2))  # no total anywhere
    assert take(store, unlimited, "u0")[0]


def test_a_run_whose_code_knows_no_total_never_refills_past_it(store: Store) -> None:
    """Task x declares total_limit=1 for queue Q, task y names Q without one. A y run
    revoked before it started (forfeit) or lost goes through every slot of its plan, the
    total included; its script must not re-wake or refill the total's line as if it had no
    limit (y's code does not know it): only one x run may then hold the total."""
    woken: list[Wake] = []
    store.on_wakes = woken.extend
    x = slots(store, queue=ConcurrencyQueue("Q", limit=5, total_limit=1))
    y = slots(store, queue=ConcurrencyQueue("Q", limit=5))
    total_units = Names.redis_key(store.names.total("Q"), UNITS)
    _, a = take(store, x, "x1")
    for w in ("x2", "x3"):
        assert store.acquire(x, w, token(w), new_ticket=f"t{w}", message="m").parked
    store.release(x, "x1", a)
    assert [w.ticket for w in woken] == ["tx2"]
    store.client.zadd(total_units, {"x2": 1}, xx=True)  # x2's claim window ran out
    store.forfeit(y, "y1", "")
    store.release_lost(y, "y2", '["y2","host",7,')
    claims = [store.acquire(x, w, token(w, ticket=f"t{w}"), ticket=f"t{w}",
                            home=store.names.total("Q")).ok for w in ("x2", "x3")]
    assert claims.count(True) <= 1, f"two runs hold a total of 1: {claims}, woken {woken}"


def test_a_woken_run_blocked_early_in_its_plan_keeps_nothing_after_it(store: Store) -> None:
    """The ordering rule with three slots (partition, total, environment): B, woken at the
    environment, finds its partition full. It must not keep the total unit it was given
    before while it waits at the partition, or B and C (which keeps the partition and waits
    at the total) wait for each other until a lease runs out (ClusterStore did)."""
    env = with_conf(store, ckeys_environment_limit=2, ckeys_burst_factor=1.0)
    woken: list[Wake] = []
    env.on_wakes = woken.extend
    queue = ConcurrencyQueue("Q", limit=1, total_limit=1)
    pk, pk2 = slots(env, queue=queue, key="K"), slots(env, queue=queue, key="K2")
    other_plan = plan_for(env.config, RunSpec(task_name="z"))  # the environment, and its queue
    assert other_plan is not None
    other = other_plan.slots
    order = [s.tag for s in pk if s.kind != "key"]  # the key mutex: not needed (limit 1)

    def run(s: Any, who: str, **kw: Any) -> tuple[Any, str]:
        tok = token(who, ticket=kw.get("ticket", ""))
        return env.acquire(s, who, tok, message="m", new_ticket=f"t{who}", **kw), tok

    def woken_at(who: str) -> str:  # "" when not woken (one script call may admit instead)
        return next((w.tag for w in reversed(woken) if w.ticket == f"t{who}"), "")

    d = run(pk, "D")[1]
    run(pk, "B"), run(pk, "C")
    env.release(pk, "D", d)  # B is woken at the partition
    w = run(pk2, "W")[1]  # W takes the total
    run(pk, "B", ticket="tB", home=woken_at("B"))  # keeps the partition, waits at the total
    z1 = run(other, "Z1")[1]
    env.release(pk2, "W", w)  # B is woken at the total
    z2 = run(other, "Z2")[1]  # the environment is full
    assert woken_at("B") == order[1]
    run(pk, "B", ticket="tB", home=order[1])
    if woken_at("C") == pk[0].tag:
        run(pk, "C", ticket="tC", home=pk[0].tag)
    env.release(other, "Z1", z1)
    if woken_at("B") == order[-1]:
        run(pk, "B", ticket="tB", home=order[-1])
    for who in ("B", "C"):
        kept = [order.index(t) for t in order if env.read_slot(t).info.get(who, "").startswith("@h")]
        waits = [order.index(t) for t in order if who in dict(env.read_slot(t).line)]
        assert not kept or not waits or max(kept) < min(waits), (
            f"{who} keeps a unit of slot {max(kept)} while it waits at slot {min(waits)}")
    env.release(other, "Z2", z2)


def serve_in_turn(store: Store, holder: tuple[Any, str, str], parked: list[tuple[Any, str]],
                  woken: list[Wake]) -> list[str]:
    """Release ``holder``, then let every woken run claim, run and release, one at a time:
    the order in which the parked runs were served."""
    s, who, tok = holder
    by_ticket = {f"t{w}": (runs, w) for runs, w in parked}
    served = []
    store.release(s, who, tok)
    while woken:
        wake = woken.pop(0)
        runs, w = by_ticket[wake.ticket]
        mine = token(w, ticket=wake.ticket)
        got = store.acquire(runs, w, mine, ticket=wake.ticket, home=wake.tag)
        assert got.ok, f"{w} was woken but could not claim: {got}"
        served.append(w)
        store.release(runs, w, mine, wake.ticket)
    return served


def test_keys_waiting_for_a_total_are_served_round_robin_and_by_weight(store: Store) -> None:
    """Fair dequeue (issue 12): a flood of key A parked first does not hold B and C back;
    B, of weight 2, gets two turns a round; within a key, first come first served."""
    woken: list[Wake] = []
    store.on_wakes = woken.extend
    queue = ConcurrencyQueue("Q", limit=50, total_limit=1, weights={"B": 2})
    x = slots(store, queue=queue, key="X")
    ok, held = take(store, x, "x")
    assert ok
    parked = []
    for who in ["a1", "a2", "a3", "a4", "a5", "b1", "b2", "b3", "c1", "c2"]:
        runs = slots(store, queue=queue, key=who[0].upper())
        plan = plan_for(store.config, RunSpec(task_name="t", queue=queue, key=who[0].upper()))
        assert plan is not None
        got = store.acquire(runs, who, token(who), message="m", new_ticket=f"t{who}",
                            place=plan.place(0, 0))
        assert got.parked and got.blocked is not None and got.blocked.kind == "total"
        parked.append((runs, who))
    served = serve_in_turn(store, (x, "x", held), parked, woken)
    # virtual starts: A 0, 10000, 20000...; B (weight 2) 0, 5000, 10000; C 0, 10000 (equal
    # starts: by task id)
    assert served == ["a1", "b1", "c1", "b2", "a2", "b3", "c2", "a3", "a4", "a5"]
    total = next(t for t in slots(store, queue=queue, key="A") if t.kind == "total")
    info = store.read_slot(total.tag).info
    assert not [f for f in info if f.startswith(("#F", "#n", "#k"))], "a drained line kept turns"


def test_a_recorded_weight_goes_before_the_declared_one(store: Store) -> None:
    woken: list[Wake] = []
    store.on_wakes = woken.extend
    queue = ConcurrencyQueue("Q", limit=50, total_limit=1, weights={"B": 3})
    store.set_key_limit("Q", "A", 2, what="weight")
    store.set_key_limit("Q", "B", 1, what="weight")
    x = slots(store, queue=queue, key="X")
    ok, held = take(store, x, "x")
    assert ok
    parked = []
    for who in ["a1", "a2", "a3", "b1", "b2"]:
        key = who[0].upper()
        plan = plan_for(store.config, RunSpec(task_name="t", queue=queue, key=key))
        assert plan is not None
        assert store.acquire(plan.slots, who, token(who), message="m", new_ticket=f"t{who}",
                             place=plan.place(0, 0)).parked
        parked.append((plan.slots, who))
    # A (recorded weight 2) starts 0, 5000, 10000; B (recorded 1 beats declared 3) 0, 10000
    assert serve_in_turn(store, (x, "x", held), parked, woken) == ["a1", "b1", "a2", "a3", "b2"]


def test_a_line_serves_higher_priority_first_then_first_come(store: Store) -> None:
    woken: list[Wake] = []
    store.on_wakes = woken.extend
    s = slots(store, key="k")
    ok, held = take(store, s, "h")
    assert ok
    parked = []
    for n, (who, priority) in enumerate([("low1", 0), ("high1", 5), ("low2", 0), ("high2", 5),
                                         ("neg", -3)]):
        got = store.acquire(s, who, token(who), message="m", new_ticket=f"t{who}",
                            place=Place(order_ms=1_800_000_000_000 + n, priority=priority))
        assert got.parked
        parked.append((s, who))
    served = serve_in_turn(store, (s, "h", held), parked, woken)
    assert served == ["high1", "high2", "low1", "low2", "neg"]


def park_in_turn(store: Store, queue: ConcurrencyQueue, who: str, key: str,
                 priority: int = 0) -> tuple[Any, str]:
    plan = plan_for(store.config, RunSpec(task_name="t", queue=queue, key=key))
    assert plan is not None
    got = store.acquire(plan.slots, who, token(who), message="m", new_ticket=f"t{who}",
                        place=plan.place(0, priority))
    assert got.parked, got
    return plan.slots, who


def test_a_higher_priority_run_leaves_the_turns_of_lower_ones_alone(store: Store) -> None:
    """Review finding 1: waking A's priority-1 run moved the one virtual clock to A's next
    turn, so C, arriving next at priority 0, waited behind all five A runs."""
    woken: list[Wake] = []
    store.on_wakes = woken.extend
    queue = ConcurrencyQueue("Q", limit=50, total_limit=1)
    x = slots(store, queue=queue, key="X")
    ok, held = take(store, x, "x")
    assert ok
    parked = [park_in_turn(store, queue, f"a{n}", "A") for n in range(1, 6)]
    parked.append(park_in_turn(store, queue, "ahi", "A", priority=1))
    store.release(x, "x", held)  # wakes ahi
    first = woken.pop(0)
    parked.append(park_in_turn(store, queue, "c1", "C"))
    ahi = parked[5][0]
    tok = token("ahi", ticket=first.ticket)
    assert store.acquire(ahi, "ahi", tok, ticket=first.ticket, home=first.tag).ok
    served = serve_in_turn(store, (ahi, "ahi", tok), parked, woken)
    assert served.index("c1") <= 1, served


def test_runs_that_leave_a_fair_line_unserved_give_their_keys_turns_back(store: Store) -> None:
    """Review findings 4 and 5: ten A runs forfeited (revoked) kept A's turns, so A's next
    run waited behind all of B; and a key's turns are kept only while it has runs waiting."""
    woken: list[Wake] = []
    store.on_wakes = woken.extend
    queue = ConcurrencyQueue("Q", limit=50, total_limit=1)
    x = slots(store, queue=queue, key="X")
    ok, held = take(store, x, "x")
    assert ok
    gone = [park_in_turn(store, queue, f"a{n}", "A") for n in range(10)]
    parked = [park_in_turn(store, queue, f"b{n}", "B") for n in range(10)]
    for runs, who in gone:
        store.forfeit(runs, who, f"t{who}")
    parked.append(park_in_turn(store, queue, "anew", "A"))
    served = serve_in_turn(store, (x, "x", held), parked, woken)
    assert served.index("anew") <= 1, served
    total = next(t for t in x if t.kind == "total")
    left = [f for f in store.read_slot(total.tag).info if f.startswith(("#F", "#n", "#k"))]
    assert not left, f"turns kept with nobody waiting: {left}"


def test_a_computed_limit_the_code_dropped_is_forgotten_by_the_sweeper(store: Store) -> None:
    """Review finding 2: under Cluster the partition kept remembering a callable's limit (5)
    after every run's code said 1, and the sweeper woke three runs into a limit of 1."""
    woken: list[Wake] = []
    store.on_wakes = woken.extend
    before = plan_for(store.config, RunSpec(task_name="t", key="k", computed_limit=5,
                                            queue=ConcurrencyQueue("Q", limit=lambda key: 5)))
    after = plan_for(store.config, RunSpec(task_name="t", key="k", queue=ConcurrencyQueue("Q", 1)))
    assert before is not None and after is not None
    assert store.acquire(before.slots, "r0", token("r0")).ok
    for who in ("r1", "r2", "r3"):
        got = store.acquire(after.slots, who, token(who), message="m", new_ticket=f"t{who}")
        assert got.parked and got.limit == 1
    sweeper = slot_for_tag(store.config, store.names, after.slots[0].tag)
    assert sweeper is not None and store.resolve_limits([sweeper]) == [1]
    store.sweep(sweeper)
    assert not woken, "the sweeper refilled past the limit with a computed limit long gone"


@pytest.mark.parametrize("message", ["m", ""], ids=["handoff", "countdown"])
def test_keep_latest_replaces_the_runs_of_its_task_waiting_on_its_slot(store: Store,
                                                                        message: str) -> None:
    """keep_latest (issue 13): blocked on its own slot, a run takes the runs of its task
    waiting there out of the line (or their deferral records) in the same call; a run of
    another task keeps its place."""
    s = slots(store, key="k")
    ok, _ = take(store, s, "h")
    assert ok

    def arrive(who: str, task: str = "t", replace: bool = True) -> Any:
        tok = json.dumps([who, "host", 1, "n", "", task, 0, []], separators=(",", ":"))
        body = json.dumps({"task": task, "sig": {}}) if message else ""
        return store.acquire(s, who, tok, message=body, new_ticket=f"t{who}",
                             place=Place(replace=replace))
    assert arrive("other", task="u", replace=False).status == "blocked"
    assert arrive("a").replaced == ()
    assert arrive("b").replaced == ("a",)
    assert arrive("c").replaced == ("b",)
    state = store.read_slot(s[0].tag)
    waiting = [t for t, _ in state.line] if message else sorted(state.deferred)
    assert sorted(waiting) == ["c", "other"]


def test_a_throttled_partition_starts_nothing_until_its_time(store: Store) -> None:
    """throttle() (issue 13): a timed pause of one partition; other keys go on, and the
    sweep index holds the line's slot for the moment it ends."""
    from celery_ckeys.contrib.testing import wait_until

    queue = ConcurrencyQueue("Q", limit=2)
    a, b = slots(store, queue=queue, key="a"), slots(store, queue=queue, key="b")
    until = store.throttle("Q", "a", 0.3)
    assert store.acquire(a, "r1", token("r1")).limit == 0, "a throttled partition admitted"
    assert take(store, b, "r2")[0], "throttling one key held another"
    due = store.client.zrange(store.names.index_key(), 0, -1, withscores=True)
    assert [float(score) for _, score in due] == [until], "its line is not swept when it ends"
    wait_until(lambda: take(store, a, "r1")[0], timeout=10, message="the throttle ends")
    assert store.now_ms() >= until


def test_a_rate_lets_n_runs_start_in_any_window_and_says_when_the_next_may(store: Store) -> None:
    """rate="3/s" (issue 13): three starts, then the fourth is blocked with the time until
    the window lets it start, even with room under the limit; releases do not change that;
    a parked run is woken by the sweep once it may start, and never sooner."""
    woken: list[Wake] = []
    store.on_wakes = woken.extend
    queue = ConcurrencyQueue("R", limit=10, rate="3/s")
    s = slots(store, queue=queue, key="k")
    held = []
    for who in ("r1", "r2", "r3"):
        ok, tok = take(store, s, who)
        assert ok
        held.append((who, tok))
    first = store.read_slot(s[0].tag).starts
    assert len(first) == 3
    blocked = store.acquire(s, "r4", token("r4"))
    assert blocked.status == "blocked" and 0 < blocked.rate_wait_ms <= 1000, blocked
    other = slots(store, queue=queue, key="other")
    assert take(store, other, "o1")[0], "one key's rate held another key back"
    for who, tok in held:
        store.release(s, who, tok)
    assert store.acquire(s, "r4", token("r4")).rate_wait_ms > 0, "a release reset the rate"
    parked = store.acquire(s, "r5", token("r5"), message="m", new_ticket="tr5")
    assert parked.parked and parked.rate_wait_ms > 0
    assert not woken
    sweep_until_woken(store, s[0].tag, woken, "the sweep wakes r5 once the rate lets it start")
    woke_at = store.read_slot(s[0].tag).starts[-1]
    assert woke_at - min(first) >= 1000, "a fourth run started within the first one's second"


def test_a_woken_run_counts_for_the_rate_until_its_copy_claims(store: Store) -> None:
    """Review finding F1 (issue 13): the start of a woken run was logged when it was woken,
    so a copy that claimed more than a window later, or a re-wake, let a fresh run start
    in the same window as it."""
    from celery_ckeys.contrib.testing import wait_until

    woken: list[Wake] = []
    store.on_wakes = woken.extend
    s = slots(store, queue=ConcurrencyQueue("R", limit=10, rate="1/s"), key="k")
    assert take(store, s, "r0")[0]
    assert store.acquire(s, "r1", token("r1"), message="m", new_ticket="tr1").parked
    sweep_until_woken(store, s[0].tag, woken, "r1 is woken once the window allows it")
    woke = store.now_ms()
    wait_until(lambda: store.now_ms() > woke + 1100, timeout=5, message="a window passes")
    assert store.acquire(s, "r2", token("r2")).status == "blocked", \
        "a fresh run started while a woken run, not yet started, held the window's start"
    ok, _ = take(store, s, "r1", ticket="tr1", home=s[0].tag)
    assert ok
    assert store.acquire(s, "r3", token("r3")).rate_wait_ms > 0, "r1's start was not counted"


def test_a_retry_woken_while_its_first_start_is_in_the_window_keeps_that_start(
        store: Store) -> None:
    """Review finding: a woken run's start was logged under its bare task id, the member of
    its pending entry too; its retry (same id, a new stay) woken while that start was still
    in the window overwrote it, and a fresh run started as a third in one window of 2/s."""
    from celery_ckeys.contrib.testing import wait_until

    woken: list[Wake] = []
    store.on_wakes = woken.extend
    s = slots(store, queue=ConcurrencyQueue("RT", limit=10, rate="2/s"), key="k")
    log = s[0].key("s")
    for who in ("A", "B"):
        ok, held = take(store, s, who)
        assert ok
        store.release(s, who, held)
    assert store.acquire(s, "T", token("T"), new_ticket="t1", message="m").parked
    sweep_until_woken(store, s[0].tag, woken, "T woken once A and B leave the window")
    ok, held = take(store, s, "E")  # the room the pending T leaves
    assert ok
    store.release(s, "E", held)
    e_at = store.now_ms()
    wait_until(lambda: store.now_ms() > e_at + 500, timeout=5, message="half a window")
    ok, first = take(store, s, "T", ticket="t1", home=s[0].tag)
    assert ok
    t_at = store.now_ms()
    store.release(s, "T", first, "t1")
    woken.clear()  # T's body retried: the same id again, a fresh stay, blocked by the rate
    assert store.acquire(s, "T", token("T"), new_ticket="t2", message="m2").parked
    sweep_until_woken(store, s[0].tag, woken, "the retry woken once E leaves the window")
    assert store.now_ms() < t_at + 1000, "too slow a host: T's start left the window"
    starts = [score for _, score in store.client.zrange(log, 0, -1, withscores=True)]
    assert len(starts) == 2 and min(starts) < 1e13 <= max(starts), \
        "the retry's pending entry replaced T's start"
    assert store.acquire(s, "F", token("F")).status == "blocked", \
        "a third run started in one window of a rate of 2/s"


@pytest.mark.parametrize("then", ["claims", "forfeits"])
def test_a_rate_cleared_while_a_run_is_woken_leaves_no_log_without_expiry(store: Store,
                                                                         then: str) -> None:
    """The model test on a cluster: a run woken under a live rate made the rate's log of
    starts persistent (its pending entry lived as long as the reservation); the rate was
    cleared before the copy claimed (or gave it back), nothing set an expiry again, and the
    log stayed in Redis for ever. Now it lives the longest window a rate can have."""
    woken: list[Wake] = []
    store.on_wakes = woken.extend
    s = slots(store, queue=ConcurrencyQueue("RC", limit=1), key="k")
    store.set_rate("RC", "5/60000")
    ok, held = take(store, s, "r0")
    assert ok
    assert store.acquire(s, "r1", token("r1"), message="m", new_ticket="tr1").parked
    store.release(s, "r0", held)
    assert [w.ticket for w in woken] == ["tr1"]
    log = Names.redis_key(s[0].tag, "s")
    assert store.client.pttl(log) == -1  # the pending entry lives as long as the reservation
    store.set_rate("RC", None)
    if then == "claims":
        ok, mine = take(store, s, "r1", ticket="tr1", home=s[0].tag)
        assert ok
        # woken under the rate: its claim is a start, even though no rate is seen now
        starts = store.client.zrange(log, 0, -1, withscores=True)
        assert [(m.split(b"@")[0], score < 1e13) for m, score in starts] == [(b"r0", True), (b"r1", True)]
        store.release(s, "r1", mine, "tr1")
    else:
        store.forfeit(s, "r1", "tr1")
    assert 0 < store.client.pttl(log) <= 3_600_000, "the rate's log lives for ever"


def test_a_woken_unit_kept_while_its_run_waits_elsewhere_still_counts_for_the_rate(
        store: Store, request: pytest.FixtureRequest) -> None:
    """Review finding: a woken run claimed its partition, found the total full and kept the
    unit ("@h") while it waited there; its entry in the rate's log expired meanwhile (on
    Cluster its claim step had logged the start already), so when it did start a fresh run
    started beside it within the same window of a rate of 1/s."""
    from celery_ckeys.contrib.testing import wait_until

    st = with_conf(store, ckeys_lock_ttl=30, ckeys_handoff_claim_timeout=0.3)
    request.addfinalizer(st.close)
    woken: list[Wake] = []
    st.on_wakes = woken.extend
    q = ConcurrencyQueue("RK", limit=3, total_limit=2, rate="1/s")
    a, b, c = (slots(st, queue=q, key=k) for k in "abc")
    ok, first = take(st, a, "A1")
    assert ok
    st.release(a, "A1", first)  # a start on a: the next must wait a window
    (ok1, b1), (ok2, c1) = take(st, b, "B1"), take(st, c, "C1")  # the total is full
    assert ok1 and ok2
    assert st.acquire(a, "X", token("X"), message="m", new_ticket="tX").parked
    sweep_until_woken(st, a[0].tag, woken, "X is woken once the rate lets it start")
    kept = st.acquire(a, "X", token("X", ticket="tX"), ticket="tX", home=a[0].tag, message="m")
    assert kept.parked and st.read_slot(a[0].tag).info.get("X") == "@htX"
    since = st.now_ms()
    wait_until(lambda: st.now_ms() > since + 1500, timeout=5, message="a window passes")
    woken.clear()
    st.release(b, "B1", b1)
    home = next(w.tag for w in woken if w.ticket == "tX")
    assert st.acquire(a, "X", token("X", ticket="tX"), ticket="tX", home=home).ok
    st.release(c, "C1", c1)  # room on the total: only the rate may hold Y back
    blocked = st.acquire(a, "Y", token("Y"))
    assert blocked.status == "blocked" and blocked.rate_wait_ms > 0, \
        f"a second start within one window of 1/s: {blocked}"


def test_a_run_woken_before_a_pause_waits_again_when_it_claims(store: Store) -> None:
    """Review finding F9: a woken copy claimed and started on a paused partition."""
    woken: list[Wake] = []
    store.on_wakes = woken.extend
    s = slots(store, queue=ConcurrencyQueue("Q", limit=1), key="k")
    ok, held = take(store, s, "h")
    assert ok
    assert store.acquire(s, "r", token("r"), message="m", new_ticket="tr").parked
    store.release(s, "h", held)
    assert [w.ticket for w in woken] == ["tr"]
    store.set_key_limit("Q", "k", 1, what="paused")
    got = store.acquire(s, "r", token("r", ticket="tr"), ticket="tr", home=s[0].tag,
                        message="m")
    assert not got.ok and got.limit == 0, "a woken run started on a paused partition"
    assert "r" in dict(store.read_slot(s[0].tag).line), "it lost its place in line"


def test_keep_latest_blocked_on_a_total_replaces_nobody(store: Store) -> None:
    """Review finding F2: under Cluster the first step actually needed (a total) was taken
    for the run's own slot, and another key's run waiting there was revoked."""
    queue = ConcurrencyQueue("Q", total_limit=1)
    x = slots(store, queue=queue, key="X")
    assert take(store, x, "x")[0]
    body = json.dumps({"task": "t", "sig": {}})  # the same task as the newcomer's token
    assert store.acquire(slots(store, queue=queue, key="A"), "a", token("a"), message=body,
                         new_ticket="ta").parked
    plan = plan_for(store.config, RunSpec(task_name="t", queue=queue))
    assert plan is not None
    got = store.acquire(plan.slots, "n", token("n"), message=body, new_ticket="tn",
                        place=Place(replace=True))
    assert got.parked and got.replaced == (), "keep_latest replaced another key's run"


def test_a_paused_queue_starts_nothing_and_resume_wakes_its_line(store: Store) -> None:
    """Pause (issue 13): limit 0 while paused, the running run keeps its unit, the waiting
    run keeps its place; resuming, a sweep of the queue's lines wakes it."""
    from celery_ckeys.limits import sweep_queue

    woken: list[Wake] = []
    store.on_wakes = woken.extend
    queue = ConcurrencyQueue("Q", limit=2)
    a, b = slots(store, queue=queue, key="a"), slots(store, queue=queue, key="b")
    ok, held = take(store, a, "r1")
    assert ok
    store.set_key_limit("Q", "a", 1, what="paused")
    got = store.acquire(a, "r2", token("r2"), message="m", new_ticket="tr2")
    assert got.parked and got.limit == 0, "a paused partition admitted a run"
    assert take(store, b, "r3")[0], "pausing one key's partition held another key"
    store.set_queue_limit("Q", 1, field="paused")
    assert store.acquire(b, "r4", token("r4")).limit == 0, "a paused queue admitted a run"
    assert store.renew_many([(a, "r1", held, "hold")]) == [1], "the running run lost its unit"
    store.release(a, "r1", held)
    assert not woken, "a run was woken while its partition is paused"
    store.set_queue_limit("Q", None, field="paused")
    store.set_key_limit("Q", "a", None, what="paused")
    assert sweep_queue(store, "Q") >= 1
    assert [w.ticket for w in woken] == ["tr2"]


def test_a_limit_that_comes_and_goes_never_splits_a_key(store: Store) -> None:
    """Finding 8: with no limit the key's runs take the partition (limit 1) and the key
    mutex; with one they take the partition: either way they meet in the partition."""
    s = slots(store, queue=ConcurrencyQueue("flip"), key="k")
    ok, first = take(store, s, "a")
    assert ok and store.holders_of(store.names.key("k")) == ["a"]
    for limit in (1, None, 1):
        store.set_queue_limit("flip", limit)
        assert not take(store, s, f"b{limit}")[0], f"a second run of k ran with limit {limit}"
    assert not take(store, slots(store, key="k"), "c")[0], "the key without a queue ran too"
    assert store.release(s, "a", first) == 2


def test_renewal_extends_only_the_owners_lease(store: Store) -> None:
    """Finding 6: a stale copy of the same task id owns nothing."""
    s = slots(store, key="r")
    _ok, mine = take(store, s, "a")
    stale = token("a", host="other", pid=2)
    assert store.renew_many([(s, "a", stale, "hold")]) == [0]
    assert store.renew_many([(s, "a", mine, "hold")]) == [1]
    assert store.release(s, "a", stale) == 0
    assert store.holders_of(s[0].tag) == ["a"]


def test_an_expired_lease_is_not_renewed_and_frees_the_slot(store: Store) -> None:
    s = slots(store, key="e")
    _ok, mine = take(store, s, "a")
    store.client.delete(Names.redis_key(s[0].tag, UNITS))  # the lease ran out
    assert take(store, s, "b")[0]
    assert store.renew_many([(s, "a", mine, "hold")]) == [0]
    assert store.release(s, "a", mine) == 0, "an expired lease freed the next holder's"
    assert store.holders_of(s[0].tag) == ["b"]


def test_releases_sent_together_free_idle_full_and_counting_slots(store: Store) -> None:
    """The heartbeat's batch: a key nobody waits on (unlock.lua frees it), a key somebody
    parked behind since it was taken (unlock.lua leaves it to release.lua, which wakes the
    line) and a queue slot, in one call."""
    woken: list[Wake] = []
    store.on_wakes = woken.extend
    full, idle, queue = slots(store, key="rf"), slots(store, key="ri"), slots(
        store, queue=ConcurrencyQueue("rq", 2))
    (_, a), (_, b), (_, q) = take(store, full, "a"), take(store, idle, "b"), take(store, queue, "q")
    assert store.acquire(full, "w", token("w"), new_ticket="t1", message="m").parked
    store.release_many([(full, "a", a, ""), (idle, "b", b, ""), (queue, "q", q, "")])
    assert [(w.ticket, w.message) for w in woken] == [("t1", "m")]
    assert store.holders_of(idle[0].tag) == [] and store.holders_of(queue[0].tag) == []
    assert store.acquire(full, "w", token("w"), ticket="t1").ok, "the woken run could not claim"


def test_counting_slots_past_the_uncontended_case_go_the_long_way(store: Store) -> None:
    """take.lua counts a unit whose time ran out as taken, and give.lua leaves a slot that
    somebody waits on, or that is no longer the run's, to the full scripts: nothing is
    admitted past a limit, nobody in line is skipped, nobody else's unit is freed."""
    woken: list[Wake] = []
    store.on_wakes = woken.extend
    s = slots(store, queue=ConcurrencyQueue("lq", 1), key="t")
    units = Names.redis_key(s[0].tag, UNITS)
    _, a = take(store, s, "a")
    store.client.zadd(units, {"a": 1})  # a's lease ran out (score: an expiry long past)
    ok, b = take(store, s, "b")
    assert ok, "a unit whose lease ran out kept the slot from a fresh run"
    assert store.release(s, "a", a) == 0, "a stale holder freed the unit of the run after it"
    assert store.holders_of(s[0].tag) == ["b"]
    assert store.acquire(s, "c", token("c"), new_ticket="tc", message="m").parked
    store.set_queue_limit("lq", 2)  # room, and a run in line: it goes first
    assert not take(store, s, "d")[0], "a fresh run passed the run in line"
    # (the room made by a raised limit is handed out by the sweeper, or the next release)
    assert store.acquire(s, "e", token("e"), new_ticket="te", message="m").parked
    assert store.release(s, "b", b) == 1
    assert [w.ticket for w in woken] == ["tc", "te"], "the release did not wake the line"


def test_a_resumed_run_that_no_longer_needs_a_key_hands_its_reservation_to_the_line(
        store: Store) -> None:
    """I1 after a limit change: a parent reserved a unit of key K on resuming, a run parked
    behind K, then a limit on its queue made K unneeded. The reservation goes to the line
    at once; left idle, K would go to a fresh run ahead of the parked one."""
    woken: list[Wake] = []
    store.on_wakes = woken.extend
    plan = slots(store, key="K", queue=ConcurrencyQueue("rq"))  # no limit: partition + key K
    key_only = slots(store, key="K")
    _ok, held = take(store, plan, "p")
    wait = json.dumps(["p", "host", 1, "w", ""])
    assert store.step_out(plan, "p", held, wait) == 2
    store.ready(plan, "p", wait)  # its child ended: units are reserved for it
    assert store.acquire(key_only, "b", token("b"), new_ticket="tb", message="mb").parked
    store.set_queue_limit("rq", 2)
    assert store.acquire(plan, "p", token("p"), mode="resume", ticket=wait).ok
    assert [w.ticket for w in woken] == ["tb"], "the parked run was not woken"
    assert not take(store, key_only, "c")[0], "a fresh run took K ahead of the line"


def test_release_of_a_lost_process_spares_a_copy_held_elsewhere(store: Store) -> None:
    s = slots(store, queue=ConcurrencyQueue("lq", 2))
    assert store.acquire(s, "a", token("a", host="h1", pid=7)).ok
    assert store.release_lost(s, "a", token_prefix("a", "h2", 7)) == 0
    assert store.release_lost(s, "a", token_prefix("a", "h1", 8)) == 0
    assert store.release_lost(s, "a", token_prefix("a", "h1", 7)) == 1


def test_fences_only_grow_and_a_stale_holder_gets_none(store: Store) -> None:
    s = slots(store, key="f")
    fences = []
    for who in "abcd":
        _ok, mine = take(store, s, who)
        fences.append(store.fence(s[0], who, mine))
        assert store.release(s, who, mine) == 1
        assert store.fence(s[0], who, mine) == -1
    assert fences == sorted(set(fences)) and len(fences) == 4


def test_nothing_is_left_once_runs_end(store: Store) -> None:
    """Issue 11: no coordination key outlives the runs, whatever the number of keys."""
    held = []
    for i in range(20):
        s = slots(store, key=f"k{i}")
        _ok, mine = take(store, s, f"r{i}")
        held.append((s, f"r{i}", mine))
    for s, who, mine in held:
        assert store.release(s, who, mine) == 1
    assert store.scan_tags() == {}


def test_a_parked_run_is_woken_with_its_ticket_and_only_that_copy_claims(store: Store) -> None:
    woke: list[Wake] = []
    store.on_wakes = woke.extend
    s = slots(store, key="w")
    ok, holder = take(store, s, "h")
    assert store.acquire(s, "p", token("p"), message="?").status == "needs_message"
    parked = store.acquire(s, "p", token("p"), message='{"m":1}', new_ticket="T1")
    assert parked.parked
    assert store.acquire(s, "n", token("n"), message="?").status == "needs_message", \
        "a fresh run passed the line"
    assert store.release(s, "h", holder) == 1
    assert woke == [Wake(s[0].tag, "T1", '{"m":1}')]
    assert store.acquire(s, "p", token("p")).why == "parked", "a copy without the ticket ran"
    ok, claimed = take(store, s, "p", ticket="T1", home=s[0].tag)
    assert ok
    # a copy with its ticket while the stay runs: busy, not dropped (the holder may be dead)
    busy = store.acquire(s, "p", token("p", ticket="T1"), ticket="T1")
    assert busy.status == "blocked" and not busy.parked
    assert store.release(s, "p", claimed, "T1") == 1
    assert store.acquire(s, "p", token("p", ticket="T1"), ticket="T1").why == "dup", \
        "a copy of a finished stay ran again"


def test_scripts_lost_in_a_restart_are_loaded_again(store: Store) -> None:
    s = slots(store, key="n")
    _ok, mine = take(store, s, "a")
    store.client.script_flush()
    assert store.renew_many([(s, "a", mine, "hold")]) == [1]
    store.client.script_flush()
    assert store.release(s, "a", mine) == 1


def test_the_hot_path_outlives_its_connection_being_killed(store: Store,
                                                           redis_server: RedisServer) -> None:
    """The hot path's own connection (store._Direct) dropped by the server: the next call
    goes through the client (redis-py's retry) and the one after reconnects it; no answer
    is lost or taken for another."""
    import redis

    admin = redis.Redis(port=redis_server.port)
    for n in range(3):
        s = slots(store, key=f"killed{n}")
        ok, mine = take(store, s, "a")
        assert ok
        # the store's own connections (the kept one and the pool's), not other tests'
        for own in {int(store.command("CLIENT", "ID")), store.client.client_id()}:
            admin.client_kill_filter(_id=own)
        assert not take(store, s, "b")[0], "a killed connection let a second owner in"
        assert store.release(s, "a", mine) == 1
        assert take(store, s, "b")[0], "the key was not free after its release"


def test_an_exception_before_the_reply_leaves_no_reply_for_the_next_command(
        store: Store) -> None:
    """An exception raised after a command is sent and before its reply is read (Celery's
    soft time limit is raised by a signal at any instant) must not leave that reply for
    the next command on the kept connection: a stale "OK" would admit a second owner."""
    s = slots(store, key="held")
    assert take(store, s, "a")[0]  # the direct connection exists now
    conn = store._direct._kept[0]
    real = conn.read_response

    class Interrupted(Exception):
        pass

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        conn.read_response = real
        raise Interrupted

    conn.read_response = interrupted
    with pytest.raises(Interrupted):
        take(store, slots(store, key="other"), "b")  # its SET is sent, the reply left
    assert not take(store, s, "c")[0], "a stale reply admitted a second owner"


def test_threads_finding_the_kept_connection_taken_make_another(store: Store) -> None:
    """Threads share the kept connections; one that finds them all taken makes another,
    kept afterwards up to a few. Every run is admitted once and freed."""
    errors: list[BaseException] = []
    made: list[int] = []
    assert store.client is not None  # made now, with the store's _Direct
    plain = store._direct._take

    def counted() -> Any:
        if not store._direct._kept:
            made.append(1)
        return plain()

    store._direct._take = counted  # type: ignore[method-assign]

    def runs(t: int) -> None:
        try:
            for i in range(40):
                s = slots(store, key=f"th{t}-{i}")
                ok, mine = take(store, s, f"r{t}-{i}")
                assert ok and not take(store, s, f"x{t}-{i}")[0]
                assert store.release(s, f"r{t}-{i}", mine) == 1
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=runs, args=(t,)) for t in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors, errors
    held = [Names.redis_key(s.tag, UNITS) for t in range(6) for i in range(40)
            for s in slots(store, key=f"th{t}-{i}")]
    assert not store.client.exists(*held), "a unit outlived its run"
    assert len(made) >= 2, "no thread ever found the kept connection taken"
    assert 1 <= len(store._direct._kept) <= store._direct.KEEP, "connections piled up"


def test_soft_time_limits_at_any_instant_never_mix_replies_nor_lose_the_fast_path(
        store: Store) -> None:
    """Celery's soft time limit is an exception raised by a signal at whatever instruction
    the run is at. Raised at random instants of the hot path's commands: no command ever
    reads another's reply (a held key never admits a second owner), and afterwards the hot
    path still runs on the kept connection, not through the client."""
    import gc
    import random
    import signal

    from billiard.exceptions import SoftTimeLimitExceeded

    def soft_limit(*_: Any) -> None:
        raise SoftTimeLimitExceeded()

    held = slots(store, key="held")
    assert take(store, held, "owner")[0]
    warm = slots(store, key="warm")  # every script loaded: NOSCRIPT goes through the client
    ok, mine = take(store, warm, "w")
    assert ok and store.release(warm, "w", mine) == 1
    gc.collect()
    connections = len(store.client.client_list())  # other tests' too, on the shared server
    rng = random.Random(7)
    old = signal.signal(signal.SIGALRM, soft_limit)
    interrupted = 0
    try:
        for n in range(1500):
            try:
                try:
                    signal.setitimer(signal.ITIMER_REAL, rng.uniform(1e-6, 2e-4))
                    fresh = slots(store, key=f"f{n}")
                    take(store, fresh, f"r{n}")  # a SET whose OK may be left unread
                    admitted = take(store, held, f"second{n}")[0]
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            except SoftTimeLimitExceeded:
                interrupted += 1
                continue
            assert not admitted, f"command {n} read another command's reply"
    finally:
        signal.signal(signal.SIGALRM, old)
    assert interrupted > 0, "no soft limit landed inside a command"
    client = store.client
    through_client: list[Any] = []
    plain = client.execute_command
    client.execute_command = lambda *a, **k: through_client.append(a) or plain(*a, **k)
    for n in range(20):
        ok, mine = take(store, slots(store, key=f"after{n}"), f"a{n}")
        assert ok and store.release(slots(store, key=f"after{n}"), f"a{n}", mine) == 1
    assert not through_client, "the hot path lost its kept connection for good"
    assert len(store._direct._kept) == 1
    gc.collect()
    assert len(client.client_list()) - connections < 10, "connections lost to soft limits"


def test_a_waiting_run_is_never_taken_for_idle(store: Store) -> None:
    """A copy of a run blocked in wait_for must not take the fast path (the run waits, it
    has not ended)."""
    s = slots(store, key="wf")
    _ok, mine = take(store, s, "p")
    wait = json.dumps(["p", "host", 1, "w", ""])
    assert store.step_out(s, "p", mine, wait) == 1
    copy = store.acquire(s, "p", token("p"))
    assert copy.status == "blocked", "a copy of a waiting run was admitted"
    assert take(store, s, "other")[0], "the waiting run kept its unit"


@pytest.mark.parametrize("owner", ["store", "recorder"])
def test_a_forked_child_never_waits_on_its_parents_client(redis_server: RedisServer, owner: str) -> None:
    """A worker's main process uses Redis from background threads (the sweeper, the
    recorder of lost runs) while it forks pool processes. A child that used, closed or let
    go of the client it inherited waited on the pool lock such a thread held at the instant
    of the fork (redis-py gives up after 5 s): the child's first run stalled."""
    from celery_ckeys.contrib.testing import ProcessLocalRedis

    if owner == "store":
        store = make(redis_server.url, "single")
        client: Any = lambda: store.client  # noqa: E731
    else:
        local = ProcessLocalRedis(f"{redis_server.url}/0")
        client = lambda: local.client  # noqa: E731
    assert client().ping()
    held, done = threading.Event(), threading.Event()

    def mid_command() -> None:  # another thread of the parent, inside the pool's lock
        with client().connection_pool._fork_lock:
            held.set()
            done.wait(30)

    threading.Thread(target=mid_command, daemon=True).start()
    assert held.wait(10)
    try:
        pid = os.fork()
        if pid == 0:  # the child reaches Redis with a client of its own, at once
            began = time.monotonic()
            ok = client().ping() and time.monotonic() - began < 2
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
    finally:
        done.set()
    assert os.waitstatus_to_exitcode(status) == 0


def test_each_script_carries_only_the_library_it_uses(redis_server: RedisServer) -> None:
    """scripts.script_source: a script is sent with the library definitions it names (and
    those they name), not the whole library; each still compiles on the server."""
    import redis

    from celery_ckeys.scripts import script_source
    from celery_ckeys.store import SCRIPTS

    client = redis.Redis(port=redis_server.port)
    for name in SCRIPTS:
        client.script_load(script_source(name))
    # the helpers they name, nothing else
    for bare, helpers in (("give", ["give_own"]), ("unlock", ["now_ms", "give_own"])):
        assert re.findall(r"^local function (\w+)\(", script_source(bare), re.M) == helpers
    take_src = script_source("take")
    assert "local function resolve_all(" in take_src and "local function key(" in take_src
    assert "local function refill(" not in take_src, "take.lua got lib.lua's line helpers"
    assert "local LIM, USED" in take_src, "a multi-name definition was dropped"

