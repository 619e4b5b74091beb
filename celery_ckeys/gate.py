"""The worker-side gate: take the run's slots right before its body, give them back after.

Flow of one run (``KeyedTask.__call__`` calls :func:`run`):

1. Read what the run asked for from its headers (:func:`run_spec`). A header that no
   celery_ckeys producer would send fails the run with :class:`MalformedHeader`.
2. :func:`acquire` takes every slot in one script call. When one is full, or Redis
   cannot be reached (fail closed), the run is *deferred*: published again with its
   task id, arguments, headers and routing, ``request.retries`` untouched, and this
   delivery ends with ``Ignore`` (so neither ``max_retries`` nor ``on_retry`` is involved).
3. The body runs while the heartbeat thread renews the leases.
4. ``finally`` releases the slots: success, exception, ``self.retry()``, ``Reject``,
   ``Ignore``, soft time limits and the SIGTERM of a hard time limit or of a revoke all
   pass through it. SIGKILL of the pool process does not; :class:`KeyedRequest`
   releases from the worker's main process instead, by task id and pool pid.
"""

from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, NoReturn, Optional

from celery.exceptions import Ignore, Reject

from . import handoff, signals
from .admission import Plan, RunSpec, plan_for
from .config import CkeysConfig, get_config
from .errors import (
    CkeysError,
    CoordinationUnavailable,
    MalformedHeader,
    describe,
)
from .heartbeat import Holding, heartbeat
from .publish import (
    HEADER_DEFERRALS,
    HEADER_FIRST_DEFERRED,
    HEADER_KEY,
    HEADER_QUEUE,
    HEADER_RESUME,
    HEADER_TAGS,
    HEADER_WAIT_CHAIN,
    HEADER_WOKEN,
    default_key,
)
from .queues import ConcurrencyQueue, coerce_queue
from .store import AcquireResult, Store, store_for
from .validation import check_key, check_tags

acquire_log = logging.getLogger("celery_ckeys.acquire")
defer_log = logging.getLogger("celery_ckeys.defer")
release_log = logging.getLogger("celery_ckeys.release")

@dataclass
class ActiveRun:
    """A run executing in this process: what it holds and how to take it again (wait_for)."""

    holding: Holding
    plan: Plan
    holder: dict[str, Any]


_active: dict[str, ActiveRun] = {}


def active_run(task_id: str) -> Optional[ActiveRun]:
    return _active.get(task_id)


def headers_of(request: Any) -> dict[str, Any]:
    """The custom headers of a run, whichever Celery version built the request."""
    headers = getattr(request, "headers", None)
    if isinstance(headers, dict):
        return headers
    found: dict[str, Any] = {}
    for name in (HEADER_KEY, HEADER_QUEUE, HEADER_TAGS, HEADER_DEFERRALS, HEADER_WAIT_CHAIN,
                 HEADER_RESUME, HEADER_FIRST_DEFERRED, HEADER_WOKEN):
        value = getattr(request, name, None)
        if value is not None:
            found[name] = value
    return found


def run_spec(task: Any, headers: dict[str, Any], args: Any, kwargs: Any) -> RunSpec:
    """What the run asks for; raises :class:`MalformedHeader` for headers no producer of ours sends."""
    key: Optional[str] = None
    if HEADER_KEY in headers and headers[HEADER_KEY] is not None:
        try:
            key = check_key(headers[HEADER_KEY])
        except CkeysError as exc:
            raise MalformedHeader(
                f"run of {task.name} arrived with an invalid '{HEADER_KEY}' header"
                f" (was it sent by a producer outside celery_ckeys?): {exc}",
                header=HEADER_KEY, value=headers[HEADER_KEY]) from None
    else:
        key = default_key(task, args, kwargs)

    queue: Optional[ConcurrencyQueue] = None
    from_trigger = False
    raw_queue = headers.get(HEADER_QUEUE)
    if raw_queue is not None:
        try:
            queue = coerce_queue(raw_queue)
        except CkeysError as exc:
            raise MalformedHeader(
                f"run of {task.name} arrived with an invalid '{HEADER_QUEUE}' header: {exc}",
                header=HEADER_QUEUE, value=raw_queue) from None
        from_trigger = True
    declared: Optional[ConcurrencyQueue] = getattr(task, "_ckeys_queue", None)
    if queue is None:
        queue = declared
    declared_limit = None
    if declared is not None and queue is not None and declared.name == queue.name:
        declared_limit = declared.limit
    return RunSpec(task_name=task.name, key=key, queue=queue,
                   queue_from_trigger=from_trigger, declared_limit=declared_limit)


def tags_of(headers: dict[str, Any]) -> list[str]:
    raw = headers.get(HEADER_TAGS)
    if raw is None:
        return []
    try:
        return check_tags(raw)
    except CkeysError as exc:
        raise MalformedHeader(f"run arrived with an invalid '{HEADER_TAGS}' header: {exc}",
                              header=HEADER_TAGS, value=raw) from None


def holder_record(task: Any, request: Any, tags: list[str]) -> dict[str, Any]:
    record: dict[str, Any] = {"t": task.name, "w": request.hostname or "", "p": os.getpid(),
                              "s": round(time.time(), 3)}
    if tags:
        record["g"] = tags
    return record


def store_of(app: Any) -> Store:
    """The app's store, ready to publish the runs a handoff wakes."""
    store = store_for(get_config(app))
    if store.on_wakes is None:
        store.on_wakes = partial(handoff.publish, app)
    return store


def plan_of(task: Any, request: Any, args: Any, kwargs: Any) -> tuple[CkeysConfig, Store, Optional[Plan]]:
    store = store_of(task.app)
    config = store.config
    spec = run_spec(task, headers_of(request), args, kwargs)
    return config, store, plan_for(config, store.names, spec)


def run(task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Execute ``task``'s body under its slots (see the module docstring)."""
    request = task.request
    _, store, plan = plan_of(task, request, args, kwargs)
    headers = headers_of(request)
    if plan is None:
        try:
            return task.run(*args, **kwargs)
        finally:
            _parent_may_resume(store, headers)
    holder = holder_record(task, request, tags_of(headers))
    acquire(task, request, store, plan, holder)
    try:
        return task.run(*args, **kwargs)
    finally:
        # the waiting parent first, so that the slot this run frees goes to it
        _parent_may_resume(store, headers)
        active = _active.get(request.id)
        if active is not None:
            release(task, active.holding, reason="finished")


def _parent_may_resume(store: Store, headers: dict[str, Any]) -> None:
    """A child its parent waits on has ended: put the parent first in line for its slots.

    This runs before Celery stores the child's result, so by the time the parent can see
    the result its place ahead of runs that have not started is already taken.
    """
    resume = headers.get(HEADER_RESUME)
    if not isinstance(resume, dict):
        return
    owner, tags = resume.get("owner"), resume.get("tags")
    if not isinstance(owner, str) or not isinstance(tags, list) or not tags:
        return
    names = store.names
    own = [t for t in tags if isinstance(t, str) and t.startswith(names.ns + "|")]
    try:
        store.wait_op("ready", own, owner)
    except CoordinationUnavailable as exc:
        release_log.warning("could not mark parent %s ready to resume: %s", owner, describe(exc))


def acquire(task: Any, request: Any, store: Store, plan: Plan, holder: dict[str, Any]) -> Holding:
    """Take the plan's slots, or defer the run (which raises ``Ignore``).

    Deferral is a countdown re-publish, or with ``ckeys_deferral="handoff"`` a place in the
    full slot's line in Redis (:mod:`celery_ckeys.handoff`).
    """
    headers = headers_of(request)
    mode = "woken" if headers.get(HEADER_WOKEN) else "fresh"
    try:
        result = store.acquire(plan.slots, request.id, holder, primary=plan.primary, mode=mode)
        if not result.ok and not result.duplicate and store.config.deferral == "handoff":
            parked_headers = deferred_headers(headers)
            first = float(parked_headers[HEADER_FIRST_DEFERRED])
            message = handoff.message_for(task, request, parked_headers, first)
            if message is not None:
                result = store.acquire(plan.slots, request.id, holder, primary=plan.primary,
                                       mode=mode, message=message,
                                       first_deferred_ms=int(first * 1000))
                if result.new_line and result.blocked is not None:
                    store.note_line(result.blocked.tag)
    except CoordinationUnavailable as exc:
        defer_log.error("run %s of %s deferred: %s", request.id, task.name, describe(exc))
        defer(task, request, store.config, blocked_by="(coordination Redis)", holder="",
              reason="unavailable")
    if result.duplicate:
        defer_log.info("run %s of %s dropped: another copy of it was already woken and claimed"
                       " its place", request.id, task.name)
        raise Ignore("duplicate wake of a parked run")
    if not result.ok:
        if result.parked:
            on_parked(task, request, result)
        on_blocked(task, request, store.config, result)
    return hold(task, request, store, plan, result, holder)


def hold(task: Any, request: Any, store: Store, plan: Plan, result: AcquireResult,
         holder: dict[str, Any]) -> Holding:
    holding = Holding(store=store, owner=request.id, task_name=task.name, slots=result.taken,
                      fence=result.fence)
    if holding.slots:
        heartbeat.add(holding)
    _active[request.id] = ActiveRun(holding, plan, holder)
    request.ckeys_fence = result.fence
    request.ckeys_slots = [slot.label for slot in result.taken]
    if acquire_log.isEnabledFor(logging.DEBUG):
        acquire_log.debug("run %s of %s acquired %s (fence %d)", request.id, task.name,
                          ", ".join(s.label for s in result.taken), result.fence)
    if signals.slots_acquired.receivers:
        first = headers_of(request).get(HEADER_FIRST_DEFERRED)
        waited = max(0.0, time.time() - float(first)) if isinstance(first, (int, float)) else 0.0
        signals.slots_acquired.send(sender=task, task_id=request.id, slots=request.ckeys_slots,
                                    fence=result.fence, waited=round(waited, 3))
    return holding


def _why(request: Any, result: AcquireResult) -> str:
    holder = result.holder
    if holder == request.id:
        return "held by an earlier delivery of this same run (its lease has not run out)"
    if holder:
        return f"held by {holder}"
    return "reserved for runs resuming from wait_for or woken from its line"


def on_blocked(task: Any, request: Any, config: CkeysConfig, result: AcquireResult) -> NoReturn:
    assert result.blocked is not None
    blocked_by = result.blocked.label
    defer_log.info("run %s of %s deferred: %s (limit %d) is %s",
                   request.id, task.name, blocked_by, result.limit, _why(request, result))
    defer(task, request, config, blocked_by=blocked_by, holder=result.holder, reason="busy")


def on_parked(task: Any, request: Any, result: AcquireResult) -> NoReturn:
    """The run now waits in Redis, in the full slot's line; this delivery ends."""
    assert result.blocked is not None
    blocked_by = result.blocked.label
    defer_log.info("run %s of %s parked: %s (limit %d) is %s",
                   request.id, task.name, blocked_by, result.limit, _why(request, result))
    if signals.run_deferred.receivers:
        signals.run_deferred.send(sender=task, task_id=request.id, blocked_by=blocked_by,
                                  holder=result.holder, countdown=None, reason="busy")
    raise Ignore(f"parked: {blocked_by} is busy")


def countdown_for(config: CkeysConfig) -> float:
    countdown = config.retry_countdown
    if config.retry_jitter:
        countdown += random.uniform(0, countdown * config.retry_jitter)
    return countdown


def deferred_headers(headers: dict[str, Any]) -> dict[str, Any]:
    """The headers a deferred copy of a run carries: one more deferral, the time of the
    first, and not marked woken (a copy is a fresh arrival; handoff marks what it parks)."""
    out = dict(headers)
    out[HEADER_DEFERRALS] = int(headers.get(HEADER_DEFERRALS) or 0) + 1
    first = headers.get(HEADER_FIRST_DEFERRED)
    out[HEADER_FIRST_DEFERRED] = first if isinstance(first, (int, float)) else round(time.time(), 3)
    out.pop(HEADER_WOKEN, None)
    return out


def defer(task: Any, request: Any, config: CkeysConfig, *, blocked_by: str, holder: str,
          reason: str) -> NoReturn:
    """Publish the same run again after the countdown, then end this delivery with Ignore.

    ``signature_from_request`` keeps the task id, arguments, headers, routing, links and
    chain; ``retries=request.retries`` keeps the retry count, so ``max_retries`` is never
    spent on waiting for a slot.
    """
    countdown = countdown_for(config)
    headers = deferred_headers(headers_of(request))
    signature = task.signature_from_request(request, countdown=countdown,
                                            retries=request.retries, headers=headers)
    try:
        signature.apply_async()
    except Exception as exc:
        # Never lose the run: leave the message to the broker when we can.
        defer_log.error("run %s of %s could not be deferred (%s); handing it back to the broker",
                        request.id, task.name, describe(exc))
        if getattr(task, "acks_late", False):
            raise Reject(describe(exc), requeue=True) from None
        raise
    if signals.run_deferred.receivers:
        signals.run_deferred.send(sender=task, task_id=request.id, blocked_by=blocked_by,
                                  holder=holder, countdown=countdown, reason=reason)
    raise Ignore(f"deferred: {blocked_by} is busy")


def release(task: Any, holding: Holding, *, reason: str) -> None:
    """Give back every slot of ``holding`` before the run's result is stored.

    A release that fails because Redis is unreachable is retried in the background until
    Redis answers, so the slot comes free then rather than when its lease runs out.
    (Releasing from a background thread on every run was tried and measured slower with
    bench/overhead.py on a 2-core box: the thread's wake-ups cost more than the round trip
    they hide.)
    """
    heartbeat.remove(holding)
    _active.pop(holding.owner, None)
    if not holding.slots:
        return
    on_done = None
    if signals.slots_released.receivers:
        labels = [s.label for s in holding.slots]

        def on_done() -> None:
            signals.slots_released.send(sender=task, task_id=holding.owner, slots=labels,
                                        reason=reason)
    try:
        holding.store.release(holding.slots, holding.owner)
    except CoordinationUnavailable as exc:
        release_log.error("run %s could not release its slots yet (%s); retrying in the"
                          " background", holding.owner, describe(exc))
        heartbeat.release(holding.store, holding.slots, holding.owner, on_done)
        return
    if on_done is not None:
        on_done()


def release_lost(task: Any, request: Any, exc: BaseException) -> None:
    """From the worker's main process: free what a dead pool process held, by task id.

    Only slots whose holder record names this worker and that pool pid are freed, so a
    redelivered copy of the run that took them elsewhere keeps them; releasing twice
    (Celery may report a lost process twice) frees nothing the second time.
    """
    pid = getattr(request, "worker_pid", None)
    if not pid:
        return
    try:
        headers = dict(request.request_dict)
        config, store, plan = plan_of(task, _HeadersOnly(headers, request), request.args,
                                      request.kwargs)
    except CkeysError:
        return
    if plan is None:
        return
    only = f"{request.hostname}\n{pid}"
    try:
        freed = store.release(plan.slots, request.id, only=only)
    except CoordinationUnavailable as err:
        release_log.error("could not free the slots of lost run %s (%s); they come free when"
                          " the lease (%gs) runs out", request.id, describe(err), config.lock_ttl)
        return
    if freed:
        release_log.warning("freed %d slot(s) of run %s of %s after its pool process ended (%s)",
                            freed, request.id, task.name, type(exc).__name__)
        if signals.slots_released.receivers:
            signals.slots_released.send(sender=task, task_id=request.id,
                                        slots=[s.label for s in plan.slots], reason="worker-lost")


class _HeadersOnly:
    """A request-like view of a message's headers, for use in the main process."""

    def __init__(self, headers: dict[str, Any], request: Any) -> None:
        self.headers = {k: v for k, v in headers.items()
                        if k in (HEADER_KEY, HEADER_QUEUE, HEADER_TAGS)}
        self.id = request.id
        self.hostname = request.hostname
