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
from .introspect import token_parts
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
            tags = [names.queue(queue), names.total(queue), *_partitions(store, queue)]
    return [(t, owner) for t in tags for owner in store.holders_of(t)]


def force_release(app: Any, owners: list[tuple[str, str]]) -> list[dict[str, str]]:
    """Release each ``(slot tag, task id)`` as if its holder were lost, with the units the
    same run holds on the slots taken together with that one (a partition's key mutex, its
    queue's own slot and total, a key's queue, the environment); what was released."""
    store = store_of(app)
    released: list[dict[str, str]] = []
    done: set[tuple[str, str]] = set()
    for t, owner in owners:
        for tag in (t, *_taken_with(store, t, owner)):
            if (tag, owner) in done:
                continue
            done.add((tag, owner))
            slot = slot_for_tag(store.config, store.names, tag)
            if slot is not None and store.release_lost([slot], owner, owner_prefix(owner)):
                released.append({"slot": slot.label, "task_id": owner})
    return released


def _taken_with(store: Store, tag: str, owner: str) -> list[str]:
    """The slots a run holding ``tag`` may hold with it (plans order partition, key, queue,
    total, environment): a unit left there would keep counting until its lease ran out.
    Releasing on a slot the run does not hold frees nothing, so this may name too many."""
    parsed = parse_tag(tag)
    if parsed is None or parsed.kind == "env":
        return []
    names = store.names
    queues = [parsed.queue] if parsed.queue else []
    found = [names.key(parsed.key)] if parsed.kind == "partition" and parsed.key else []
    if parsed.kind == "key" and parsed.key is not None:
        # a key's run has no queue of its own (its task's implicit queue, named by its
        # token) or a partition of the key on the queue it was triggered on
        task = _task_of(store, tag, owner)
        queues += [task] if task else []
        for t in _partitions(store, key=parsed.key):
            other = parse_tag(t)
            if other is not None and other.queue:
                found.append(t)
                queues.append(other.queue)
    for queue in queues:
        found += [names.queue(queue), names.total(queue)]
    return [t for t in dict.fromkeys([*found, names.env()]) if t != tag]


def _task_of(store: Store, tag: str, owner: str) -> Optional[str]:
    """The task name in ``owner``'s hold token on slot ``tag`` (None: not a hold)."""
    state = store.read_slot(tag)
    parts = token_parts(state.simple if state.simple is not None else state.info.get(owner))
    return str(parts[5]) if len(parts) > 5 else None


def _partitions(store: Store, queue: Optional[str] = None, key: Optional[str] = None) -> list[str]:
    """The partition tags of ``queue`` (any queue: None) for ``key`` (any key: None)."""
    pattern = "|".join(["p", "*" if queue is None else enc(queue), "*" if key is None else enc(key)])
    return sorted(t for t in store.scan_tags(pattern)
                  if (parsed := parse_tag(t)) is not None and parsed.kind == "partition")
