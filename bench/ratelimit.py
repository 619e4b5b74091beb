"""(h) The rate limiter on the real scripts (no Celery): accuracy and Redis cost per run.

Four client processes try to start runs of one partition with ``rate="50/s"`` as fast as
they can for 3 seconds: admitted runs release at once, blocked ones sleep for the
``rate_wait_ms`` the script returned. From the server's own start times (the scripts' log of
the window, read every 100 ms) it reports the most starts in any one-second window (the
goal: exactly N, never more) and the starts against the most the rate allows; and from INFO
commandstats the commands and server time per admitted run, and per attempt.
"""

from __future__ import annotations

import json
import multiprocessing
import time
import uuid
from typing import Any

import redis

from celery_ckeys.admission import RunSpec, plan_for
from celery_ckeys.config import from_conf
from celery_ckeys.embedded import RedisServer
from celery_ckeys.queues import ConcurrencyQueue
from celery_ckeys.store import Store

RATE, SECONDS, CLIENTS = 50, 3.0, 4


def _client(url: str, namespace: str, seconds: float, out: Any) -> None:
    store = Store(from_conf({"ckeys_redis_url": f"{url}/0"}, default_namespace=namespace))
    plan = plan_for(store.config, RunSpec("t", key="k",
                                          queue=ConcurrencyQueue("api", 1000, rate=f"{RATE}/s")))
    assert plan is not None
    starts: list[int] = []
    attempts = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        who = uuid.uuid4().hex
        token = json.dumps([who, "bench", 1, "n", "", "t", 0, []])
        attempts += 1
        got = store.acquire(plan.slots, who, token)
        if got.ok:
            starts.append(store.now_ms())
            store.release(plan.slots, who, token)
        else:
            time.sleep(max(got.rate_wait_ms, 1) / 1000)
    out.put((starts, attempts))


def run() -> dict[str, Any]:
    server = RedisServer().start()
    try:
        namespace = f"rate-{uuid.uuid4().hex[:6]}"
        client = redis.Redis.from_url(f"{server.url}/0")
        client.config_resetstat()
        out: Any = multiprocessing.Queue()
        procs = [multiprocessing.Process(target=_client, args=(server.url, namespace, SECONDS, out))
                 for _ in range(CLIENTS)]
        for p in procs:
            p.start()
        # the server's own start times: the scripts' log holds every start for one window,
        # so reading it every 100 ms sees each of them
        log = f"ckeys:{{{namespace}|p|api|k}}:s"
        seen: dict[bytes, float] = {}
        while any(p.is_alive() for p in procs) and out.qsize() < len(procs):
            seen.update(client.zrange(log, 0, -1, withscores=True))
            time.sleep(0.1)
        got = [out.get(timeout=60) for _ in procs]
        for p in procs:
            p.join()
        starts = sorted(seen.values())
        attempts = sum(a for _, a in got)
        admitted = sum(len(s) for s, _ in got)
        most = max(sum(1 for t in starts[i:] if t < s + 1000) for i, s in enumerate(starts))
        stats = client.info("commandstats")
        scripts = [v for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval")]
        inner = sum(v["calls"] for k, v in stats.items() if k not in (
            "cmdstat_evalsha", "cmdstat_eval", "cmdstat_config", "cmdstat_info", "cmdstat_time"))
        usec = sum(v["usec"] for v in scripts)
        return {"rate": RATE, "clients": CLIENTS, "seconds": SECONDS, "starts": admitted,
                "starts_logged": len(starts), "attempts": attempts, "most_in_any_second": most,
                "allowed": RATE * int(-(-SECONDS // 1)),
                "commands_per_start": inner / max(1, admitted),
                "server_us_per_start": usec / max(1, admitted),
                "server_us_per_attempt": usec / max(1, attempts)}
    finally:
        server.stop()


def markdown(r: dict[str, Any]) -> list[str]:
    ok = r["most_in_any_second"] <= r["rate"]
    return ["## (h) The rate limiter", "",
            f"{r['clients']} client processes start runs of one partition with"
            f" `rate=\"{r['rate']}/s\"` as fast as they can for {r['seconds']:g} s (the real"
            " scripts, no Celery; blocked attempts sleep for the wait the script returns);"
            " start times are the server's.", "",
            "| starts (at most allowed) | attempts | most in any 1 s | commands per start |"
            " server us per start | server us per attempt |", "|---|---|---|---|---|---|",
            f"| {r['starts']} ({r['allowed']}) | {r['attempts']} | {r['most_in_any_second']} |"
            f" {r['commands_per_start']:.1f} | {r['server_us_per_start']:.1f} |"
            f" {r['server_us_per_attempt']:.1f} |", "",
            f"Goal: never more than {r['rate']} in any second"
            f" ({'met' if ok else '**not met**'}: {r['most_in_any_second']}).", ""]


if __name__ == "__main__":
    result = run()
    print(json.dumps(result, indent=2))
    print("\n".join(markdown(result)))
