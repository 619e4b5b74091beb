"""The throughput ceiling of the scripts, without Celery; how their cost grows; memory.

* **Pairs per second.** Several processes (no Celery) each run acquire + release pairs,
  each on a key of its own, against one redis-server and against a 3-master Cluster. Two
  numbers per setup: the pairs per second those Python clients reached, and the ceiling of
  the server, 1 s / (Redis server time of one pair, from INFO commandstats): what one Redis
  core could serve when clients are not the bottleneck.
* **Distinct keys.** The server time of a pair while 10, 1,000 or 1,000,000 other keys are
  held (a Redis key lookup is a hash table: it should stay flat).
* **Runs waiting on one key.** With 1, 10 or 1,000 runs parked in a key's line, the server
  time of one handoff: the holder's release (which wakes the head of the line), the woken
  run's claim, and one newcomer parking at the tail (so the line keeps its length).
* **Memory.** Bytes of Redis memory per distinct key in use, per partition in use (a queue
  partition under an environment limit) and per run waiting in a line.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Optional

import redis

from celery_ckeys.admission import RunSpec, plan_for
from celery_ckeys.config import CkeysConfig, from_conf
from celery_ckeys.embedded import RedisServer
from celery_ckeys.queues import ConcurrencyQueue
from celery_ckeys.scripts import script_source
from celery_ckeys.slots import Slot
from celery_ckeys.store import Store, Wake, store_for

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from servers import Cluster
from serverside import inner_commands

LEASE_S = 3600
#: pairs per round trip in the load generator (as redis-benchmark -P pipelines)
BATCH = 100
INNER = inner_commands()


def token(who: str) -> str:
    """A hold token shaped like the ones the gate writes (protocol.md section 2)."""
    return json.dumps([who, "bench@host", os.getpid(), uuid.uuid4().hex[:8], "", "bench.t",
                       time.time(), []], separators=(",", ":"))


def config_for(url: str, namespace: str, cluster: bool = False, environment: Optional[int] = None,
               deferral: str = "countdown") -> CkeysConfig:
    conf: dict[str, Any] = {"ckeys_redis_url": url, "ckeys_redis_cluster": cluster,
                            "ckeys_lock_ttl": LEASE_S, "ckeys_deferral": deferral}
    if environment is not None:
        conf["ckeys_environment_limit"] = environment
    return from_conf(conf, default_namespace=namespace)


def slots_of(config: CkeysConfig, key: str, queue: Optional[ConcurrencyQueue] = None) -> list[Slot]:
    plan = plan_for(config, RunSpec("bench.t", key=key, queue=queue))
    assert plan is not None
    return list(plan.slots)


def server_usec(clients: list[redis.Redis]) -> tuple[int, int]:
    """Calls and server time of what clients sent, summed over ``clients``: every command but
    those a script runs inside (an EVALSHA's time already includes them) and INFO."""
    calls = usec = 0
    for client in clients:
        for name, stats in client.info("commandstats").items():
            command = name.replace("cmdstat_", "")
            if command in INNER or command.startswith(("info", "config", "cluster")):
                continue
            calls += int(stats.get("calls", 0))
            usec += int(stats.get("usec", 0))
    return calls, usec


def _pairs(url: str, cluster: bool, namespace: str, index: int, seconds: float, start_at: float,
           out: Any) -> None:
    """One load process: acquire + release pairs on keys of its own, :data:`BATCH` pairs per
    round trip, as the store sends them on the hot path (``SET NX PX``, then ``unlock.lua``;
    each reply is checked, so a pair that did not take and free its key fails the run).
    On a Cluster each master gets its own batches over a plain connection, as a load
    generator that knows the slot map does (redis-py's cluster pipeline would be the
    bottleneck)."""
    config = config_for(url, namespace, cluster)
    store = store_for(config)
    sha = store.client.script_load(script_source("unlock"))  # a pipeline does not load it
    batches: dict[tuple[str, int], list[tuple[str, str, list[str], list[Any]]]] = {}
    i = 0
    while len(batches) < (3 if cluster else 1) or min(map(len, batches.values())) < BATCH:
        who = f"w{index}:{i}"
        tok = token(who)
        name, keys, args = store._release_call("normal", slots_of(config, f"p{index}:{i}"), who,
                                               tok, "")
        assert name == "unlock"
        node = store.client.get_node_from_key(keys[0]) if cluster else None
        where = (node.host, node.port) if node is not None else ("", 0)
        if len(batches.setdefault(where, [])) < BATCH:
            batches[where].append((keys[0], tok, keys, args))
        i += 1
    pipes = [(redis.Redis(host=host, port=port) if port else store.client, calls)
             for (host, port), calls in batches.items()]
    while time.time() < start_at:
        time.sleep(0.001)
    done, deadline = 0, start_at + seconds
    while time.time() < deadline:
        for client, calls in pipes:
            pipe = client.pipeline(transaction=False)
            for key, tok, keys, args in calls:
                pipe.set(key, tok, nx=True, px=LEASE_S * 1000)
                pipe.evalsha(sha, len(keys), *keys, *args)
            replies = pipe.execute()
            assert all(replies[0::2]) and all(int(r) == 1 for r in replies[1::2]), replies[:4]
            done += len(calls)
    out.put(done)


def pairs_per_second(url: str, clients: list[redis.Redis], cluster: bool, processes: int,
                     seconds: float = 5.0) -> dict[str, float]:
    namespace = f"tp{uuid.uuid4().hex[:6]}"
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    before = server_usec(clients)
    start_at = time.time() + 3.0  # every process is up and has its plans by then
    procs = [ctx.Process(target=_pairs, args=(url, cluster, namespace, i, seconds, start_at, out))
             for i in range(processes)]
    for p in procs:
        p.start()
    done = sum(out.get(timeout=seconds + 120) for _ in procs)
    for p in procs:
        p.join()
    usec = server_usec(clients)[1] - before[1]
    per_pair = usec / max(done, 1)
    # on a Cluster, each master is its own core: the ceiling adds up over the masters
    cores = len(clients) if cluster else 1
    return {"processes": processes, "batch": BATCH, "pairs_per_s": done / seconds,
            "server_us_per_pair": per_pair, "ceiling_pairs_per_s": cores * 1e6 / per_pair}


def keys_scaling(counts: tuple[int, ...] = (10, 1000, 1_000_000), pairs: int = 3000) -> list[dict[str, Any]]:
    rows = []
    server = RedisServer().start()
    try:
        client = redis.Redis(port=server.port)
        config = config_for(f"{server.url}/0", "ks")
        store = Store(config)
        held = 0
        probe = [slots_of(config, f"probe{i}") for i in range(pairs)]
        tokens = [token(f"q{i}") for i in range(pairs)]
        for count in counts:
            _populate_more(client, config, held, count)
            held = count
            before = server_usec([client])
            for i in range(pairs):
                store.acquire(probe[i], f"q{i}", tokens[i])
                store.release(probe[i], f"q{i}", tokens[i])
            usec = server_usec([client])[1] - before[1]
            rows.append({"held_keys": count, "server_us_per_pair": usec / pairs,
                         "dbsize": int(client.dbsize())})
        store.close()
    finally:
        server.stop()
    return rows


def _populate_more(client: redis.Redis, config: CkeysConfig, start: int, stop: int) -> None:
    store = Store(config)
    pipe = client.pipeline(transaction=False)
    for i in range(start, stop):
        keys, _, _ = store._keys(slots_of(config, f"held{i}"), f"h{i}")
        pipe.set(keys[0], token(f"h{i}"), px=LEASE_S * 1000)
        if i % 10000 == 9999:
            pipe.execute()
    pipe.execute()
    store.close()


class Line:
    """One key, a holder, and runs parked in its line (handoff), driven through the store."""

    def __init__(self, url: str) -> None:
        self.store = Store(config_for(url, "ws", deferral="handoff"))
        self.woken: list[Wake] = []
        self.store.on_wakes = self.woken.extend
        self.slots = slots_of(self.store.config, "hot")
        self.serial = 0
        self.holder, self.held = "run0", token("run0")
        assert self.store.acquire(self.slots, self.holder, self.held).ok

    def park(self) -> None:
        self.serial += 1
        who = f"run{self.serial}"
        result = self.store.acquire(self.slots, who, token(who), new_ticket=uuid.uuid4().hex,
                                    message=who)
        assert result.parked, result

    def handoff(self) -> None:
        """The holder ends, the head of the line claims its unit, a newcomer parks."""
        assert self.store.release(self.slots, self.holder, self.held) == 1
        wake = self.woken.pop()
        self.holder, self.held = wake.message, token(wake.message)
        assert self.store.acquire(self.slots, self.holder, self.held, ticket=wake.ticket).ok
        self.park()


def waiters_scaling(counts: tuple[int, ...] = (1, 10, 1000), cycles: int = 500) -> list[dict[str, Any]]:
    rows = []
    for count in counts:
        server = RedisServer().start()
        try:
            client = redis.Redis(port=server.port)
            line = Line(f"{server.url}/0")
            for _ in range(count):
                line.park()
            before = server_usec([client])
            for _ in range(cycles):
                line.handoff()
            calls, usec = (a - b for a, b in zip(server_usec([client]), before))
            rows.append({"waiting": count, "server_us_per_handoff": usec / cycles,
                         "calls_per_handoff": calls / cycles})
            line.store.close()
        finally:
            server.stop()
    return rows


def memory(keys: int = 20000, waiting: int = 2000) -> dict[str, float]:
    server = RedisServer().start()
    try:
        client = redis.Redis(port=server.port)
        out = {}
        for name, environment, queue in (("key", None, None),
                                         ("partition", 1_000_000, ConcurrencyQueue("mq", limit=5))):
            config = config_for(f"{server.url}/0", f"m{name}", environment=environment)
            store = Store(config)
            before = int(client.info("memory")["used_memory"])
            for i in range(keys):
                who = f"{name}{i}"
                assert store.acquire(slots_of(config, f"k{i}", queue), who, token(who)).ok
            # the environment slot is one for all runs: its growth is per run, counted in
            out[f"bytes_per_{name}"] = (int(client.info("memory")["used_memory"]) - before) / keys
            store.close()
        config = config_for(f"{server.url}/0", "mw", deferral="handoff")
        store = Store(config)
        store.on_wakes = lambda wakes: None
        slots = slots_of(config, "line")
        assert store.acquire(slots, "holder", token("holder")).ok
        before = int(client.info("memory")["used_memory"])
        for i in range(waiting):
            who = f"waiter{i}"
            assert store.acquire(slots, who, token(who), new_ticket=uuid.uuid4().hex,
                                 message="x" * 100).parked
        out["bytes_per_waiting_run"] = (int(client.info("memory")["used_memory"]) - before) / waiting
        out["waiting_message_bytes"] = 100
        store.close()
        return out
    finally:
        server.stop()


def one_redis(processes: int) -> dict[str, float]:
    server = RedisServer().start()
    try:
        return pairs_per_second(f"{server.url}/0", [redis.Redis(port=server.port)], False, processes)
    finally:
        server.stop()


def cluster(processes: int) -> dict[str, float]:
    nodes = Cluster().start()
    try:
        clients = [redis.Redis(port=n.port) for n in nodes.nodes]
        return pairs_per_second(nodes.url, clients, True, processes)
    finally:
        nodes.stop()


def run(quick: bool = False) -> dict[str, Any]:
    processes = 2 * (os.cpu_count() or 1)
    single = one_redis(processes)
    three = cluster(processes)
    return {"single": single, "cluster": three,
            "keys": keys_scaling((10, 1000, 100_000) if quick else (10, 1000, 1_000_000)),
            "waiters": waiters_scaling(),
            "memory": memory()}


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
