"""(g) Fair sharing between tenants, on the real scripts (no Celery: the order is the
scripts', and a worker would only add noise).

* **Jain's index.** 10 tenants with skewed backlogs (1 to 1,000 runs each) publish at once
  onto one queue (partition limit 1,000, ``total_limit`` 4) in handoff mode; every run
  lasts one turn. Runs are served as the scripts wake them: a finishing run releases, the
  woken run claims and runs. Slot time per tenant is counted in windows of turns; a window
  counts the tenants backlogged through all of it, and Jain's index
  ``(sum x)^2 / (n * sum x^2)`` of their slot time is taken per window. First come first
  served (the flood that published first takes every slot) is shown beside it: the same
  scripts with the line's fairness switched off (every run of one key).
* **Admission cost against waiting tenants.** With 10, 1,000 or 100,000 tenants waiting in
  a total's line (one run each), the Redis commands and server time of one park (a new
  tenant joins the line) plus one turnover (a holder releases, the woken run claims): a
  sorted set keeps the line, so it may grow with log n, never with n.
"""

from __future__ import annotations

import itertools
import json
import uuid
from collections import Counter, deque
from typing import Any

import redis

from celery_ckeys.admission import RunSpec, plan_for
from celery_ckeys.config import from_conf
from celery_ckeys.embedded import RedisServer
from celery_ckeys.queues import ConcurrencyQueue
from celery_ckeys.store import Store, Wake

TENANTS = (1, 3, 10, 30, 60, 100, 200, 400, 700, 1000)
TOTAL = 4
_ns = itertools.count()


def _token(who: str, ticket: str = "") -> str:
    return json.dumps([who, "bench", 1, uuid.uuid4().hex[:8], ticket, "t", 0, []],
                      separators=(",", ":"))


def _store(url: str) -> tuple[Store, list[Wake]]:
    config = from_conf({"ckeys_redis_url": f"{url}/0", "ckeys_lock_ttl": 600,
                        "ckeys_handoff_claim_window": 600},
                       default_namespace=f"fair-{next(_ns)}")
    store = Store(config)
    woken: list[Wake] = []
    store.on_wakes = woken.extend
    return store, woken


def _serve(store: Store, woken: list[Wake], queue: ConcurrencyQueue, backlogs: dict[str, int],
           one_key: bool) -> list[str]:
    """Publish every backlog at once, then serve turn by turn; the tenant of each turn."""
    running: deque[tuple[Any, str, str, str]] = deque()
    plans, tickets = {}, {}
    # the biggest backlog publishes first, as a flood does
    order = [(tenant, n) for tenant, count in sorted(backlogs.items(), key=lambda x: -x[1])
             for n in range(count)]
    for tenant, n in order:
        who = f"{tenant}-{n}"
        plan = plan_for(store.config, RunSpec("t", queue=queue, key="all" if one_key else tenant))
        assert plan is not None
        plans[who], tickets[f"t{who}"] = plan, who
        token = _token(who)
        got = store.acquire(plan.slots, who, token, message="m", new_ticket=f"t{who}",
                            place=plan.place(0, 0))
        if got.ok:
            running.append((plan.slots, who, token, ""))
    served = [who.rsplit("-", 1)[0] for _, who, _, _ in running]
    while running:
        slots, who, token, ticket = running.popleft()
        store.release(slots, who, token, ticket)
        while woken:
            wake = woken.pop(0)
            mine = tickets[wake.ticket]
            token = _token(mine, wake.ticket)
            got = store.acquire(plans[mine].slots, mine, token, ticket=wake.ticket, home=wake.tag)
            assert got.ok, got
            running.append((plans[mine].slots, mine, token, wake.ticket))
            served.append(mine.rsplit("-", 1)[0])
    return served


def jain(values: list[float]) -> float:
    """1 when every value is equal; 1/n when one takes everything (or none gets anything)."""
    squares = sum(v * v for v in values)
    return sum(values) ** 2 / (len(values) * squares) if squares else 1 / len(values)


def windows(served: list[str], backlogs: dict[str, int]) -> list[float]:
    """Jain's index per window of turns, over the tenants backlogged through all of it."""
    out = []
    width = 4 * len(backlogs)
    # from the first turn anybody waited for: the runs admitted before the others published
    # (the flood's first TOTAL) were nobody's turn
    for start in range(TOTAL, len(served) - width + 1, width):
        chunk = served[start:start + width]
        after = Counter(served[:start + width])
        backlogged = [t for t in backlogs if backlogs[t] - after[t] > 0]
        counts = Counter(chunk)
        if len(backlogged) >= 2:
            out.append(jain([float(counts[t]) for t in backlogged]))
    return out


def fairness(url: str) -> dict[str, Any]:
    backlogs = {f"tenant{i}": n for i, n in enumerate(TENANTS)}
    result: dict[str, Any] = {"tenants": len(backlogs), "backlogs": list(TENANTS),
                              "total_limit": TOTAL}
    for name, one_key in (("fair", False), ("first come first served", True)):
        store, woken = _store(url)
        queue = ConcurrencyQueue("fair", limit=1000, total_limit=TOTAL)
        served = _serve(store, woken, queue, backlogs, one_key)
        per = windows(served, backlogs)
        first_turn = {t: served.index(t) for t in backlogs}
        result[name] = {"windows": len(per), "jain_min": min(per), "jain_mean": sum(per) / len(per),
                        "turn_of_the_one_run_tenant": first_turn["tenant0"]}
        store.close()
    return result


def cost(url: str, waiting: int) -> dict[str, Any]:
    """Commands and server time of one park plus one turnover with ``waiting`` tenants in line."""
    store, woken = _store(url)
    queue = ConcurrencyQueue("cost", limit=1000, total_limit=1)
    client = redis.Redis.from_url(f"{url}/0")

    def plan_of(key: str) -> Any:
        plan = plan_for(store.config, RunSpec("t", queue=queue, key=key))
        assert plan is not None
        return plan

    holder = plan_of("holder")
    token = _token("h0")
    assert store.acquire(holder.slots, "h0", token).ok
    pipe_calls = []
    for n in range(waiting):
        plan = plan_of(f"w{n}")
        keys, specs, index_at = store._keys(plan.slots, f"w{n}", plan.weight_conf)
        fair = ".".join(str(j) for j, s in enumerate(plan.slots, 1) if s.fair)
        pipe_calls.append(("acquire", keys, [
            f"w{n}", _token(f"w{n}"), 600000, "run", "", f"tw{n}", "m",
            plan.place(0, 0).lua(fair, store._conf_position(keys, plan.weight_conf)),
            f"{store._window},{store._countdown},{store.config.deferral_memory_ms},1,{index_at}",
            len(plan.slots), *specs]))
        if len(pipe_calls) == 1000:
            store.pipeline(pipe_calls)
            pipe_calls = []
    if pipe_calls:
        store.pipeline(pipe_calls)
    cycles = 100
    client.config_resetstat()
    current = ("h0", "holder", token, "")
    for n in range(cycles):
        newcomer = plan_of(f"new{n}")
        store.acquire(newcomer.slots, f"new{n}", _token(f"new{n}"), message="m",
                      new_ticket=f"tnew{n}", place=newcomer.place(0, 0))
        who, key, tok, ticket = current
        store.release(plan_of(key).slots, who, tok, ticket)
        wake = woken.pop(0)
        mine = wake.ticket[1:]  # tickets are "t" + the run's id, and its key is its id
        tok = _token(mine, wake.ticket)
        assert store.acquire(plan_of(mine).slots, mine, tok, ticket=wake.ticket,
                             home=wake.tag).ok
        current = (mine, mine, tok, wake.ticket)
        woken.clear()
    stats = client.info("commandstats")
    scripts = {k: v for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval")}
    usec = sum(v["usec"] for v in scripts.values())
    inner = sum(v["calls"] for k, v in stats.items()
                if k not in ("cmdstat_evalsha", "cmdstat_eval", "cmdstat_config", "cmdstat_info"))
    store.close()
    return {"waiting_tenants": waiting, "usec_per_cycle": usec / cycles,
            "commands_per_cycle": inner / cycles}


def run(quick: bool = False) -> dict[str, Any]:
    server = RedisServer().start()
    try:
        url = server.url
        return {"jain": fairness(url),
                "cost": [cost(url, n) for n in (10, 1000, 10_000 if quick else 100_000)]}
    finally:
        server.stop()


def markdown(r: dict[str, Any]) -> list[str]:
    j = r["jain"]
    lines = ["## (g) Fair sharing between tenants", "",
             f"{j['tenants']} tenants with backlogs {', '.join(map(str, j['backlogs']))} publish"
             f" at once (the biggest first) onto one queue with `total_limit={j['total_limit']}`,"
             " handoff; the real scripts, no Celery; every run lasts one turn. Jain's index of"
             " slot time per window of 40 turns, over the tenants backlogged through the window.",
             "", "| order | windows | Jain mean | Jain min | turn of the 1-run tenant |",
             "|---|---|---|---|---|"]
    for name in ("fair", "first come first served"):
        x = j[name]
        lines.append(f"| {name} | {x['windows']} | {x['jain_mean']:.3f} | {x['jain_min']:.3f} |"
                     f" {x['turn_of_the_one_run_tenant']} |")
    ok = j["fair"]["jain_min"] >= 0.95
    lines += ["", f"Goal Jain >= 0.95 while backlogged: {'met' if ok else '**not met**'}"
              f" (worst window {j['fair']['jain_min']:.3f}).", "",
              "Admission cost with n tenants waiting in the total's line (one park, one release"
              " that wakes the next, its claim; 100 cycles):", "",
              "| waiting tenants | commands per cycle | server us per cycle |", "|---|---|---|"]
    for c in r["cost"]:
        lines.append(f"| {c['waiting_tenants']:,} | {c['commands_per_cycle']:.1f} |"
                     f" {c['usec_per_cycle']:.1f} |")
    first, last = r["cost"][0], r["cost"][-1]
    flat = last["commands_per_cycle"] <= first["commands_per_cycle"] + 0.01
    lines += ["", f"Commands per cycle do not grow with n ({'met' if flat else '**not met**'});"
              " the line is a sorted set, so its server time may grow with log n:"
              f" x{last['usec_per_cycle'] / first['usec_per_cycle']:.2f} from"
              f" {first['waiting_tenants']:,} to {last['waiting_tenants']:,}.", ""]
    return lines


if __name__ == "__main__":
    result = run()
    print(json.dumps(result, indent=2))
    print("\n".join(markdown(result)))
