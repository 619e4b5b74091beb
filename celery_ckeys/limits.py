"""Queue limits kept centrally in Redis, from Python: what ``celery ckeys limits`` does.

A limit set here applies to runs that start from then on, on every worker, without a
restart (each admission reads it). A key's own limit goes before its queue's; the
environment limit still caps both (docs/protocol.md section 1).
"""

from __future__ import annotations

from typing import Any, Optional

from .admission import queue_limit, slot_for_tag, total_slot
from .introspect import declared_queues
from .naming import LINE, parse_tag
from .validation import check_key, check_limit, check_queue_name, check_rate, check_weight


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


def set_total(app: Any, queue: str, total: int) -> None:
    """Record ``queue``'s total_limit: every key's partition and keyless run together."""
    check_queue_name(queue)
    check_limit(total, what=f"total_limit of queue {queue!r}")
    _store(app).set_queue_limit(queue, total, field="total")


def clear_total(app: Any, queue: str) -> None:
    """Forget the recorded total_limit: the one declared in code applies, else none."""
    check_queue_name(queue)
    _store(app).set_queue_limit(queue, None, field="total")


def set_rate(app: Any, queue: str, rate: str) -> None:
    """Record ``queue``'s rate ("10/s", "100/m", "5/h"): per partition (per queue for runs
    without a key), at most that many runs start in any window, on all workers. Goes before
    a rate declared in code."""
    check_queue_name(queue)
    _store(app).set_rate(queue, check_rate(rate))


def clear_rate(app: Any, queue: str) -> None:
    """Forget ``queue``'s recorded rate: the one declared in code applies, else none."""
    check_queue_name(queue)
    _store(app).set_rate(queue, None)


def set_weight(app: Any, queue: str, key: str, weight: int) -> None:
    """Record ``key``'s weight in ``queue``'s fair lines (its total, the environment): it gets
    ``weight`` turns a round. Goes before a weight declared in code."""
    check_queue_name(queue)
    _store(app).set_key_limit(queue, check_key(key), check_weight(weight, key=key), what="weight")


def clear_weight(app: Any, queue: str, key: str) -> None:
    """Forget ``key``'s recorded weight: the one declared in code applies, else 1."""
    check_queue_name(queue)
    _store(app).set_key_limit(queue, check_key(key), None, what="weight")


def pause(app: Any, queue: str, *, key: Optional[str] = None) -> None:
    """Pause ``queue`` (with ``key``: that key's partition alone): nothing new of it starts,
    on any worker, until ``resume``; running runs finish, waiting runs keep their
    places. Kept in Redis, so it outlives worker restarts."""
    check_queue_name(queue)
    if key is None:
        _store(app).set_queue_limit(queue, 1, field="paused")
    else:
        _store(app).set_key_limit(queue, check_key(key), 1, what="paused")


def resume(app: Any, queue: str, *, key: Optional[str] = None) -> None:
    """Undo ``pause``; the runs waiting in the queue's lines are woken now, in order."""
    check_queue_name(queue)
    store = _store(app)
    if key is None:
        store.set_queue_limit(queue, None, field="paused")
    else:
        store.set_key_limit(queue, check_key(key), None, what="paused")
    sweep_queue(store, queue)


def sweep_queue(store: Any, queue: str) -> int:
    """Sweep every line of ``queue`` now (its partitions, its own slot, its total), so that
    room a change made (a resume, a raised limit) goes to those waiting at once rather than
    at the next due sweep. Returns how many lines it swept."""
    swept = 0
    for tag, roles in store.scan_tags().items():
        slot = slot_for_tag(store.config, store.names, tag)
        parsed = parse_tag(tag)
        if (slot is not None and parsed is not None and parsed.queue == queue and LINE in roles
                and slot.kind in ("queue", "partition", "total")):
            store.sweep(slot)
            swept += 1
    return swept


def paused(app: Any, queue: str) -> dict[str, Any]:
    """``{"queue": bool, "keys": [key, ...]}``: what of ``queue`` is paused."""
    check_queue_name(queue)
    store = _store(app)
    return {"queue": store.queue_limit(queue, field="paused") is not None,
            "keys": sorted(store.key_limits(queue, what="paused"))}


def get_limits(app: Any, queue: str) -> dict[str, Any]:
    """What applies to ``queue`` now: ``{"queue", "recorded", "declared", "effective",
    "total": {"recorded", "declared", "effective"}, "computed": bool, "keys": {key:
    {"recorded", "effective"}}, "weights": {key: {"recorded", "declared", "effective"}}}``
    (each key with a limit or a weight of its own)."""
    check_queue_name(queue)
    store = _store(app)
    code = declared_queues(app).get(queue)
    declared = code.fixed_limit if code is not None else None
    recorded = store.queue_limit(queue)
    spec = queue_limit(store.config, queue, declared=declared)
    effective, _ = spec.resolve(recorded)
    keys = {}
    for key, own in sorted(store.key_limits(queue).items()):
        computed = code.limit_for(key) if code is not None else None
        applies, _ = queue_limit(store.config, queue, declared=declared, key=key,
                                 computed=computed).resolve(recorded, override=own)
        keys[key] = {"recorded": own, "effective": applies}
    recorded_weights = store.key_limits(queue, what="weight")
    declared_weights = dict(code.weights or {}) if code is not None else {}
    weights = {key: {"recorded": recorded_weights.get(key), "declared": declared_weights.get(key),
                     "effective": recorded_weights.get(key, declared_weights.get(key, 1))}
               for key in sorted(set(recorded_weights) | set(declared_weights))}
    declared_total = code.total_limit if code is not None else None
    recorded_total = store.queue_limit(queue, field="total")
    total_spec = total_slot(store.names, store.config, queue, declared=declared_total).limit
    total = {"recorded": recorded_total, "declared": declared_total,
             "effective": total_spec.resolve(recorded_total)[0]}
    return {"queue": queue, "recorded": recorded, "declared": declared, "effective": effective,
            "total": total, "computed": code is not None and code.computed, "keys": keys,
            "weights": weights, "paused": paused(app, queue),
            "rate": {"recorded": _rate_text(store.recorded_rate(queue)),
                     "declared": code.rate if code is not None else None}}


def _rate_text(rate: Optional[str]) -> Optional[str]:
    """``"n/window_ms"`` as people write it (``"10/s"``)."""
    if rate is None:
        return None
    n, _, window = rate.partition("/")
    unit = {"1000": "s", "60000": "m", "3600000": "h"}.get(window)
    return f"{n}/{unit}" if unit else f"{n}/{window}ms"
