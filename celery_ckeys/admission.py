"""Which slots a run needs: the policy of SPEC 4.1, 4.4, 4.5 and 4.6.

A run needs, all at once (``acquire.lua`` takes them atomically):

* a limited queue and a key: the key's **partition** of that queue (full limit each);
  when the queue turns out to have no limit anywhere, the namespace-wide key mutex;
* a limited queue and no key: a slot of the **queue**;
* a key and no queue: the namespace-wide **key** mutex (limit 1);
* with ``ckeys_environment_limit=L``: an **environment** slot (limit ``floor(L x B)``), and
  for a run with no queue of its own, a slot of its task's implicit queue (limit ``L``),
  since every queue is capped at ``L``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from .config import CkeysConfig
from .naming import Names
from .queues import ConcurrencyQueue
from .store import Slot


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


@dataclass(frozen=True)
class Plan:
    slots: tuple[Slot, ...]
    #: 1-based index of the slot that identifies the run (where deferrals are recorded).
    primary: int

    @property
    def primary_slot(self) -> Slot:
        return self.slots[self.primary - 1]


def env_slot(names: Names, config: CkeysConfig) -> Slot:
    return Slot(tag=names.env(), kind="env", label="(environment)",
                spec=(("l", config.environment_burst_limit),))


def key_slot(names: Names, key: str, *, alternative: bool = False) -> Slot:
    spec: tuple[tuple[str, Any], ...] = (("l", 1),)
    if alternative:
        spec = (("alt", True), ("l", 1))
    return Slot(tag=names.key(key), kind="key", label=f"key {key}", spec=spec)


def _queue_spec(config: CkeysConfig, *, trigger_limit: Optional[int], declared: Optional[int],
                alternative: Optional[int] = None) -> tuple[tuple[str, Any], ...]:
    spec: list[tuple[str, Any]] = [("c", True)]
    if trigger_limit is not None:
        spec.append(("s", trigger_limit))
    if declared is not None:
        spec.append(("d", declared))
    if config.environment_limit is not None:
        spec.append(("x", config.environment_limit))
    if alternative is not None:
        spec.append(("a", alternative))
    return tuple(spec)


def plan_for(config: CkeysConfig, names: Names, run: RunSpec) -> Optional[Plan]:
    """The slots ``run`` needs, most specific first; ``None`` when it needs none."""
    slots: list[Slot] = []
    queue = run.queue
    if queue is not None:
        trigger_limit = queue.limit if run.queue_from_trigger else None
        declared = run.declared_limit if not run.queue_from_trigger else None
        if declared is None and not run.queue_from_trigger:
            declared = queue.limit
        conf_tag = names.queue(queue.name)
        if run.key is not None:
            # index of the key mutex that stands in if the queue has no limit at all
            spec = _queue_spec(config, trigger_limit=trigger_limit, declared=declared,
                               alternative=2)
            slots.append(Slot(tag=names.partition(queue.name, run.key), kind="partition",
                              label=f"queue {queue.name} [{run.key}]", spec=spec,
                              conf_tag=conf_tag))
            slots.append(key_slot(names, run.key, alternative=True))
        else:
            slots.append(Slot(tag=conf_tag, kind="queue", label=f"queue {queue.name}",
                              spec=_queue_spec(config, trigger_limit=trigger_limit,
                                               declared=declared),
                              conf_tag=conf_tag))
    else:
        if run.key is not None:
            slots.append(key_slot(names, run.key))
        if config.environment_limit is not None:
            # the task's implicit queue, which defaults to (and is capped at) L
            conf_tag = names.queue(run.task_name)
            slots.append(Slot(tag=conf_tag, kind="queue", label=f"queue {run.task_name}",
                              spec=_queue_spec(config, trigger_limit=None, declared=None),
                              conf_tag=conf_tag))
    if config.environment_limit is not None:
        slots.append(env_slot(names, config))
    if not slots:
        return None
    return Plan(slots=tuple(slots), primary=1)
