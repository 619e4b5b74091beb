"""``make bench``: every benchmark, each comparing its cases in the same run.

Writes ``bench/out/RESULTS.md`` (a markdown table with the machine it ran on) and
``bench/out/results.png``. ``bench/RESULTS.md`` is a committed copy of one such run.

    (a) uncontended keyed against plain Celery wall time        goal <= 1.10
    (b) Redis round trips per uncontended keyed run             goal <= 2
    (c) release-to-start latency, countdown against handoff      goal (handoff) p50 <= 10 ms, p99 <= 50 ms
    (d) contended makespan against the ideal lower bound        goal (handoff) <= 1.10
    (e) broker publishes per run under contention
    (f) the uncontended workload on celery-once and celery-singleton
    and a profile of the hot path against the round-trip floor.
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
import hotpath
import latency
import makespan
import overhead
from common import machine

OUT = Path(__file__).parent / "out"


def run(quick: bool) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": machine(),
                               "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    step = "(a)+(f) overhead"
    print(step, flush=True)
    results["overhead"] = overhead.run(runs=800, rounds=3 if quick else 5)
    print("(b) round trips", flush=True)
    results["round_trips"] = commands.round_trips(runs=400)
    print("(c) latency", flush=True)
    results["latency"] = [latency.measure("handoff", 30 if quick else 100),
                          latency.measure("countdown", 3 if quick else 8)]
    print("(d) makespan", flush=True)
    results["makespan"] = [makespan.measure("handoff"), makespan.measure("countdown"),
                           makespan.measure("plain")]
    print("(e) publishes", flush=True)
    results["publishes"] = [commands.publishes(mode, runs=200, keys=5, seconds=0.2, countdown=1.0)
                            for mode in ("countdown", "handoff")]
    print("hot path", flush=True)
    results["hotpath"] = hotpath.measure(n=2000)
    return results


def verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"


def markdown(r: dict[str, Any]) -> str:
    o, rt = r["overhead"], r["round_trips"]
    ratio = o["ratio"]["celery_ckeys KeyedTask"]
    lines = [
        "# Benchmark results", "",
        f"Machine: {r['machine']}. Run {r['started']} with `make bench` (`bench/run_all.py`);"
        " every case of a table ran in the same run, on private redis-servers.", "",
        "## (a) and (f) Uncontended runs against plain Celery and the peer packages", "",
        f"{o['runs']} no-op runs per case, one prefork worker with 2 processes, a distinct key"
        f" per run; median of {o['rounds']} alternating rounds, first publish to last result.", "",
        "| case | wall time | vs plain Celery |", "|---|---|---|",
    ]
    for name, seconds in o["seconds"].items():
        lines.append(f"| {name} | {seconds:.3f} s | {o['ratio'][name]:.3f} |")
    lines += ["", f"Goal keyed / plain <= 1.10: {verdict(ratio <= 1.10)} ({ratio:.3f}).", "",
              "## (b) Redis round trips per uncontended keyed run", "",
              "| runs | round trips per run | Redis commands run inside the scripts, per run |",
              "|---|---|---|",
              f"| {rt['runs']} | {rt['round_trips_per_run']:.2f} |"
              f" {rt['redis_commands_in_scripts_per_run']:.1f} |",
              "", f"Goal <= 2: {verdict(rt['round_trips_per_run'] <= 2.0)}.", "",
              "## (c) Release-to-start latency", "",
              "A holder takes a key for 300 ms; one waiter is published once it runs. Latency is from"
              " the end of the holder's body to the start of the waiter's.", "",
              "| deferral | countdown | samples | p50 | p99 | max |", "|---|---|---|---|---|---|"]
    for x in r["latency"]:
        lines.append(f"| {x['mode']} | {x['countdown_s']:g} s | {x['samples']} |"
                     f" {x['p50_ms']:.1f} ms |"
                     f" {x['p99_ms']:.1f} ms | {x['max_ms']:.1f} ms |")
    h = r["latency"][0]
    lines += ["", f"Goal for handoff p50 <= 10 ms and p99 <= 50 ms:"
              f" {verdict(h['p50_ms'] <= 10 and h['p99_ms'] <= 50)}.", "",
              "## (d) Contended makespan", "",
              "500 runs over 50 keys, 100 ms each, 2 workers x 4 processes, published key by key."
              " Ideal = max(total work / processes, work of one key). The `plain` row runs the same"
              " bodies without keys: Celery's own floor on this machine.", "",
              "| deferral | countdown | makespan | ideal | ratio |", "|---|---|---|---|---|"]
    for x in r["makespan"]:
        lines.append(f"| {x['mode']} | {x['countdown_s']:g} s | {x['seconds']:.2f} s |"
                     f" {x['ideal_seconds']:.2f} s | {x['ratio']:.3f} |")
    mh = r["makespan"][0]
    lines += ["", f"Goal for handoff <= 1.10: {verdict(mh['ratio'] <= 1.10)}.", "",
              "## (e) Broker publishes per run under contention", "",
              "200 runs over 5 keys, 200 ms each, 2 workers x 4 processes; countdown 1 s (the number"
              " of countdown re-publishes grows with wait / countdown). Counted with INFO"
              " commandstats on the broker's own redis-server (LPUSH), the first publish included.", "",
              "| deferral | publishes per run |", "|---|---|"]
    for x in r["publishes"]:
        lines.append(f"| {x['mode']} | {x['publishes_per_run']:.2f} |")
    hp = r["hotpath"]["us_per_call"]
    lines += ["", "## Hot path against the floor", "",
              "One process, loopback; microseconds per call, client side.", "",
              "| operation | us |", "|---|---|"]
    for name, us in hp.items():
        lines.append(f"| {name} | {us:.1f} |")
    lines += ["", "Server-side time per call (INFO commandstats): "
              + ", ".join(f"{k.replace('cmdstat_', '')} {v:.1f} us"
                          for k, v in r["hotpath"]["server_usec_per_call"].items()) + ".", "",
              "Where the time of acquire + release goes (cProfile, top entries by own time):", "",
              "```", r["hotpath"]["profile"].strip(), "```", ""]
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
    o = r["overhead"]
    names = list(o["ratio"])
    axes[0].barh(names, [o["ratio"][n] for n in names], color="#4477aa")
    axes[0].axvline(1.10, color="#cc3311", linestyle="--", label="goal 1.10")
    axes[0].set_title("(a)(f) uncontended wall time / plain")
    axes[0].legend()
    lat = r["latency"]
    axes[1].bar([f"{x['mode']}\np50" for x in lat] + [f"{x['mode']}\np99" for x in lat],
                [x["p50_ms"] for x in lat] + [x["p99_ms"] for x in lat], color="#228833")
    axes[1].set_yscale("log")
    axes[1].set_title("(c) release-to-start latency, ms (log)")
    mk = r["makespan"]
    axes[2].bar([x["mode"] for x in mk], [x["ratio"] for x in mk], color="#ccbb44")
    axes[2].axhline(1.10, color="#cc3311", linestyle="--")
    axes[2].set_title("(d) contended makespan / ideal")
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
