"""Waiting on a child without holding slots (SPEC 4.8; docs/protocol.md 6.3).

``wait_for(child)`` inside a keyed run:

1. checks for a recursive-wait deadlock: when the child would run on one of the caller's
   own queues, partitions or keys, the waiting ancestors already there plus the caller must
   not exceed its limit (``RecursiveWaitDeadlock``, raised before anything is published);
2. steps out of every unit it holds and is listed as waiting, with a wait token, in one
   call (``wait.lua enter``): the units are free for other runs, the child among them;
3. publishes the child with the chain of waiting ancestors and who waits (its slots too);
4. blocks until the child is ready, without Celery's "never call result.get() within a
   task" guard (lifted for this call only), and fails with ``WaitStarvation`` if every
   worker process that could run the child is itself blocked waiting;
5. takes its units back ahead of runs that have not started: the child tells it (``wait.lua
   ready``) when its body ends in a final state, before its result is stored, and from then
   on units that come free are reserved for the parent; it claims them, woken through a list
   it blocks on rather than by polling.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any, Optional

from celery import current_task
from celery.canvas import Signature
from celery.exceptions import TimeoutError as CeleryTimeoutError

from . import gate, metrics, signals
from .admission import plan_for
from .config import CkeysConfig, get_config
from .errors import CoordinationUnavailable, RecursiveWaitDeadlock, WaitStarvation, describe
from .heartbeat import Holding, heartbeat
from .publish import HEADER_RESUME, HEADER_WAIT_CHAIN, prepare
from .store import Store

logger = logging.getLogger("celery_ckeys.wait")

BLOCKED_LEASE_MS = 30_000


def wait_for(target: Any, timeout: Optional[float] = None, *, task: Any = None) -> Any:
    """Wait for ``target`` (a signature, which is published, or an ``AsyncResult``).

    Returns the child's result or raises its exception, as ``.get()`` does; raises
    Celery's ``TimeoutError`` after ``timeout`` seconds. Inside a keyed run the run's
    slots are given back while it waits and taken back before this returns or raises.
    """
    current = task if task is not None else current_task
    request = getattr(current, "request", None) if current is not None else None
    if current is None or request is None or request.called_directly or request.id is None:
        result = target.apply_async() if isinstance(target, Signature) else target
        return result.get(timeout=timeout)
    if request.is_eager:
        result = target.apply() if isinstance(target, Signature) else target
        return result.get(timeout=timeout, disable_sync_subtasks=False)
    return _Wait(current, request, target, timeout).run()


class _Wait:
    def __init__(self, task: Any, request: Any, target: Any, timeout: Optional[float]) -> None:
        self.task = task
        self.app = task.app
        self.request = request
        self.target = target
        self.timeout = timeout
        self.config: CkeysConfig = get_config(self.app)
        self.store: Store = gate.store_of(self.app)
        self.active = gate.active_run(request)
        self.chain: list[str] = list(gate.headers_of(request).get(HEADER_WAIT_CHAIN) or [])

    def my_tags(self) -> list[str]:
        """The run's own keys, queues and partitions (not the environment)."""
        if self.active is None:
            return []
        return [s.tag for s in self.active.holding.slots if s.kind != "env"]

    def run(self) -> Any:
        signature = self.target if isinstance(self.target, Signature) else None
        child_queue = None
        if signature is not None:
            signature = signature.clone()
            self.check_deadlock(signature)
            child_queue = _broker_queue(self.app, signature)
        waiting = self.step_out()
        error: Optional[BaseException] = None
        result = self.target
        started = time.monotonic()
        try:
            if signature is not None:
                result = signature.apply_async(**self.child_options(signature, waiting))
            self.block(result, child_queue)
        except (CeleryTimeoutError, WaitStarvation) as exc:
            error = exc
        finally:
            outcome = "done" if error is None else (
                "timeout" if isinstance(error, CeleryTimeoutError) else "starved")
            seconds = round(time.monotonic() - started, 3)
            metrics.waited_for(self.task, seconds, outcome)
            if signals.wait_finished.receivers:
                signals.wait_finished.send(sender=self.task, task_id=self.request.id,
                                           child_id=getattr(result, "id", None),
                                           seconds=seconds, outcome=outcome)
            self.resume(waiting)
        if error is not None:
            raise error
        return result.get(disable_sync_subtasks=False, propagate=True)

    # -- 1. deadlock ---------------------------------------------------------------
    def check_deadlock(self, signature: Signature) -> None:
        mine = self.my_tags()
        if not mine:
            return
        child_task = self.app.tasks.get(signature.task)
        if child_task is None or not getattr(child_task, "_ckeys_keyed", False):
            return
        options = dict(signature.options)
        prepare(options, task=child_task, args=signature.args, kwargs=signature.kwargs)
        spec = gate.run_spec(child_task, dict(options.get("headers") or {}), signature.args,
                             signature.kwargs)
        plan = plan_for(self.config, spec)
        if plan is None:
            return
        limits = self.store.resolve_limits(plan.slots)
        for slot, limit in zip(plan.slots, limits):
            if limit is None or slot.tag not in mine:
                continue
            depth = self.chain.count(slot.tag) + 1
            if depth > limit:
                raise RecursiveWaitDeadlock(
                    f"recursive wait deadlock on {slot.label} (limit {limit}): {depth} runs in"
                    f" this chain would be waiting on it at once. Raise its limit, or run the"
                    f" child on another queue", queue=slot.label, limit=limit, depth=depth,
                    task_id=self.request.id)

    # -- 2. step out ---------------------------------------------------------------
    def step_out(self) -> Optional[Holding]:
        if self.active is None or not self.active.holding.slots:
            return None
        holding = self.active.holding
        if gate.hold_observers:
            gate.observe("pause", self.task, holding.token)
        wait_token = gate.wait_token(self.request, holding.ticket)
        heartbeat.remove(holding)
        waiting = Holding(store=self.store, owner=self.request.id, token=wait_token,
                          task_name=self.task.name, slots=holding.slots, role="wait",
                          ticket=holding.ticket)
        heartbeat.add(waiting)
        try:
            self.store.step_out(holding.slots, self.request.id, holding.token, wait_token)
        except CoordinationUnavailable:
            # The wait may have been entered (only the reply got lost) or not. Renew the hold
            # again, never the wait: a wait that nobody renews expires after one lease, while
            # one renewed for as long as this process lives kept every later copy of the
            # run busy. The gate releases the hold when the error ends the run.
            heartbeat.remove(waiting)
            heartbeat.add(holding)
            raise
        metrics.released(len(holding.slots), "waiting")
        if signals.slots_released.receivers:
            signals.slots_released.send(sender=self.task, task_id=self.request.id,
                                        slots=[s.label for s in holding.slots], reason="waiting")
        logger.debug("run %s waits; it gave back %s", self.request.id,
                     ", ".join(s.label for s in holding.slots))
        return waiting

    # -- 3. publish ----------------------------------------------------------------
    def child_options(self, signature: Signature, waiting: Optional[Holding]) -> dict[str, Any]:
        headers = dict(signature.options.get("headers") or {})
        headers[HEADER_WAIT_CHAIN] = self.chain + self.my_tags()
        if waiting is not None:
            headers[HEADER_RESUME] = {"owner": self.request.id, "token": waiting.token,
                                      "slots": [s.as_header() for s in waiting.slots]}
        return {"headers": headers}

    # -- 4. block ------------------------------------------------------------------
    def block(self, result: Any, child_queue: Optional[str]) -> None:
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        starving_since: Optional[float] = None
        poll = self.config.wait_poll_interval
        owner, host = self.request.id, self.request.hostname or ""
        _quietly(self.store.blocked, owner, host, BLOCKED_LEASE_MS)
        checked, starving = 0.0, False
        try:
            while not result.ready():
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    raise CeleryTimeoutError(
                        f"wait_for: the child {result.id} did not finish within {self.timeout}s")
                if now - checked >= 0.5:
                    checked = now
                    starving = _starving(self.store, child_queue)
                    _quietly(self.store.blocked, owner, host, BLOCKED_LEASE_MS)
                if starving and result.state == "PENDING":
                    starving_since = starving_since if starving_since is not None else now
                    if now - starving_since >= self.config.starvation_grace:
                        raise WaitStarvation(
                            f"wait_for in {owner}: every worker process that could run the"
                            f" child {result.id} (broker queue {child_queue or 'any'}) is itself"
                            f" blocked in wait_for, so the child can never start. Give the workers"
                            f" more processes than runs that wait at once, or route children to"
                            f" workers of their own", task_id=owner, child=result.id,
                            queue=child_queue)
                else:
                    starving_since = None
                time.sleep(poll)
        finally:
            _quietly(self.store.unblocked, owner)

    # -- 5. resume -----------------------------------------------------------------
    def resume(self, waiting: Optional[Holding]) -> None:
        if waiting is None or self.active is None:
            return
        owner, plan = self.request.id, self.active.plan
        token = gate.hold_token(self.task, self.request, waiting.ticket,
                                gate.tags_of(gate.headers_of(self.request)))
        # it waits (and its lease is renewed) on every slot it needs now: the plan may have
        # grown while it waited (a limit came or went)
        heartbeat.remove(waiting)
        waiting = replace(waiting, slots=plan.slots)
        heartbeat.add(waiting)
        attempt = 0
        while True:
            attempt += 1
            try:
                result = self.store.acquire(plan.slots, owner, token, mode="resume",
                                            ticket=waiting.token)
            except CoordinationUnavailable as exc:
                if attempt % 20 == 1:
                    logger.error("run %s cannot resume yet: %s", owner, describe(exc))
                time.sleep(0.5)
                continue
            if result.ok:
                break
            assert result.blocked is not None
            if attempt % 100 == 0:
                logger.info("run %s is waiting to resume: %s is full", owner, result.blocked.label)
            _quietly(self.store.wait_wake, result.blocked, 1.0)
        heartbeat.remove(waiting)
        gate.hold(self.task, self.request, self.store, plan, token, waiting.ticket, result)


def _quietly(fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except CoordinationUnavailable:
        time.sleep(0.1)


def _starving(store: Store, queue: Optional[str]) -> bool:
    """True when every live worker process that consumes ``queue`` is blocked waiting."""
    try:
        now_ms, workers, blocked, where = store.registry()
    except CoordinationUnavailable:
        return False
    capacity: dict[str, int] = {}
    for host, info in workers.items():
        if info.get("expires", 0) < now_ms:
            continue
        if queue is None or queue in info.get("queues", []):
            capacity[host] = int(info.get("concurrency", 0))
    total = sum(capacity.values())
    if total <= 0:
        return False  # no live worker for the child at all: not starvation, just none yet
    waiting = sum(1 for owner, expiry in blocked if expiry > now_ms and where.get(owner) in capacity)
    return waiting >= total


def _broker_queue(app: Any, signature: Signature) -> Optional[str]:
    """The broker queue the child will be delivered to, as Celery's router decides it."""
    try:
        route = app.amqp.router.route(dict(signature.options), signature.task, signature.args,
                                      signature.kwargs)
        queue = route.get("queue")
        name = getattr(queue, "name", queue)
        return str(name) if name else str(app.conf.task_default_queue)
    except Exception:  # routers are user code; fall back to "any worker"
        return None
