"""``throttle(seconds)``: from inside a run, hold back its partition (or its queue) for a while.

The reply to an HTTP 429 with a Retry-After: the current run's partition (its queue's own
slot when the run has no key) starts no new run, on any worker, for ``seconds``. Runs that
already execute go on; runs waiting keep their places and start once it ends (their line
is swept then). Other keys are not affected.
"""

from __future__ import annotations

from typing import Any, Optional

from celery import current_task

from . import gate
from .errors import CkeysError


def throttle(seconds: float, *, task: Optional[Any] = None) -> float:
    """Throttle the current run's partition (or queue) for ``seconds``; returns until when
    (server time, epoch seconds). Raises ``CkeysError`` outside a keyed run on a
    concurrency queue, and ``ValueError`` for a bad ``seconds``."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
        raise ValueError(f"throttle() needs a positive number of seconds, got {seconds!r}")
    current = task if task is not None else current_task
    request = getattr(current, "request", None) if current is not None else None
    active = gate.active_run(request) if request is not None else None
    if active is None or not active.plan.slots:
        raise CkeysError("throttle() is for the body of a KeyedTask run that holds its slots")
    slot = active.plan.slots[0]
    if slot.kind not in ("partition", "queue") or slot.conf_tag is None or slot.limit.queue is None:
        raise CkeysError(f"throttle() needs a run on a concurrency queue; {slot.label} is not one",
                         task_id=getattr(request, "id", None))
    key = slot.limit.key if slot.kind == "partition" else None
    until_ms = active.holding.store.throttle(slot.limit.queue, key, float(seconds))
    return until_ms / 1000
