"""``ConcurrencyQueue``: a named limit that several tasks may share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

from .errors import InvalidConcurrencyQueue
from .validation import check_limit, check_queue_name


@dataclass(frozen=True)
class ConcurrencyQueue:
    """At most ``limit`` runs of this queue execute at once across all workers.

    ``limit=None`` leaves the limit to what Redis already records for the queue
    (set by an earlier trigger or ``celery ckeys limits set``), else to
    ``ckeys_environment_limit``. With a key, ``limit`` applies to each key's partition;
    ``total_limit`` caps the whole queue (every key, and runs without one) as well.
    """

    name: str
    limit: Optional[int] = None
    total_limit: Optional[int] = None

    def __post_init__(self) -> None:
        check_queue_name(self.name)
        if self.limit is not None:
            check_limit(self.limit, what=f"limit of queue {self.name!r}")
        if self.total_limit is not None:
            check_limit(self.total_limit, what=f"total_limit of queue {self.name!r}")


QueueLike = Union[ConcurrencyQueue, str, Mapping[str, Any]]


def coerce_queue(value: Any) -> ConcurrencyQueue:
    """Accept a :class:`ConcurrencyQueue`, a queue name, or ``{"name": ..., "limit": ...,
    "total_limit": ...}``."""
    if isinstance(value, ConcurrencyQueue):
        return value
    if isinstance(value, str):
        return ConcurrencyQueue(value)
    if isinstance(value, Mapping):
        unknown = set(value) - {"name", "limit", "total_limit"}
        if unknown:
            raise InvalidConcurrencyQueue(
                "concurrency_queue accepts the fields 'name', 'limit' and 'total_limit', got"
                f" {sorted(unknown)}", queue=dict(value))
        if "name" not in value:
            raise InvalidConcurrencyQueue("concurrency_queue needs a 'name'", queue=dict(value))
        return ConcurrencyQueue(value["name"], value.get("limit"), value.get("total_limit"))
    raise InvalidConcurrencyQueue(
        "concurrency_queue must be a ConcurrencyQueue, a queue name or"
        f" {{'name': ..., 'limit': ...}}, got {type(value).__name__}: {value!r}", queue=value)
