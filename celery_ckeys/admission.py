"""Which slots a run needs: the policy of SPEC 4.1, 4.4, 4.5 and 4.6 (pure; no Redis).

A run needs, all at once (``acquire.lua`` takes them atomically):

* a queue and a key: the key's **partition** of that queue, always (docs/protocol.md 6.4).
  When the queue turns out to have no limit anywhere, the partition's limit is 1 and the
  run also needs the namespace-wide **key** mutex, so a limit that comes and goes never
  splits the runs of one key over two slots that do not see each other;
* a queue and no key: a slot of the **queue** (nothing, if it has no limit anywhere);
* a key and no queue: the namespace-wide **key** mutex (limit 1);
* with ``ckeys_environment_limit=L``: an **environment** slot (limit ``floor(L x B)``), and
  for a run with no queue of its own, a slot of its task's implicit queue (limit ``L``),
  since every queue is capped at ``L``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

from .config import CkeysConfig
from .naming import Names
from .queues import ConcurrencyQueue
from .slots import LimitSpec, Place, Slot


@dataclass(frozen=True)
class RunSpec:
    """What a run asked for, read from its headers and its task's declarations."""

    task_name: str
    key: Optional[str] = None
    queue: Optional[ConcurrencyQueue] = None
    #: True when ``queue`` came with the run (trigger time): its limit is then recorded.
    queue_from_trigger: bool = False
    #: The limit the task declares for ``queue`` in code (used when nothing is recorded).
    declared_limit: Optional[int] = None
    #: The total_limit the task declares for ``queue`` in code.
    declared_total: Optional[int] = None
    #: The limit the queue's callable (in code) computes for ``key``'s partition.
    computed_limit: Optional[int] = None
    #: The rate the task declares for ``queue`` in code (``"n/window_ms"``).
    declared_rate: Optional[str] = None


@dataclass(frozen=True)
class Plan:
    slots: tuple[Slot, ...]
    #: 1-based index of the slot that identifies the run (where deferrals are recorded).
    primary: int = 1
    #: Whose turn a run is in a fair line: its key ("" none), the weight its queue declares
    #: for it, and the queue whose conf may record a weight for it.
    key: str = ""
    weight: Optional[int] = None
    weight_conf: Optional[str] = None

    def place(self, order_ms: int, priority: int, replace: bool = False) -> Place:
        """Where the run goes when it parks (slots.Place)."""
        return Place(order_ms=order_ms, priority=priority, key=self.key, weight=self.weight,
                     weight_conf=self.weight_conf, replace=replace)

    @property
    def primary_slot(self) -> Slot:
        return self.slots[self.primary - 1]

    @property
    def tags(self) -> frozenset[str]:
        return frozenset(slot.tag for slot in self.slots)


def env_slot(names: Names, config: CkeysConfig) -> Slot:
    return Slot(tag=names.env(), kind="env", label="(environment)",
                limit=LimitSpec(fixed=config.environment_burst_limit))


_MUTEX = LimitSpec(fixed=1)


def key_slot(names: Names, key: str, *, when_unlimited: Optional[int] = None) -> Slot:
    return Slot(tag=names.key(key), kind="key", label=f"key {key}", limit=_MUTEX,
                when_unlimited=when_unlimited)


def total_slot(names: Names, config: CkeysConfig, queue: str, *, trigger: Optional[int] = None,
               declared: Optional[int] = None, remembered: bool = False) -> Slot:
    return Slot(tag=names.total(queue), kind="total", label=f"queue {queue} (total)",
                limit=LimitSpec(queue=queue, trigger=trigger, declared=declared,
                                cap=config.environment_limit, total=True, remembered=remembered),
                conf_tag=names.queue(queue))


def queue_limit(config: CkeysConfig, queue: str, *, trigger: Optional[int] = None,
                declared: Optional[int] = None, key: Optional[str] = None,
                computed: Optional[int] = None, rate: Optional[str] = None,
                rate_trigger: Optional[str] = None) -> LimitSpec:
    """A queue's limit; with ``key``, that of its partition (one run per key when the queue
    has no limit; a limit recorded for the key alone goes first, then ``computed``)."""
    return LimitSpec(queue=queue, trigger=trigger, declared=declared,
                     cap=config.environment_limit, unlimited_as=1 if key is not None else None,
                     key=key, computed=computed, rate=rate, rate_trigger=rate_trigger)


@lru_cache(maxsize=64)
def names_of(namespace: str) -> Names:
    return Names(namespace)


@lru_cache(maxsize=4096)
def plan_for(config: CkeysConfig, run: RunSpec) -> Optional[Plan]:
    """The slots ``run`` needs, most specific first; ``None`` when it needs none."""
    names = names_of(config.namespace)
    slots: list[Slot] = []
    queue = run.queue
    if queue is not None:
        trigger = queue.fixed_limit if run.queue_from_trigger else None
        declared = None if run.queue_from_trigger else (
            run.declared_limit if run.declared_limit is not None else queue.fixed_limit)
        conf_tag = names.queue(queue.name)
        rate_trigger = queue.rate_spec if run.queue_from_trigger else None
        rate = run.declared_rate if run.queue_from_trigger else (
            run.declared_rate or queue.rate_spec)
        if run.key is not None:
            slots.append(Slot(tag=names.partition(queue.name, run.key), kind="partition",
                              label=f"queue {queue.name} [{run.key}]",
                              limit=queue_limit(config, queue.name, trigger=trigger,
                                                declared=declared, key=run.key,
                                                computed=run.computed_limit, rate=rate,
                                                rate_trigger=rate_trigger),
                              conf_tag=conf_tag))
            slots.append(key_slot(names, run.key, when_unlimited=1))
        else:
            slots.append(Slot(tag=conf_tag, kind="queue", label=f"queue {queue.name}",
                              limit=queue_limit(config, queue.name, trigger=trigger,
                                                declared=declared, rate=rate,
                                                rate_trigger=rate_trigger),
                              conf_tag=conf_tag))
        # The whole queue, under its total_limit. Every plan of a queue has it, so that a
        # total recorded from the CLI applies at once; with no total anywhere the scripts
        # resolve it to "not needed" and take nothing there.
        total = queue.total_limit if run.queue_from_trigger else None
        declared_total = None if run.queue_from_trigger else (
            run.declared_total if run.declared_total is not None else queue.total_limit)
        slots.append(total_slot(names, config, queue.name, trigger=total, declared=declared_total))
    else:
        if run.key is not None:
            slots.append(key_slot(names, run.key))
        if config.environment_limit is not None:
            # the task's implicit queue, which defaults to (and is capped at) L
            conf_tag = names.queue(run.task_name)
            slots.append(Slot(tag=conf_tag, kind="queue", label=f"queue {run.task_name}",
                              limit=queue_limit(config, run.task_name), conf_tag=conf_tag))
    if config.environment_limit is not None:
        slots.append(env_slot(names, config))
    if not slots:
        return None
    return Plan(slots=tuple(slots), key=run.key or "",
                weight=queue.weight_of(run.key) if queue is not None else None,
                weight_conf=names.queue(queue.name) if queue is not None else None)


def slot_for_tag(config: CkeysConfig, names: Names, tag: str) -> Optional[Slot]:
    """The slot behind a tag, with the limit the sweeper can know without the run: a
    queue's recorded limit, else the limit last resolved on the slot, capped by ``L``."""
    from .naming import parse_tag

    parsed = parse_tag(tag)
    if parsed is None or parsed.namespace != names.namespace:
        return None
    if parsed.kind == "env":
        if config.environment_limit is None:  # the limit was removed; its line drains
            return Slot(tag=tag, kind="env", label=parsed.label, limit=LimitSpec(remembered=True))
        return env_slot(names, config)
    if parsed.kind == "key":
        return Slot(tag=tag, kind="key", label=parsed.label, limit=LimitSpec(fixed=1))
    if parsed.kind == "total" and parsed.queue is not None:
        return total_slot(names, config, parsed.queue, remembered=True)
    if parsed.kind in ("queue", "partition") and parsed.queue is not None:
        spec = LimitSpec(queue=parsed.queue, cap=config.environment_limit, remembered=True,
                         unlimited_as=1 if parsed.kind == "partition" else None,
                         key=parsed.key if parsed.kind == "partition" else None)
        return Slot(tag=tag, kind=parsed.kind, label=parsed.label, limit=spec,
                    conf_tag=names.queue(parsed.queue))
    return None
