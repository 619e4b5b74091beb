"""Conflict policies: what a fresh run does when its own slot (its key, partition or queue)
is full. ``"wait"`` is the gate's ordinary path; the others decide here (Celery glue: the
result backend, remote control, signals, metrics). README, "Conflict policies".

* ``skip``: the run does not execute; its result is REVOKED at once, with a reason naming
  the slot and its holder.
* ``cancel_running``: the holder is revoked with ``terminate=True`` (it ends REVOKED; its
  process's exit frees its units, as for any lost process); the newcomer then waits as
  usual and runs next.
* ``keep_latest``: the newcomer waits and replaces the runs of its task that waited on the
  same slot (acquire.lua takes them out of the line, or their deferral records, atomically);
  each ends REVOKED.
"""

from __future__ import annotations

import logging
from typing import Any, NoReturn, Sequence

from celery.exceptions import Ignore

from . import metrics, signals
from .store import AcquireResult

logger = logging.getLogger("celery_ckeys.policy")


def _revoked(task: Any, task_id: str, reason: str) -> None:
    """Store REVOKED (with ``reason``) as the run's result, so ``.get()`` ends at once."""
    try:
        task.backend.mark_as_revoked(task_id, reason=reason)
    except Exception as exc:  # a result backend that cannot store it: log, the decision stands
        logger.warning("could not store REVOKED for %s: %r", task_id, exc)


def skip(task: Any, request: Any, result: AcquireResult) -> NoReturn:
    assert result.blocked is not None
    reason = f"skipped: {result.blocked.label} is held by {result.holder or 'a run resuming'}"
    logger.info("run %s of %s %s", request.id, task.name, reason)
    _revoked(task, request.id, reason)
    metrics.decided(task, "skipped")
    if signals.run_skipped.receivers:
        signals.run_skipped.send(sender=task, task_id=request.id, blocked_by=result.blocked.label,
                                 holder=result.holder)
    raise Ignore(reason)


def cancel_holder(task: Any, request: Any, result: AcquireResult) -> None:
    """Revoke (terminate) the run holding the full slot; the newcomer then waits for it."""
    assert result.blocked is not None
    holder = result.holder
    if not holder or holder == request.id:
        return  # a reservation (a run resuming or woken) or a copy of itself: nothing to cancel
    logger.info("run %s of %s cancels %s, which holds %s", request.id, task.name, holder,
                result.blocked.label)
    task.app.control.revoke(holder, terminate=True)
    metrics.decided(task, "cancelled")
    if signals.run_cancelled.receivers:
        signals.run_cancelled.send(sender=task, task_id=holder, by=request.id,
                                   blocked_by=result.blocked.label)


def replaced(task: Any, request: Any, result: AcquireResult, ids: Sequence[str]) -> None:
    """The runs the newcomer replaced end REVOKED (their copies in the broker, deferred with
    a countdown, are revoked too, so a worker discards them)."""
    assert result.blocked is not None
    reason = f"replaced by {request.id} (keep_latest on {result.blocked.label})"
    task.app.control.revoke(list(ids))
    for task_id in ids:
        logger.info("run %s of %s %s", task_id, task.name, reason)
        _revoked(task, task_id, reason)
        metrics.decided(task, "replaced")
        if signals.run_replaced.receivers:
            signals.run_replaced.send(sender=task, task_id=task_id, by=request.id,
                                      blocked_by=result.blocked.label)
