"""The chaos suite's checker: proves the guarantees from a journal of executions.

Every execution of a run writes ``start`` before its body and ``end`` after it, with its
task id, pool pid, labels (the key or queue it needs) and wall-clock time (all workers
share the machine's clock). An execution whose pool process was SIGKILLed has no ``end``;
it ended at the latest when the chaos driver killed that pid, so its interval ends there.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Optional


@dataclass
class Execution:
    task_id: str
    pid: int
    labels: list[str]
    start: float
    end: Optional[float]
    killed: bool = False
    final: bool = True  # False for an attempt that then retried


def executions(events: Iterable[dict[str, Any]], kills: dict[int, list[float]]) -> list[Execution]:
    """Pair starts with their ends (same task id and pid); close killed ones at the kill."""
    open_: dict[tuple[str, int], Execution] = {}
    done: list[Execution] = []
    for event in sorted(events, key=lambda e: e["t"]):
        ident = (event["id"], event["pid"])
        if event["ev"] == "start":
            if ident in open_:  # the same run again in the same pid: the first never ended
                done.append(open_.pop(ident))
            open_[ident] = Execution(event["id"], event["pid"], event["labels"], event["t"], None)
        elif event["ev"] == "end" and ident in open_:
            execution = open_.pop(ident)
            execution.end = event["t"]
            execution.final = event.get("final", True)
            done.append(execution)
    done.extend(open_.values())
    for execution in done:
        if execution.end is None:
            after = [t for t in kills.get(execution.pid, []) if t >= execution.start]
            if after:
                execution.end = min(after)
                execution.killed = True
    return done


def check(events: list[dict[str, Any]], kills: dict[int, list[float]], limits: dict[str, int],
          expected_ids: Iterable[str]) -> list[str]:
    """Every problem found; an empty list means every guarantee held."""
    problems: list[str] = []
    runs = executions(events, kills)
    for execution in runs:
        if execution.end is None:
            problems.append(f"{execution.task_id} started in pid {execution.pid} and neither"
                            " ended nor was killed")
    finished = {e.task_id for e in runs if e.end is not None and not e.killed and e.final}
    missing = set(expected_ids) - finished
    if missing:
        problems.append(f"{len(missing)} run(s) never completed, e.g. {sorted(missing)[:3]}")
    by_label: dict[str, list[Execution]] = defaultdict(list)
    for execution in runs:
        if execution.end is not None:
            for label in execution.labels:
                by_label[label].append(execution)
    for label, items in by_label.items():
        limit = limits.get(label, 1)
        points = sorted([(e.start, 1, e.task_id) for e in items] + [(e.end, -1, e.task_id) for e in items],
                        key=lambda p: (p[0], p[1]))  # an end at the same instant comes first
        running = 0
        for t, delta, task_id in points:
            running += delta
            if running > limit:
                problems.append(f"{label}: {running} executions at once (limit {limit}) at {t:.6f},"
                                f" when {task_id} started")
                break
    return problems
