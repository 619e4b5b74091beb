"""Redis server time and commands a keyed run adds to a plain run, uncontended.

Read from INFO commandstats, which counts work done on the server and is not wall-clock
noise: ``calls`` exactly, ``usec`` as the server's own time. Two layouts:

* ``shared`` (the default configuration users run): one redis-server is the broker, the
  result backend and the coordination Redis;
* ``separate``: coordination on a redis-server of its own (the broker and the results on
  another).

Plain and keyed runs go through the same worker (one prefork worker, 2 processes), in
alternating rounds. A keyed run's scripts count once: an EVALSHA's ``usec`` already includes
the commands it runs, so those inner commands' own entries are left out of the time (they
are counted in the commands, as commandstats counts them), but for as many calls of each
name as the plain round made (Celery's and kombu's own). Nothing else that celery_ckeys
sends per run goes unnoticed: every other command's difference is added in. Round trips
are the commands sent from outside a script (a pipeline of several would count several).

The figure asserted and reported is the time of what a keyed run sends on top of a plain
one (its scripts, and each command it sends more often), with redis-server on a core of
its own (:func:`common.pin_servers`). The total difference of the two rounds' server time
is reported beside it: on 2 cores, Celery's own commands move by more than that.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import redis
from common import World, pin_servers, unpin

LUA = Path(__file__).parent.parent / "celery_ckeys" / "lua"


def inner_commands() -> set[str]:
    """Every command name a celery_ckeys script calls (from the .lua files themselves)."""
    import re

    names: set[str] = set()
    for script in LUA.glob("*.lua"):
        names.update(m.lower() for m in re.findall(r'redis\.p?call\("([A-Z]+)"', script.read_text()))
    return names


def snapshot(port: int) -> dict[str, tuple[int, int]]:
    info = redis.Redis(port=port).info("commandstats")
    return {k.replace("cmdstat_", ""): (int(v["calls"]), int(v["usec"])) for k, v in info.items()}


Stats = dict[str, tuple[int, int]]


def delta(before: Stats, after: Stats) -> Stats:
    out = {}
    for name, (calls, usec) in after.items():
        c0, u0 = before.get(name, (0, 0))
        if calls - c0:
            out[name] = (calls - c0, usec - u0)
    return out


def measure(layout: str, runs: int = 1000, rounds: int = 3, environment: bool = False) -> dict[str, Any]:
    world = World(shared=layout == "shared",
                  **({"BENCH_ENV_LIMIT": "1000000"} if environment else {}))
    cores = pin_servers(world)
    try:
        world.start_workers(count=1, concurrency=2)
        m = world.module
        ports = sorted({world.broker.port, world.coord.port})
        inner = inner_commands()
        task = m.queued if environment else m.keyed
        cases = {"plain": lambda rnd, i: m.plain.apply_async((i,)),
                 "keyed": lambda rnd, i: task.apply_async((i,), concurrency_key=f"r{rnd}:{i}")}
        for publish in cases.values():  # warm-up: connections, script cache
            for r in [publish(99, i) for i in range(50)]:
                r.get(timeout=60)
        per_run: dict[str, list[dict[str, tuple[int, int]]]] = {name: [] for name in cases}
        for rnd in range(rounds):
            for name, publish in cases.items():
                before = {p: snapshot(p) for p in ports}
                for r in [publish(rnd, i) for i in range(runs)]:
                    r.get(timeout=300)
                total: dict[str, tuple[int, int]] = {}
                for p in ports:
                    for cmd, (calls, usec) in delta(before[p], snapshot(p)).items():
                        c0, u0 = total.get(cmd, (0, 0))
                        total[cmd] = (c0 + calls, u0 + usec)
                total.pop("info", None)
                per_run[name].append(total)

        def own(name: str, rnd: int) -> tuple[float, float, float]:
            """Commands, server time and round trips of one round, per run. A script's inner
            commands are in its EVALSHA's time already; Celery and kombu send some commands
            of the same names themselves (HSET, ZADD, ...), as many in a keyed round as in a
            plain one: those, at the keyed round's time per call, are counted, the rest of
            that name is a script's and is not counted again."""
            t, base = per_run[name][rnd], per_run["plain"][rnd]
            calls = usec = trips = 0.0
            for cmd, (c, u) in t.items():
                calls += c
                if cmd in inner and cmd not in ("evalsha", "eval"):
                    celery_calls = min(c, base.get(cmd, (0, 0))[0])
                    usec += u * celery_calls / c
                    trips += celery_calls
                else:
                    usec += u
                    trips += c
            return calls / runs, usec / runs, trips / runs

        def summary(name: str) -> dict[str, float]:
            rows = [own(name, rnd) for rnd in range(rounds)]
            scripts = [sum(u for cmd, (_, u) in t.items() if cmd in ("evalsha", "eval")) / runs
                       for t in per_run[name]]
            return {"commands": statistics.median(r[0] for r in rows),
                    "usec": statistics.median(r[1] for r in rows),
                    "script_usec": statistics.median(scripts),
                    "round_trips": statistics.median(r[2] for r in rows)}

        def added(rnd: int) -> float:
            """Server time of what a keyed run sends on top of a plain one, per run: its
            scripts, and each command it sends more often than the plain round did, at the
            keyed round's time per call. Celery's own commands, sent as often in both
            rounds, are left out: their time per call moves with the machine's load by more
            than the whole of what is measured here (the total difference is also kept)."""
            t, base = per_run["keyed"][rnd], per_run["plain"][rnd]
            usec = 0.0
            for cmd, (c, u) in t.items():
                if cmd in ("evalsha", "eval"):
                    usec += u - base.get(cmd, (0, 0))[1]
                elif cmd not in inner:
                    usec += u * max(0, c - base.get(cmd, (0, 0))[0]) / c
            return usec / runs

        plain, keyed = summary("plain"), summary("keyed")
        last = per_run["keyed"][-1]
        leftover = sum(1 for _ in redis.Redis(port=world.coord.port).scan_iter("ckeys:*")
                       if not _.startswith((b"ckeys:{" + world.environ["BENCH_NS"].encode() + b"|workers",)))
        return {"layout": layout, "environment": environment, "runs": runs, "rounds": rounds,
                "plain": plain, "keyed": keyed,
                "added_usec": statistics.median(added(rnd) for rnd in range(rounds)),
                "total_difference_usec": keyed["usec"] - plain["usec"],
                "added_commands": keyed["commands"] - plain["commands"],
                "added_round_trips": keyed["round_trips"] - plain["round_trips"],
                "keyed_breakdown": {cmd: (c / runs, u / runs) for cmd, (c, u) in sorted(last.items())},
                "keys_left": leftover, "cores": cores}
    finally:
        world.close()
        unpin()


def quick() -> None:
    """``make bench-quick``: the default configuration, asserting on counts Redis keeps
    (commandstats), not on wall-clock time. Fails when the hot path regresses."""
    key_only = measure("shared", runs=300, rounds=2)
    both = measure("shared", runs=300, rounds=2, environment=True)
    for r in (key_only, both):
        print(f"{'partition + environment' if r['environment'] else 'key only':24s}"
              f" +{r['added_usec']:.1f} us server time, +{r['added_commands']:.2f} commands,"
              f" +{r['added_round_trips']:.2f} round trips, {r['keys_left']} keys left")
    # Server time in microseconds swings by half between runs on a shared CI machine (30.0 us
    # there against 17.9 us here for the same commit), so it is only asserted against the plain
    # run's own time, measured in the same rounds: a keyed run must not double what Redis spends
    # on a plain one (0.1 more than tripled it). The counts below are exact.
    problems = []
    share = key_only["added_usec"] / key_only["plain"]["usec"]
    print(f"key only adds {share:.0%} of a plain run's server time")
    if share > 1.0:
        problems.append(f"key only adds {share:.0%} of a plain run's server time (limit 100%)")
    if key_only["added_commands"] > 4.1:
        problems.append(f"key only adds {key_only['added_commands']:.2f} commands (4 when this"
                        " check was written: SET NX PX, EVALSHA unlock.lua, its GET and DEL)")
    if both["added_commands"] > 25:
        problems.append(f"partition + environment adds {both['added_commands']:.2f} commands"
                        " (24 when this check was written: take.lua and give.lua; the total"
                        " slot's conf field is read with the partition's)")
    for r in (key_only, both):
        if r["added_round_trips"] > 2.01:
            problems.append(f"{r['added_round_trips']:.2f} round trips per run (limit 2)")
        if r["keys_left"]:
            problems.append(f"{r['keys_left']} coordination keys left after the runs")
    if problems:
        raise SystemExit("bench-quick failed: " + "; ".join(problems))
    print("bench-quick: ok")


if __name__ == "__main__":
    quick()
