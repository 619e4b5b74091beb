"""Introspection from Python: what holds, waits and is deferred, per queue, partition and key.

::

    from celery_ckeys.introspect import status, explain

    for slot in status(app):
        print(slot.label, slot.limit, [h.task_id for h in slot.holders], slot.deferred_count)

It reads Redis only (``SCAN`` over the namespace's keys, then a pipeline per slot), never
the workers, so it works from any machine that reaches the coordination Redis. The CLI
(``celery -A proj ckeys status``) is built on it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from .config import CkeysConfig, get_config
from .naming import (
    CONF,
    DEFERRED,
    HOLDERS,
    MESSAGES,
    META,
    PARKED,
    RESUMING,
    WAITING,
    WOKEN,
    Names,
    Tag,
    parse_tag,
)
from .store import Store, store_for


@dataclass
class Holder:
    task_id: str
    task_name: str
    held_seconds: float
    worker: str
    pid: Optional[int]
    tags: list[str]
    lease_left_seconds: float


@dataclass
class Deferred:
    task_id: str
    task_name: str
    waiting_seconds: float
    deferrals: int
    blocked_by: str
    holder: str
    tags: list[str] = field(default_factory=list)


@dataclass
class Waiting:
    """A run blocked in ``wait_for`` (it holds no slot) or back from it, about to resume."""

    task_id: str
    resuming: bool


@dataclass
class Parked:
    """A run waiting in a slot's handoff line (``position`` 1 goes next), or woken (0)."""

    task_id: str
    task_name: str
    position: int
    parked_seconds: float
    woken: bool = False


@dataclass
class SlotStatus:
    kind: str  # "env" | "key" | "queue" | "partition"
    label: str
    queue: Optional[str]
    key: Optional[str]
    limit: Optional[int]
    holders: list[Holder] = field(default_factory=list)
    deferred: list[Deferred] = field(default_factory=list)
    waiting: list[Waiting] = field(default_factory=list)
    parked: list[Parked] = field(default_factory=list)

    @property
    def deferred_count(self) -> int:
        return len(self.deferred) + len(self.parked)

    @property
    def oldest_wait_seconds(self) -> Optional[float]:
        ages = [d.waiting_seconds for d in self.deferred] + [p.parked_seconds for p in self.parked]
        return max(ages) if ages else None

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["deferred_count"] = self.deferred_count
        data["oldest_wait_seconds"] = self.oldest_wait_seconds
        return data


def declared_limits(app: Any) -> dict[str, int]:
    """Limits declared in code (``concurrency_limit``, ``ConcurrencyQueue(limit=)``), by queue."""
    found: dict[str, int] = {}
    for task in list(app.tasks.values()):
        queue = getattr(task, "_ckeys_queue", None)
        if queue is not None and queue.limit is not None:
            found.setdefault(queue.name, queue.limit)
    return found


def effective_limit(config: CkeysConfig, recorded: Optional[int], declared: Optional[int]) -> Optional[int]:
    """The limit ``acquire.lua`` applies to a queue: recorded, else declared, capped by L."""
    limit = recorded if recorded is not None else declared
    cap = config.environment_limit
    if limit is None or (cap is not None and cap < limit):
        limit = cap
    return limit


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _now_ms(store: Store) -> int:
    sec, usec = store.guarded(lambda c: c.time())
    return int(sec) * 1000 + int(usec) // 1000


def _scan_tags(store: Store) -> dict[str, set[str]]:
    """Tags of this namespace with the roles (key suffixes) that exist for each."""
    names = store.names
    found: dict[str, set[str]] = {}

    def _do(client: Any) -> None:
        for raw in client.scan_iter(match=names.scan_pattern(), count=1000):
            parsed = names.parse(_text(raw))
            if parsed is None:
                continue
            tag, role = parsed
            found.setdefault(_tag_string(names, tag), set()).add(role)

    store.guarded(_do)
    return found


def _tag_string(names: Names, tag: Tag) -> str:
    if tag.kind == "env":
        return names.env()
    if tag.kind == "key" and tag.key is not None:
        return names.key(tag.key)
    if tag.kind == "queue" and tag.queue is not None:
        return names.queue(tag.queue)
    if tag.kind == "partition" and tag.queue is not None and tag.key is not None:
        return names.partition(tag.queue, tag.key)
    return f"{names.ns}|{tag.kind}"


def _label_of(names: Names, holders_key: str) -> str:
    parsed = names.parse(holders_key)
    return parsed[0].label if parsed else holders_key


def status(app: Any, *, tag: Optional[str] = None, include_idle: bool = False) -> list[SlotStatus]:
    """Every queue, partition and key of the app's namespace with holders, waits or deferrals.

    ``tag`` keeps only slots where a holder or deferred run carries that tag.
    ``include_idle`` also lists queues that only have a recorded limit.
    """
    config = get_config(app)
    store = store_for(config)
    return collect(store, declared=declared_limits(app), tag=tag, include_idle=include_idle)


def collect(store: Store, *, declared: Optional[dict[str, int]] = None, tag: Optional[str] = None,
            include_idle: bool = False) -> list[SlotStatus]:
    config, names = store.config, store.names
    declared = declared or {}
    tags = _scan_tags(store)
    now = _now_ms(store)
    # recorded queue limits (a partition reads its queue's)
    conf_tags = [t for t, roles in tags.items() if CONF in roles]

    def _limits(client: Any) -> dict[str, Optional[int]]:
        pipe = client.pipeline(transaction=False)
        for t in conf_tags:
            pipe.hget(Names.redis_key(t, CONF), "limit")
        return {t: (int(v) if v is not None else None) for t, v in zip(conf_tags, pipe.execute())}

    recorded = store.guarded(_limits) if conf_tags else {}
    result: list[SlotStatus] = []
    for t in sorted(tags):
        parsed = parse_tag(t)
        if parsed is None or parsed.kind not in ("env", "key", "queue", "partition"):
            continue
        slot = SlotStatus(kind=parsed.kind, label=parsed.label, queue=parsed.queue, key=parsed.key,
                          limit=_limit_for(config, names, parsed, recorded, declared))
        _fill(store, t, slot, now)
        busy = slot.holders or slot.deferred or slot.waiting or slot.parked
        if not busy and not (include_idle and parsed.kind == "queue" and recorded.get(t) is not None):
            continue
        if tag is not None and not any(tag in h.tags for h in slot.holders) \
                and not any(tag in d.tags for d in slot.deferred):
            continue
        result.append(slot)
    return result


def _limit_for(config: CkeysConfig, names: Names, tag: Tag, recorded: dict[str, Optional[int]],
               declared: dict[str, int]) -> Optional[int]:
    if tag.kind == "key":
        return 1
    if tag.kind == "env":
        return config.environment_burst_limit
    assert tag.queue is not None
    return effective_limit(config, recorded.get(names.queue(tag.queue)), declared.get(tag.queue))


def _fill(store: Store, t: str, slot: SlotStatus, now: int) -> None:
    key = Names.redis_key

    def _read(client: Any) -> list[Any]:
        pipe = client.pipeline(transaction=False)
        pipe.zrange(key(t, HOLDERS), 0, -1, withscores=True)
        pipe.hgetall(key(t, META))
        pipe.zrange(key(t, DEFERRED), 0, -1, withscores=True)
        pipe.zrange(key(t, WAITING), 0, -1, withscores=True)
        pipe.zrange(key(t, RESUMING), 0, -1, withscores=True)
        pipe.zrange(key(t, WOKEN), 0, -1, withscores=True)
        pipe.zrange(key(t, PARKED), 0, -1, withscores=True)
        pipe.hgetall(key(t, MESSAGES))
        return list(pipe.execute())

    holders, meta, deferred, waiting, resuming, woken, parked, messages = store.guarded(_read)
    meta = {_text(k): _text(v) for k, v in meta.items()}
    for raw_owner, expiry in holders:
        if expiry <= now:
            continue  # expired: the next acquire prunes it
        owner = _text(raw_owner)
        info = _json(meta.get(owner))
        started = info.get("s")
        slot.holders.append(Holder(
            task_id=owner, task_name=str(info.get("t", "?")),
            held_seconds=round(max(0.0, now / 1000 - started), 3) if started else 0.0,
            worker=str(info.get("w", "")), pid=info.get("p"), tags=list(info.get("g") or []),
            lease_left_seconds=round((expiry - now) / 1000, 3)))
    memory = store.config.deferral_memory_ms
    for raw_owner, last in deferred:
        if last < now - memory:
            continue
        owner = _text(raw_owner)
        rec = _json(meta.get("?" + owner))
        info = _json(rec.get("info")) if isinstance(rec.get("info"), str) else {}
        slot.deferred.append(Deferred(
            task_id=owner, task_name=str(info.get("t", "?")),
            waiting_seconds=round((now - int(rec.get("first", last))) / 1000, 3),
            deferrals=int(rec.get("n", 1)),
            blocked_by=_label_of(store.names, str(rec.get("blocked", ""))),
            holder=str(rec.get("holder", "")), tags=list(info.get("g") or [])))
    for raw_owner, expiry in waiting:
        if expiry > now:
            slot.waiting.append(Waiting(task_id=_text(raw_owner), resuming=False))
    for raw_owner, _asked in resuming:
        slot.waiting.append(Waiting(task_id=_text(raw_owner), resuming=True))
    messages = {_text(k): _json(_text(v)) for k, v in messages.items()}
    for position, (raw_owner, first) in enumerate(list(woken) + list(parked)):
        owner = _text(raw_owner)
        msg = messages.get(owner, {})
        is_woken = position < len(woken)
        slot.parked.append(Parked(
            task_id=owner, task_name=str(msg.get("task", "?")),
            position=0 if is_woken else position - len(woken) + 1,
            parked_seconds=round((now - int(msg.get("first") or first)) / 1000, 3), woken=is_woken))


def _json(raw: Optional[str]) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


@dataclass
class Explanation:
    task_id: str
    state: str  # "running" | "deferred" | "parked" | "waiting" | "unknown"
    slots: list[str] = field(default_factory=list)
    blocked_by: Optional[str] = None
    holders: list[Holder] = field(default_factory=list)
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def explain(app: Any, task_id: str) -> Explanation:
    """Why ``task_id`` is or is not running: which slot blocks it and who holds that slot."""
    config = get_config(app)
    store = store_for(config)
    slots = collect(store, declared=declared_limits(app))
    by_label = {s.label: s for s in slots}
    held = [s.label for s in slots if any(h.task_id == task_id for h in s.holders)]
    if held:
        return Explanation(task_id, "running", slots=held, detail="it holds " + ", ".join(held))
    for s in slots:
        for p in s.parked:
            if p.task_id == task_id:
                held_by = ", ".join(f"{h.task_id} ({h.task_name}, {h.held_seconds:.0f}s)"
                                    for h in s.holders) or "nobody"
                if p.woken:
                    detail = (f"woken from the line of {s.label} (limit {s.limit}) and on its way"
                              f" to a worker; its place is reserved; held by {held_by}")
                else:
                    detail = (f"parked in the line of {s.label} (limit {s.limit}) at position"
                              f" {p.position}, {p.position - 1} ahead of it, waiting"
                              f" {p.parked_seconds:.0f}s; held by {held_by}")
                return Explanation(task_id, "parked", slots=[s.label], blocked_by=s.label,
                                   holders=s.holders, detail=detail)
        for d in s.deferred:
            if d.task_id == task_id:
                blocker = by_label.get(d.blocked_by)
                holders = blocker.holders if blocker else []
                who = ", ".join(f"{h.task_id} ({h.task_name}, {h.held_seconds:.0f}s)"
                                for h in holders) or (d.holder or "runs resuming from wait_for")
                limit = blocker.limit if blocker else None
                return Explanation(task_id, "deferred", slots=[s.label], blocked_by=d.blocked_by,
                                   holders=holders,
                                   detail=f"deferred {d.deferrals} time(s) over"
                                          f" {d.waiting_seconds:.0f}s: {d.blocked_by} (limit {limit})"
                                          f" is full, held by {who}")
        for w in s.waiting:
            if w.task_id == task_id:
                what = "resuming, waiting for a slot on" if w.resuming else "blocked in wait_for on"
                return Explanation(task_id, "waiting", slots=[s.label],
                                   detail=f"{what} {s.label}; it holds no slot while it waits")
    return Explanation(task_id, "unknown",
                       detail="not holding, deferred, parked or waiting in this namespace: it may"
                              " be queued in the broker, finished, or not a keyed run")
