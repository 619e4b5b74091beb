"""Force-release from Python: what ``celery ckeys release`` (and the dashboard's release
action) does.

    from celery_ckeys.release import held, force_release

    owners = held(app, queue="reports", key="acme")   # [(slot tag, task id), ...]
    force_release(app, owners)                       # [{"slot": ..., "task_id": ...}, ...]

The runs that held the slots keep executing; they are told their lease is lost when they
next renew it. Use it to unstick slots whose holder you know is gone.
"""

from __future__ import annotations

from typing import Any, Optional

from .admission import slot_for_tag
from .gate import store_of
from .naming import enc, parse_tag
from .store import Store, owner_prefix
from .validation import check_key, check_queue_name


def held(app: Any, key: Optional[str] = None, *, queue: Optional[str] = None,
         partition_key: Optional[str] = None) -> list[tuple[str, str]]:
    """``(slot tag, task id)`` of every holder of the concurrency ``key``, or of ``queue``
    (its own slot, its total and all its partitions; with ``partition_key`` that key's
    partition alone). Give either ``key`` or ``queue``."""
    if (key is None) == (queue is None):
        raise ValueError("give either a concurrency key or a queue")
    store = store_of(app)
    names = store.names
    if key is not None:
        tags = [names.key(check_key(key))]
    else:
        assert queue is not None
        check_queue_name(queue)
        if partition_key is not None:
            tags = [names.partition(queue, check_key(partition_key))]
        else:
            tags = [names.queue(queue), names.total(queue), *_partitions_of(store, queue)]
    return [(t, owner) for t in tags for owner in store.holders_of(t)]


def force_release(app: Any, owners: list[tuple[str, str]]) -> list[dict[str, str]]:
    """Release each ``(slot tag, task id)`` as if its holder were lost; what was released."""
    store = store_of(app)
    released = []
    for t, owner in owners:
        slot = slot_for_tag(store.config, store.names, t)
        if slot is not None and store.release_lost([slot], owner, owner_prefix(owner)):
            released.append({"slot": slot.label, "task_id": owner})
    return released


def _partitions_of(store: Store, queue: str) -> list[str]:
    return sorted(t for t in store.scan_tags(f"p|{enc(queue)}|*")
                  if (parsed := parse_tag(t)) is not None and parsed.kind == "partition")
