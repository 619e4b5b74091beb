"""What the dashboard shows: one read of Redis (``introspect.status`` and the queues'
limits) every few seconds, shared by every browser, and the last minutes of it for the
charts. Nothing here talks to Redis but through ``celery_ckeys.introspect`` and
``celery_ckeys.limits``, as the CLI does."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from .. import limits
from ..errors import describe
from ..introspect import SlotStatus, carries, status

#: how far back the charts reach
HISTORY_SECONDS = 600.0


@dataclass
class QueueView:
    """One queue across its own slot, its partitions and its total."""

    name: str
    #: runs are limited per key (partitions), ``limit`` applying to each key's partition
    partitioned: bool
    limit: Optional[int]
    total: Optional[int]
    rate: Optional[str]
    paused: bool
    paused_keys: list[str]
    running: int
    waiting: int
    oldest_wait_seconds: Optional[float]


@dataclass
class Snapshot:
    taken: float
    slots: list[SlotStatus] = field(default_factory=list)
    queues: list[QueueView] = field(default_factory=list)
    error: Optional[str] = None

    def filtered(self, tag: Optional[str]) -> list[SlotStatus]:
        return self.slots if not tag else [s for s in self.slots if carries(s, tag)]


def _runs(slots: list[SlotStatus]) -> tuple[set[str], set[str], Optional[float]]:
    """Distinct runs holding, and waiting (parked, deferred or in wait_for), over ``slots``:
    one run of a partitioned queue holds its partition and the total, and counts once."""
    running = {h.task_id for s in slots for h in s.holders}
    waiting = ({p.task_id for s in slots for p in s.parked}
               | {d.task_id for s in slots for d in s.deferred}
               | {w.task_id for s in slots for w in s.waiting}) - running
    ages = [a for s in slots if (a := s.oldest_wait_seconds) is not None]
    return running, waiting, max(ages) if ages else None


def queue_views(app: Any, slots: list[SlotStatus]) -> list[QueueView]:
    views = []
    for name in sorted({s.queue for s in slots if s.queue is not None}):
        mine = [s for s in slots if s.queue == name]
        running, waiting, oldest = _runs(mine)
        got = limits.get_limits(app, name)
        rate = got["rate"]["recorded"] or got["rate"]["declared"]
        views.append(QueueView(
            name=name, partitioned=any(s.kind == "partition" for s in mine),
            limit=got["effective"], total=got["total"]["effective"], rate=rate,
            paused=got["paused"]["queue"], paused_keys=got["paused"]["keys"],
            running=len(running), waiting=len(waiting), oldest_wait_seconds=oldest))
    return views


def take(app: Any) -> Snapshot:
    """Read Redis once; a failure is shown on the page (without a password), not raised."""
    now = time.time()
    try:
        slots = status(app, include_idle=True)
        return Snapshot(taken=now, slots=slots, queues=queue_views(app, slots))
    except Exception as exc:  # Redis down, a bad reply: say so, try again later
        return Snapshot(taken=now, error=describe(exc))


class Sampler:
    """Takes a snapshot every ``interval`` seconds in a daemon thread, and keeps the running
    and waiting counts per queue for the last ``HISTORY_SECONDS``."""

    def __init__(self, app: Any, interval: float = 2.0) -> None:
        self.app = app
        self.interval = interval
        self._lock = threading.Lock()
        self._latest: Optional[Snapshot] = None
        self._history: deque[tuple[float, dict[str, tuple[int, int]]]] = deque()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="ckeys-dashboard", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def refresh(self) -> Snapshot:
        """Take a snapshot now (after an action, so the page shows its effect at once)."""
        snap = take(self.app)
        with self._lock:
            self._latest = snap
            if snap.error is None:
                self._history.append(
                    (snap.taken, {q.name: (q.running, q.waiting) for q in snap.queues}))
            while self._history and self._history[0][0] < snap.taken - HISTORY_SECONDS:
                self._history.popleft()
        return snap

    def latest(self) -> Snapshot:
        with self._lock:
            snap = self._latest
        return snap if snap is not None else self.refresh()

    def history(self) -> list[tuple[float, dict[str, tuple[int, int]]]]:
        with self._lock:
            return list(self._history)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.refresh()
            self._stop.wait(self.interval)


@dataclass
class Chart:
    """A queue's running and waiting runs over the last minutes, as SVG polyline points."""

    queue: str
    running: str
    waiting: str
    peak: int
    width: ClassVar[int] = 240
    height: ClassVar[int] = 48


def _points(series: list[tuple[float, tuple[int, int]]], index: int, now: float,
            span: float, peak: int) -> str:
    return " ".join(f"{Chart.width * (1 - (now - t) / span):.1f},"
                    f"{Chart.height * (1 - counts[index] / peak):.1f}" for t, counts in series)


def charts(history: list[tuple[float, dict[str, tuple[int, int]]]], now: float,
           queues: list[str]) -> list[Chart]:
    """The x axis spans the history kept (up to :data:`HISTORY_SECONDS`), so a dashboard
    started a minute ago fills its charts too."""
    span = min(HISTORY_SECONDS, max(1.0, now - history[0][0])) if history else HISTORY_SECONDS
    found = []
    for queue in queues:
        series = [(t, counts.get(queue, (0, 0))) for t, counts in history if now - t <= span]
        peak = max([1] + [max(counts) for _, counts in series])
        found.append(Chart(queue=queue, running=_points(series, 0, now, span, peak),
                           waiting=_points(series, 1, now, span, peak), peak=peak))
    return found
