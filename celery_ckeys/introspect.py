"""Introspection from Python: what holds, waits and is deferred, per queue, partition and key.

    from celery_ckeys.introspect import status, explain

    for slot in status(app):
        print(slot.label, slot.limit, [h.task_id for h in slot.holders], slot.deferred_count)

It reads Redis only (``SCAN`` over the namespace's keys, then a pipeline per slot), never
the workers, so it works from any machine that reaches the coordination Redis. The CLI
(``celery -A proj ckeys status``) is built on it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Optional

from .admission import slot_for_tag
from .config import get_config
from .errors import describe
from .naming import CONF, Tag, parse_tag
from .publish import HEADER_FIRST_DEFERRED, HEADER_KEY, HEADER_PRIORITY
from .queues import ConcurrencyQueue
from .slots import FAIR_KINDS
from .store import SlotState, Store, store_for


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
    key: Optional[str] = None
    priority: int = 0


@dataclass
class SlotStatus:
    kind: str  # "env" | "key" | "queue" | "partition" | "total"
    label: str
    queue: Optional[str]
    key: Optional[str]
    limit: Optional[int]
    #: the queue, or this partition, is paused (``celery ckeys pause``): its limit is 0
    paused: bool = False
    holders: list[Holder] = field(default_factory=list)
    deferred: list[Deferred] = field(default_factory=list)
    waiting: list[Waiting] = field(default_factory=list)
    parked: list[Parked] = field(default_factory=list)
    #: set when the slot's records in Redis could not be read (what was read is shown)
    error: Optional[str] = None

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


def age_text(seconds: Optional[float]) -> str:
    """``42s``, ``1m30s``, ``2h05m`` (``-`` for none): how the CLI and dashboard show ages."""
    if seconds is None:
        return "-"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def declared_queues(app: Any) -> dict[str, ConcurrencyQueue]:
    """Queues declared in code (``concurrency_limit``, ``ConcurrencyQueue(...)`` on a task),
    by name; the first task that declares a queue with a limit or total decides."""
    found: dict[str, ConcurrencyQueue] = {}
    for task in list(app.tasks.values()):
        queue = getattr(task, "_ckeys_queue", None)
        if queue is not None and (queue.name not in found or (
                found[queue.name].limit is None and found[queue.name].total_limit is None)):
            found[queue.name] = queue
    return found


def status(app: Any, *, tag: Optional[str] = None, include_idle: bool = False) -> list[SlotStatus]:
    """Every queue, partition and key of the app's namespace with holders, waits or deferrals.

    ``tag`` keeps only slots where a holder or deferred run carries that tag.
    ``include_idle`` also lists queues that only have a recorded limit.
    """
    store = store_for(get_config(app))
    return collect(store, declared=declared_queues(app), tag=tag, include_idle=include_idle)


def collect(store: Store, *, declared: Optional[dict[str, ConcurrencyQueue]] = None,
            tag: Optional[str] = None, include_idle: bool = False) -> list[SlotStatus]:
    declared = declared or {}
    tags = store.scan_tags()
    recorded = store.recorded_limits()
    pauses: dict[str, tuple[bool, set[str]]] = {}
    result: list[SlotStatus] = []
    for t in sorted(tags):
        parsed = parse_tag(t)
        if parsed is None or parsed.kind not in ("env", "key", "queue", "partition", "total"):
            continue
        slot = SlotStatus(kind=parsed.kind, label=parsed.label, queue=parsed.queue, key=parsed.key,
                          limit=None)
        try:
            state = store.read_slot(t)
            slot.limit = _limit_for(store, parsed, t, declared)
            slot.paused = _paused(store, parsed, pauses)
            _fill(store, slot, state)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            # one record no celery_ckeys wrote must not hide every other slot
            slot.error = "unreadable: " + describe(exc)
            result.append(slot)
            continue
        busy = slot.holders or slot.deferred or slot.waiting or slot.parked or slot.paused
        if not busy and not (include_idle and parsed.kind == "queue"
                             and parsed.queue in recorded and CONF in tags[t]):
            continue
        if tag is not None and not carries(slot, tag):
            continue
        result.append(slot)
    return result


def carries(slot: SlotStatus, tag: str) -> bool:
    """Whether a run holding or deferred on ``slot`` carries ``tag`` (``status(tag=...)``)."""
    return any(tag in h.tags for h in slot.holders) or any(tag in d.tags for d in slot.deferred)


def _paused(store: Store, tag: Tag, seen: dict[str, tuple[bool, set[str]]]) -> bool:
    """Whether the slot's queue, or its partition, is paused (one conf read per queue)."""
    if tag.queue is None or tag.kind not in ("queue", "partition"):
        return False
    if tag.queue not in seen:
        seen[tag.queue] = (store.queue_limit(tag.queue, field="paused") is not None,
                           set(store.key_limits(tag.queue, what="paused")))
    whole, keys = seen[tag.queue]
    return whole or (tag.kind == "partition" and tag.key in keys)


def _limit_for(store: Store, tag: Tag, tag_string: str,
               declared: dict[str, ConcurrencyQueue]) -> Optional[int]:
    """The limit as admission resolves it now (by the scripts' own rule: recorded limits of
    the queue and of the key, declared ones from this app, else what the slot remembers)."""
    slot = slot_for_tag(store.config, store.names, tag_string)
    if slot is None:
        return None
    queue = declared.get(tag.queue or "")
    if queue is not None:
        value = queue.total_limit if slot.kind == "total" else queue.fixed_limit
        computed = (queue.limit_for(tag.key) if slot.kind == "partition" and tag.key is not None
                    else None)
        slot = replace(slot, limit=replace(slot.limit, declared=value, computed=computed,
                                           remembered=False))
    return store.resolve_limits([slot])[0]


def token_parts(raw: Optional[str]) -> list[Any]:
    """The fields of a hold token (``gate.hold_token``); [] when ``raw`` is not one."""
    try:
        value = json.loads(raw or "")
    except ValueError:
        return []
    return value if isinstance(value, list) else []


def _holder(task_id: str, token: str, lease_left_ms: float, now_ms: int) -> Holder:
    parts = token_parts(token) + [None] * 8
    started = parts[6]
    return Holder(task_id=task_id, task_name=str(parts[5] or "?"),
                  held_seconds=round(max(0.0, now_ms / 1000 - started), 3) if started else 0.0,
                  worker=str(parts[1] or ""), pid=parts[2], tags=list(parts[7] or []),
                  lease_left_seconds=round(lease_left_ms / 1000, 3))


def _fill(store: Store, slot: SlotStatus, state: SlotState) -> None:
    now = state.now_ms
    if state.simple is not None:
        owner = str((token_parts(state.simple) or ["?"])[0])
        slot.holders.append(_holder(owner, state.simple, state.simple_ttl_ms, now))
    woken: list[tuple[str, float]] = []
    for owner, expiry in state.units:
        if expiry < 0:
            continue  # the marker of a run waiting in wait_for, listed below
        unit = state.info.get(owner, "")
        if unit.startswith(("@w", "@h")):  # woken, or kept while it waits on a later slot
            woken.append((owner, expiry))
        elif unit.startswith("@r"):
            slot.waiting.append(Waiting(task_id=owner, resuming=True))
        elif expiry > now:
            slot.holders.append(_holder(owner, unit, expiry - now, now))
    memory = store.config.deferral_memory_ms
    for owner, raw in state.deferred.items():
        rec = _json(raw)
        last = int(rec.get("at", 0))
        if last < now - memory:
            continue
        info = token_parts(rec.get("info") if isinstance(rec.get("info"), str) else None) + [None] * 8
        blocked = parse_tag(str(rec.get("blocked", "")))
        slot.deferred.append(Deferred(
            task_id=owner, task_name=str(info[5] or "?"),
            waiting_seconds=round((now - int(rec.get("first", last))) / 1000, 3),
            deferrals=int(rec.get("n", 1)), blocked_by=blocked.label if blocked else "?",
            holder=str(rec.get("holder", "")), tags=list(info[7] or [])))
    resuming = {t for t, _ in state.resume}
    for owner, expiry in state.waiting:
        if expiry > now and not any(w.task_id == owner for w in slot.waiting):
            slot.waiting.append(Waiting(task_id=owner, resuming=owner in resuming))
    for position, (owner, _) in enumerate(woken + state.line):
        _, _, message = state.messages.get(owner, "").partition("\n")
        parked = _json(message)
        headers = _headers_of(parked)
        first = headers.get(HEADER_FIRST_DEFERRED)
        is_woken = position < len(woken)
        slot.parked.append(Parked(
            task_id=owner, task_name=str(parked.get("task", "?")),
            position=0 if is_woken else position - len(woken) + 1,
            parked_seconds=round(max(0.0, now / 1000 - first), 3)
            if isinstance(first, (int, float)) and not is_woken else 0.0,
            woken=is_woken, key=headers.get(HEADER_KEY) if isinstance(headers.get(HEADER_KEY), str)
            else None, priority=int(headers.get(HEADER_PRIORITY) or 0)))


def _headers_of(parked: dict[str, Any]) -> dict[str, Any]:
    """The ckeys headers of a parked message (its signature's options)."""
    sig = parked.get("sig")
    options = sig.get("options") if isinstance(sig, dict) else None
    headers = options.get("headers") if isinstance(options, dict) else None
    return headers if isinstance(headers, dict) else {}


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


def _fairness(line: SlotStatus, run: Parked, slots: list[SlotStatus]) -> str:
    """Why a run waits in a fair line: whose turns come first, and what each key runs now."""
    ahead = [p.key or "(no key)" for p in line.parked if not p.woken and p.position < run.position]
    after = list(dict.fromkeys(ahead))  # each key once, in the order their turns come
    running: dict[str, int] = {}
    for s in slots:
        if s.kind == "partition" and s.key is not None and (
                line.kind == "env" or s.queue == line.queue):
            running[s.key] = running.get(s.key, 0) + len(s.holders)
    busy = ", ".join(f"{k} has {n} running" for k, n in sorted(running.items()) if n)
    turn = (f"keys take turns here: you are next after {', '.join(after)}" if after
            else "keys take turns here: it is your turn next")
    return turn + (f" ({busy})" if busy else "")


def explain(app: Any, task_id: str) -> Explanation:
    """Why ``task_id`` is or is not running: which slot blocks it and who holds that slot."""
    store = store_for(get_config(app))
    slots = collect(store, declared=declared_queues(app))
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
                    if p.priority:
                        detail += f"; its priority is {p.priority}"
                    if s.kind in FAIR_KINDS:
                        detail += "; " + _fairness(s, p, slots)
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
