"""Queue limits kept centrally in Redis, from Python: what ``celery ckeys limits`` does.

A limit set here applies to runs that start from then on, on every worker, without a
restart (each admission reads it). A key's own limit goes before its queue's; the
environment limit still caps both (docs/protocol.md section 1).
"""

from __future__ import annotations

from typing import Any, Optional

from .admission import queue_limit
from .introspect import declared_limits
from .validation import check_key, check_limit, check_queue_name


def _store(app: Any) -> Any:
    from .gate import store_of

    return store_of(app)


def set_limit(app: Any, queue: str, limit: int, *, key: Optional[str] = None) -> None:
    """Record ``queue``'s limit, or with ``key`` the limit of that key's partition alone."""
    check_queue_name(queue)
    check_limit(limit, what=f"limit of queue {queue!r}")
    if key is None:
        _store(app).set_queue_limit(queue, limit)
    else:
        _store(app).set_key_limit(queue, check_key(key), limit)


def clear_limit(app: Any, queue: str, *, key: Optional[str] = None) -> None:
    """Forget the recorded limit (of ``key`` alone, when given): the next rule down applies."""
    check_queue_name(queue)
    if key is None:
        _store(app).set_queue_limit(queue, None)
    else:
        _store(app).set_key_limit(queue, check_key(key), None)


def get_limits(app: Any, queue: str) -> dict[str, Any]:
    """``{"queue", "recorded", "declared", "effective", "keys": {key: {"recorded",
    "effective"}}}``: what applies to ``queue`` now, and to each key with a limit of its own."""
    check_queue_name(queue)
    store = _store(app)
    declared = declared_limits(app).get(queue)
    recorded = store.queue_limit(queue)
    spec = queue_limit(store.config, queue, declared=declared)
    effective, _ = spec.resolve(recorded)
    keys = {}
    for key, own in sorted(store.key_limits(queue).items()):
        applies, _ = queue_limit(store.config, queue, declared=declared, key=key).resolve(
            recorded, override=own)
        keys[key] = {"recorded": own, "effective": applies}
    return {"queue": queue, "recorded": recorded, "declared": declared, "effective": effective,
            "keys": keys}
