"""(a) and (f): uncontended runs, keyed against plain Celery and the peer packages.

800 no-op runs per case on one prefork worker (2 processes), every run with a key of its
own so nothing is ever contended. Cases alternate round by round so that drift on the
machine hits them alike; each case's time is its median round. Wall time runs from the
first publish to the last result.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

from common import World


def cases(world: World) -> dict[str, Callable[[int, int], Any]]:
    m = world.module
    found: dict[str, Callable[[int, int], Any]] = {
        "plain Celery": lambda rnd, i: m.plain.apply_async((i,)),
        "celery_ckeys KeyedTask": lambda rnd, i: m.keyed.apply_async(
            (i,), concurrency_key=f"r{rnd}:{i}"),
    }
    if m.once is not None:
        found["celery-once QueueOnce"] = lambda rnd, i: m.once.apply_async((rnd * 100000 + i,))
    if m.singleton is not None:
        found["celery-singleton Singleton"] = lambda rnd, i: m.singleton.apply_async((rnd * 100000 + i,))
    return found


def run(runs: int = 800, rounds: int = 5, shared: bool = True) -> dict[str, Any]:
    world = World(shared=shared)
    try:
        world.start_workers(count=1, concurrency=2)
        todo = cases(world)
        for publish in todo.values():  # warm-up: imports, connections, script cache
            for r in [publish(99, i) for i in range(50)]:
                r.get(timeout=60)
        times: dict[str, list[float]] = {name: [] for name in todo}
        for rnd in range(rounds):
            for name, publish in todo.items():
                start = time.perf_counter()
                results = [publish(rnd, i) for i in range(runs)]
                for r in results:
                    r.get(timeout=300)
                times[name].append(time.perf_counter() - start)
        medians = {name: statistics.median(ts) for name, ts in times.items()}
        base = medians["plain Celery"]
        return {"layout": "shared" if shared else "separate", "runs": runs, "rounds": rounds,
                "seconds": medians,
                "ratio": {name: t / base for name, t in medians.items()}}
    finally:
        world.close()


if __name__ == "__main__":
    print(run())
