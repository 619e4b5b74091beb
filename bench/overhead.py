"""Benchmark (a): uncontended keyed runs against plain Celery, in the same run.

800 no-op runs of a plain task, then of the same body on ``KeyedTask`` with a distinct
key per run (so nothing is ever contended), on one prefork worker. Reports wall time
from first publish to last result, and the ratio keyed / plain (goal: <= 1.10).
Rounds alternate so that drift on the machine hits both cases alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import Worker, machine

from celery_ckeys.embedded import RedisServer


def run(runs: int, rounds: int) -> dict[str, float]:
    server = RedisServer().start()
    environ = {"BENCH_BROKER": f"{server.url}/1", "BENCH_REDIS": f"{server.url}/0",
               "BENCH_NS": "bench-a", "BENCH_PREFETCH": "4"}
    import os
    os.environ.update(environ)
    import benchapp

    app = benchapp.app
    app.conf.broker_url = environ["BENCH_BROKER"]
    app.conf.result_backend = environ["BENCH_BROKER"]
    app.conf.ckeys_redis_url = environ["BENCH_REDIS"]
    worker = Worker("benchapp", environ, concurrency=2)
    try:
        worker.wait_ready(app)
        times: dict[str, list[float]] = {"plain": [], "keyed": []}
        # warm-up
        for r in [benchapp.plain.delay(0) for _ in range(50)]:
            r.get(timeout=60)
        for r in [benchapp.keyed.apply_async((0,), concurrency_key=f"w{i}") for i in range(50)]:
            r.get(timeout=60)
        for rnd in range(rounds):
            for case in ("plain", "keyed"):
                start = time.perf_counter()
                if case == "plain":
                    results = [benchapp.plain.delay(i) for i in range(runs)]
                else:
                    results = [benchapp.keyed.apply_async((i,), concurrency_key=f"r{rnd}:{i}")
                               for i in range(runs)]
                for r in results:
                    r.get(timeout=120)
                times[case].append(time.perf_counter() - start)
        plain_t = statistics.median(times["plain"])
        keyed_t = statistics.median(times["keyed"])
        return {"plain_s": plain_t, "keyed_s": keyed_t, "ratio": keyed_t / plain_t}
    finally:
        worker.stop()
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=800)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    result = run(args.runs, args.rounds)
    print(f"machine: {machine()}")
    print(f"{args.runs} no-op runs, median of {args.rounds} rounds")
    print(f"plain Celery : {result['plain_s']:.3f} s")
    print(f"KeyedTask    : {result['keyed_s']:.3f} s")
    print(f"ratio        : {result['ratio']:.3f} (goal <= 1.10)")


if __name__ == "__main__":
    main()
