"""What a run must hold, as plain values: a ``Slot`` and its ``LimitSpec``.

The queue-limit rule lives here once (``LimitSpec.resolve``) and once in Lua
(``resolve_limit`` in ``lua/core.lua``, which admission uses atomically); a property test
keeps the two equal. Nothing here talks to Redis.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from .naming import Names


@dataclass(frozen=True)
class LimitSpec:
    """How a slot's limit is found.

    ``fixed``: a limit that never changes (a key mutex: 1; the environment: ``floor(L x B)``).
    Otherwise the slot is a queue's (or a partition of it), and its limit is, in order:
    ``trigger`` (a limit given when the run was triggered; recorded for the queue from then
    on), the recorded limit, ``declared`` (in code), else ``cap``; never more than ``cap``
    (the environment's base limit). With none of them the queue is unlimited, unless
    ``unlimited_as`` is set (a partition: one run per key, see docs/protocol.md 6.4).
    ``remembered`` stands in for ``declared`` where the declaring code is not at hand (the
    sweeper): the declared limit the last run on the slot brought (``#d`` in its info hash;
    never the limit resolved from it, so a recorded limit cleared since does not live on).
    ``key``: the partition's key. A limit recorded for that key alone (``key:<key>`` in the
    queue's conf) goes before all of the above, then ``computed`` (by the queue's callable,
    for that key; remembered on the slot as ``#o`` for the sweeper); the cap still applies.
    ``total``: the slot is a queue's whole (its ``total_limit``): the same order of trigger,
    recorded (``total`` in the conf) and declared, but the cap only caps: with none of them
    the slot is not needed at all.
    """

    fixed: Optional[int] = None
    queue: Optional[str] = None
    trigger: Optional[int] = None
    declared: Optional[int] = None
    cap: Optional[int] = None
    unlimited_as: Optional[int] = None
    remembered: bool = False
    key: Optional[str] = None
    total: bool = False
    computed: Optional[int] = None
    #: ``computed`` is only remembered on the slot, not used: the spec's limit is already
    #: resolved (ClusterStore's steps carry the resolved limit as ``trigger``)
    computed_noted: bool = False
    #: the partition's (or the queue's own slot's) rate, ``"n/window_ms"``: declared in code
    #: (a recorded rate goes first; remembered on the slot as ``#r`` for the sweeper), or
    #: given at trigger time (``rate_trigger``, recorded as the queue's ``rate``)
    rate: Optional[str] = None
    rate_trigger: Optional[str] = None

    @property
    def conf_field(self) -> str:
        """The field of the queue's conf HASH where this slot's limit is recorded."""
        return "total" if self.total else "limit"

    def resolve(self, recorded: Optional[int], remembered: Optional[int] = None,
                override: Optional[int] = None,
                remembered_computed: Optional[int] = None,
                paused: bool = False) -> tuple[Optional[int], bool]:
        """``(limit, fell_back)``: the limit (``None``: unlimited), and whether ``unlimited_as``
        applied. ``recorded`` is the queue's recorded limit (ignored when ``trigger`` is set),
        ``override`` the one recorded for ``key`` (ignored without a key);
        ``remembered*``: what the slot remembers, standing in for code when ``remembered``;
        ``paused``: the queue, or the partition, is paused (limit 0)."""
        if self.fixed is not None:
            return self.fixed, False
        if paused and not self.total:
            return 0, False
        limit = self.trigger if self.trigger is not None else recorded
        computed = self.computed if self.computed is not None else (
            remembered_computed if self.remembered else None)
        if computed is not None and not self.total and not self.computed_noted:
            limit = computed
        if override is not None and self.key is not None:
            limit = override
        if limit is None:
            limit = remembered if self.remembered else self.declared
        if self.total:
            if limit is not None and self.cap is not None and self.cap < limit:
                limit = self.cap
            return limit, False
        if limit is None or (self.cap is not None and self.cap < limit):
            limit = self.cap
        if limit is None and self.unlimited_as is not None:
            return self.unlimited_as, True
        return limit, False

    def lua(self, conf_position: int) -> str:
        """The spec as ``resolve_limit`` in core.lua reads it (conf at ``KEYS[conf_position]``;
        0 for a slot with no queue conf)."""
        if self.fixed is not None:
            return f"={self.fixed}"
        declared = "#" if self.remembered else _opt(self.declared)
        if self.total:
            return f"t|{conf_position}|{_opt(self.trigger)}|{declared}|{_opt(self.cap)}"
        computed = "#" if self.remembered and self.computed is None else _opt(self.computed)
        if self.computed_noted:
            # remember what the code computed (none: clear it), or, without the code at hand
            # (the sweeper), keep what the slot remembers
            computed = "!#" if self.remembered and self.computed is None else \
                f"!{_opt(self.computed)}"
        rate = (f"={self.rate_trigger}" if self.rate_trigger is not None else
                self.rate if self.rate is not None else "#" if self.remembered else "")
        return (f"q|{conf_position}|{_opt(self.trigger)}|{declared}|{_opt(self.cap)}"
                f"|{_opt(self.unlimited_as)}|{computed}|{rate}|{self.key or ''}")

    def as_header(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if v not in (None, False)}

    @classmethod
    def from_header(cls, data: dict[str, Any]) -> LimitSpec:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


#: Slots whose line is fair between keys (docs/protocol.md section 4.1): the shared ones.
FAIR_KINDS = frozenset({"total", "env"})


@dataclass(frozen=True)
class Place:
    """Where a run goes when it parks in a line: after every run of higher ``priority``;
    in a fair line at its key's next turn (``weight`` turns a round), else by ``order_ms``
    (its first deferral). ``weight`` is the one declared in code; a weight recorded in the
    queue's conf (``weight_conf``) goes first. ``kept``: it keeps a unit of an earlier slot
    (only ClusterStore, which parks slot by slot, says so; acquire.lua knows otherwise).
    ``replace``: see ``replace``."""

    order_ms: int = 0
    priority: int = 0
    key: str = ""
    weight: Optional[int] = None
    weight_conf: Optional[str] = None
    kept: bool = False
    #: keep_latest: blocked on its own (first) slot, it replaces the runs of its task waiting
    #: there
    replace: bool = False

    def lua(self, fair: str, conf_position: int) -> str:
        """As acquire.lua reads it (ARGV 8)."""
        return (f"{max(0, self.order_ms)}|{self.priority}|{int(self.kept)}|{int(self.replace)}"
                f"|{_opt(self.weight)}|{conf_position}|{fair}|{self.key}")


def _opt(value: Optional[int]) -> str:
    return "" if value is None else str(int(value))


@dataclass(frozen=True)
class Slot:
    """One thing a run holds a unit of: the environment, a key, a queue or a partition.

    ``when_unlimited`` makes the slot conditional: it is needed (limit 1) only when slot
    number ``when_unlimited`` (1-based, in the same plan) resolves to no limit of its own.
    """

    tag: str
    kind: str  # "env" | "key" | "queue" | "partition" | "total"
    label: str
    limit: LimitSpec
    #: the tag of the queue whose conf HASH records its limit (queue and partition slots)
    conf_tag: Optional[str] = None
    when_unlimited: Optional[int] = None
    #: not needed: the line a woken copy comes from, which its plan no longer names; only
    #: the unit woken for it there is looked at (and given back)
    home_only: bool = False

    def key(self, role: str) -> str:
        return Names.redis_key(self.tag, role)

    @property
    def fair(self) -> bool:
        return self.kind in FAIR_KINDS

    def lua_spec(self, conf_position: int) -> str:
        if self.home_only:
            return "~"
        if self.when_unlimited is not None:
            return f"?{self.when_unlimited}"
        return self.limit.lua(conf_position)

    def as_header(self) -> dict[str, Any]:
        data: dict[str, Any] = {"tag": self.tag, "kind": self.kind, "label": self.label,
                                "limit": self.limit.as_header()}
        if self.conf_tag is not None:
            data["conf_tag"] = self.conf_tag
        if self.when_unlimited is not None:
            data["when_unlimited"] = self.when_unlimited
        return data

    @classmethod
    def from_header(cls, data: dict[str, Any]) -> Slot:
        return cls(tag=str(data["tag"]), kind=str(data["kind"]), label=str(data["label"]),
                   limit=LimitSpec.from_header(dict(data.get("limit") or {})),
                   conf_tag=data.get("conf_tag"), when_unlimited=data.get("when_unlimited"))
