"""(c) Release-to-start latency: from the end of one run's body to the start of the one run
waiting for the same key, for countdown against handoff deferral.

Each sample is a pair: a holder (300 ms) takes the key; once it runs, a waiter is published
and is deferred. The latency is the gap between the holder's body ending and the waiter's
body starting (same machine, same clock): the release, the wake, the broker round trip and
the waiter's acquire. Countdown runs at its default of 10 s, so it gets fewer samples.
"""

from __future__ import annotations

import time
from typing import Any

import redis
from common import World, percentile


def measure(mode: str, samples: int, countdown: float = 10.0, shared: bool = True) -> dict[str, Any]:
    world = World(shared=shared, BENCH_DEFERRAL=mode, BENCH_COUNTDOWN=str(countdown))
    try:
        world.start_workers(count=2, concurrency=4)
        m = world.module
        client = redis.Redis(port=world.coord.port)
        gaps = []
        for i in range(samples):
            label = f"lat-{mode}-{i}"
            holder = m.timed.apply_async((label, 0.3), concurrency_key=f"pair{i}")
            deadline = time.monotonic() + 30
            while not client.exists(f"ckeys:{{{world.environ['BENCH_NS']}|k|pair{i}}}:h"):
                if time.monotonic() > deadline:
                    raise TimeoutError("the holder never started")
                time.sleep(0.005)
            waiter = m.timed.apply_async((label, 0.0), concurrency_key=f"pair{i}")
            holder.get(timeout=60)
            waiter.get(timeout=120)
            raw_spans = client.lrange(f"bench:events:{label}", 0, -1)
            spans = sorted(tuple(map(float, raw.split())) for raw in raw_spans)
            gaps.append((spans[1][0] - spans[0][1]) * 1000)
        return {"mode": mode, "countdown_s": countdown, "samples": len(gaps),
                "p50_ms": percentile(gaps, 0.5), "p99_ms": percentile(gaps, 0.99), "max_ms": max(gaps)}
    finally:
        world.close()


def line(runs: int = 40, seconds: float = 0.05, shared: bool = True) -> dict[str, Any]:
    """The issue's own measurement: ``runs`` runs of one key published at once on 2 workers x
    3 processes (handoff); each gap runs from one body's end to the next body's start."""
    world = World(shared=shared, BENCH_DEFERRAL="handoff")
    try:
        world.start_workers(count=2, concurrency=3)
        m = world.module
        label = "line"
        for r in [m.timed.apply_async((label, seconds), concurrency_key="one") for _ in range(runs)]:
            r.get(timeout=300)
        raw_spans = redis.Redis(port=world.coord.port).lrange(f"bench:events:{label}", 0, -1)
        spans = sorted(tuple(map(float, raw.split())) for raw in raw_spans)
        gaps = [(b[0] - a[1]) * 1000 for a, b in zip(spans, spans[1:])]
        assert min(gaps) >= 0, "two runs of one key overlapped"
        return {"mode": "handoff, one line", "runs": runs, "samples": len(gaps),
                "p50_ms": percentile(gaps, 0.5), "p99_ms": percentile(gaps, 0.99), "max_ms": max(gaps)}
    finally:
        world.close()


if __name__ == "__main__":
    print(line())
    print(measure("handoff", 100))
    print(measure("countdown", 8))
