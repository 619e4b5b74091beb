"""Handoff deferral (``ckeys_deferral = "handoff"``): blocked runs wait in Redis, in line.

A run that cannot get its units is *parked*: its message goes into the full slot's line
in Redis (ordered by when it was first deferred), atomically with the check that found the
slot full, so no release can slip in between and be missed. No worker holds it. The run
that frees a unit hands it to the first in line as a *reservation* (fresh runs cannot take
it) and publishes its message at once, carrying the run's ticket; one release wakes one
run, so there is no thundering herd. The copy with that ticket claims the reservation;
any other copy of the run stands aside (docs/protocol.md section 5).

The countdown stays as a safety net: every worker's main process sweeps the lines that
are due (``sweep.lua``), waking again a woken run that did not arrive within the claim
window and handing out room that nobody was given, so a releaser that dies between
waking and publishing, or a holder whose lease runs out, never strands anyone.

Messages are the run's Celery signature (task id, arguments, headers, routing, links) as
JSON. A run whose arguments JSON cannot carry falls back to the countdown.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone
from typing import Any, Optional, Sequence

from kombu.utils.json import dumps, loads

from .publish import HEADER_TICKET, copy_expiry

logger = logging.getLogger("celery_ckeys.handoff")


def message_for(task: Any, request: Any, headers: dict[str, Any]) -> Optional[str]:
    """The run's message to park, or ``None`` when its arguments do not fit in JSON."""
    parked = {k: v for k, v in headers.items() if k != HEADER_TICKET}
    extra: dict[str, Any] = {}
    ours, own = copy_expiry(headers)
    if ours:  # a woken copy parks again: the line keeps the run's expiry, not the copy's
        extra["expires"] = own
    signature = task.signature_from_request(request, retries=request.retries, headers=parked,
                                            **extra)
    try:
        return str(dumps({"task": task.name, "sig": dict(signature)}))
    except (TypeError, ValueError) as exc:
        logger.warning("run %s of %s cannot be parked (%s); deferring it with a countdown",
                       request.id, task.name, exc)
        return None


def publish(app: Any, wakes: Sequence[Any]) -> None:
    """Publish woken runs, each with its own task id, arguments, headers and routing, and
    the ticket (and home line) that lets exactly one copy claim its reservation.

    Every copy expires after ``ckeys_handoff_copy_ttl`` (sooner if the run's own
    ``expires`` says so): Celery discards an older copy, and the run, still reserved or in
    line in Redis, is woken again. So a copy of a run that turns up after the memo that
    recognises its finished stay has gone is discarded; only when Redis knows nothing of the
    stay is the run published again (``gate.copy_expired``; docs/protocol.md section 5.0).
    """
    from .config import get_config

    copy_ttl = get_config(app).handoff_copy_ttl
    for wake in wakes:
        sig = loads(wake.message)["sig"]
        options = dict(sig.get("options") or {})
        options.pop("redelivered", None)
        own = datetime.now(timezone.utc) + timedelta(seconds=copy_ttl)
        theirs = _when(options.get("expires"))
        ours = theirs is None or own < theirs
        if ours:
            options["expires"] = own
        headers = dict(options.get("headers") or {})
        # with the copy life as its expires, the copy says so and carries the run's own
        own_expires = theirs.isoformat() if ours and theirs is not None else None
        headers[HEADER_TICKET] = [wake.ticket, wake.tag, 1 if ours else 0, own_expires]
        options["headers"] = headers
        app.send_task(sig["task"], sig.get("args") or (), sig.get("kwargs") or {}, **options)


def _when(expires: Any) -> Optional[datetime]:
    """A run's own ``expires`` as Celery carries it (an ISO 8601 string), if any."""
    if isinstance(expires, datetime):
        return expires if expires.tzinfo else expires.replace(tzinfo=timezone.utc)
    if isinstance(expires, str):
        try:
            return _when(datetime.fromisoformat(expires))
        except ValueError:
            return None
    return None

