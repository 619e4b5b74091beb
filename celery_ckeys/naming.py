"""Redis key names for coordination state.

Every name is ``ckeys:{<tag>}:<role>``. The tag is the namespace plus what the state
belongs to (a key, a queue, a partition, the environment), each part percent-encoded
so that no user string can contain ``{``, ``}``, ``|``, ``:`` or a glob character.
That makes the mapping injective (two namespaces, or a key and a queue, can never
share a name) and gives each key or queue its own Redis Cluster hash tag, so that
state spreads across masters instead of piling onto one.
"""

from __future__ import annotations

import re
from typing import NamedTuple, Optional
from urllib.parse import quote, unquote

PREFIX = "ckeys"

# Roles: what each Redis key of a slot holds (docs/protocol.md section 3; lua/core.lua
# names them the same way and takes them in the order of SLOT_ROLES).
UNITS = "h"  # STRING (one hold) or ZSET task id -> expiry of its hold or reservation
INFO = "i"  # HASH task id -> hold token or reservation; "#f" last fence; "#l" last limit
LINE = "p"  # ZSET task id -> order: the handoff line
MESSAGES = "m"  # HASH task id -> ticket "\n" message of a parked or woken run
RESUME = "r"  # ZSET task id -> when its child finished: the resume order
WAITING = "w"  # ZSET task id -> lease expiry of a run blocked in wait_for
WAITS = "v"  # HASH task id -> wait token
DEFERRED = "f"  # HASH task id -> countdown deferral record (JSON)
WAKE = "q"  # LIST pushed to when a unit is reserved for a resuming run
STARTS = "s"  # ZSET start -> when (ms): the rate limit's log of the window
CONF = "c"  # HASH "limit" -> recorded limit of a queue
SLOT_ROLES = (UNITS, INFO, LINE, MESSAGES, RESUME, WAITING, WAITS, DEFERRED, WAKE, STARTS)


def memo_role(task_id: str) -> str:
    """The role of the memo ``done:<ticket>`` a ticketed run leaves on a slot when it ends."""
    return f"x:{enc(task_id)}"


_UNRESERVED = re.compile(r"[A-Za-z0-9_.~-]*")


def enc(part: str) -> str:
    """Percent-encode everything but ``[A-Za-z0-9_.~-]``: injective and brace-free."""
    if _UNRESERVED.fullmatch(part):
        return part  # what quote() returns for it, at a fraction of its cost (every run)
    return quote(part, safe="")


class Tag(NamedTuple):
    """A parsed tag: what a slot belongs to."""

    namespace: str
    kind: str  # "env" | "key" | "queue" | "partition" | other bookkeeping kinds
    queue: Optional[str] = None
    key: Optional[str] = None

    @property
    def label(self) -> str:
        if self.kind == "env":
            return "(environment)"
        if self.kind == "key":
            return f"key {self.key}"
        if self.kind == "queue":
            return f"queue {self.queue}"
        if self.kind == "partition":
            return f"queue {self.queue} [{self.key}]"
        if self.kind == "total":
            return f"queue {self.queue} (total)"
        return self.kind


_KIND_CODES = {"env": "env", "k": "key", "q": "queue", "p": "partition", "t": "total"}


class Names:
    """All Redis key names of one namespace."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.ns = enc(namespace)

    # -- tags -----------------------------------------------------------------
    def env(self) -> str:
        return f"{self.ns}|env"

    def key(self, key: str) -> str:
        return f"{self.ns}|k|{enc(key)}"

    def queue(self, queue: str) -> str:
        return f"{self.ns}|q|{enc(queue)}"

    def partition(self, queue: str, key: str) -> str:
        return f"{self.ns}|p|{enc(queue)}|{enc(key)}"

    def total(self, queue: str) -> str:
        """The whole of a queue with a ``total_limit``: every partition and keyless run."""
        return f"{self.ns}|t|{enc(queue)}"

    def workers(self) -> str:
        return f"{self.ns}|workers"

    def lines(self) -> str:
        return f"{self.ns}|lines"

    def index_key(self) -> str:
        """The handoff's sweep index: slot tag -> when it is next due for a sweep."""
        return self.redis_key(self.lines(), "i")

    # -- keys -----------------------------------------------------------------
    @staticmethod
    def redis_key(tag: str, role: str) -> str:
        return f"{PREFIX}:{{{tag}}}:{role}"

    def scan_pattern(self, role: str = "*") -> str:
        return f"{PREFIX}:{{{self.ns}|*}}:{role}"

    def parse(self, redis_key: str) -> Optional[tuple[Tag, str]]:
        """``(tag, role)`` for a key of this namespace, else ``None``."""
        head = f"{PREFIX}:{{"
        if not redis_key.startswith(head):
            return None
        tag, sep, rest = redis_key[len(head):].partition("}:")
        if not sep:
            return None
        parsed = parse_tag(tag)
        if parsed is None or parsed.namespace != self.namespace:
            return None
        return parsed, rest


def parse_tag(tag: str) -> Optional[Tag]:
    parts = tag.split("|")
    if len(parts) < 2:
        return None
    namespace, code = unquote(parts[0]), parts[1]
    kind = _KIND_CODES.get(code, code)
    if kind == "key" and len(parts) == 3:
        return Tag(namespace, kind, key=unquote(parts[2]))
    if kind in ("queue", "total") and len(parts) == 3:
        return Tag(namespace, kind, queue=unquote(parts[2]))
    if kind == "partition" and len(parts) == 4:
        return Tag(namespace, kind, queue=unquote(parts[2]), key=unquote(parts[3]))
    if len(parts) == 2:
        return Tag(namespace, kind)
    return None
