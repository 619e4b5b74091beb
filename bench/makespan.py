"""(d) Contended makespan: 500 runs over 50 keys, 100 ms each, on 2 workers x 4 processes,
against the ideal lower bound max(total work / processes, work of the busiest key).

Runs are published key by key (all ten runs of one key, then the next key's), so that the
workers always meet runs whose key is taken: that is the contention being measured.
"""

from __future__ import annotations

import time
from typing import Any

from common import World


def measure(mode: str, runs: int = 500, keys: int = 50, seconds: float = 0.1,
            countdown: float = 10.0, workers: int = 2, concurrency: int = 4,
            shared: bool = True) -> dict[str, Any]:
    """``mode`` is a deferral mode, or ``"plain"``: the same runs without keys, which is
    Celery's own floor on this machine (every run still costs a delivery and a result)."""
    world = World(shared=shared, BENCH_DEFERRAL="countdown" if mode == "plain" else mode,
                  BENCH_COUNTDOWN=str(countdown))
    try:
        world.start_workers(count=workers, concurrency=concurrency)
        m = world.module
        start = time.perf_counter()
        per_key = runs // keys
        results = [m.timed.apply_async((f"mk-{mode}", seconds),
                                       concurrency_key=None if mode == "plain" else f"key{i // per_key}")
                   for i in range(runs)]
        for r in results:
            r.get(timeout=1800)
        took = time.perf_counter() - start
        ideal = max(runs * seconds / (workers * concurrency), (runs / keys) * seconds)
        return {"mode": mode, "countdown_s": countdown, "seconds": took, "ideal_seconds": ideal,
                "ratio": took / ideal}
    finally:
        world.close()


if __name__ == "__main__":
    print(measure("handoff"))
