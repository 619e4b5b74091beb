"""Issue 12 on real workers, in handoff mode: fair dequeue between tenants sharing a total,
priorities within a line, limits computed per key and recorded per key."""

from __future__ import annotations

import re

from conftest import Env, wait_until

from celery_ckeys.introspect import explain, status
from celery_ckeys.naming import LINE, Names


def starts(env: Env, prefix: str) -> list[str]:
    """The first label (the tenant) of each run that started, in start order."""
    return [e["labels"][0] for e in env.events("start") if e["labels"][0].startswith(prefix)]


def line_length(env: Env, tag: str) -> int:
    return int(env.coord().zcard(Names.redis_key(tag, LINE)))


def test_a_trickle_of_two_tenants_finishes_long_before_a_flood_sharing_a_total(env: Env) -> None:
    """30 runs of "flood" wait for a total of 2 before two other tenants publish 2 runs each:
    the freed slots go round robin, so the trickle runs as soon as its turn comes (about
    one slot turnover per tenant), not after the flood's backlog (first come first served)."""
    env.configure(ckeys_deferral="handoff")
    env.workers(count=1, concurrency=4)
    work = env.app().tasks["ckt.work"]
    fair = {"name": "fair", "limit": 50, "total_limit": 2}
    flood = [work.apply_async((["fair:flood", "fair:all"], 0.2), concurrency_queue=fair,
                              concurrency_key="flood") for _ in range(30)]
    total = env.names.total("fair")
    wait_until(lambda: line_length(env, total) >= 20, timeout=60,
               message="the flood waits in the total's line")
    last = env.coord().zrange(Names.redis_key(total, LINE), -1, -1)[0]  # the line's tail
    why = explain(env.app(), last.decode() if isinstance(last, bytes) else last)
    assert why.state == "parked" and why.blocked_by == "queue fair (total)"
    assert "keys take turns here: you are next after flood" in why.detail, why.detail
    # what runs now, per key; none when a turnover falls between the reads of the total and
    # of the partition (explain reads slot by slot), or the freed unit is on its way
    assert re.search(r"\(flood has [12] running\)$", why.detail) or (
        "running" not in why.detail), why.detail
    trickle = [work.apply_async(([f"fair:{key}", "fair:all"], 0.2), concurrency_queue="fair",
                                concurrency_key=key) for key in ("t1", "t2") for _ in range(2)]
    for r in trickle + flood:
        r.get(timeout=120)
    order = starts(env, "fair:")
    last_trickle = max(i for i, who in enumerate(order) if who != "fair:flood")
    flood_after = order[last_trickle:].count("fair:flood")
    assert flood_after >= 12, (
        f"only {flood_after} flood runs started after the trickle's last: {order}")
    assert env.max("fair:all") == 2


def test_higher_priority_runs_leave_a_line_first(env: Env) -> None:
    """A key held by a long run; three runs of priority 0, then two of priority 5, wait in its
    line: the two go first, then the three in the order they came."""
    env.configure(ckeys_deferral="handoff")
    env.workers(count=1, concurrency=4)
    app = env.app()
    work = app.tasks["ckt.work"]
    first = app.tasks["ckt.hold_until"].apply_async((["prio:holder"], "prio"),
                                                      concurrency_key="prio")
    wait_until(lambda: env.events("start"), timeout=60, message="the holder starts")
    low = []
    for n in range(3):
        low.append(work.apply_async(([f"prio:low{n}"], 0.05), concurrency_key="prio"))
        wait_until(lambda n=n: line_length(env, env.names.key("prio")) == n + 1, timeout=60,
                   message=f"low{n} waits in the line")
    high = []
    for n in range(2):
        high.append(work.s([f"prio:high{n}"], 0.05)
                    .set(concurrency_key="prio", concurrency_priority=5).apply_async())
        wait_until(lambda n=n: line_length(env, env.names.key("prio")) == n + 4, timeout=60,
                   message=f"high{n} waits in the line")
    parked = {p.task_id: p for s in status(app) for p in s.parked}
    assert parked[high[0].id].priority == 5 and parked[low[0].id].priority == 0
    assert parked[high[0].id].key == "prio" and parked[low[0].id].parked_seconds > 0
    env.open_gate("prio")
    for r in [first, *low, *high]:
        r.get(timeout=120)
    assert starts(env, "prio:") == ["prio:holder", "prio:high0", "prio:high1", "prio:low0",
                                    "prio:low1", "prio:low2"]


def test_a_key_of_weight_3_gets_three_turns_a_round(env: Env) -> None:
    """gold (weight 3, given with the trigger-time queue) and plain each have 12 runs waiting
    for a total of 1: of the first 8 served, 6 are gold's and 2 plain's."""
    env.configure(ckeys_deferral="handoff")
    env.workers(count=1, concurrency=4)
    app = env.app()
    work = app.tasks["ckt.work"]
    pool = {"name": "weighted", "limit": 50, "total_limit": 1, "weights": {"gold": 3}}
    holder = app.tasks["ckt.hold_until"].apply_async((["w:holder"], "weighted"),
                                                       concurrency_queue=pool, concurrency_key="h")
    wait_until(lambda: env.events("start"), timeout=60, message="the holder starts")
    runs = [work.apply_async(([f"w:{key}"], 0.02), concurrency_queue=pool, concurrency_key=key)
            for key in ("gold", "plain") for _ in range(12)]
    wait_until(lambda: line_length(env, env.names.total("weighted")) == 24, timeout=60,
               message="all 24 wait for the total")
    env.open_gate("weighted")
    for r in [holder, *runs]:
        r.get(timeout=120)
    served = starts(env, "w:")[1:9]
    assert served.count("w:gold") == 6 and served.count("w:plain") == 2, served


def test_a_limit_computed_per_key_and_one_recorded_for_a_key(env: Env) -> None:
    """ConcurrencyQueue("tiered", limit=lambda key: 2 if key.startswith("paid:") else 1):
    a paid key reaches 2, a free key stays at 1; a limit recorded for the free key alone
    goes before the callable's."""
    from celery_ckeys import limits

    env.workers(count=1, concurrency=4)
    app = env.app()
    tiered = app.tasks["ckt.tiered"]
    runs = [tiered.apply_async(([f"tiered:{key}"], 0.3), concurrency_key=key)
            for _ in range(4) for key in ("paid:acme", "free:bob")]
    for r in runs:
        r.get(timeout=120)
    assert env.max("tiered:paid:acme") == 2
    assert env.max("tiered:free:bob") == 1
    limits.set_limit(app, "tiered", 3, key="free:bob")
    later = [tiered.apply_async((["tiered:bob-later"], 0.3), concurrency_key="free:bob")
             for _ in range(6)]
    for r in later:
        r.get(timeout=120)
    assert env.max("tiered:bob-later") == 3
