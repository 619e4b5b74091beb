"""Handoff deferral (``ckeys_deferral = "handoff"``): blocked runs wait in Redis, in line.

A run that cannot get a slot is *parked*: its message goes into the full slot's line in
Redis (first in, first out by when it was first deferred), atomically with the check that
found the slot full, so no release can slip in between and be missed. It is not held by
any worker. The run that frees a slot pops the oldest parked run into the *woken* set
(its place stays reserved: fresh runs cannot take it) and re-publishes its message at
once; one release wakes one run, so there is no thundering herd. The woken copy claims its
reservation when it arrives; any other copy of it is turned away.

The countdown stays as a safety net: every worker's main process sweeps the lines each
second (``sweep.lua``), re-publishing woken runs that never arrived and waking runs parked
for a whole countdown, so a releaser that dies between popping and publishing, or a holder
whose lease runs out, never strands anyone. Parked runs have no expiry in Redis.

Messages are the run's Celery signature (task id, arguments, headers, routing, links) as
JSON. Arguments that JSON cannot carry fall back to countdown deferral for that run.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

from kombu.utils.json import dumps, loads

from .publish import HEADER_WOKEN

logger = logging.getLogger("celery_ckeys.handoff")


def message_for(task: Any, request: Any, headers: dict[str, Any], first_deferred: float) -> Optional[str]:
    """The run's message to park, or ``None`` when its arguments do not fit in JSON."""
    woken_headers = dict(headers)
    woken_headers[HEADER_WOKEN] = 1
    signature = task.signature_from_request(request, retries=request.retries, headers=woken_headers)
    now_ms = int(time.time() * 1000)
    envelope = {"id": request.id, "task": task.name, "at": now_ms,
                "first": int(first_deferred * 1000), "sig": dict(signature)}
    try:
        return str(dumps(envelope))
    except (TypeError, ValueError) as exc:
        logger.warning("run %s of %s cannot be parked (%s); deferring it with a countdown",
                       request.id, task.name, exc)
        return None


def publish(app: Any, messages: list[str]) -> None:
    """Re-publish woken runs, each with its own task id, arguments, headers and routing."""
    for raw in messages:
        envelope = loads(raw)
        sig = envelope["sig"]
        options = dict(sig.get("options") or {})
        options.pop("redelivered", None)
        app.send_task(sig["task"], sig.get("args") or (), sig.get("kwargs") or {}, **options)
