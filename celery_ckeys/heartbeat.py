"""Leases in the background: renewal, and releases that Redis refused.

One daemon thread per process renews every run that process holds (by its hold token)
or waits for (by its wait token), so it works the same under the prefork pool (a thread
in each pool process, started after the fork), the threads pool (one thread for all) and
solo. All renewals of a tick go out in one pipelined round trip.

A release that failed because Redis was briefly unreachable is handed to the same
thread, which retries it until Redis answers or the lease would have run out, so the
unit comes free as soon as possible. ``flush`` drains what is pending; a pool
process calls it before it exits. A process forked from one that holds units (a task
body that calls ``os.fork()``) starts with nothing: it never renews or releases its
parent's units.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from celery.signals import worker_process_shutdown

from .errors import CoordinationUnavailable, describe
from .slots import Slot
from .store import Store

logger = logging.getLogger("celery_ckeys.renew")


@dataclass(eq=False)
class Holding:
    """The units one run holds (role "hold", by its hold token), or, while it waits in
    ``wait_for``, its places as a waiter (role "wait", by its wait token)."""

    store: Store
    owner: str  # the task id
    token: str
    task_name: str
    slots: tuple[Slot, ...]
    role: str = "hold"
    #: the ticket its hold token carries ("" for none): its end leaves the memo done:ticket
    ticket: str = ""
    #: the process that acquired: only it may release (a forked child never does)
    pid: int = field(default_factory=os.getpid)
    since: float = field(default_factory=time.monotonic)
    lost: bool = False
    on_lost: Optional[Callable[[Holding], None]] = None


@dataclass(eq=False)
class _PendingRelease:
    holding: Holding
    deadline: float
    on_done: Optional[Callable[[], None]] = None
    reported: bool = False


class Heartbeat:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holdings: set[Holding] = set()
        self._pending: list[_PendingRelease] = []
        self._wake = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._pid = 0

    def add(self, holding: Holding) -> None:
        with self._lock:
            self._holdings.add(holding)
            self._ensure_thread()

    def remove(self, holding: Holding) -> None:
        with self._lock:
            self._holdings.discard(holding)

    def release(self, holding: Holding, on_done: Optional[Callable[[], None]] = None) -> None:
        """Release in the background, retrying until Redis answers or the lease would end."""
        with self._lock:
            self._pending.append(_PendingRelease(
                holding, time.monotonic() + holding.store.config.lock_ttl, on_done))
            self._ensure_thread()
            self._wake.set()

    def forget_after_fork(self) -> None:
        """In a forked child: the parent's runs are not ours to renew or release."""
        self._lock = threading.Lock()
        self._holdings = set()
        self._pending = []
        self._thread = None

    def flush(self, timeout: float = 5.0) -> bool:
        """Release everything pending now, in the calling thread; True when nothing is left."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if not self._pending:
                    return True
            self._release_pending()
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)

    def holdings(self) -> list[Holding]:
        with self._lock:
            return list(self._holdings)

    def _ensure_thread(self) -> None:
        # After fork() the parent's thread does not exist in the child: start our own.
        if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
            self._pid = os.getpid()
            self._wake = threading.Event()
            self._thread = threading.Thread(target=self._loop, name="ckeys-heartbeat", daemon=True)
            self._thread.start()

    def _interval(self) -> float:
        with self._lock:
            ttls = [h.store.config.lock_ttl for h in self._holdings]
            pending = bool(self._pending)
        interval = min(ttls) / 3 if ttls else 5.0
        if pending:
            interval = min(interval, 0.5)
        return max(0.2, interval)

    def _loop(self) -> None:
        next_renewal = time.monotonic() + self._interval()
        while True:
            self._wake.wait(max(0.0, min(self._interval(), next_renewal - time.monotonic())))
            self._wake.clear()
            try:
                self._release_pending()
                if time.monotonic() >= next_renewal:
                    self.tick()
                    next_renewal = time.monotonic() + self._interval()
            except Exception:  # pragma: no cover - never let the thread die
                logger.exception("lease renewal failed")

    def tick(self) -> None:
        """Renew every lease this process holds (one pipelined round trip per store)."""
        by_store: dict[int, tuple[Store, list[Holding]]] = {}
        for holding in self.holdings():
            by_store.setdefault(id(holding.store), (holding.store, []))[1].append(holding)
        for store, holdings in by_store.values():
            try:
                counts = store.renew_many([(h.slots, h.owner, h.token, h.role) for h in holdings])
            except CoordinationUnavailable as exc:
                logger.error("could not renew %d lease(s): %s", len(holdings), describe(exc))
                continue
            for holding, renewed in zip(holdings, counts):
                if renewed < len(holding.slots) and not holding.lost and holding in self._holdings:
                    holding.lost = True
                    logger.error(
                        "run %s of %s lost %d of its %d slot(s): the lease ran out before it"
                        " could be renewed; another run may now hold them",
                        holding.owner, holding.task_name, len(holding.slots) - renewed,
                        len(holding.slots))
                    if holding.on_lost is not None:
                        holding.on_lost(holding)

    def _release_pending(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        if not pending:
            return
        by_store: dict[int, tuple[Store, list[_PendingRelease]]] = {}
        for item in pending:
            store = item.holding.store
            by_store.setdefault(id(store), (store, []))[1].append(item)
        keep: list[_PendingRelease] = []
        for store, items in by_store.values():
            try:
                store.release_many([(i.holding.slots, i.holding.owner, i.holding.token,
                                     i.holding.ticket) for i in items])
            except CoordinationUnavailable as exc:
                now = time.monotonic()
                alive = [item for item in items if now < item.deadline]
                if len(alive) < len(items):
                    logger.error("gave up releasing %d run(s); their leases have run out",
                                 len(items) - len(alive))
                if not any(item.reported for item in alive):
                    logger.error("could not release %d run(s) yet (%s); retrying",
                                 len(alive), describe(exc))
                for item in alive:
                    item.reported = True
                keep.extend(alive)
                continue
            for item in items:
                _done(item)
        if keep:
            with self._lock:
                self._pending.extend(keep)


def _done(item: _PendingRelease) -> None:
    if item.reported:
        logger.info("released the slots of run %s after Redis came back", item.holding.owner)
    if item.on_done is not None:
        try:
            item.on_done()
        except Exception:  # pragma: no cover - a receiver's bug
            logger.exception("slots_released receiver failed")


heartbeat = Heartbeat()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=heartbeat.forget_after_fork)


def flush(timeout: float = 5.0) -> bool:
    return heartbeat.flush(timeout)


@worker_process_shutdown.connect(weak=False, dispatch_uid="celery_ckeys.flush_releases")
def _flush_on_process_exit(**_: Any) -> None:
    # a pool process that exits (max_tasks_per_child, shutdown) gives back what it holds
    flush()


atexit.register(flush)

