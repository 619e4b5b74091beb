"""Profile of the keyed hot path, against the floor: the Redis round trip itself.

In one process, against a private redis-server on loopback, it times what an uncontended
keyed run adds to a Celery run: building the plan, the acquire script, the release script;
next to a bare PING and a bare ``SET NX PX`` (the cheapest possible lock). Then cProfile
shows where the Python time of acquire + release goes.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import time
from typing import Any, Callable

from common import RedisServer

from celery_ckeys.admission import RunSpec, plan_for
from celery_ckeys.config import from_conf
from celery_ckeys.store import Store

HOLDER = {"t": "bench.keyed", "w": "bench@host", "p": 1, "s": 0.0}


def per_call(fn: Callable[[int], Any], n: int) -> float:
    fn(0)
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - start) / n * 1e6


def measure(n: int = 3000) -> dict[str, Any]:
    server = RedisServer().start()
    try:
        config = from_conf({"ckeys_redis_url": f"{server.url}/0"}, default_namespace="hot")
        store = Store(config)
        client = store.client
        plans = [plan_for(config, store.names, RunSpec("t", key=f"k{i}")) for i in range(n + 1)]
        out = {
            "PING (round-trip floor)": per_call(lambda i: client.ping(), n),
            "SET NX PX (the cheapest lock)": per_call(
                lambda i: client.set(f"lock{i}", "owner", nx=True, px=300000), n),
            "plan (Python only)": per_call(
                lambda i: plan_for(config, store.names, RunSpec("t", key=f"k{i}")), n),
            "acquire.lua": per_call(
                lambda i: store.acquire(plans[i].slots, f"o{i}", HOLDER, primary=1), n),  # type: ignore[union-attr]
            "release.lua": per_call(lambda i: store.release(plans[i].slots, f"o{i}"), n),  # type: ignore[union-attr]
        }
        profiler = cProfile.Profile()
        profiler.enable()
        for i in range(n):
            p = plans[i]
            assert p is not None
            store.acquire(p.slots, f"p{i}", HOLDER, primary=1)
            store.release(p.slots, f"p{i}")
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(8)
        info = client.info("commandstats")
        wanted = ("cmdstat_evalsha", "cmdstat_ping", "cmdstat_set")
        lua = {k: v["usec_per_call"] for k, v in info.items() if k in wanted}
        return {"us_per_call": out, "server_usec_per_call": lua, "profile": text.getvalue()}
    finally:
        server.stop()


if __name__ == "__main__":
    result = measure()
    for name, us in result["us_per_call"].items():
        print(f"{name:32s} {us:8.1f} us")
    print(result["server_usec_per_call"])
    print(result["profile"])
