"""The worker-side gate: take the run's units right before its body, give them back after.

Flow of one run (``KeyedTask.__call__`` calls ``run``; docs/protocol.md):

1. Read what the run asked for from its headers (``run_spec``). A header that no
   celery_ckeys producer would send fails the run with ``MalformedHeader``.
2. ``admit`` decides in one ``acquire.lua`` call: admitted, blocked or a copy to drop.
   A blocked run is *deferred*: parked in a line in Redis (handoff) or published again
   after the countdown, with its task id, arguments, headers and routing and
   ``request.retries`` untouched; this delivery ends with ``Ignore``.
3. The body runs while the heartbeat renews the lease, by the run's hold token.
4. ``finally`` releases, in the process that acquired only: success, exception,
   ``self.retry()``, ``Reject``, ``Ignore`` and soft time limits pass through it. When the
   pool process dies instead (SIGKILL, hard time limit, revoke with terminate), the
   worker's main process releases once the process is gone (``release_lost``).
   After a body that returned or raised, the release's reply is read in ``task_postrun``,
   once Celery has stored the result (``release(later=True)``, protocol.md section 6.2).
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Callable, NoReturn, Optional

from celery import states
from celery.app.task import Context
from celery.exceptions import Ignore, Reject, Retry
from celery.signals import task_postrun

from . import conflict, handoff, metrics, signals
from .admission import Plan, RunSpec, plan_for, slot_for_tag
from .config import CkeysConfig, get_config
from .errors import CkeysError, CoordinationUnavailable, MalformedHeader, describe
from .heartbeat import Holding, heartbeat
from .publish import (
    ALL_HEADERS,
    HEADER_DEFERRALS,
    HEADER_FIRST_DEFERRED,
    HEADER_KEY,
    HEADER_POLICY,
    HEADER_PRIORITY,
    HEADER_QUEUE,
    HEADER_RESUME,
    HEADER_TAGS,
    HEADER_TICKET,
    PER_STAY,
    copy_expiry,
    default_key,
    deferred_headers,
    strip_stay,
)
from .queues import ConcurrencyQueue, coerce_queue
from .slots import Slot
from .store import AcquireResult, Store, store_for, token_prefix
from .validation import check_key, check_policy, check_priority, check_tags

acquire_log = logging.getLogger("celery_ckeys.acquire")
defer_log = logging.getLogger("celery_ckeys.defer")
release_log = logging.getLogger("celery_ckeys.release")


@dataclass
class ActiveRun:
    """A run executing in this process: what it holds and how to take it again (wait_for)."""

    holding: Holding
    plan: Plan
    token: str


#: Where a delivery keeps its ActiveRun: on its own request (Context), not under its task id.
#: With the threads, gevent or eventlet pool two copies of one run can be in one process at
#: once (a redelivery, a re-woken copy), and the one that is deferred must never find, and
#: release, what the executing one holds; any thread the body starts still finds it.
_ACTIVE = "_ckeys_active"

#: Observers of the windows in which a run holds its slots, called in the run's own thread
#: as ``observer(event, task, token)``: ``"hold"`` right after it took them (its body runs
#: next, or resumes after ``wait_for``), ``"pause"`` right before it steps out to wait and
#: ``"end"`` right before it gives them back. While coordination holds, two windows of one
#: slot never overlap. When a pool process died under a run, the worker's main process
#: calls ``observer("lost", task, prefix)`` once that process is gone, before its units are
#: freed: ``prefix`` starts every token that process made for the run (``store.token_prefix``).
#: The test recorder (``celery_ckeys.contrib.pytest``) uses it.
HoldObserver = Callable[[str, Any, str], None]
hold_observers: list[HoldObserver] = []


def observe(event: str, task: Any, token: str) -> None:
    for observer in list(hold_observers):
        try:
            observer(event, task, token)
        except Exception:  # an observer never changes how a run ends
            release_log.exception("hold observer %r failed", observer)


def active_run(request: Any) -> Optional[ActiveRun]:
    """What the delivery behind ``request`` holds, while its body runs."""
    found = request.__dict__.get(_ACTIVE)
    return found if isinstance(found, ActiveRun) else None


def headers_of(request: Any) -> dict[str, Any]:
    """The custom headers of a run, whichever Celery version built the request."""
    headers = getattr(request, "headers", None)
    if isinstance(headers, dict):
        return headers
    found: dict[str, Any] = {}
    for name in ALL_HEADERS:
        value = getattr(request, name, None)
        if value is not None:
            found[name] = value
    return found


def run_spec(task: Any, headers: dict[str, Any], args: Any, kwargs: Any) -> RunSpec:
    """What the run asks for; raises ``MalformedHeader`` for headers no producer of ours sends."""
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
    declared_limit = declared_total = computed = declared_rate = None
    if declared is not None and queue is not None and declared.name == queue.name:
        declared_limit, declared_total = declared.fixed_limit, declared.total_limit
        declared_rate = declared.rate_spec
        if key is not None:
            computed = declared.limit_for(key)
    return RunSpec(task_name=task.name, key=key, queue=queue, queue_from_trigger=from_trigger,
                   declared_limit=declared_limit, declared_total=declared_total,
                   computed_limit=computed, declared_rate=declared_rate)


def _replaced_already(task: Any, request: Any) -> bool:
    """A copy deferred with a countdown whose run a later keep_latest run replaced: its result
    is REVOKED already (a worker that missed the revoke broadcast would run it otherwise)."""
    try:
        return bool(task.AsyncResult(request.id).state == states.REVOKED)
    except Exception:  # no result backend, or it is down: the revoke broadcast is all there is
        return False


def policy_of(headers: dict[str, Any]) -> str:
    """The run's conflict policy ("wait" when none was given)."""
    raw = headers.get(HEADER_POLICY)
    if raw is None:
        return "wait"
    try:
        return check_policy(raw)
    except CkeysError as exc:
        raise MalformedHeader(f"run arrived with an invalid '{HEADER_POLICY}' header: {exc}",
                              header=HEADER_POLICY, value=raw) from None


def priority_of(headers: dict[str, Any]) -> int:
    """The run's priority in a line (0 when none was given)."""
    raw = headers.get(HEADER_PRIORITY)
    if raw is None:
        return 0
    try:
        return check_priority(raw)
    except CkeysError as exc:
        raise MalformedHeader(f"run arrived with an invalid '{HEADER_PRIORITY}' header: {exc}",
                              header=HEADER_PRIORITY, value=raw) from None


def tags_of(headers: dict[str, Any]) -> list[str]:
    raw = headers.get(HEADER_TAGS)
    if raw is None:
        return []
    try:
        return check_tags(raw)
    except CkeysError as exc:
        raise MalformedHeader(f"run arrived with an invalid '{HEADER_TAGS}' header: {exc}",
                              header=HEADER_TAGS, value=raw) from None


def ticket_of(headers: dict[str, Any]) -> tuple[str, Optional[str]]:
    """``(ticket, home tag)`` of a copy woken from a line; ``("", None)`` for any other."""
    raw = headers.get(HEADER_TICKET)
    if isinstance(raw, (list, tuple)) and len(raw) >= 2 and isinstance(raw[0], str):
        return raw[0], raw[1] if isinstance(raw[1], str) else None
    return "", None


def expires_by_us(headers: dict[str, Any]) -> bool:
    """This copy's ``expires`` is the handoff's own copy life, not the run's: when it passes,
    the run itself is still in Redis and is woken again."""
    return copy_expiry(headers)[0]


def deferred_before(request: Any, headers: dict[str, Any]) -> bool:
    """Whether this run may have a countdown deferral record to clear as it is admitted: a
    copy published by a deferral says so in a header; a message the broker delivers again
    may be one whose run was deferred (its record written) before the deferral's own
    publish failed or its worker was lost."""
    if headers.get(HEADER_DEFERRALS):
        return True
    return bool((getattr(request, "delivery_info", None) or {}).get("redelivered"))


#: JSON as ``json.dumps(..., separators=(",", ":"))`` writes it, without its per-call setup
_compact = json.JSONEncoder(separators=(",", ":")).encode


def nonce(size: int) -> str:
    """``size`` random bytes in hex: what makes a token or ticket unique (``uuid4`` costs
    several times as much, on every run)."""
    return os.urandom(size).hex()


def hold_token(task: Any, request: Any, ticket: str, tags: list[str]) -> str:
    """A token unique to this acquisition; ``status`` and release-by-pid read it too."""
    return _compact([request.id, request.hostname or "", os.getpid(), nonce(6),
                     ticket, task.name, round(time.time(), 3), tags])


def wait_token(request: Any, ticket: str) -> str:
    """A token unique to one wait in ``wait_for``; release-by-pid reads it as it reads a
    hold token (its first three fields)."""
    return _compact([request.id, request.hostname or "", os.getpid(), nonce(6), ticket])


def store_of(app: Any) -> Store:
    """The app's store, ready to publish the runs a handoff wakes."""
    store = store_for(get_config(app))
    if store.on_wakes is None:
        store.on_wakes = partial(handoff.publish, app)
    return store


def plan_of(task: Any, headers: dict[str, Any], args: Any, kwargs: Any) -> Optional[Plan]:
    return plan_for(get_config(task.app), run_spec(task, headers, args, kwargs))


def with_home(store: Store, plan: Plan, home: Optional[str]) -> tuple[Slot, ...]:
    """The plan's slots, and the slot of the line a copy was woken from if it is not one
    of them (the plan changed since: a limit or the environment changed)."""
    if home is None or home in plan.tags:
        return plan.slots
    slot = slot_for_tag(store.config, store.names, home)
    return plan.slots if slot is None else (*plan.slots, replace(slot, home_only=True))


def run(task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Execute ``task``'s body under its units (see the module docstring)."""
    if _releasing:
        finish_release()  # never two in flight in one thread, whatever ran in between
    request = task.request
    headers = headers_of(request)
    store = store_of(task.app)
    final = False  # the body ended in a state Celery stores as final (not Retry/Ignore/Reject)
    requeued = False  # Reject(requeue=True): the same message comes back and must run
    abrupt = False  # SystemExit, KeyboardInterrupt: Celery stores nothing; a redelivery must run
    try:
        plan = plan_of(task, headers, args, kwargs)
        if plan is not None:
            admit(task, request, store, plan, headers)
        else:
            leave_home(task, request, store, headers)
        result = task.run(*args, **kwargs)
        final = True
        return result
    except Reject as exc:
        requeued = bool(getattr(exc, "requeue", False))
        raise
    except (Retry, Ignore):
        raise
    except Exception:
        final = True
        raise
    except BaseException:
        abrupt = True
        raise
    finally:
        if final:
            # before this run's units go, so that what it frees goes to the waiting parent
            _parent_may_resume(store, headers)
        active = request.__dict__.pop(_ACTIVE, None)  # after wait_for: a new token
        if active is not None:
            # no memo for a requeued stay (its message, ticket and all, is delivered again),
            # nor for one that ends its process: a release queued for the background would
            # write it after the main process cleared it for the redelivery
            release(task, active.holding, reason="finished", memo=not (requeued or abrupt),
                    later=final)


def leave_home(task: Any, request: Any, store: Store, headers: dict[str, Any]) -> None:
    """A copy woken from a line whose run needs no slot any more (the limits that made it
    wait are gone) gives back the unit woken for it before it runs: left there, it would be
    woken again, and run again, every claim window."""
    ticket, home = ticket_of(headers)
    slot = slot_for_tag(store.config, store.names, home) if ticket and home else None
    if slot is None:
        return
    try:
        store.unclaim([replace(slot, home_only=True)], request.id, ticket)
    except CoordinationUnavailable as exc:
        defer_log.error("run %s of %s deferred: %s", request.id, task.name, describe(exc))
        defer(task, request, store.config, blocked_by="(coordination Redis)", holder="",
              reason="unavailable")


def _parent_may_resume(store: Store, headers: dict[str, Any]) -> None:
    """A child its parent waits on reached a final state: the parent goes first for its
    units from now on. Runs before Celery stores the child's result, so by the time the
    parent sees it, its place ahead of runs that have not started is already taken."""
    resume = headers.get(HEADER_RESUME)
    if not isinstance(resume, dict):
        return
    owner, token, slots = resume.get("owner"), resume.get("token"), resume.get("slots")
    if not isinstance(owner, str) or not isinstance(token, str) or not isinstance(slots, list):
        return
    try:
        mine = [Slot.from_header(s) for s in slots if isinstance(s, dict)]
        store.ready([s for s in mine if s.tag.startswith(store.names.ns + "|")], owner, token)
    except CoordinationUnavailable as exc:
        release_log.warning("could not tell parent %s to resume: %s", owner, describe(exc))
    except (KeyError, TypeError, ValueError):
        release_log.warning("ignored a malformed '%s' header for parent %s", HEADER_RESUME, owner)


def admit(task: Any, request: Any, store: Store, plan: Plan, headers: dict[str, Any]) -> Holding:
    """Take the plan's units, or defer the run, or drop a copy (both raise ``Ignore``)."""
    config = store.config
    ticket, home = ticket_of(headers)
    token = hold_token(task, request, ticket, tags_of(headers))
    slots = with_home(store, plan, home)
    first = headers.get(HEADER_FIRST_DEFERRED)
    order_ms = int(float(first) * 1000) if isinstance(first, (int, float)) else 0
    new_ticket = ticket or nonce(8)

    policy = policy_of(headers) if not ticket else "wait"  # a woken copy's run already waited
    place = plan.place(order_ms, priority_of(headers), replace=policy == "keep_latest")

    def attempt(message: str, primary: int = plan.primary) -> AcquireResult:
        return store.acquire(slots, request.id, token, ticket=ticket, new_ticket=new_ticket,
                             message=message, place=place, primary=primary, home=home,
                             deferred=deferred_before(request, headers))
    if policy == "keep_latest" and headers.get(HEADER_DEFERRALS) and _replaced_already(task, request):
        raise Ignore("replaced by a later run (keep_latest)")
    try:
        if policy in ("skip", "cancel_running"):
            # a look first: a fresh run that is blocked changes nothing when it neither parks
            # nor records a deferral (a negative primary: admitted, it still clears its record)
            result = attempt("", primary=-plan.primary)
            if result.ok:
                return hold(task, request, store, plan, token, ticket, result)
            if (result.status == "blocked" and result.blocked == plan.slots[0]
                    and result.limit > 0 and not result.rate_wait_ms  # full, not paused
                    and result.holder != request.id):  # nor held by a copy of itself
                if policy == "skip":
                    conflict.skip(task, request, result)
                conflict.cancel_holder(task, request, result)
        # a copy woken from a line goes back to a line whatever this worker's deferral (its
        # run is then always in Redis, and its copies may expire: protocol.md section 5)
        result = attempt("?" if config.deferral == "handoff" or ticket else "")
        if result.status == "needs_message":
            # built only now: most runs never wait, and never pay for their message
            message = handoff.message_for(task, request, deferred_headers(headers, time.time()))
            result = attempt(message or "")
    except CoordinationUnavailable as exc:
        defer_log.error("run %s of %s deferred: %s", request.id, task.name, describe(exc))
        defer(task, request, config, blocked_by="(coordination Redis)", holder="",
              reason="unavailable")
    if result.status == "dropped":
        defer_log.info("run %s of %s: this copy stands aside (%s)", request.id, task.name,
                       "a copy with its ticket ran or runs" if result.why == "dup"
                       else "the run waits in a line in Redis")
        raise Ignore(f"copy of a run that {result.why}")
    if result.status == "blocked":
        if result.replaced:
            conflict.replaced(task, request, result, result.replaced)
        if result.parked:
            on_parked(task, request, result)
        on_blocked(task, request, config, result)
    return hold(task, request, store, plan, token, ticket, result)


def hold(task: Any, request: Any, store: Store, plan: Plan, token: str, ticket: str,
         result: AcquireResult) -> Holding:
    first = headers_of(request).get(HEADER_FIRST_DEFERRED)
    waited = max(0.0, time.time() - float(first)) if isinstance(first, (int, float)) else 0.0
    strip_stay(request)
    holding = Holding(store=store, owner=request.id, token=token, task_name=task.name,
                      slots=result.taken, ticket=ticket)
    heartbeat.add(holding)
    request.__dict__[_ACTIVE] = ActiveRun(holding, plan, token)
    if result.taken and type(request) is Context:
        request.__class__ = FencedContext  # ckeys_fence is read from Redis only if asked for
    request.ckeys_slots = [slot.label for slot in result.taken]
    if hold_observers:
        observe("hold", task, token)
    if acquire_log.isEnabledFor(logging.DEBUG):
        acquire_log.debug("run %s of %s acquired %s", request.id, task.name,
                          ", ".join(s.label for s in result.taken))
    metrics.acquired(task, len(result.taken), waited)
    if signals.slots_acquired.receivers:
        signals.slots_acquired.send(sender=task, task_id=request.id, slots=request.ckeys_slots,
                                    fence=_fence_or_none(request, result),
                                    waited=round(waited, 3))
    return holding


def _fence_or_none(request: Any, result: AcquireResult) -> Optional[int]:
    """The fence for the ``slots_acquired`` signal, or None when it cannot be read now.

    The run is admitted: its units are taken. A Redis blip at this instant must not turn
    into the run's own exception (it would end FAILURE without its body ever running); the
    body reading ``ckeys_fence`` itself still gets the error, since it is the one that
    depends on the value.
    """
    if not result.taken:
        return None
    try:
        return int(request.ckeys_fence)
    except CkeysError as exc:
        acquire_log.warning("run %s: no fence for slots_acquired (%s)", request.id, describe(exc))
        return None


class FencedContext(Context):  # type: ignore[misc]
    """The request of a run that holds its units: ``ckeys_fence`` is its fencing token.

    It is fetched from Redis on first read (``fence.lua``), so runs that never read it
    pay nothing for it, and it is refused (``CkeysError``) once the run lost its lease.
    """

    @property
    def ckeys_fence(self) -> int:
        cached = self.__dict__.get("_ckeys_fence")
        if cached is not None:
            return int(cached)
        active = active_run(self)
        if active is None or not active.holding.slots:
            raise CkeysError("this run holds no slot, so it has no fencing token", task_id=self.id)
        fence = active.holding.store.fence(active.holding.slots[0], self.id, active.token)
        if fence < 0:
            raise CkeysError("this run lost its lease: its fencing token is void", task_id=self.id)
        self.__dict__["_ckeys_fence"] = fence
        return int(fence)


def _why(request: Any, result: AcquireResult) -> str:
    if result.rate_wait_ms:
        what = "at its rate" if result.limit else "throttled"
        return f"{what}: the next run may start in {result.rate_wait_ms} ms"
    if result.limit == 0:
        return "paused (celery ckeys resume starts it again)"
    holder = result.holder
    if holder == request.id:
        return "held by another delivery of this same run (its lease has not run out)"
    if holder:
        return f"held by {holder}"
    return "reserved for runs resuming from wait_for or woken from its line"


def on_blocked(task: Any, request: Any, config: CkeysConfig, result: AcquireResult) -> NoReturn:
    assert result.blocked is not None
    blocked_by = result.blocked.label
    defer_log.info("run %s of %s deferred: %s (limit %d) is %s",
                   request.id, task.name, blocked_by, result.limit, _why(request, result))
    if result.rate_wait_ms:  # its rate, or a throttle (limit 0), says when it may start
        defer(task, request, config, blocked_by=blocked_by, holder=result.holder,
              reason="rate" if result.limit else "throttled", after=result.rate_wait_ms / 1000)
    defer(task, request, config, blocked_by=blocked_by, holder=result.holder,
          reason="paused" if result.limit == 0 else "busy")


def on_parked(task: Any, request: Any, result: AcquireResult) -> NoReturn:
    """The run now waits in Redis, in the full slot's line; this delivery ends."""
    assert result.blocked is not None
    blocked_by = result.blocked.label
    defer_log.info("run %s of %s parked: %s (limit %d) is %s",
                   request.id, task.name, blocked_by, result.limit, _why(request, result))
    metrics.deferred(task, "busy")
    if signals.run_deferred.receivers:
        signals.run_deferred.send(sender=task, task_id=request.id, blocked_by=blocked_by,
                                  holder=result.holder, countdown=None, reason="busy")
    raise Ignore(f"parked: {blocked_by} is busy")


def countdown_for(config: CkeysConfig) -> float:
    countdown = config.retry_countdown
    if config.retry_jitter:
        countdown += random.uniform(0, countdown * config.retry_jitter)
    return countdown


def defer(task: Any, request: Any, config: CkeysConfig, *, blocked_by: str, holder: str,
          reason: str, after: Optional[float] = None) -> NoReturn:
    """Publish the same run again after the countdown, then end this delivery with Ignore.

    ``signature_from_request`` keeps the task id, arguments, headers (its ticket too: the
    copy is the same stay in line), routing, links and chain; ``retries=request.retries``
    keeps the retry count, so ``max_retries`` is never spent on waiting for a slot.
    """
    # a rate says exactly when the next run may start: no sooner, and no later
    countdown = after if after is not None else countdown_for(config)
    headers = deferred_headers(headers_of(request), time.time())
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
    metrics.deferred(task, reason)
    if signals.run_deferred.receivers:
        signals.run_deferred.send(sender=task, task_id=request.id, blocked_by=blocked_by,
                                  holder=holder, countdown=countdown, reason=reason)
    raise Ignore(f"deferred: {blocked_by} is busy")


def release(task: Any, holding: Holding, *, reason: str, memo: bool = True,
            later: bool = False) -> None:
    """Give back every unit of ``holding``, in the process that took them only.

    A release that fails because Redis is unreachable is retried in the background until
    Redis answers, so the units come free then rather than when their lease runs out.

    ``later``: the run ended in a state Celery stores next; its release is sent now and its
    reply read once Celery has stored the result (``task_postrun``, ``finish_release``), so
    that the two round trips overlap (``Store.release_later``).
    """
    if holding.pid != os.getpid():
        return  # a process forked by the task body: the units are its parent's
    if hold_observers:
        observe("end", task, holding.token)
    heartbeat.remove(holding)
    if not holding.slots:
        return

    def on_done() -> None:
        metrics.released(len(holding.slots), reason)
        if signals.slots_released.receivers:
            signals.slots_released.send(sender=task, task_id=holding.owner,
                                        slots=[s.label for s in holding.slots], reason=reason)
    ticket = holding.ticket if memo else ""

    def unreleased(exc: CoordinationUnavailable) -> None:
        release_log.error("run %s could not release its slots yet (%s); retrying in the"
                          " background", holding.owner, describe(exc))
        heartbeat.release(holding if memo else replace(holding, ticket=""), on_done)

    def finish(reply: Callable[[], int]) -> None:
        try:
            reply()
        except CoordinationUnavailable as exc:
            unreleased(exc)
            return
        except Exception:
            # interrupted while it read the reply (a soft time limit in task_postrun): the
            # release may not have run; the background one matches the token, so a release
            # that did run frees nothing twice
            heartbeat.release(holding if memo else replace(holding, ticket=""), on_done)
            raise
        on_done()
    args = (holding.slots, holding.owner, holding.token, ticket)
    if not later:
        finish(partial(holding.store.release, *args))
        return
    if threading.get_ident() in _releasing:
        finish_release()  # one pending reply per thread: the one before is read first
    try:
        _releasing[threading.get_ident()] = partial(finish, holding.store.release_later(*args))
    except CoordinationUnavailable as exc:
        unreleased(exc)  # release_later tried the synchronous way already


#: The release each thread sent and has not read the reply of yet (``release(later=True)``).
_releasing: dict[int, Callable[[], None]] = {}
# a forked child's connections are its own: a reply its parent awaits is not its to read
os.register_at_fork(after_in_child=_releasing.clear)


@task_postrun.connect(weak=False, dispatch_uid="celery_ckeys.finish_release")
def finish_release(**_: Any) -> None:
    """Read the reply of the release this thread's run sent before Celery stored its result
    (Celery sends ``task_postrun`` in a ``finally``, in the run's thread, on every path)."""
    pending = _releasing.pop(threading.get_ident(), None)
    if pending is not None:
        pending()


# -- the worker's main process: runs whose pool process is gone, and copies Celery drops ------

def _plan_of_message(task: Any, headers: dict[str, Any], args: Any,
                     kwargs: Any) -> tuple[Optional[Store], tuple[Slot, ...]]:
    """The slots a message's run needs, and the line it was woken from, from the main process."""
    store = store_of(task.app)
    try:
        plan = plan_of(task, {k: v for k, v in headers.items() if k in ALL_HEADERS}, args, kwargs)
    except CkeysError:
        plan = None
    slots = with_home(store, plan or Plan(slots=()), ticket_of(headers)[1])
    return (store, slots) if slots else (None, ())


def release_lost(task: Any, task_id: str, hostname: str, pid: int, headers: dict[str, Any],
                 args: Any, kwargs: Any, exc_name: str) -> None:
    """Free what a pool process that is gone held or waited on, by the prefix of its tokens
    (task id, host, pid): a copy of the run elsewhere keeps what it holds."""
    prefix = token_prefix(task_id, hostname, pid)
    if hold_observers:
        observe("lost", task, prefix)  # the process is gone: so is every window it had open
    store, slots = _plan_of_message(task, headers, args, kwargs)
    if store is None:
        return
    try:
        freed = store.release_lost(slots, task_id, prefix)
    except CoordinationUnavailable as err:
        release_log.error("could not free the slots of lost run %s (%s); they come free when"
                          " the lease (%gs) runs out", task_id, describe(err), store.config.lock_ttl)
        return
    if freed:
        release_log.warning("freed %d slot(s) of run %s of %s after its pool process ended (%s)",
                            freed, task_id, task.name, exc_name)
        metrics.released(freed, "worker-lost")
        if signals.slots_released.receivers:
            signals.slots_released.send(sender=task, task_id=task_id,
                                        slots=[s.label for s in slots], reason="worker-lost")


def forfeit(task: Any, task_id: str, headers: dict[str, Any], args: Any, kwargs: Any,
            why: str) -> None:
    """Celery discarded a copy without running it (revoked, expired, unknown task): what it
    had reserved, and its place in a line, go at once; other copies of it stand aside."""
    store, slots = _plan_of_message(task, headers, args, kwargs)
    if store is None:
        return
    ticket = ticket_of(headers)[0]
    try:
        store.forfeit(slots, task_id, ticket)
    except CoordinationUnavailable as err:
        release_log.error("could not give back what %s run %s reserved (%s); it comes free"
                          " when its claim window passes", why, task_id, describe(err))


def comes_back(task: Any, task_id: str, headers: dict[str, Any], args: Any,
               kwargs: Any) -> None:
    """The pool process of a woken copy died and Celery puts its message back. If the body
    had ended, the gate's release left the memo of its ticket, and the result was never
    stored: the memo would drop the redelivery as a duplicate, the run's result PENDING for
    ever. The memo goes before the message is back (units stay until the process is gone)."""
    ticket = ticket_of(headers)[0]
    if not ticket:
        return
    store, slots = _plan_of_message(task, headers, args, kwargs)
    if store is None:
        return
    try:
        store.forget_memo(slots, task_id, ticket)
    except CoordinationUnavailable as err:
        release_log.error("could not clear the memo of lost run %s (%s); its redelivery is"
                          " dropped as a duplicate", task_id, describe(err))


def copy_expired(task: Any, request: Any, headers: dict[str, Any]) -> None:
    """Celery discarded a copy whose ``expires`` was the handoff's copy life. Its run is
    normally still in Redis (woken, kept or in line: it is woken again; held: it runs; or
    finished: its memo). When Redis knows nothing of its stay any more, the copy had claimed
    and then died with its host, its lease ran out, and this is the broker's redelivery:
    nothing else would ever run it, so it is published again as a fresh run (at-least-once,
    never dropped unless proven to have run)."""
    store, slots = _plan_of_message(task, headers, request.args, request.kwargs)
    if store is None:
        return
    try:
        if store.stay_known(slots, request.id, ticket_of(headers)[0]):
            return
    except CoordinationUnavailable as err:
        release_log.warning("could not check the stay of expired copy %s (%s); publishing"
                            " it again", request.id, describe(err))
    # the same run as Celery would publish it from its request (group, chord, root, retries,
    # time limits, routing...), as a fresh run: no per-stay headers, its own expires
    fresh = {k: v for k, v in headers.items() if k not in PER_STAY}
    context = request  # Celery's task_revoked passes the run's Context
    if not isinstance(request, Context):
        raw = getattr(request, "request_dict", None)
        context = Context(dict(raw) if isinstance(raw, dict) else {"id": request.id},
                          args=tuple(request.args or ()), kwargs=dict(request.kwargs or {}),
                          delivery_info=getattr(request, "delivery_info", None) or {})
    defer_log.warning("run %s of %s: its copy expired and Redis no longer knows its stay (its"
                      " host died after it claimed); publishing it again", request.id, task.name)
    task.signature_from_request(context, retries=context.retries or 0, headers=fresh,
                                expires=copy_expiry(headers)[1]).apply_async()
