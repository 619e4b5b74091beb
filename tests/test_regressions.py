"""Interleavings an adversarial review of protocol v2 found, each reproduced against the
real scripts; every test here failed before its fix. Time is moved by editing scores where a
lease or a claim window would run out, not by sleeping."""

from __future__ import annotations

import itertools
import json
import uuid
from datetime import datetime, timezone
from typing import Any, Iterator

import pytest
from celery import Celery
from servers import Cluster

from celery_ckeys.admission import RunSpec, plan_for
from celery_ckeys.cluster import ClusterStore
from celery_ckeys.config import from_conf
from celery_ckeys.embedded import RedisServer
from celery_ckeys.naming import UNITS, Names
from celery_ckeys.queues import ConcurrencyQueue
from celery_ckeys.slots import Place
from celery_ckeys.store import Store, Wake

_ns = itertools.count()


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = Cluster().start()
    yield c
    c.stop()


def make(url: str, cluster: bool = False, **conf: Any) -> tuple[Store, list[Wake]]:
    config = from_conf({"ckeys_redis_url": url, "ckeys_lock_ttl": 60, "ckeys_retry_countdown": 1,
                        "ckeys_handoff_claim_timeout": 5, "ckeys_redis_cluster": cluster, **conf},
                       default_namespace=f"rev-{next(_ns)}")
    store = (ClusterStore if cluster else Store)(config)
    woken: list[Wake] = []
    store.on_wakes = woken.extend
    return store, woken


@pytest.fixture(params=["one-redis", "cluster"])
def stores(request: pytest.FixtureRequest, redis_server: RedisServer) -> Iterator[tuple[Store, list[Wake]]]:
    if request.param == "cluster":
        c = request.getfixturevalue("cluster")
        store, woken = make(c.url, cluster=True)
    else:
        store, woken = make(f"{redis_server.url}/0")
    yield store, woken
    store.close()


def token(run: str, ticket: str = "") -> str:
    return json.dumps([run, "h1", 1, uuid.uuid4().hex[:8], ticket, "t", 0, []], separators=(",", ":"))


def wait_token(run: str) -> str:
    return json.dumps([run, "h1", 1, uuid.uuid4().hex[:8], ""], separators=(",", ":"))


def slots_of(store: Store, key: str | None = None, queue: str | None = None) -> Any:
    plan = plan_for(store.config, RunSpec("t", key=key,
                                          queue=ConcurrencyQueue(queue) if queue else None))
    assert plan is not None
    return plan.slots


def admit(store: Store, slots: Any, run: str, tok: str, ticket: str = "", home: str | None = None,
          first_ms: int = 0) -> Any:
    """As gate.admit does it: ask with "?", then give the message."""
    kw: dict[str, Any] = dict(ticket=ticket, new_ticket=ticket or uuid.uuid4().hex[:16],
                              place=Place(order_ms=first_ms), home=home)
    result = store.acquire(slots, run, tok, message="?", **kw)
    if result.status == "needs_message":
        result = store.acquire(slots, run, tok, message=json.dumps({"run": run}), **kw)
    return result


def expire(store: Store, tag: str, who: str) -> None:
    """``who``'s unit on ``tag`` runs out now (its lease, or its claim window)."""
    store.client.zadd(Names.redis_key(tag, UNITS), {who: 1}, xx=True)


def test_a_lapsed_hold_is_handed_on_at_once_so_no_fresh_run_passes_the_line(
        redis_server: RedisServer) -> None:
    """I1: a probe pruned the last, lapsed hold of a slot with a line and did not refill it;
    the units key vanished and the next call was admitted by SET NX, ahead of the line."""
    store, woken = make(f"{redis_server.url}/0")
    s = slots_of(store, key="k")
    assert admit(store, s, "A", token("A")).ok
    assert admit(store, s, "B", token("B")).parked
    expire(store, s[0].tag, "A")  # A stalls past its lease
    late = admit(store, s, "C", token("C"))
    assert not late.ok, "a fresh run passed the line"
    assert [w.tag for w in woken] == [s[0].tag], "the first in line was not woken"


def test_a_copy_of_a_woken_run_expires_before_the_memo_of_its_stay(redis_server: RedisServer) -> None:
    """L2: a copy of a woken run that sat in the broker longer than the memo's life ran a
    finished run again. Copies now expire after ckeys_handoff_copy_ttl, the memo lives that
    long, and re-wakes back off."""
    from celery import Celery

    from celery_ckeys.handoff import publish

    store, woken = make(f"{redis_server.url}/0", ckeys_handoff_copy_ttl=120)
    s = slots_of(store, key="k")
    ta = token("A")
    assert admit(store, s, "A", ta).ok
    assert admit(store, s, "B", token("B")).parked
    store.release(s, "A", ta)
    first = store.read_slot(s[0].tag).units[0][1]
    expire(store, s[0].tag, "B")  # its claim window passes: woken again, with a longer one
    store.sweep(s[0])
    state = store.read_slot(s[0].tag)
    assert len(woken) == 2 and woken[0].ticket == woken[1].ticket
    assert state.units[0][1] - state.now_ms > (first - state.now_ms) + 4000, "no back-off"
    tb = token("B", woken[1].ticket)
    assert admit(store, s, "B", tb, ticket=woken[1].ticket, home=woken[1].tag).ok
    store.release(s, "B", tb, woken[1].ticket)
    memo = Names.redis_key(s[0].tag, "x:B")
    assert 110_000 < store.client.pttl(memo) <= 120_000
    # every woken copy carries an expires no later than that life, and says it is ours
    sent: list[dict[str, Any]] = []
    app = Celery("rev", set_as_current=False)
    app.conf.update(ckeys_redis_url=store.config.redis_url, ckeys_handoff_copy_ttl=120)
    app.send_task = lambda name, args, kwargs, **options: sent.append(options)  # type: ignore[method-assign]
    message = json.dumps({"task": "t", "sig": {"task": "t", "args": [], "kwargs": {},
                                              "options": {"headers": {}}}})
    soon = "2000-01-01T00:00:00+00:00"
    later = json.dumps({"task": "t", "sig": {"task": "t", "args": [], "kwargs": {},
                                            "options": {"headers": {}, "expires": soon}}})
    publish(app, [Wake("tag", "R", message), Wake("tag", "R", later)])
    left = (sent[0]["expires"] - datetime.now(timezone.utc)).total_seconds()
    assert 110 < left <= 120 and sent[0]["headers"]["ckeys_ticket"] == ["R", "tag", 1, None]
    assert sent[1]["expires"] == soon and sent[1]["headers"]["ckeys_ticket"] == ["R", "tag", 0, None]


def test_a_woken_run_keeps_its_home_unit_while_asked_for_its_message(
        stores: tuple[Store, list[Wake]]) -> None:
    """5.1 under Cluster: a woken run that claimed its home, then met a later full slot, was
    asked for its message and gave its home back; two woken runs handed it back and forth."""
    store, woken = stores
    both = slots_of(store, key="k", queue="q")  # q unlimited: [q[k] (1), key k]
    tw = token("W")
    assert admit(store, both, "W", tw).ok
    assert admit(store, both, "X", token("X"), first_ms=1000).parked
    assert admit(store, both, "Y", token("Y"), first_ms=2000).parked
    store.release(both, "W", tw)  # wakes X at q[k]
    assert admit(store, slots_of(store, key="k"), "Z", token("Z")).ok  # Z holds key k
    (wake,) = woken
    again = admit(store, both, "X", token("X", wake.ticket), ticket=wake.ticket, home=wake.tag)
    assert again.parked and again.blocked is not None and again.blocked.kind == "key"
    home = store.read_slot(both[0].tag)
    assert home.info.get("X", "").startswith("@h"), "X did not keep its home unit"
    assert len(woken) == 1, "the home unit went to the next run and back"


def test_two_resuming_runs_never_wait_on_each_other(stores: tuple[Store, list[Wake]]) -> None:
    """5.1 under Cluster: a resuming run blocked on its first slot stayed first in the resume
    order of its second, got it reserved, and two runs each held what the other needed."""
    store, _ = stores
    both = slots_of(store, key="k", queue="q")
    key_only = slots_of(store, key="k")
    ty = token("Y")
    taken_y = store.acquire(both, "Y", ty).taken
    wy = wait_token("Y")
    store.step_out(taken_y, "Y", ty, wy)  # Y waits on q[k] and key k
    store.set_queue_limit("q", 1)
    tx = token("X")
    taken_x = store.acquire(both, "X", tx).taken
    wx = wait_token("X")
    store.step_out(taken_x, "X", tx, wx)  # X waits on q[k] only
    tw = token("W")
    taken_w = store.acquire(both, "W", tw).taken
    store.set_queue_limit("q", None)  # the key mutex is needed again
    tz = token("Z")
    assert store.acquire(key_only, "Z", tz).ok
    store.ready(taken_x, "X", wx)
    store.ready(taken_y, "Y", wy)
    store.release(taken_w, "W", tw)
    done: set[str] = set()
    for attempt in range(4):
        for who, wt in (("X", wx), ("Y", wy)):
            if who not in done and store.acquire(both, who, token(who), mode="resume",
                                                 ticket=wt).ok:
                done.add(who)
                store.release(both, who, "")  # (it ends later; what matters is it resumed)
        if attempt == 0:
            store.release(key_only, "Z", tz)
    assert done, "both resuming runs wait on each other"


def test_a_dead_waiters_place_in_a_resume_order_is_swept(redis_server: RedisServer) -> None:
    """B1: a resume order entry kept a slot's keys for ever (never indexed for a sweep) once
    the waiter's whole host died."""
    store, _ = make(f"{redis_server.url}/0")
    s = slots_of(store, key="k")
    tx = token("X")
    assert store.acquire(s, "X", tx).ok
    wx = wait_token("X")
    store.step_out(s, "X", tx, wx)
    tz = token("Z")
    assert store.acquire(s, "Z", tz).ok
    store.ready(s, "X", wx)  # k is full: X joins the resume order
    assert s[0].tag in [t for t, _ in store.client.zrange(store.names.index_key(), 0, -1,
                                                          withscores=True)
                        for t in [t.decode()]], "the slot is not in the sweep index"
    # the host of X and Z dies: their leases run out, and the sweeper goes by
    client = store.client
    expire(store, s[0].tag, "Z")
    client.zadd(Names.redis_key(s[0].tag, "w"), {"X": 1}, xx=True)
    store.sweep(s[0])
    assert store.scan_tags() == {}, f"left behind: {store.scan_tags()}"


def test_a_re_wake_never_creates_a_unit_above_a_lowered_limit(redis_server: RedisServer) -> None:
    """S1: a woken run not claimed in time was woken again with a new unit although the
    limit had been lowered meanwhile and the slot was full under it."""
    store, woken = make(f"{redis_server.url}/0")
    store.set_queue_limit("q", 2)
    s = slots_of(store, queue="q")
    t1, t2 = token("H1"), token("H2")
    assert store.acquire(s, "H1", t1).ok and store.acquire(s, "H2", t2).ok
    assert admit(store, s, "B", token("B")).parked
    store.release(s, "H2", t2)  # wakes B
    store.set_queue_limit("q", 1)
    expire(store, s[0].tag, "B")  # B's copy does not arrive in time
    store.sweep(s[0])
    state = store.read_slot(s[0].tag)
    assert [t for t, e in state.units if e > state.now_ms] == ["H1"]
    assert [t for t, _ in state.line] == ["B"], "B did not go back to the head of its line"
    store.release(s, "H1", t1)
    assert woken[-1].tag == s[0].tag and json.loads(woken[-1].message)["run"] == "B"


# -- a second review ----------------------------------------------------------------------


def test_a_copy_with_the_ticket_of_a_dead_hold_is_deferred_not_dropped(
        stores: tuple[Store, list[Wake]]) -> None:
    """L2: a redelivered copy of a woken run met the hold of its own stay and was dropped as
    a duplicate; the hold's process was dead, so the unit went without a memo and the run was
    nowhere. A hold proves only that a stay started: the copy is now busy, and runs later."""
    from celery_ckeys.store import token_prefix

    store, woken = stores
    s = slots_of(store, key="k")
    ta = token("A")
    assert admit(store, s, "A", ta).ok
    assert admit(store, s, "X", token("X")).parked
    store.release(s, "A", ta)
    (wake,) = woken
    assert admit(store, s, "X", token("X", wake.ticket), ticket=wake.ticket, home=wake.tag).ok
    # X's worker dies; the broker redelivers the same message (same ticket) at once
    again = admit(store, s, "X", token("X", wake.ticket), ticket=wake.ticket, home=wake.tag)
    assert again.status == "blocked" and not again.parked, "the copy was dropped"
    store.release_lost(s, "X", token_prefix("X", "h1", 1))
    assert admit(store, s, "X", token("X", wake.ticket), ticket=wake.ticket, home=wake.tag).ok, \
        "the run of the dead process never ran again"


def test_renewing_a_hold_leaves_a_slot_with_a_woken_run_persistent(redis_server: RedisServer) -> None:
    """I1: renew gave the units key of a slot with a woken run a TTL; when the renewing
    holder's host died, the key expired with the woken reservation in it and nothing woke
    the run again."""
    store, woken = make(f"{redis_server.url}/0")
    store.set_queue_limit("q", 2)
    s = slots_of(store, queue="q")
    ta, tb = token("A"), token("B")
    assert store.acquire(s, "A", ta).ok and store.acquire(s, "B", tb).ok
    assert admit(store, s, "X", token("X")).parked
    store.release(s, "A", ta)
    assert len(woken) == 1
    assert store.renew_many([(s, "B", tb, "hold")]) == [1]
    for role in (UNITS, "i"):
        assert store.client.pttl(Names.redis_key(s[0].tag, role)) == -1, \
            f"renew put a TTL on the {role} key of a slot with a woken run"


def test_a_woken_copy_whose_run_needs_no_slot_any_more_gives_its_unit_back(
        redis_server: RedisServer) -> None:
    """S3: a woken run whose plan became empty (the environment limit was removed) ran
    without calling the gate's admission, so its woken unit was woken again, and the run ran
    again, every claim window."""
    from types import SimpleNamespace

    from celery_ckeys.gate import leave_home
    from celery_ckeys.publish import HEADER_TICKET

    old, woken = make(f"{redis_server.url}/0", ckeys_environment_limit=1,
                      ckeys_burst_factor=1.0)
    plan = plan_for(old.config, RunSpec("t"))
    assert plan is not None
    s = plan.slots
    ta = token("A")
    assert old.acquire(s, "A", ta).ok
    assert admit(old, s, "X", token("X")).parked
    old.release(s, "A", ta)
    (wake,) = woken
    rewoken: list[Wake] = []
    new = Store(from_conf({"ckeys_redis_url": f"{redis_server.url}/0"},
                          default_namespace=old.config.namespace))
    new.on_wakes = rewoken.extend
    assert plan_for(new.config, RunSpec("t")) is None
    leave_home(SimpleNamespace(name="t"), SimpleNamespace(id="X"), new,
               {HEADER_TICKET: [wake.ticket, wake.tag, 1]})
    home = next(slot for slot in s if slot.tag == wake.tag)
    new.sweep(home)
    assert rewoken == [], "the run was woken again"
    assert not store_keys(new, wake.tag), "the line kept state"


def store_keys(store: Store, tag: str) -> list[str]:
    return [k for k in store.client.scan_iter(match=f"ckeys:{{{tag}}}:*")]


# -- the second review (2026-12-01) -------------------------------------------------

def test_the_sweeper_never_wakes_runs_up_to_a_recorded_limit_cleared_since(
        stores: tuple[Store, list[Wake]]) -> None:
    """F5: the sweeper, which has no declaring code at hand, resolved a queue slot with the
    limit last resolved there (the recorded 5), not the declared 2 that applies once the
    recorded limit is cleared: it woke three runs, and all three claimed."""
    from celery_ckeys.admission import slot_for_tag

    store, woken = stores
    plan = plan_for(store.config, RunSpec("t", queue=ConcurrencyQueue("q", 2)))
    assert plan is not None
    slot = plan.slots[0]  # the queue (its total slot, unused, follows)
    store.set_queue_limit("q", 5)
    holds = {f"H{i}": token(f"H{i}") for i in range(1, 6)}
    for who, tok in holds.items():
        assert admit(store, plan.slots, who, tok).ok
    for who in ("P1", "P2", "P3"):
        assert admit(store, plan.slots, who, token(who)).parked
    store.set_queue_limit("q", None)  # the declared 2 applies again
    for who in ("H1", "H2", "H3"):
        store.release(plan.slots, who, holds[who])
    assert woken == []  # 2 units are left, limit 2
    swept = slot_for_tag(store.config, store.names, slot.tag)
    assert swept is not None
    store.sweep(swept)
    assert woken == []
    store.release(plan.slots, "H4", holds["H4"])  # one unit left: one run is woken
    assert len(woken) == 1


def test_a_run_that_keeps_an_earlier_unit_parks_at_the_head_of_the_next_line(
        stores: tuple[Store, list[Wake]]) -> None:
    """F6: under Cluster the order a kept run parks with arrives already lowered (negative),
    and acquire.lua took any order <= 0 for "now": the run parked behind everybody while it
    kept the earlier slot's unit (protocol.md 5.1 promises the head of the line)."""
    store, woken = stores
    spec = RunSpec("t", key="k", queue=ConcurrencyQueue("q"))
    both = plan_for(store.config, spec)
    key_only = plan_for(store.config, RunSpec("t", key="k"))
    assert both is not None and key_only is not None
    tw = token("W")
    assert admit(store, both.slots, "W", tw).ok  # q unlimited: q[k] and key k
    assert admit(store, both.slots, "X", token("X"), first_ms=1000).parked
    store.release(both.slots, "W", tw)  # X is woken at q[k]
    (wake,) = woken
    tz = token("Z")
    assert store.acquire(key_only.slots, "Z", tz).ok  # Z holds key k
    for i, who in enumerate(("L1", "L2")):
        assert admit(store, key_only.slots, who, token(who), first_ms=2000 + i).parked
    x = admit(store, both.slots, "X", token("X", wake.ticket), ticket=wake.ticket, home=wake.tag)
    assert x.parked and x.blocked is not None and x.blocked.tag == key_only.slots[0].tag
    woken.clear()
    store.release(key_only.slots, "Z", tz)
    assert [json.loads(w.message)["run"] for w in woken] == ["X"]


def test_a_lost_reply_to_step_out_never_leaves_a_wait_renewed(redis_server: RedisServer) -> None:
    """F7: wait_for moved the heartbeat from the hold to the wait before stepping out; when
    the step-out script ran but its reply was lost, the run ended with the error and its
    process went on renewing the wait for ever, so every later copy of the run was busy."""
    from celery.app.task import Context
    from celery.result import AsyncResult

    from celery_ckeys import KeyedTask, gate
    from celery_ckeys.errors import CoordinationUnavailable
    from celery_ckeys.heartbeat import heartbeat

    app = Celery("f7", broker="memory://", set_as_current=False)
    app.conf.update(ckeys_redis_url=f"{redis_server.url}/0", ckeys_namespace=f"f7-{uuid.uuid4().hex[:6]}")

    @app.task(base=KeyedTask, bind=True, name="f7.parent", concurrency_key="k:{k}")
    def parent(self: Any, k: str) -> Any:
        return self.wait_for(AsyncResult("child-of-f7", app=app), timeout=5)

    store = gate.store_of(app)
    real = store.step_out

    def reply_lost(*args: Any, **kwargs: Any) -> Any:
        real(*args, **kwargs)  # the script ran on the server...
        raise CoordinationUnavailable("...but its reply never arrived")

    store.step_out = reply_lost  # type: ignore[method-assign]
    parent.request_stack.push(Context(id="F7", args=("a",), kwargs={}, headers={},
                                      called_directly=False, is_eager=False, hostname="w1"))
    try:
        with pytest.raises(CoordinationUnavailable):
            gate.run(parent, ("a",), {})
    finally:
        parent.request_stack.pop()
        store.step_out = real  # type: ignore[method-assign]
    assert [(h.owner, h.role) for h in heartbeat.holdings() if h.owner == "F7"] == []


def test_a_claimed_copy_whose_host_died_is_published_again_when_its_redelivery_expires(
        redis_server: RedisServer) -> None:
    """F1: a woken copy claimed its reservation (its message left the slot), then its host
    died and its lease ran out: Redis knew nothing of the run. The broker redelivered the
    message only after its visibility timeout, past the copy's life, and Celery discarded it
    as expired by us: the run, never revoked and never finished, was lost."""
    from types import SimpleNamespace

    from celery_ckeys import KeyedTask, gate, worker

    app = Celery("f1", broker="memory://", set_as_current=False)
    app.conf.update(ckeys_redis_url=f"{redis_server.url}/0", ckeys_deferral="handoff",
                    ckeys_namespace=f"f1-{uuid.uuid4().hex[:6]}")

    @app.task(base=KeyedTask, bind=True, name="f1.t", concurrency_key="k:{k}")
    def t(self: Any, k: str) -> str:
        return k

    sent: list[dict[str, Any]] = []
    app.send_task = lambda name, args=(), kwargs=None, **options: sent.append(  # type: ignore[method-assign]
        {"name": name, "args": list(args), **options})
    store = gate.store_of(app)
    plan = gate.plan_of(t, {}, ("a",), {})
    assert plan is not None
    ta = token("A")
    assert store.acquire(plan.slots, "A", ta).ok
    message = json.dumps({"task": "f1.t", "sig": {"task": "f1.t", "args": ["a"], "kwargs": {},
                                                 "options": {"headers": {}}}})
    assert store.acquire(plan.slots, "X", token("X"), message=message, new_ticket="R1").parked
    store.release(plan.slots, "A", ta)
    (woken,) = sent
    ticket, home, ours, _own = woken["headers"]["ckeys_ticket"]
    assert ours == 1
    copy = SimpleNamespace(id="X", args=("a",), kwargs={}, headers=dict(woken["headers"]),
                           delivery_info={"exchange": "", "routing_key": "celery"})
    worker._on_revoked(sender=t, request=copy, expired=True)
    assert len(sent) == 1  # still woken in Redis: it is woken again, nothing to publish
    assert admit(store, plan.slots, "X", token("X", ticket), ticket=ticket, home=home).ok
    # the host dies; the lease runs out; the next call on the slot prunes it
    store.client.zadd(Names.redis_key(plan.slots[0].tag, UNITS), {"X": 1}, xx=True)
    tb = token("B")
    assert store.acquire(plan.slots, "B", tb).ok
    store.release(plan.slots, "B", tb)
    worker._on_revoked(sender=t, request=copy, expired=True)  # the late redelivery
    assert len(sent) == 2 and sent[1]["task_id"] == "X" and sent[1]["args"] == ["a"]
    assert "ckeys_ticket" not in sent[1]["headers"] and sent[1]["expires"] is None


def test_the_fence_can_be_read_from_a_thread_the_body_starts(redis_server: RedisServer) -> None:
    """G2 (a review of the F4 fix): with active runs found by task id and thread, a thread
    started by the body found no active run and ckeys_fence raised 'holds no slot'."""
    import threading

    from celery.app.task import Context

    from celery_ckeys import KeyedTask, gate

    app = Celery("g2", broker="memory://", set_as_current=False)
    app.conf.update(ckeys_redis_url=f"{redis_server.url}/0", ckeys_namespace=f"g2-{uuid.uuid4().hex[:6]}")
    seen: list[Any] = []

    @app.task(base=KeyedTask, bind=True, name="g2.t", concurrency_key="k:{k}")
    def t(self: Any, k: str) -> None:
        request = self.request

        def read() -> None:
            try:
                seen.append(request.ckeys_fence)
            except Exception as exc:
                seen.append(exc)
        worker = threading.Thread(target=read)
        worker.start()
        worker.join()

    t.request_stack.push(Context(id="G2", args=("a",), kwargs={}, headers={},
                                 called_directly=False, is_eager=False, hostname="w1"))
    try:
        gate.run(t, ("a",), {})
    finally:
        t.request_stack.pop()
    assert len(seen) == 1 and isinstance(seen[0], int) and seen[0] > 0
