"""Redis key names for coordination state.

Every name is ``ckeys:{<tag>}:<role>``. The tag is the namespace plus what the state
belongs to (a key, a queue, a partition, the environment), each part percent-encoded
so that no user string can contain ``{``, ``}``, ``|``, ``:`` or a glob character.
That makes the mapping injective (two namespaces, or a key and a queue, can never
share a name) and gives each key or queue its own Redis Cluster hash tag, so that
state spreads across masters instead of piling onto one.
"""

from __future__ import annotations

from typing import NamedTuple, Optional
from urllib.parse import quote, unquote

PREFIX = "ckeys"

# Roles: what each Redis key of a slot holds.
HOLDERS = "h"  # ZSET owner -> lease expiry (ms)
META = "m"  # HASH owner -> holder JSON; "?"+owner -> deferral JSON; "#f" -> last fence
DEFERRED = "d"  # ZSET owner -> last deferral (ms)
RESUMING = "r"  # ZSET owner -> when it asked to resume (ms); these go first
WAITING = "w"  # ZSET owner -> lease expiry of a run blocked in wait_for
PARKED = "p"  # ZSET owner -> first deferral (ms): the handoff line, oldest first
WOKEN = "v"  # ZSET owner -> when it was woken (ms): popped from the line, on its way
MESSAGES = "pm"  # HASH owner -> message JSON of a parked or woken run
CONF = "c"  # HASH "limit" -> recorded limit of a queue
WAKE = "k"  # LIST a releaser pushes to, so a resuming waiter need not poll


def enc(part: str) -> str:
    """Percent-encode everything but ``[A-Za-z0-9_.~-]``: injective and brace-free."""
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
        return self.kind


_KIND_CODES = {"env": "env", "k": "key", "q": "queue", "p": "partition"}


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

    def workers(self) -> str:
        return f"{self.ns}|workers"

    def lines(self) -> str:
        return f"{self.ns}|lines"

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
    if kind == "queue" and len(parts) == 3:
        return Tag(namespace, kind, queue=unquote(parts[2]))
    if kind == "partition" and len(parts) == 4:
        return Tag(namespace, kind, queue=unquote(parts[2]), key=unquote(parts[3]))
    if len(parts) == 2:
        return Tag(namespace, kind)
    return None
