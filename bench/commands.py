"""(b) Redis round trips per uncontended keyed run, and (e) broker publishes per run
under contention, both read from INFO commandstats.

The coordination Redis serves nothing but celery_ckeys here (results go to the broker's
server), so every EVALSHA on it is one round trip of ours.
"""

from __future__ import annotations

from typing import Any

from common import World


def round_trips(runs: int = 400) -> dict[str, Any]:
    world = World()
    try:
        world.start_workers(count=1, concurrency=2)
        m = world.module
        for r in [m.keyed.apply_async((i,), concurrency_key=f"w{i}") for i in range(20)]:
            r.get(timeout=60)
        world.reset_stats()
        for r in [m.keyed.apply_async((i,), concurrency_key=f"k{i}") for i in range(runs)]:
            r.get(timeout=120)
        stats = world.stats(world.coord)
        calls = stats.get("evalsha", 0) + stats.get("eval", 0)
        inside = sum(v for k, v in stats.items() if k not in ("evalsha", "eval", "config|resetstat",
                                                               "config", "info", "ping"))
        return {"runs": runs, "round_trips_per_run": calls / runs,
                "redis_commands_in_scripts_per_run": inside / runs}
    finally:
        world.close()


def publishes(mode: str, runs: int = 200, keys: int = 5, seconds: float = 0.02,
              countdown: float = 1.0) -> dict[str, Any]:
    world = World(BENCH_DEFERRAL=mode, BENCH_COUNTDOWN=str(countdown))
    try:
        world.start_workers(count=2, concurrency=4)
        m = world.module
        world.reset_stats()
        results = [m.timed.apply_async((f"pub-{mode}", seconds), concurrency_key=f"k{i % keys}")
                   for i in range(runs)]
        for r in results:
            r.get(timeout=600)
        stats = world.stats(world.broker)
        pushes = stats.get("lpush", 0) + stats.get("rpush", 0)
        return {"mode": mode, "runs": runs, "keys": keys, "publishes_per_run": pushes / runs}
    finally:
        world.close()


if __name__ == "__main__":
    print(round_trips())
    print(publishes("countdown"))
    print(publishes("handoff"))
