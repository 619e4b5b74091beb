"""``make bench``: every benchmark, each comparing its cases in the same run.

Writes ``bench/out/RESULTS.md`` (markdown tables with the machine it ran on, and no paths
of it) and ``bench/out/results.png``. ``bench/RESULTS.md`` is a committed copy of one run.

    (a) Redis server time, commands and round trips a keyed run adds (INFO commandstats),
        on every redis-server found (Debian's and the embedded one), shared and separate
    (b) wall time keyed / plain, uncontended, shared and separate; the peers alongside
    (c) handoff release-to-start latency; countdown for comparison
    (d) contended makespan against the ideal and against plain Celery
    (e) broker publishes per run under contention
    (f) the scripts without Celery: pairs per second, one Redis and a 3-master Cluster; cost
        against distinct keys held and runs waiting; memory per key and per waiting run
    (g) fair sharing: Jain's index across skewed tenants sharing a total; admission cost
        against the number of waiting tenants
    (h) the rate limiter: starts in any window against N; its Redis cost per run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import commands
import fairness
import latency
import makespan
import overhead
import ratelimit
import serverside
import throughput
from common import machine, redis_servers, use_server

OUT = Path(__file__).parent / "out"


def run(quick: bool) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": machine(),
                               "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    servers = redis_servers()
    results["servers"] = list(servers)
    print("(a) server time", flush=True)
    rows = []
    for label, binary in servers.items():
        use_server(binary)
        for layout in ("shared", "separate"):
            for environment in (False, True):
                r = serverside.measure(layout, runs=300 if quick else 1000,
                                       rounds=2 if quick else 3, environment=environment)
                r["server"] = label
                rows.append(r)
    results["serverside"] = rows
    use_server(next(iter(servers.values())))  # the rest on the first (Debian's when present)
    print("(b) wall time", flush=True)
    results["overhead"] = [overhead.run(runs=800, rounds=3 if quick else 5, shared=shared)
                           for shared in (True, False)]
    print("(c) latency", flush=True)
    results["latency"] = [latency.measure("handoff", 30 if quick else 100),
                          latency.line(),
                          latency.measure("countdown", 3 if quick else 5)]
    print("(d) makespan", flush=True)
    results["makespan"] = [makespan.measure("handoff"), makespan.measure("plain"),
                           makespan.measure("countdown")]
    print("(e) publishes", flush=True)
    results["publishes"] = [commands.publishes(mode, runs=200, keys=5, seconds=0.2, countdown=1.0)
                            for mode in ("countdown", "handoff")]
    print("(f) throughput, scaling, memory", flush=True)
    results["throughput"] = throughput.run(quick)
    print("(g) fairness", flush=True)
    results["fairness"] = fairness.run(quick)
    print("(h) rate limiter", flush=True)
    results["ratelimit"] = ratelimit.run()
    return results


def verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"


def markdown(r: dict[str, Any]) -> str:
    lines = [
        "# Benchmark results", "",
        f"Machine: {r['machine']}. Run {r['started']} with `make bench` (`bench/run_all.py`);"
        " every case of a table ran in the same run, on private redis-servers. Table (a) ran on"
        f" each of {', '.join(r['servers'])}; the others on {r['servers'][0]}.", "",
        "Layouts: **shared** is the default configuration (one redis-server is the broker, the"
        " result backend and the coordination Redis); **separate** puts coordination on a"
        " redis-server of its own.", "",
        "## (a) Redis server time a keyed run adds to a plain run", "",
        "One prefork worker with 2 processes; no-op runs, a distinct key per run (uncontended);"
        " plain and keyed rounds alternate; medians over rounds. Server time and commands are"
        " INFO commandstats summed over every redis-server of the layout (a script's commands"
        " count as commands, their time once, inside the EVALSHA), with the redis-servers on"
        " one core and the worker and the client on the other. **added us** is the time of"
        " what a keyed run sends on top of a plain one: its scripts, and each command it sends"
        " more often, at the keyed round's time per call. Celery's own commands, sent as often"
        " in both rounds, move with the load by more than that: the totals of the two rounds"
        " and their difference are shown beside it.", "",
        "| server | layout | keyed run | plain us | keyed us | difference | added us |"
        " added commands | added round trips | coordination keys left |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for x in r["serverside"]:
        case = "key + queue partition + environment" if x["environment"] else "key only"
        lines.append(f"| {x['server']} | {x['layout']} | {case} | {x['plain']['usec']:.1f} |"
                     f" {x['keyed']['usec']:.1f} | {x['total_difference_usec']:.1f} |"
                     f" **{x['added_usec']:.1f}** |"
                     f" {x['added_commands']:.2f} | {x['added_round_trips']:.2f} | {x['keys_left']} |")
    key_only = [x for x in r["serverside"] if not x["environment"]]
    both = [x for x in r["serverside"] if x["environment"]]
    worst_key = max(x["added_usec"] for x in key_only)
    worst_both = max(x["added_usec"] for x in both)
    lines += ["", f"Goals: key only <= 15 us ({verdict(worst_key <= 15)}, worst {worst_key:.1f} us),"
              f" never above 30 us ({verdict(worst_key <= 30)}); with a partition and an"
              f" environment limit <= 30 us ({verdict(worst_both <= 30)}, worst {worst_both:.1f} us);"
              f" commands added <= 4 ({verdict(max(x['added_commands'] for x in key_only) <= 4.05)}"
              " key only); round trips added <= 2"
              f" ({verdict(max(x['added_round_trips'] for x in r['serverside']) <= 2.01)});"
              f" keys left 0 ({verdict(all(x['keys_left'] == 0 for x in r['serverside']))}).", "",
              "## (b) Wall time, uncontended, against plain Celery and the peers", "",
              "800 no-op runs per case, one prefork worker with 2 processes, a distinct key per"
              " run; median of alternating rounds, first publish to last result (results on).", "",
              "| layout | case | wall time | vs plain Celery |", "|---|---|---|---|"]
    for o in r["overhead"]:
        for name, seconds in o["seconds"].items():
            lines.append(f"| {o['layout']} | {name} | {seconds:.3f} s | {o['ratio'][name]:.3f} |")
    ratios = {o["layout"]: o["ratio"]["celery_ckeys KeyedTask"] for o in r["overhead"]}
    lines += ["", "Goal keyed / plain <= 1.05: " + ", ".join(
        f"{layout} {verdict(v <= 1.05)} ({v:.3f})" for layout, v in ratios.items()) + ".", "",
        "## (c) Release-to-start latency", "",
        "Pairs: a holder takes a key for 300 ms, one waiter is published once it runs (2 workers"
        " x 4 processes). One line: 40 runs of one key published at once, 50 ms each, on 2"
        " workers x 3 processes. Latency runs from the end of one body to the start of the"
        " next on the same key.", "",
        "| deferral | samples | p50 | p99 | max |", "|---|---|---|---|---|"]
    for x in r["latency"]:
        name = x["mode"] if "countdown_s" not in x else \
            f"{x['mode']} pairs (countdown {x['countdown_s']:g} s)"
        lines.append(f"| {name} | {x['samples']} | {x['p50_ms']:.1f} ms | {x['p99_ms']:.1f} ms |"
                     f" {x['max_ms']:.1f} ms |")
    h = [x for x in r["latency"] if x["mode"].startswith("handoff")]
    lines += ["", "Goal for handoff p50 <= 5 ms, p99 <= 20 ms: " + ", ".join(
        f"{x['mode']} {verdict(x['p50_ms'] <= 5 and x['p99_ms'] <= 20)}" for x in h) + ".", "",
        "## (d) Contended makespan", "",
        "500 runs over 50 keys, 100 ms each, 2 workers x 4 processes, published key by key."
        " Ideal = max(total work / processes, work of one key). `plain` runs the same bodies"
        " without keys: Celery's own makespan on this machine.", "",
        "| deferral | makespan | ideal | / ideal | / plain |", "|---|---|---|---|---|"]
    plain = next(x for x in r["makespan"] if x["mode"] == "plain")["seconds"]
    for x in r["makespan"]:
        lines.append(f"| {x['mode']} | {x['seconds']:.2f} s | {x['ideal_seconds']:.2f} s |"
                     f" {x['ratio']:.3f} | {x['seconds'] / plain:.3f} |")
    mh = r["makespan"][0]
    lines += ["", f"Goals for handoff: <= 1.05 x ideal {verdict(mh['ratio'] <= 1.05)};"
              f" within 3% of plain {verdict(mh['seconds'] / plain <= 1.03)}.", "",
              "## (e) Broker publishes per run under contention", "",
              "200 runs over 5 keys, 200 ms each, 2 workers x 4 processes; countdown 1 s. LPUSH on"
              " the broker (INFO commandstats), the first publish included.", "",
              "| deferral | publishes per run |", "|---|---|"]
    for x in r["publishes"]:
        lines.append(f"| {x['mode']} | {x['publishes_per_run']:.2f} |")
    t = r["throughput"]
    single, cluster = t["single"], t["cluster"]
    lines += ["", "## (f) The scripts without Celery", "",
              f"Acquire + release pairs, {single['processes']} client processes (redis-py), each"
              " on keys of its own, 5 s: the commands the store sends on the hot path (`SET NX"
              f" PX`, then `unlock.lua`), {single['batch']} pairs per round trip as a load"
              " generator pipelines them (`redis-benchmark -P`), every reply checked. The"
              " ceiling is what the server's time per pair allows one Redis core (per master on"
              " the Cluster).", "",
              "| setup | pairs/s reached | server us per pair | server ceiling, pairs/s |",
              "|---|---|---|---|",
              f"| one Redis | {single['pairs_per_s']:.0f} | {single['server_us_per_pair']:.1f} |"
              f" {single['ceiling_pairs_per_s']:.0f} |",
              f"| 3-master Cluster | {cluster['pairs_per_s']:.0f} | {cluster['server_us_per_pair']:.1f} |"
              f" {cluster['ceiling_pairs_per_s']:.0f} |", "",
              f"Goals: >= 50,000 pairs/s on one Redis: reached by the clients"
              f" {verdict(single['pairs_per_s'] >= 50000)}, by the server ceiling"
              f" {verdict(single['ceiling_pairs_per_s'] >= 50000)}; Cluster >= 2.5 x one node:"
              f" clients {verdict(cluster['pairs_per_s'] >= 2.5 * single['pairs_per_s'])}"
              f" ({cluster['pairs_per_s'] / single['pairs_per_s']:.2f} x), ceiling"
              f" {verdict(cluster['ceiling_pairs_per_s'] >= 2.5 * single['ceiling_pairs_per_s'])}"
              f" ({cluster['ceiling_pairs_per_s'] / single['ceiling_pairs_per_s']:.2f} x).", "",
              "| other keys held | server us per pair |", "|---|---|"]
    for x in t["keys"]:
        lines.append(f"| {x['held_keys']:,} | {x['server_us_per_pair']:.1f} |")
    lines += ["", "| runs waiting on the key | server us per handoff (release + claim + one park) |",
              "|---|---|"]
    for x in t["waiters"]:
        lines.append(f"| {x['waiting']:,} | {x['server_us_per_handoff']:.1f} |")
    mem = t["memory"]
    lines += ["", "| memory | bytes |", "|---|---|",
              f"| per distinct key in use (key only) | {mem['bytes_per_key']:.0f} |",
              f"| per partition in use (queue partition + environment) | {mem['bytes_per_partition']:.0f} |",
              f"| per run waiting in a line (message of {mem['waiting_message_bytes']} bytes;"
              f" a parked run stores its whole message) | {mem['bytes_per_waiting_run']:.0f} |", ""]
    if "fairness" in r:
        lines += fairness.markdown(r["fairness"])
    if "ratelimit" in r:
        lines += ratelimit.markdown(r["ratelimit"])
    return "\n".join(lines)


def chart(r: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart (pip install 'celery-ckeys[bench]')")
        return
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    rows = r["serverside"]
    axes[0].barh([f"{x['server']} {x['layout']}\n{'key+queue+env' if x['environment'] else 'key'}"
                  for x in rows], [x["added_usec"] for x in rows], color="#4477aa")
    axes[0].axvline(15, color="#cc3311", linestyle="--", label="goal 15 us")
    axes[0].set_title("(a) server time added per run, us")
    axes[0].legend()
    lat = [x for x in r["latency"] if x["mode"].startswith("handoff")]
    axes[1].bar([f"{x['mode']}\np50" for x in lat] + [f"{x['mode']}\np99" for x in lat],
                [x["p50_ms"] for x in lat] + [x["p99_ms"] for x in lat], color="#228833")
    axes[1].axhline(20, color="#cc3311", linestyle="--")
    axes[1].set_title("(c) handoff release-to-start, ms")
    mk = r["makespan"]
    axes[2].bar([x["mode"] for x in mk], [x["ratio"] for x in mk], color="#ccbb44")
    axes[2].axhline(1.05, color="#cc3311", linestyle="--")
    axes[2].set_yscale("log")
    axes[2].set_title("(d) contended makespan / ideal (log)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer samples")
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    results = run(args.quick)
    (OUT / "results.json").write_text(json.dumps(results, indent=2, default=str))
    text = markdown(results)
    (OUT / "RESULTS.md").write_text(text)
    chart(results, OUT / "results.png")
    print(text)
    print(f"written: {OUT / 'RESULTS.md'}, {OUT / 'results.png'}")


if __name__ == "__main__":
    main()
