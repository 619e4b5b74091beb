"""``celery -A proj ckeys``: the real CLI, run as a subprocess against live workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest
from conftest import TESTS, Env, seed_holder, wait_until

from celery_ckeys import ConcurrencyQueue


def ckeys(env: Env, *args: str, input: str | None = None,
          check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "celery", "-A", "workerapp", "ckeys", *args],
                          cwd=str(TESTS), env={**os.environ, **env.worker_environ({})},
                          capture_output=True, text=True, input=input, timeout=60)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def status_json(env: Env, *args: str) -> list[dict[str, Any]]:
    return json.loads(ckeys(env, "status", "--json", *args).stdout)


def by_label(slots: list[dict[str, Any]], label: str) -> dict[str, Any]:
    (slot,) = [s for s in slots if s["label"] == label]
    return slot


def test_status_shows_holders_and_deferred_runs_as_they_are(env: Env) -> None:
    env.workers(count=2, concurrency=4)
    work = env.app().tasks["ckt.work"]
    paid = {"name": "paid-users", "limit": 2}
    # they hold until the test is done looking (a fixed duration raced the CLI on a busy host)
    holders = [env.app().tasks["ckt.hold_until"].apply_async(
        (["x"], "status"), concurrency_queue=paid, concurrency_key="alice", tags=["plan:paid"])
        for _ in range(2)]
    wait_until(lambda: len(env.holders(env.names.partition("paid-users", "alice"))) == 2, 30,
               message="two holders")
    waiting = work.apply_async((["x"], 0.0), concurrency_queue=paid, concurrency_key="alice")
    wait_until(lambda: by_label(status_json(env), "queue paid-users [alice]")["deferred_count"] == 1,
               30, message="the deferred run in status")
    slot = by_label(status_json(env), "queue paid-users [alice]")
    assert slot["limit"] == 2
    assert {h["task_id"] for h in slot["holders"]} == {h.id for h in holders}
    assert all(h["worker"].endswith("@ckt") and h["tags"] == ["plan:paid"] for h in slot["holders"])
    assert slot["deferred"][0]["task_id"] == waiting.id and slot["oldest_wait_seconds"] >= 0
    table = ckeys(env, "status").stdout
    assert "queue paid-users [alice]" in table and holders[0].id in table and "plan:paid" in table
    assert [s["label"] for s in status_json(env, "--tag", "plan:paid")] == ["queue paid-users [alice]"]
    assert status_json(env, "--tag", "plan:none") == []
    # explain names the blocking slot and its holders
    why = json.loads(ckeys(env, "explain", waiting.id, "--json").stdout)
    assert why["state"] == "deferred" and why["blocked_by"] == "queue paid-users [alice]"
    assert {h["task_id"] for h in why["holders"]} == {h.id for h in holders}
    assert "is full, held by" in ckeys(env, "explain", waiting.id).stdout
    running = json.loads(ckeys(env, "explain", holders[0].id, "--json").stdout)
    assert running["state"] == "running"
    env.open_gate("status")
    waiting.get(timeout=60)


def test_release_asks_first_and_frees_a_stuck_key(env: Env) -> None:
    # a stuck holder: taken straight in Redis, as if its worker host had vanished
    from celery_ckeys.admission import RunSpec
    from celery_ckeys.config import get_config
    from celery_ckeys.store import store_for

    app = env.app()
    store = store_for(get_config(app))
    seed_holder(store, RunSpec(task_name="t", key="stuck"), "ghost")
    refused = ckeys(env, "release", "stuck", input="n\n", check=False)
    assert refused.returncode != 0 and "Force-release 1 slot(s)?" in refused.stdout
    assert env.holders(env.names.key("stuck")) == ["ghost"]
    done = ckeys(env, "release", "stuck", input="y\n")
    assert "released key stuck held by ghost" in done.stdout
    assert env.holders(env.names.key("stuck")) == []
    assert "nothing to release" in ckeys(env, "release", "stuck", "--yes").stdout


def test_release_a_queue_and_its_partitions(env: Env) -> None:
    from celery_ckeys.admission import RunSpec
    from celery_ckeys.config import get_config
    from celery_ckeys.queues import ConcurrencyQueue
    from celery_ckeys.store import store_for

    store = store_for(get_config(env.app()))
    for run, owner in ((RunSpec("t", queue=ConcurrencyQueue("q", 2)), "o1"),
                       (RunSpec("t", queue=ConcurrencyQueue("q", 2), key="a"), "o2"),
                       (RunSpec("t", queue=ConcurrencyQueue("q", 2), key="b"), "o3")):
        seed_holder(store, run, owner)
    out = json.loads(ckeys(env, "release", "--queue", "q", "--key", "a", "--yes", "--json").stdout)
    assert out["released"] == [{"slot": "queue q [a]", "task_id": "o2"}]
    out = json.loads(ckeys(env, "release", "--queue", "q", "--yes", "--json").stdout)
    assert sorted(r["task_id"] for r in out["released"]) == ["o1", "o3"]


def test_releasing_a_partition_frees_what_its_run_holds_with_it(env: Env) -> None:
    """A forced release of a partition freed that slot only: the holder's units on the
    queue's total and on the environment went on counting until their lease ran out."""
    from celery_ckeys.admission import RunSpec
    from celery_ckeys.config import get_config
    from celery_ckeys.store import store_for

    env.configure(ckeys_environment_limit=4)
    store = store_for(get_config(env.app()))
    store.set_queue_limit("qt", 5, field="total")
    seed_holder(store, RunSpec("t", queue=ConcurrencyQueue("qt", 2), key="a"), "o4")
    tags = [env.names.partition("qt", "a"), env.names.total("qt"), env.names.env()]
    assert all(store.holders_of(t) == ["o4"] for t in tags)
    out = json.loads(ckeys(env, "release", "--queue", "qt", "--key", "a", "--yes", "--json").stdout)
    assert sorted(r["slot"] for r in out["released"]) == [
        "(environment)", "queue qt (total)", "queue qt [a]"]
    assert all(store.holders_of(t) == [] for t in tags)


def test_releasing_a_key_frees_what_its_run_holds_with_it(env: Env) -> None:
    """A forced release of a key freed the key alone: its run's units on its task's
    implicit queue and on the environment went on counting until their lease ran out."""
    from celery_ckeys.admission import RunSpec
    from celery_ckeys.config import get_config
    from celery_ckeys.store import store_for

    env.configure(ckeys_environment_limit=4)
    store = store_for(get_config(env.app()))
    seed_holder(store, RunSpec("t", key="k1"), "o5")
    tags = [env.names.key("k1"), env.names.queue("t"), env.names.env()]
    assert all(store.holders_of(t) == ["o5"] for t in tags)
    out = json.loads(ckeys(env, "release", "k1", "--yes", "--json").stdout)
    assert sorted(r["slot"] for r in out["released"]) == ["(environment)", "key k1", "queue t"]
    assert all(store.holders_of(t) == [] for t in tags)


@pytest.mark.parametrize("by", ["key", "partition"])
def test_releasing_a_key_or_its_partition_frees_the_other(env: Env, by: str) -> None:
    """A run triggered with a key on a queue with no limit anywhere holds the key's
    partition (limit 1) and the key mutex: releasing either left the other held."""
    from celery_ckeys.admission import RunSpec
    from celery_ckeys.config import get_config
    from celery_ckeys.store import store_for

    store = store_for(get_config(env.app()))
    seed_holder(store, RunSpec("t", queue=ConcurrencyQueue("qn"), key="k2"), "o6")
    tags = [env.names.partition("qn", "k2"), env.names.key("k2")]
    assert all(store.holders_of(t) == ["o6"] for t in tags)
    args = ["k2"] if by == "key" else ["--queue", "qn", "--key", "k2"]
    out = json.loads(ckeys(env, "release", *args, "--yes", "--json").stdout)
    assert sorted(r["slot"] for r in out["released"]) == ["key k2", "queue qn [k2]"]
    assert all(store.holders_of(t) == [] for t in tags)


def test_limits_get_and_set(env: Env) -> None:
    out = json.loads(ckeys(env, "limits", "get", "--json").stdout)
    declared = {q["queue"]: q for q in out["queues"]}
    assert declared["ckt.one_at_a_time"]["declared"] == 1
    assert declared["shared"]["effective"] == 2
    assert "queue reports: limit 5" in ckeys(env, "limits", "set", "reports", "5").stdout
    out = json.loads(ckeys(env, "limits", "get", "reports", "--json").stdout)
    assert out["queues"] == [{"queue": "reports", "recorded": 5, "declared": None, "effective": 5,
                              "total": {"recorded": None, "declared": None, "effective": None},
                              "computed": False, "keys": {}, "weights": {},
                              "paused": {"queue": False, "keys": []},
                              "rate": {"recorded": None, "declared": None}}]
    assert "total limit 7" in ckeys(env, "limits", "set", "reports", "--total", "7").stdout
    out = json.loads(ckeys(env, "limits", "get", "reports", "--json").stdout)
    assert out["queues"][0]["total"]["effective"] == 7
    assert "(total)" in ckeys(env, "limits", "get", "reports").stdout
    ckeys(env, "limits", "set", "reports", "--clear-total")
    out = json.loads(ckeys(env, "limits", "get", "reports", "--json").stdout)
    assert out["queues"][0]["total"]["recorded"] is None
    mixed = ckeys(env, "limits", "set", "reports", "3", "--total", "7", check=False)
    assert mixed.returncode != 0 and "give one of" in mixed.stderr
    assert "queue reports [gold]: weight 3" in ckeys(env, "limits", "set", "reports", "--key",
                                                      "gold", "--weight", "3").stdout
    out = json.loads(ckeys(env, "limits", "get", "reports", "--json").stdout)
    assert out["queues"][0]["weights"] == {"gold": {"recorded": 3, "declared": None,
                                                    "effective": 3}}
    assert "[gold] weight" in ckeys(env, "limits", "get", "reports").stdout
    no_key = ckeys(env, "limits", "set", "reports", "--weight", "3", check=False)
    assert no_key.returncode != 0 and "need --key" in no_key.stderr
    heavy = ckeys(env, "limits", "set", "reports", "--key", "gold", "--weight", "5000", check=False)
    assert heavy.returncode != 0 and "from 1 to 100" in heavy.stderr
    ckeys(env, "limits", "set", "reports", "--key", "gold", "--clear-weight")
    out = json.loads(ckeys(env, "limits", "get", "reports", "--json").stdout)
    assert out["queues"][0]["weights"] == {}
    table = ckeys(env, "limits", "get").stdout
    assert "reports" in table and "APPLIES" in table
    ckeys(env, "limits", "set", "reports", "--clear")
    out = json.loads(ckeys(env, "limits", "get", "reports", "--json").stdout)
    assert out["queues"][0]["recorded"] is None
    bad = ckeys(env, "limits", "set", "reports", "0", check=False)
    assert bad.returncode != 0 and "positive integer" in bad.stderr
    assert "queue reports [acme]: paused" in ckeys(env, "pause", "reports", "--key", "acme").stdout
    assert "queue reports: paused" in ckeys(env, "pause", "reports").stdout
    out = json.loads(ckeys(env, "limits", "get", "reports", "--json").stdout)
    assert out["queues"][0]["paused"] == {"queue": True, "keys": ["acme"]}
    ckeys(env, "resume", "reports")
    assert "queue reports [acme]: resumed" in ckeys(env, "resume", "reports", "--key",
                                                    "acme").stdout
    out = json.loads(ckeys(env, "limits", "get", "reports", "--json").stdout)
    assert out["queues"][0]["paused"] == {"queue": False, "keys": []}
    assert "queue reports: rate 10/m" in ckeys(env, "limits", "set", "reports", "--rate",
                                               "10/m").stdout
    out = json.loads(ckeys(env, "limits", "get", "reports", "--json").stdout)
    assert out["queues"][0]["rate"] == {"recorded": "10/m", "declared": None}
    bad_rate = ckeys(env, "limits", "set", "reports", "--rate", "10/d", check=False)
    assert bad_rate.returncode != 0 and "N/s, N/m or N/h" in bad_rate.stderr
    ckeys(env, "limits", "set", "reports", "--clear-rate")
    out = json.loads(ckeys(env, "limits", "get", "reports", "--json").stdout)
    assert out["queues"][0]["rate"]["recorded"] is None


def test_a_limit_set_from_the_cli_applies_to_the_next_runs(env: Env) -> None:
    env.workers(count=2, concurrency=4)
    ckeys(env, "limits", "set", "ckt.limited3", "1")
    limited3 = env.app().tasks["ckt.limited3"]
    for r in [limited3.apply_async((["cli-limit"], 0.2)) for _ in range(5)]:
        r.get(timeout=60)
    assert env.max("cli-limit") == 1


def test_a_key_limit_set_from_the_cli_applies_to_that_key_alone(env: Env) -> None:
    """``limits set Q N --key K`` reaches running workers at the next admission: K's
    partition runs N at once, other keys keep the queue's limit; ``--clear`` takes it back."""
    env.workers(count=2, concurrency=4)
    assert "queue tenants [acme]: limit 3" in ckeys(env, "limits", "set", "tenants", "3",
                                                    "--key", "acme").stdout
    work = env.app().tasks["ckt.work"]
    queue = ConcurrencyQueue("tenants", limit=1)
    runs = [work.apply_async((["t:acme"], 0.4), concurrency_queue=queue, concurrency_key="acme")
            for _ in range(8)]
    runs += [work.apply_async((["t:other"], 0.3), concurrency_queue=queue, concurrency_key="other")
             for _ in range(3)]
    for r in runs:
        r.get(timeout=120)
    assert env.max("t:acme") == 3
    assert env.max("t:other") == 1
    out = json.loads(ckeys(env, "limits", "get", "tenants", "--json").stdout)
    assert out["queues"][0]["keys"] == {"acme": {"recorded": 3, "effective": 3}}
    assert "[acme]" in ckeys(env, "limits", "get").stdout
    ckeys(env, "limits", "set", "tenants", "--key", "acme", "--clear")
    for r in [work.apply_async((["t:acme-after"], 0.2), concurrency_queue=queue,
                               concurrency_key="acme") for _ in range(4)]:
        r.get(timeout=120)
    assert env.max("t:acme-after") == 1
    bad = ckeys(env, "limits", "set", "tenants", "2", "--key", "", check=False)
    assert bad.returncode != 0 and "key" in bad.stderr.lower()
